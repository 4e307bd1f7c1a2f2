"""DynamicBatchSampler: batches bounded by total length, drawn from length buckets."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from poolloader.samplers._base import State
from poolloader.samplers._bucketing import (
    assign_buckets,
    estimate_bucket_boundaries,
    split_by_bucket,
)
from poolloader.samplers._checks import (
    LengthsLike,
    as_lengths,
    check_optional_positive_int,
    check_positive_int,
    check_positive_number,
)
from poolloader.samplers._constraint import BatchConstraint, Cost
from poolloader.samplers._walk import ITEM_STREAM, Group, GroupedSampler, pass_seed

__all__ = ["DynamicBatchSampler"]


class DynamicBatchSampler(GroupedSampler):
    """Batches whose cost stays within ``max_duration``, each drawn from one length bucket.

    Items are split into ``num_buckets`` buckets of about equal total length (boundaries
    estimated from ``lengths``), so a batch holds items of similar length and little is
    padded. Each epoch, items are shuffled within their bucket and batches are cut lazily:
    every step draws a bucket at random (weighted by the batches it still holds) and takes
    from it the longest run of items that fits the limits in effect. An item longer than
    ``max_duration`` is yielded as a batch of its own (and a warning names how many there
    are when the sampler is built): one long outlier should cost one small batch, not
    crash a run hours in. Filter such items out beforehand if they must never appear.

    ``drop_last=True`` drops, in each bucket and epoch, the final batch if it is not full:
    one that ran out of items while it could still have taken one more item as long as its
    longest.

    Sharding: every rank walks the same global order of ``B`` batches and, in each round of
    ``world_size`` (``W``) consecutive batches, keeps the one at its rank. Rank ``r``'s
    ``k``-th batch is global batch ``(k * W + r) mod B``, for ``k`` in ``range(n)`` with
    ``n = ceil(B / W)``, or ``n = B // W`` with ``drop_last`` (the last, incomplete round
    dropped). So every rank yields exactly ``n`` batches, the ranks' batches are disjoint
    except the padding of the last round (the epoch's first batches again), and together
    they cover every item not dropped. ``len()`` is ``n``.

    Assigning ``max_duration`` or ``max_batch_size`` takes effect from the next batch drawn
    (with several ranks, the next round; make the same change on every rank at the same
    step); ``len()`` then counts the epoch under the new limits (see
    ``SamplerBase.__len__``). A DataLoader with workers has drawn ``prefetch_factor *
    num_workers`` batches ahead of the loop, so the change shows that many batches later,
    at the same batch on every rank (see ``SamplerBase.paced``); the loader's
    ``state_dict()`` carries the new limits.

    Args:
        lengths: One non-negative length per item (sequence, NumPy array or tensor).
        max_duration: Most cost one batch may have, in the units of ``lengths``.
        max_batch_size: Most items one batch may hold, or ``None`` for no count limit.
        num_buckets: Buckets to estimate; fewer result when lengths repeat. ``1`` turns
            bucketing off (random batches bounded by the limits).
        cost: ``"sum"`` of lengths, or ``"padded"``: batch size x longest item.
        shuffle: Shuffle items within buckets and the batch order each epoch; otherwise
            buckets are taken shortest first, items in index order.
        seed: Base seed; epoch ``e`` is shuffled with ``seed + e``.
        drop_last: See above.
        rank: This process's rank. ``None``: the environment variable ``RANK``, else
            ``torch.distributed.get_rank()`` if a process group is initialised, else 0.
        world_size: Number of ranks. ``None``: ``WORLD_SIZE``, else
            ``torch.distributed.get_world_size()``, else 1.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range; the message says which and how to fix it.

    Example:
        >>> sampler = DynamicBatchSampler([1.0, 2.0, 3.0, 4.0], max_duration=5.0, seed=1)
        >>> sorted(i for batch in sampler for i in batch)
        [0, 1, 2, 3]
    """

    _LIMIT_KEYS = ("max_duration", "max_batch_size")

    def __init__(
        self,
        lengths: LengthsLike,
        *,
        max_duration: float,
        max_batch_size: int | None = None,
        num_buckets: int = 10,
        cost: Cost = "sum",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        values = as_lengths(lengths)
        constraint = BatchConstraint(
            max_duration=_check_max_duration("max_duration", max_duration),
            max_batch_size=max_batch_size,
            cost=cost,
        )
        buckets = check_positive_int("num_buckets", num_buckets)
        super().__init__(
            values,
            constraint,
            shuffle=shuffle,
            drop_last=drop_last,
            batches_per_epoch=None,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self._boundaries = estimate_bucket_boundaries(values, buckets)
        self._bucket_of = assign_buckets(values, self._boundaries)
        self._cached: tuple[int, list[Group]] | None = None
        _warn_oversized(values, constraint.max_duration or 0.0)

    @property
    def max_duration(self) -> float:
        """Most cost one batch may have; assigning it applies from the next batch."""
        return float(self._constraint.max_duration or 0.0)

    @max_duration.setter
    def max_duration(self, value: float) -> None:
        limit = _check_max_duration("max_duration", value)
        self._constraint = self._constraint.replace(max_duration=limit)

    @property
    def max_batch_size(self) -> int | None:
        """Most items one batch may hold (``None``: no limit); applies from the next batch."""
        return self._constraint.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int | None) -> None:
        size = check_optional_positive_int("max_batch_size", value)
        self._constraint = self._constraint.replace(max_batch_size=size)

    @property
    def cost(self) -> Cost:
        """How a batch's cost is measured: ``"sum"`` or ``"padded"``."""
        return self._constraint.cost

    @property
    def boundaries(self) -> list[float]:
        """The estimated bucket boundaries (bucket ``b`` holds ``[b-1] <= length < [b]``)."""
        return self._boundaries.tolist()

    @property
    def num_buckets(self) -> int:
        """The number of buckets in use (at most the ``num_buckets`` asked for)."""
        return int(self._boundaries.size) + 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_items={self.num_items}, "
            f"max_duration={self.max_duration}, max_batch_size={self.max_batch_size}, "
            f"num_buckets={self.num_buckets}, cost={self.cost!r}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )

    def _groups(self, pass_index: int) -> list[Group]:
        if self._cached is None or self._cached[0] != pass_index:
            self._cached = (pass_index, self._make_groups(pass_index))
        return self._cached[1]

    def _make_groups(self, pass_index: int) -> list[Group]:
        count = self.num_items
        if self._shuffle:
            bits = np.random.PCG64(pass_seed(self._seed, pass_index, ITEM_STREAM))
            order = np.random.Generator(bits).permutation(count)
        else:
            order = np.arange(count, dtype=np.int64)
        parts = split_by_bucket(order, self._bucket_of, self.num_buckets)
        return [Group.of(items, self._lengths) for items in parts]

    def _limit_state(self) -> State:
        return {"max_duration": self.max_duration, "max_batch_size": self.max_batch_size}

    def _parse_limits(self, state: Mapping[str, Any]) -> BatchConstraint:
        return self._constraint.replace(
            max_duration=_check_max_duration("state['max_duration']", state["max_duration"]),
            max_batch_size=check_optional_positive_int(
                "state['max_batch_size']", state["max_batch_size"]
            ),
        )


def _check_max_duration(name: str, value: object) -> float:
    return check_positive_number(
        name, value, "pass the most total length one batch may hold, in the units of lengths"
    )


def _warn_oversized(lengths: np.ndarray[Any, np.dtype[np.float64]], max_duration: float) -> None:
    oversized = int(np.count_nonzero(lengths > max_duration))
    if oversized:
        warnings.warn(
            f"{oversized} of {lengths.size} items are longer than max_duration={max_duration}; "
            "each will be yielded as a batch of its own. Raise max_duration or filter those "
            "items out if that is not what you want",
            stacklevel=3,
        )
