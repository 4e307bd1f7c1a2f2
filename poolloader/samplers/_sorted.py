"""SortedBatchSampler: SpeeChain's batching view of length-sorted items."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from poolloader.samplers._base import State
from poolloader.samplers._checks import (
    LengthsLike,
    as_lengths,
    check_optional_positive_int,
    check_positive_number,
)
from poolloader.samplers._constraint import BatchConstraint, cut_batch
from poolloader.samplers._walk import Group, GroupedSampler

__all__ = ["SHUFFLE_SEGMENTS", "SortedBatchSampler", "batch_starts", "sorted_order"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Runs the sorted order is split into when ``shuffle=True``; each step takes the next batch
#: of a run drawn at random. More runs bring the batch order closer to a full shuffle of
#: batches; each costs one int in ``state_dict()`` and, after a mid-epoch limit increase,
#: at most one short batch where the run ends. With 64 runs, two consecutive batches come
#: from neighbouring lengths by chance about once in 64 steps.
SHUFFLE_SEGMENTS = 64


def sorted_order(lengths: FloatArray, descending: bool | None) -> IntArray:
    """Item indices by length (ties by index); ``descending=None`` keeps the given order."""
    if descending is None:
        return np.arange(lengths.size, dtype=np.int64)
    keys = -lengths if descending else lengths
    return np.argsort(keys, kind="stable").astype(np.int64)


def batch_starts(lengths: FloatArray, constraint: BatchConstraint) -> list[int]:
    """Where each greedy batch of ``lengths`` (in this order) starts."""
    starts: list[int] = []
    position = 0
    while position < lengths.size:
        starts.append(position)
        position = cut_batch(lengths, position, constraint)
    return starts


def _split_runs(
    order: IntArray, lengths: FloatArray, constraint: BatchConstraint, runs: int
) -> list[Group]:
    """Split ``order`` into at most ``runs`` runs, each starting where a batch starts."""
    starts = batch_starts(lengths[order], constraint)
    count = min(runs, len(starts))
    edges = [starts[(run * len(starts)) // count] for run in range(count)] + [order.size]
    return [Group.of(order[a:b], lengths) for a, b in itertools.pairwise(edges)]


class SortedBatchSampler(GroupedSampler):
    """SpeeChain's batching view: length-sorted items cut into batches, batch order shuffled.

    Items are sorted by length (``descending=True`` puts the longest first, ``False`` the
    shortest, ``None`` keeps the given order) and cut into batches of ``batch_size`` items
    or, with ``max_duration``, of at most that total length (give exactly one; an item
    longer than ``max_duration`` is a batch of its own). The batches are the same every
    epoch while the limits stay put.

    With ``shuffle=True`` the batch order is shuffled each epoch with ``seed + epoch``: the
    sorted order is split, at batch boundaries, into up to ``SHUFFLE_SEGMENTS`` runs, and
    each step takes the next batch of a run drawn at random (weighted by the batches it
    still holds). This is not a uniform permutation of the batches: within a run, batches
    keep their sorted order (what keeps ``state_dict()`` small and lets limits change
    mid-epoch). Without shuffling, batches come in sorted order.

    ``batches_per_epoch`` fixes the batches per rank and epoch, as SpeeChain's does: the
    passes over the data follow one another as one stream (pass ``p`` shuffled with
    ``seed + p``) and epoch ``e`` takes the ``batches_per_epoch * world_size`` batches of
    the stream that start at ``e * batches_per_epoch * world_size``. A smaller value clips
    an epoch and the next one carries on where it stopped; a larger one repeats batches
    from the next pass. Over any run of epochs every batch comes once per pass; with
    ``shuffle=True`` an epoch between one and two passes long may hold a batch twice and
    leave another to the next epoch (the end of one shuffled pass and the start of the
    next). Which batches an epoch holds depends only on ``seed`` and ``e`` (not on the
    epochs run before), computed with the limits in effect when it starts.

    Sharding, with ``W = world_size`` and ``B`` batches in the epoch's global order: rank
    ``r``'s ``k``-th batch is global batch ``(k * W + r) mod B``. Without
    ``batches_per_epoch`` an epoch is one pass and ``k`` runs over ``range(ceil(B / W))``,
    the last round padded with the epoch's first batches; with it, ``B`` is
    ``batches_per_epoch * W`` and ``k`` over ``range(batches_per_epoch)``. Every rank
    yields the same number of batches (``len()``); the ranks take disjoint positions that
    together cover the epoch, so items repeat across ranks only where the global order
    repeats batches (the padding, or a ``batches_per_epoch`` longer than a pass).

    Assigning ``batch_size`` or ``max_duration`` takes effect from the next batch drawn
    (with several ranks, the next round; a DataLoader with workers has drawn
    ``prefetch_factor * num_workers`` ahead, see ``SamplerBase.paced``); either may then be
    ``None`` as long as one is set.
    Without ``batches_per_epoch``, ``len()`` then counts the epoch under the new limits.

    Args:
        lengths: One non-negative length per item (sequence, NumPy array or tensor).
        batch_size: Items per batch.
        max_duration: Most total length per batch, in the units of ``lengths``.
        descending: Sort direction, or ``None`` for no sorting.
        shuffle: Shuffle the batch order each epoch.
        seed: Base seed.
        batches_per_epoch: Batches per rank and epoch, or ``None`` for one pass.
        rank: This process's rank. ``None``: the environment variable ``RANK``, else
            ``torch.distributed.get_rank()`` if a process group is initialised, else 0.
        world_size: Number of ranks. ``None``: ``WORLD_SIZE``, else
            ``torch.distributed.get_world_size()``, else 1.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range, or not exactly one of ``batch_size`` and
            ``max_duration`` is given.

    Example:
        >>> sampler = SortedBatchSampler([3.0, 1.0, 2.0, 4.0], batch_size=2, shuffle=False)
        >>> list(sampler)
        [[3, 0], [2, 1]]
    """

    _LIMIT_KEYS = ("batch_size", "max_duration")

    def __init__(
        self,
        lengths: LengthsLike,
        *,
        batch_size: int | None = None,
        max_duration: float | None = None,
        descending: bool | None = True,
        shuffle: bool = True,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        values = as_lengths(lengths)
        constraint = _initial_constraint(batch_size, max_duration)
        if descending not in (True, False, None):
            raise ValueError(
                f"descending should be True, False or None, but got descending={descending!r}"
            )
        super().__init__(
            values,
            constraint,
            shuffle=shuffle,
            drop_last=False,
            batches_per_epoch=batches_per_epoch,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self._descending = descending
        runs = SHUFFLE_SEGMENTS if self._shuffle else 1
        self._runs = _split_runs(sorted_order(values, descending), values, constraint, runs)

    @property
    def batch_size(self) -> int | None:
        """Items per batch (``None``: bounded by ``max_duration`` only)."""
        return self._constraint.max_batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._constraint = _constraint(value, self._constraint.max_duration)

    @property
    def max_duration(self) -> float | None:
        """Most total length per batch (``None``: bounded by ``batch_size`` only)."""
        return self._constraint.max_duration

    @max_duration.setter
    def max_duration(self, value: float | None) -> None:
        self._constraint = _constraint(self._constraint.max_batch_size, value)

    @property
    def descending(self) -> bool | None:
        """Sort direction (``None``: the given order)."""
        return self._descending

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_items={self.num_items}, batch_size={self.batch_size}, "
            f"max_duration={self.max_duration}, descending={self.descending}, "
            f"shuffle={self.shuffle}, seed={self.seed}, "
            f"batches_per_epoch={self.batches_per_epoch}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )

    def _groups(self, pass_index: int) -> list[Group]:
        return self._runs

    def _first_pass(self, epoch: int) -> tuple[int, int]:
        if self._batches_per_epoch is None:
            return epoch, 0
        per_pass = self._walk(0).count_remaining(self._constraint)
        start = epoch * self._batches_per_epoch * self._world_size
        return divmod(start, per_pass)

    def _limit_state(self) -> State:
        return {"batch_size": self.batch_size, "max_duration": self.max_duration}

    def _parse_limits(self, state: Mapping[str, Any]) -> BatchConstraint:
        return _constraint(
            state["batch_size"],
            state["max_duration"],
            names=("state['batch_size']", "state['max_duration']"),
        )


def _initial_constraint(batch_size: object, max_duration: object) -> BatchConstraint:
    """The constructor's limits: exactly one of the two, as SpeeChain asks."""
    if (batch_size is None) == (max_duration is None):
        raise ValueError(
            "SortedBatchSampler needs exactly one of batch_size and max_duration, but got "
            f"batch_size={batch_size!r} and max_duration={max_duration!r}; pass "
            "batch_size for a fixed number of items per batch, or max_duration"
        )
    return _constraint(batch_size, max_duration)


def _constraint(
    batch_size: object,
    max_duration: object,
    names: tuple[str, str] = ("batch_size", "max_duration"),
) -> BatchConstraint:
    """The constraint for the sorted sampler's limits; messages use ``names``."""
    size = check_optional_positive_int(names[0], batch_size)
    duration = None
    if max_duration is not None:
        duration = check_positive_number(names[1], max_duration)
    if size is None and duration is None:
        raise ValueError(
            "SortedBatchSampler needs batch_size or max_duration, but both would be None; "
            "set one before clearing the other"
        )
    return BatchConstraint(max_duration=duration, max_batch_size=size)
