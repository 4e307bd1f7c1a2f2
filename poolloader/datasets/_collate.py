"""Padding collate: variable-length arrays of a batch padded to the longest.

What happens to each key (or each tuple position) of the items:

=============================== ================================================
values                          in the batch
=============================== ================================================
tensors / arrays, >= 1 dim      padded along ``axis`` to the longest, stacked
                                to ``(batch, ...)``; ``<key>_len`` int64 holds
                                the original lengths
0-dim tensors, numpy scalars    stacked to ``(batch,)``
bool / int / float numbers      a tensor, as torch's ``default_collate`` makes
                                (bool, int64, float64); numpy scalars mixed
                                with Python numbers too
strings, None, anything else    a list, as given
=============================== ================================================

The rule goes by type, never by content: a key of arrays always gets
``<key>_len``, even in a batch whose arrays happen to have one length, so every
batch of a dataset has the same keys. For tuple items a padded position becomes
a ``(padded, lengths)`` pair.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

LENGTH_SUFFIX = "_len"
"""Appended to a key to name the lengths of its padded values."""

PerKey = float | Mapping[Any, float]
"""One value for every key, or a mapping by key (dict items) or position (tuple items)."""

PerKeyAxis = int | Mapping[Any, int]
"""One axis for every key, or a mapping by key or position; unlisted keys use axis 0."""


class _Padded(tuple[torch.Tensor, torch.Tensor]):
    """``(padded, lengths)``: marks a result that was padded, so its lengths are kept."""


def pad_collate(batch: Sequence[Any], *, pad_value: PerKey = 0.0, axis: PerKeyAxis = 0) -> Any:
    """Collate a batch of items, padding variable-length tensors and arrays.

    Module level and picklable, so it works as ``collate_fn`` under spawn. For
    other defaults in a picklable form, use :class:`PadCollate`.

    Args:
        batch: a list of dicts (the usual), of tuples/lists, or of bare arrays.
        pad_value: the value to pad with; a mapping gives one per key (0.0 for the rest).
        axis: the axis to pad (the time axis, 0 by default); a mapping gives one per key.

    Returns:
        For dict items a dict holding every key collated (see the module docstring)
        plus ``<key>_len`` for each padded key; for tuple items a tuple (a padded
        position becomes ``(padded, lengths)``); for bare arrays ``(padded, lengths)``.

    Raises:
        ValueError: an empty batch, items with different keys, arrays that differ
            on an axis other than ``axis``, or a ``<key>_len`` already in the items.

    Example:
        >>> batch = pad_collate([{"x": torch.ones(2)}, {"x": torch.ones(3)}])
        >>> batch["x"].tolist(), batch["x_len"].tolist()
        ([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], [2, 3])
    """
    if isinstance(batch, (Mapping, str)) or not isinstance(batch, Sequence):
        raise TypeError(
            f"pad_collate takes a list of items, but got {type(batch).__name__} (an already "
            "collated batch? a dataset whose list index collates needs no collate_fn)"
        )
    if len(batch) == 0:
        raise ValueError("pad_collate got an empty batch; a batch needs at least one item")
    first = batch[0]
    if isinstance(first, Mapping):
        return _collate_dicts(batch, pad_value, axis)
    if isinstance(first, (tuple, list)):
        return _collate_sequences(batch, pad_value, axis)
    result = _collate_values("the items", list(batch), _pick(pad_value, 0, 0.0), _pick(axis, 0, 0))
    return tuple(result) if isinstance(result, _Padded) else result


class PadCollate:
    """:func:`pad_collate` with chosen defaults, as a small picklable object.

    Args:
        pad_value: the value to pad with, or a mapping by key (0.0 for unlisted keys).
        axis: the axis to pad, or a mapping by key (0 for unlisted keys).

    Example:
        >>> collate = PadCollate(pad_value={"tokens": -1}, axis={"audio": -1})
        >>> loader = DataLoader(dataset, batch_size=8, collate_fn=collate)  # doctest: +SKIP
    """

    def __init__(self, pad_value: PerKey = 0.0, axis: PerKeyAxis = 0) -> None:
        self.pad_value = dict(pad_value) if isinstance(pad_value, Mapping) else pad_value
        self.axis = dict(axis) if isinstance(axis, Mapping) else axis

    def __call__(self, batch: Sequence[Any]) -> Any:
        """Collate ``batch`` with this object's settings; see :func:`pad_collate`."""
        return pad_collate(batch, pad_value=self.pad_value, axis=self.axis)

    def __repr__(self) -> str:
        """Show the settings: ``PadCollate(pad_value=0.0, axis=0)``."""
        return f"PadCollate(pad_value={self.pad_value!r}, axis={self.axis!r})"


def _pick(setting: Any, key: Any, default: Any) -> Any:
    """Return the per-key value of a setting that may be a mapping."""
    if isinstance(setting, Mapping):
        return setting.get(key, default)
    return setting


