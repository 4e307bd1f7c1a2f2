"""Argument checks shared by the samplers: each message says what, what was given, how to fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from poolloader._segment import is_sealed_array

__all__ = [
    "as_lengths",
    "check_non_negative_int",
    "check_optional_positive_int",
    "check_positive_int",
    "check_positive_number",
]

LengthsLike = Sequence[float] | npt.NDArray[Any] | torch.Tensor


def _with_hint(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def check_positive_number(name: str, value: object, hint: str = "") -> float:
    """Return ``value`` as a float if it is a positive, finite real number.

    Args:
        name: The argument's name, for the message.
        value: What the caller gave.
        hint: How to fix it, appended to the message.

    Raises:
        TypeError: ``value`` is not a real number (booleans are refused).
        ValueError: ``value`` is zero, negative, infinite or NaN.
    """
    message = _with_hint(f"{name} should be a positive number, but got {name}={value!r}", hint)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(message)
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(message)
    return number


def _check_int(name: str, value: object, lowest: int, what: str, hint: str) -> int:
    message = _with_hint(f"{name} should be a {what} integer, but got {name}={value!r}", hint)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(message)
    if value < lowest:
        raise ValueError(message)
    return int(value)


def check_positive_int(name: str, value: object, hint: str = "") -> int:
    """Return ``value`` as an int if it is an integer ``>= 1``.

    Raises:
        TypeError: ``value`` is not an integer (booleans are refused).
        ValueError: ``value < 1``.
    """
    return _check_int(name, value, 1, "positive", hint)


def check_non_negative_int(name: str, value: object, hint: str = "") -> int:
    """Return ``value`` as an int if it is an integer ``>= 0``.

    Raises:
        TypeError: ``value`` is not an integer (booleans are refused).
        ValueError: ``value < 0``.
    """
    return _check_int(name, value, 0, "non-negative", hint)


def check_optional_positive_int(name: str, value: object, hint: str = "") -> int | None:
    """Like :func:`check_positive_int`, but ``None`` passes through."""
    return None if value is None else check_positive_int(name, value, hint)


def as_lengths(lengths: LengthsLike) -> npt.NDArray[np.float64]:
    """Validate item lengths and return them as a read-only 1-D float64 array.

    Args:
        lengths: One non-negative, finite number per item: a sequence, a NumPy array, a
            torch tensor (any device; it is copied to the CPU), or a
            :class:`~poolloader.SharedList` of numbers.

    Returns:
        ``lengths[i]`` being item ``i``'s length: a read-only float64 copy, or, for float64
        lengths in sealed shared memory (a ``SharedList`` of floats, ``column()`` of one,
        ``ManifestDataset.lengths``), that array itself, since nothing can change it: a
        million-item table then costs the sampler no copy.

    Raises:
        TypeError: ``lengths`` does not hold numbers.
        ValueError: ``lengths`` is empty, not one-dimensional, or holds a negative or
            non-finite value; the message names the first offending item.
    """
    raw = _to_numpy(lengths)
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
        raise TypeError(
            f"lengths should hold numbers (one length per item), but got dtype {raw.dtype}; "
            "pass the item durations or frame counts"
        )
    if raw.ndim != 1 or raw.size == 0:
        raise ValueError(
            "lengths should be a non-empty, one-dimensional sequence with one length per "
            f"item, but got shape {raw.shape}; pass one number per dataset item"
        )
    shared = raw.dtype == np.float64 and is_sealed_array(raw)
    values = raw if shared else np.array(raw, dtype=np.float64)
    _check_values(values)
    values.flags.writeable = False
    return values


def _to_numpy(lengths: LengthsLike) -> npt.NDArray[Any]:
    if isinstance(lengths, torch.Tensor):
        return lengths.detach().cpu().numpy()
    try:
        return np.asarray(lengths)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"lengths should be a sequence of numbers, but got {type(lengths).__name__}: {exc}"
        ) from exc


def _check_values(values: npt.NDArray[np.float64]) -> None:
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        first = int(bad[0])
        raise ValueError(
            "lengths should be finite and non-negative, but got "
            f"lengths[{first}]={float(values[first])!r} ({bad.size} such item(s) in all); "
            "drop or fix those items before building the sampler"
        )
