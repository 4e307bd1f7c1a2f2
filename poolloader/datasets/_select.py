"""Data selection: keep part of a dataset by position, at random, or by metadata.

The modes and the meaning of ``num`` follow SpeeChain's data selection:

========== ==================================================================
mode       keeps
========== ==================================================================
order      the first ``num`` items
rev_order  the last ``num`` items
random     ``num`` items drawn without replacement, seeded by ``seed``
min        the ``num`` items with the smallest metadata, or those <= a threshold
max        the ``num`` items with the largest metadata, or those >= a threshold
middle     ``num`` items around the median: the largest and smallest removed
========== ==================================================================

``num`` is one of:

* a float in (0, 1): the ratio of the items to keep, ``int(len * num)`` of them;
* a negative integer ``-k``: keep ``k`` items (SpeeChain's spelling of a count:
  the absolute value is taken; it does *not* mean "remove k"). A positive integer
  is refused, as SpeeChain refuses it, so that ``1`` is never read as "all";
* a string holding a number, for ``min`` and ``max`` only: the metadata threshold,
  inclusive (``min`` keeps values ``<=`` it, ``max`` values ``>=`` it).

The kept items stay in their original order whatever the mode. ``middle`` with
``k`` of ``n`` items removes ``(n - k) // 2`` smallest and the rest of the
surplus largest, so exactly ``k`` remain. ``random`` uses
``numpy.random.default_rng(seed)``, independent of any global state, so every
rank of a distributed job that passes the same seed keeps the same items.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, overload

import numpy as np

from ._manifest import PathOrPaths, describe_ids, read_numbers, to_number

ORDER_MODES = ("order", "rev_order", "random")
"""Modes that select by position and take no metadata."""

META_MODES = ("min", "max", "middle")
"""Modes that select by a number per item (a duration, a length, a score)."""

Num = float | int | str
"""How many to keep: a ratio in (0, 1), a count ``-k``, or a threshold string."""

Meta = PathOrPaths | Mapping[str, float] | None
"""Metadata for the meta modes: ``id value`` file(s) such as ``utt2dur``, or a mapping."""


class Selectable(Protocol):
    """What :func:`select` needs of a dataset: its ids and a way to restrict it."""

    @property
    def ids(self) -> Sequence[str]:
        """The ids, in position order."""
        ...

    def subset(self, keys: Sequence[str]) -> Any:
        """Return the dataset restricted to ``keys``, in that order."""
        ...


DatasetT = TypeVar("DatasetT", bound=Selectable)


@overload
def select(
    ids_or_dataset: DatasetT, mode: str, num: Num, meta: Meta = None, seed: int = 0
) -> DatasetT: ...


@overload
def select(
    ids_or_dataset: Iterable[str], mode: str, num: Num, meta: Meta = None, seed: int = 0
) -> list[str]: ...


def select(ids_or_dataset: Any, mode: str, num: Num, meta: Meta = None, seed: int = 0) -> Any:
    """Keep part of a dataset (or of a list of ids) the way SpeeChain's data selection does.

    See the module docstring of ``poolloader.datasets._select`` for the table of modes.

    Args:
        ids_or_dataset: a list of ids, or a dataset with ``ids`` and ``subset(ids)``
            (such as :class:`~poolloader.datasets.ManifestDataset`).
        mode: ``"order"``, ``"rev_order"``, ``"random"``, ``"min"``, ``"max"`` or ``"middle"``.
        num: a ratio in (0, 1); a negative count ``-k``, keeping ``k`` items (SpeeChain's
            form: a positive integer is refused); or, for ``min``/``max``, a threshold
            string such as ``"15.0"`` (inclusive).
        meta: for the meta modes, the number of each id: a Kaldi-style ``id value``
            file (``utt2dur``, ``utt2num_samples``), a list of them, or a mapping. With a
            dataset and no ``meta``, its ``lengths`` are used.
        seed: the seed of ``random``; the same seed keeps the same items on every rank.

    Returns:
        The kept ids in their original order, or, given a dataset, the dataset
        restricted to them.

    Raises:
        ValueError: an unknown mode; ``num`` out of range or of a form the mode does not
            take; no metadata for a meta mode, or metadata missing some ids; nothing kept.
        TypeError: ``num`` or ``ids_or_dataset`` of the wrong type.

    Example:
        >>> select(["a", "b", "c", "d"], "rev_order", -2)
        ['c', 'd']
        >>> select(["a", "b", "c", "d"], "min", "2.5", meta={"a": 3, "b": 1, "c": 2, "d": 4})
        ['b', 'c']
    """
    ids = _ids_of(ids_or_dataset)
    values = _meta_values(ids_or_dataset, ids, mode, meta)
    positions = select_positions(len(ids), mode, num, values, seed=seed)
    chosen = [ids[p] for p in positions]
    return ids_or_dataset.subset(chosen) if _is_dataset(ids_or_dataset) else chosen


@overload
def select_steps(
    ids_or_dataset: DatasetT, steps: Sequence[Sequence[Any]], *, seed: int = 0
) -> DatasetT: ...


@overload
def select_steps(
    ids_or_dataset: Iterable[str], steps: Sequence[Sequence[Any]], *, seed: int = 0
) -> list[str]: ...


def select_steps(ids_or_dataset: Any, steps: Sequence[Sequence[Any]], *, seed: int = 0) -> Any:
    """Apply several selections in sequence, each to what the previous one kept.

    The steps have the shape of SpeeChain's ``data_selection`` list:
    ``(mode, num)`` for ``order``/``rev_order``/``random`` and ``(mode, num, meta)``
    (or ``(mode, num)`` with a dataset that has lengths) for ``min``/``max``/``middle``.

    Args:
        ids_or_dataset: a list of ids, or a dataset with ``ids`` and ``subset(ids)``.
        steps: the selections, applied in order.
        seed: the seed of every ``random`` step.

    Returns:
        What :func:`select` returns for the last step.

    Raises:
        ValueError: a step of the wrong shape, or any error of :func:`select`.

    Example:
        >>> ids = [f"utt{i}" for i in range(10)]
        >>> select_steps(ids, [("order", 0.5), ("rev_order", -2)])
        ['utt3', 'utt4']
    """
    if isinstance(steps, (str, bytes)) or (steps and isinstance(steps[0], str)):
        raise ValueError(
            f"steps should be a list of (mode, num[, meta]) steps, but got {steps!r}; "
            "wrap a single step in a list: [('order', 0.5)]"
        )
    current = ids_or_dataset
    for index, step in enumerate(steps):
        if not isinstance(step, (tuple, list)) or len(step) not in (2, 3):
            raise ValueError(
                f"step {index} should be (mode, num) or (mode, num, meta), but got {step!r}"
            )
        meta = step[2] if len(step) == 3 else None
        current = select(current, step[0], step[1], meta, seed=seed)
    return current


def select_positions(
    size: int, mode: str, num: Num, values: np.ndarray | None = None, *, seed: int = 0
) -> list[int]:
    """Return the positions (ascending) that a selection keeps out of ``size`` items.

    The pure core of :func:`select`; ``values`` holds each position's metadata for
    the meta modes.

    Raises:
        ValueError: see :func:`select`.
    """
    if mode not in ORDER_MODES + META_MODES:
        raise ValueError(
            f"mode should be one of {list(ORDER_MODES + META_MODES)}, but got mode={mode!r}"
        )
    if mode in META_MODES and values is None:
        raise ValueError(f"mode {mode!r} selects by metadata, but no metadata was given")
    if isinstance(num, str):
        chosen = _by_threshold(mode, num, values)
    else:
        chosen = _by_count(mode, _count(num, size), size, values, seed)
    if len(chosen) == 0:
        raise ValueError(
            f"selection mode={mode!r}, num={num!r} keeps none of the {size} items; "
            "ask for more (a larger ratio or count, or a looser threshold)"
        )
    return sorted(int(p) for p in chosen)


def _count(num: Any, size: int) -> int:
    """Turn a ratio or a count into the number of items to keep."""
    if isinstance(num, (bool, np.bool_)) or not isinstance(
        num, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            "num should be a ratio in (0, 1), a negative integer count, or (for 'min' and "
            f"'max') a threshold string, but got {type(num).__name__}: {num!r}"
        )
    if isinstance(num, (float, np.floating)):
        return _ratio_count(float(num), size)
    return _negative_count(int(num), size)


def _ratio_count(num: float, size: int) -> int:
    """The number of items a ratio in (0, 1) keeps: ``int(size * num)``, as SpeeChain."""
    if not 0.0 < num < 1.0:
        raise ValueError(
            f"num={num!r} is a float, which means the ratio of items to keep and must be "
            "in (0, 1); for a count give a negative integer, e.g. num=-100 keeps 100"
        )
    return int(size * num)


def _negative_count(num: int, size: int) -> int:
    """The number of items ``num=-k`` keeps: ``k``; refuse a count that is not negative."""
    if num >= 0:
        example = f"num=-{num} keeps {num} items" if num else "num=-k keeps k items"
        raise ValueError(
            f"num={num!r} is a non-negative integer, but a count is written negative, as in "
            f"SpeeChain ({example}), and a ratio as a float in (0, 1)"
        )
    if -num > size:
        raise ValueError(
            f"num={num!r} asks for {-num} of the {size} items; a count must be between "
            f"-{size} and -1"
        )
    return -num


def _by_count(mode: str, count: int, size: int, values: np.ndarray | None, seed: int) -> np.ndarray:
    """Positions kept by a ratio or count selection."""
    if mode == "order":
        return np.arange(count)
    if mode == "rev_order":
        return np.arange(size - count, size)
    if mode == "random":
        return np.random.default_rng(seed).choice(size, size=count, replace=False)
    values = np.asarray(values, dtype=np.float64)
    if mode == "max":
        return np.argsort(-values, kind="stable")[:count]
    ascending = np.argsort(values, kind="stable")
    low = 0 if mode == "min" else (size - count) // 2
    return ascending[low : low + count]


def _by_threshold(mode: str, num: str, values: np.ndarray | None) -> np.ndarray:
    """Positions kept by a metadata threshold (``min``: at most it, ``max``: at least it)."""
    if mode not in ("min", "max"):
        raise ValueError(
            f"num={num!r} is a threshold, which only modes 'min' and 'max' take; mode {mode!r} "
            "takes a ratio in (0, 1) or a negative integer count"
        )
    try:
        threshold = float(num)
    except ValueError:
        raise ValueError(
            f"num={num!r} is not a number; a string num is a metadata threshold such as '15.0'"
        ) from None
    values = np.asarray(values, dtype=np.float64)
    return np.flatnonzero(values <= threshold if mode == "min" else values >= threshold)


def _is_dataset(source: Any) -> bool:
    """Tell a dataset (ids and subset) from a plain collection of ids."""
    return hasattr(source, "subset") and hasattr(source, "ids")


def _ids_of(source: Any) -> list[str]:
    """Return the ids of a dataset or a collection of ids, checking they are strings."""
    if _is_dataset(source):
        return list(source.ids)
    if isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Iterable):
        raise TypeError(
            "select takes a list of ids or a dataset with ids and subset(), but got "
            f"{type(source).__name__}: {source!r}"
        )
    ids = list(source)
    wrong = [key for key in ids if not isinstance(key, str)]
    if wrong:
        raise TypeError(f"ids should be strings, but got {describe_ids(wrong)}")
    return ids


def _meta_values(source: Any, ids: list[str], mode: str, meta: Meta) -> np.ndarray | None:
    """Return each id's metadata for the meta modes (``None`` for the order modes)."""
    if mode not in META_MODES:
        if meta is not None:
            raise ValueError(
                f"mode {mode!r} selects by position and takes no meta; the modes that use "
                f"metadata are {list(META_MODES)}"
            )
        return None
    if meta is None:
        return _dataset_lengths(source, mode, len(ids))
    mapping = meta if isinstance(meta, Mapping) else read_numbers(meta, "meta")
    missing = [key for key in ids if key not in mapping]
    if missing:
        where = "the mapping" if isinstance(meta, Mapping) else f"meta={meta!r}"
        raise ValueError(
            f"{where} has no value for {len(missing)} of the {len(ids)} ids: "
            f"{describe_ids(missing)}; the metadata needs a number for every id being selected"
        )
    return np.array([to_number(mapping[key], "meta", key) for key in ids], dtype=np.float64)


def _dataset_lengths(source: Any, mode: str, size: int) -> np.ndarray:
    """Use a dataset's ``lengths`` as the metadata, or explain that some is needed."""
    lengths = getattr(source, "lengths", None) if _is_dataset(source) else None
    if lengths is None:
        raise ValueError(
            f"mode {mode!r} selects by metadata: pass meta= (an 'id value' file such as "
            "utt2dur, a list of them, or a mapping from id to number), or select from a "
            "dataset that has lengths"
        )
    values = np.asarray(lengths, dtype=np.float64)
    if values.shape != (size,):
        raise ValueError(
            f"the dataset's lengths have shape {values.shape}, but it has {size} ids; "
            "lengths need one number per id"
        )
    return values
