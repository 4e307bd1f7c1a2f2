"""Bucketing maths: equal-mass length boundaries and grouping an item order by bucket.

Pure functions of arrays, tested alone. A bucket ``b`` holds the items whose length ``x``
satisfies ``boundaries[b - 1] <= x < boundaries[b]`` (open-ended at both extremes).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["assign_buckets", "estimate_bucket_boundaries", "split_by_bucket"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def estimate_bucket_boundaries(lengths: FloatArray, num_buckets: int) -> FloatArray:
    """Boundaries that split ``lengths`` into buckets of about equal total length (mass).

    The sorted lengths are cut where their running mass comes nearest to ``k / num_buckets``
    of the total, and boundary ``k`` is the length of the first item after cut ``k``. With
    distinct lengths each bucket's mass is therefore within one item's length of
    ``total / num_buckets``; repeated lengths stay together, which can merge buckets.

    Args:
        lengths: Non-negative item lengths.
        num_buckets: Buckets wanted, ``>= 1``.

    Returns:
        Strictly increasing boundaries, at most ``num_buckets - 1`` of them, every one above
        the shortest length, so that no bucket is empty. Fewer come back when lengths repeat
        or all are zero.

    Example:
        >>> estimate_bucket_boundaries(np.array([1.0, 1.0, 2.0, 4.0]), 2).tolist()
        [4.0]
    """
    ordered = np.sort(lengths)
    before = np.concatenate(([0.0], np.cumsum(ordered)))  # mass of the first j items
    total = before[-1]
    if num_buckets <= 1 or total <= 0:
        return np.empty(0, dtype=np.float64)
    targets = total * np.arange(1, num_buckets, dtype=np.float64) / num_buckets
    above = np.searchsorted(before, targets, side="left")  # first cut reaching the target
    nearer = before[above] - targets <= targets - before[above - 1]
    cuts = np.where(nearer, above, above - 1)
    boundaries = np.unique(ordered[cuts[cuts < ordered.size]])
    return boundaries[boundaries > ordered[0]]


def assign_buckets(lengths: FloatArray, boundaries: FloatArray) -> IntArray:
    """The bucket index of each item: ``b`` where ``boundaries[b-1] <= x < boundaries[b]``."""
    return np.searchsorted(boundaries, lengths, side="right").astype(np.int64)


def split_by_bucket(order: IntArray, bucket_of: IntArray, num_buckets: int) -> list[IntArray]:
    """Split an item order into one sub-order per bucket, keeping the relative order.

    Args:
        order: Item indices in the order to keep.
        bucket_of: Bucket index of every item (indexed by item).
        num_buckets: Number of buckets; empty ones come back as empty arrays.

    Returns:
        ``num_buckets`` arrays; array ``b`` holds the items of ``order`` in bucket ``b``.
    """
    buckets = bucket_of[order]
    grouped = order[np.argsort(buckets, kind="stable")]
    counts = np.bincount(buckets, minlength=num_buckets)
    return np.split(grouped, np.cumsum(counts)[:-1])
