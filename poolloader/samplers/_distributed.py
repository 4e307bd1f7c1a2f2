"""Rank resolution and the sharding maths every poolloader sampler shares.

Everything here is a pure function of its arguments (rank resolution also reads the
environment and ``torch.distributed``), so it is tested alone and reused by every sampler,
the stream sampler included.

The sharding formula, for ``B`` batches in an epoch's global order and ``W`` ranks::

    per_rank = ceil(B / W)    if not drop_last    (the last round is padded)
    per_rank = B // W         if drop_last        (the last, incomplete round is dropped)
    rank r, step k  ->  global position (k * W + r) mod B,   for k in range(per_rank)

Positions ``>= B`` wrap to the start of the epoch order, so padding repeats the epoch's first
batches. Every rank gets exactly ``per_rank`` batches by construction; the positions of one
round ``k`` are disjoint across ranks, and ranks together cover all ``B`` batches unless
``drop_last`` dropped the ``B mod W`` batches of the last round.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch.distributed

from poolloader.samplers._checks import check_non_negative_int, check_positive_int

__all__ = [
    "batches_per_rank",
    "rank_positions",
    "resolve_rank_world_size",
    "shard_position",
]


def batches_per_rank(num_batches: int, world_size: int, drop_last: bool) -> int:
    """How many batches each rank yields from an epoch of ``num_batches`` global batches.

    Args:
        num_batches: Batches in the epoch's global order (all ranks together).
        world_size: Number of ranks.
        drop_last: Drop the last, incomplete round instead of padding it.

    Returns:
        ``num_batches // world_size`` when ``drop_last``, else ``ceil(num_batches / world_size)``.
    """
    if drop_last:
        return num_batches // world_size
    return math.ceil(num_batches / world_size)


def shard_position(step: int, rank: int, world_size: int, num_batches: int) -> int:
    """The global position of the batch ``rank`` yields at its ``step``-th draw.

    Args:
        step: How many batches this rank yielded before (0 for its first).
        rank: This rank.
        world_size: Number of ranks.
        num_batches: Batches in the epoch's global order; must be positive.

    Returns:
        ``(step * world_size + rank) % num_batches``: a position past the end wraps to the
        start of the epoch order, which is how padding repeats batches.
    """
    return (step * world_size + rank) % num_batches


def rank_positions(num_batches: int, rank: int, world_size: int, drop_last: bool) -> list[int]:
    """Every global position ``rank`` yields in an epoch of ``num_batches`` batches, in order.

    Args:
        num_batches: Batches in the epoch's global order.
        rank: This rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
        drop_last: Drop the last, incomplete round instead of padding it.

    Returns:
        The positions, ``batches_per_rank(num_batches, world_size, drop_last)`` of them.

    Example:
        >>> rank_positions(5, 1, 2, drop_last=False)
        [1, 3, 0]
        >>> rank_positions(5, 1, 2, drop_last=True)
        [1, 3]
    """
    count = batches_per_rank(num_batches, world_size, drop_last)
    return [shard_position(step, rank, world_size, num_batches) for step in range(count)]


def resolve_rank_world_size(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int]:
    """Resolve this process's rank and the world size.

    Each of the two is resolved on its own, taking the first of:

    1. the explicit argument, when not ``None``;
    2. the environment variable ``RANK`` / ``WORLD_SIZE`` (set by ``torchrun``);
    3. ``torch.distributed.get_rank()`` / ``get_world_size()``, when ``torch.distributed``
       is available and its default process group is initialised;
    4. ``0`` / ``1``.

    Args:
        rank: Explicit rank, or ``None`` to resolve it.
        world_size: Explicit world size, or ``None`` to resolve it.

    Returns:
        ``(rank, world_size)`` with ``0 <= rank < world_size``.

    Raises:
        TypeError: An explicit value is not an integer.
        ValueError: A value is out of range or an environment variable is not an integer;
            the message names where each value came from.
    """
    size, size_source = _resolve_one("world_size", world_size, "WORLD_SIZE", _dist_world_size, 1)
    check_positive_int("world_size", size, _source_hint("world_size", size_source))
    resolved, rank_source = _resolve_one("rank", rank, "RANK", _dist_rank, 0)
    check_non_negative_int("rank", resolved, _source_hint("rank", rank_source))
    if resolved >= size:
        raise ValueError(
            f"Invalid rank {resolved}, rank should be in the interval [0, {size - 1}] "
            f"(rank from {rank_source}, world_size from {size_source}); pass matching "
            "rank and world_size, or fix the environment that set them"
        )
    return resolved, size


def _resolve_one(
    name: str,
    explicit: int | None,
    env_var: str,
    from_dist: Callable[[], int],
    default: int,
) -> tuple[int, str]:
    """One value and a phrase naming its source, in the documented order."""
    if explicit is not None:
        return explicit, "the argument"
    raw = os.environ.get(env_var)
    if raw is not None:
        return _parse_env(name, env_var, raw), f"the environment variable {env_var}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return from_dist(), "torch.distributed"
    return default, "the default"


def _source_hint(name: str, source: str) -> str:
    """How to fix a bad value, naming where it came from."""
    if source == "the argument":
        return f"pass a valid {name}"
    return f"it came from {source}; pass {name}= explicitly or fix that source"


def _parse_env(name: str, env_var: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{name} comes from the environment variable {env_var}, which should hold an "
            f"integer, but got {env_var}={raw!r}; unset it or pass {name}= explicitly"
        ) from None


def _dist_rank() -> int:
    return int(torch.distributed.get_rank())


def _dist_world_size() -> int:
    return int(torch.distributed.get_world_size())