def _collate_dicts(batch: Sequence[Any], pad_value: PerKey, axis: PerKeyAxis) -> dict[str, Any]:
    """Collate dict items key by key."""
    keys = list(batch[0])
    for index, item in enumerate(batch):
        if not isinstance(item, Mapping) or set(item) != set(keys):
            found = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            raise ValueError(
                f"pad_collate: item {index} has keys {found}, but item 0 has {sorted(keys)}; "
                "every item of a batch needs the same keys"
            )
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        result = _collate_values(
            f"key {key!r}", values, _pick(pad_value, key, 0.0), _pick(axis, key, 0)
        )
        _store(out, keys, key, result)
    return out


def _store(out: dict[str, Any], keys: list[str], key: str, result: Any) -> None:
    """Put a key's result in the batch, and its lengths under ``<key>_len`` if it was padded."""
    if not isinstance(result, _Padded):
        out[key] = result
        return
    length_key = f"{key}{LENGTH_SUFFIX}"
    if length_key in keys:
        raise ValueError(
            f"pad_collate: key {key!r} is padded and its lengths go to {length_key!r}, but the "
            f"items already have a key {length_key!r}; rename that key"
        )
    out[key], out[length_key] = result


def _collate_sequences(batch: Sequence[Any], pad_value: PerKey, axis: PerKeyAxis) -> Any:
    """Collate tuple/list items position by position."""
    size = len(batch[0])
    for index, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != size:
            raise ValueError(
                f"pad_collate: item {index} is {type(item).__name__} of length "
                f"{len(item) if isinstance(item, (tuple, list)) else '-'}, but item 0 has "
                f"{size} elements; every item of a batch needs the same structure"
            )
    results = []
    for position in range(size):
        values = [item[position] for item in batch]
        what = f"position {position}"
        pad, ax = _pick(pad_value, position, 0.0), _pick(axis, position, 0)
        result = _collate_values(what, values, pad, ax)
        results.append(tuple(result) if isinstance(result, _Padded) else result)
    kind = type(batch[0])
    return kind(*results) if hasattr(kind, "_fields") else kind(results)  # a namedtuple's fields


def _is_array(value: Any) -> bool:
    """Tell whether a value is a tensor, or a numpy array or scalar (a 0-dim array) of
    numbers; strings, dates and objects of numpy stay as they are, as torch keeps them."""
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biufc"


def _is_number(value: Any) -> bool:
    """Tell whether a value is a bool, int or float, Python's or numpy's scalar."""
    return isinstance(value, (bool, int, float, np.bool_, np.number))


def _collate_values(what: str, values: list[Any], pad_value: float, axis: int) -> Any:
    """Collate one key's values: pad arrays, stack scalars, keep the rest as a list."""
    if all(_is_array(v) for v in values):
        tensors = [_as_tensor(v) for v in values]
        if tensors[0].dim() == 0:
            return _stack(what, tensors)
        return _Padded(_pad(what, tensors, pad_value, axis))
    if all(_is_number(v) for v in values):
        return torch.from_numpy(np.asarray(values))
    return values


def _as_tensor(value: torch.Tensor | np.ndarray | np.generic) -> torch.Tensor:
    """Turn a numpy array or scalar into a tensor (sharing memory where it can)."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    return torch.from_numpy(array if array.flags.c_contiguous else array.copy())


def _stack(what: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack 0-dim tensors, refusing a mix of 0-dim and n-dim values."""
    if any(t.dim() != 0 for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"pad_collate: {what} mixes scalars and arrays: shapes {shapes}")
    return torch.stack(tensors)


def _pad(
    what: str, tensors: list[torch.Tensor], pad_value: float, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad tensors along ``axis`` to the longest and stack them; return them and their lengths."""
    ndim = tensors[0].dim()
    ax = _normalise_axis(what, axis, ndim)
    _check_shapes(what, tensors, ax)
    lengths = [t.shape[ax] for t in tensors]
    shape = list(tensors[0].shape)
    shape[ax] = max(lengths)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    out = torch.full([len(tensors), *shape], pad_value, dtype=dtype)
    for row, (tensor, length) in enumerate(zip(tensors, lengths, strict=True)):
        out[row].narrow(ax, 0, length).copy_(tensor)
    return out, torch.tensor(lengths, dtype=torch.int64)


def _normalise_axis(what: str, axis: int, ndim: int) -> int:
    """Turn a possibly negative axis into an index, or raise saying what the arrays are."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(
            f"pad_collate: axis={axis!r} is out of range for {what}, whose values have "
            f"{ndim} dimension(s); give an axis in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def _check_shapes(what: str, tensors: list[torch.Tensor], axis: int) -> None:
    """Raise unless the tensors agree on every axis but ``axis``."""
    reference = list(tensors[0].shape)
    reference[axis] = -1
    for index, tensor in enumerate(tensors):
        shape = list(tensor.shape)
        if len(shape) == len(reference):
            shape[axis] = -1
        if shape != reference:
            raise ValueError(
                f"pad_collate: {what} has shape {tuple(tensor.shape)} in item {index} but "
                f"{tuple(tensors[0].shape)} in item 0; only axis {axis} may differ "
                "(pass axis= to pad another one)"
            )
