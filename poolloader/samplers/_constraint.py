"""The batch limit, kept apart from iteration (lhotse's ``SamplingConstraint`` idea).

A :class:`BatchConstraint` only answers questions about lengths: does this batch fit, how
many of these items fit, is this batch full. :func:`cut_batch` and :func:`next_batch_end`
turn those answers into the greedy cut a sampler takes from an item order. Samplers read
their constraint afresh for every batch, so replacing it (``sampler.max_duration = x``)
takes effect from the next batch drawn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from poolloader.samplers._checks import check_optional_positive_int, check_positive_number

__all__ = ["COST_KINDS", "FIRST_WINDOW", "BatchConstraint", "cut_batch", "next_batch_end"]

Cost = Literal["sum", "padded"]

#: The ways a batch's cost is measured: "sum" adds the lengths (total audio per batch);
#: "padded" is batch size x longest item (what a padded tensor really holds).
COST_KINDS: tuple[Cost, ...] = ("sum", "padded")

#: Items the first look-ahead window holds when no ``max_batch_size`` bounds a batch. The
#: cut doubles the window until it finds the first item that does not fit: a larger first
#: window wastes vector work on batches of few long items, a smaller one costs more
#: doublings (one NumPy pass each) on batches of many short items.
FIRST_WINDOW = 64

FloatArray = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class BatchConstraint:
    """Decides whether items fit in one batch.

    A batch fits when its cost is at most ``max_duration`` and it holds at most
    ``max_batch_size`` items (each limit applies when not ``None``). An item longer than
    ``max_duration`` never fits with others; samplers yield it as a batch of its own rather
    than fail hours into a run, so one long outlier costs one small batch.

    Args:
        max_duration: Most cost one batch may have, in the units of the lengths.
        max_batch_size: Most items one batch may hold.
        cost: ``"sum"`` (sum of lengths) or ``"padded"`` (batch size x longest item).

    Raises:
        TypeError: A limit has the wrong type.
        ValueError: A limit is not positive, no limit is set, or ``cost`` is unknown.

    Example:
        >>> BatchConstraint(max_duration=10.0).fits([3.0, 4.0])
        True
        >>> BatchConstraint(max_duration=10.0, cost="padded").fits([3.0, 4.0, 4.0])
        False
    """

    max_duration: float | None = None
    max_batch_size: int | None = None
    cost: Cost = "sum"

    def __post_init__(self) -> None:
        if self.max_duration is not None:
            object.__setattr__(
                self, "max_duration", check_positive_number("max_duration", self.max_duration)
            )
        object.__setattr__(
            self,
            "max_batch_size",
            check_optional_positive_int("max_batch_size", self.max_batch_size),
        )
        if self.cost not in COST_KINDS:
            raise ValueError(f"cost should be 'sum' or 'padded', but got cost={self.cost!r}")
        if self.max_duration is None and self.max_batch_size is None:
            raise ValueError(
                "a BatchConstraint needs at least one limit, but got max_duration=None and "
                "max_batch_size=None; set either or both"
            )

    def replace(self, **changes: object) -> BatchConstraint:
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def prefix_costs(self, lengths: FloatArray) -> FloatArray:
        """The cost of each prefix ``lengths[:1], lengths[:2], ...`` taken as a batch."""
        if self.cost == "sum":
            return np.cumsum(lengths)
        counts = np.arange(1, lengths.size + 1, dtype=np.float64)
        return counts * np.maximum.accumulate(lengths)

    def count_fitting(self, lengths: FloatArray) -> int:
        """How many leading items of ``lengths`` fit in one batch (possibly 0).

        Prefix costs never decrease (lengths are non-negative), so the items that fit are
        exactly a leading run.
        """
        count = lengths.size
        if self.max_batch_size is not None:
            count = min(count, self.max_batch_size)
        if self.max_duration is None or count == 0:
            return count
        costs = self.prefix_costs(lengths[:count])
        return int(np.count_nonzero(costs <= self.max_duration))

    def fits(self, lengths: Sequence[float] | FloatArray) -> bool:
        """Whether all of ``lengths`` fit together in one batch."""
        values = np.asarray(lengths, dtype=np.float64)
        return self.count_fitting(values) == values.size

    def is_full(self, lengths: Sequence[float] | FloatArray) -> bool:
        """Whether the batch could not take one more item as long as its longest.

        This is what ``drop_last`` asks of a bucket's final batch: a batch that ran out of
        items before reaching a limit is incomplete.
        """
        values = np.asarray(lengths, dtype=np.float64)
        if values.size == 0:
            return False
        return not self.fits(np.append(values, values.max()))

    def estimated_batches(self, counts: npt.NDArray[np.int64], masses: FloatArray) -> FloatArray:
        """A rough batch count for groups of ``counts`` items and total length ``masses``.

        Used only to weight which group a shuffled sampler draws from next, so that groups
        run out at about the same time. At least 1 for a non-empty group, 0 for an empty one.
        """
        estimate = np.zeros(counts.shape, dtype=np.float64)
        if self.max_batch_size is not None:
            estimate = np.maximum(estimate, counts / self.max_batch_size)
        if self.max_duration is not None:
            estimate = np.maximum(estimate, masses / self.max_duration)
        return np.where(counts > 0, np.maximum(estimate, 1.0), 0.0)


def cut_batch(lengths: FloatArray, start: int, constraint: BatchConstraint) -> int:
    """Where the greedy batch that starts at ``start`` ends.

    Args:
        lengths: An item order's lengths.
        start: First item of the batch, ``0 <= start < len(lengths)``.
        constraint: The limit in effect.

    Returns:
        ``stop`` such that ``lengths[start:stop]`` is the longest run from ``start`` that
        fits, and at least one item (an oversized item is a batch of its own).
    """
    end = lengths.size
    limit = constraint.max_batch_size
    window = limit + 1 if limit is not None else FIRST_WINDOW
    while True:
        stop = min(end, start + window)
        count = constraint.count_fitting(lengths[start:stop])
        if count < stop - start or stop == end:
            return start + max(count, 1)
        window *= 2


def next_batch_end(
    lengths: FloatArray, start: int, constraint: BatchConstraint, drop_last: bool
) -> tuple[int, bool]:
    """The greedy cut from ``start``, and whether to keep the batch.

    With ``drop_last``, a batch that reaches the end of ``lengths`` without being full (see
    :meth:`BatchConstraint.is_full`) is dropped.

    Returns:
        ``(stop, keep)``: the batch is ``lengths[start:stop]``; the items are consumed
        either way.
    """
    stop = cut_batch(lengths, start, constraint)
    incomplete = stop == lengths.size and not constraint.is_full(lengths[start:stop])
    return stop, not (drop_last and incomplete)
