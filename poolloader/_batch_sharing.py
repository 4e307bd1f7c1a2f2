"""What the tensors and arrays of one batch share, found before it is pickled
(NOTE [ Views ] in ``_skeleton.py``): storages several tensors view and the parts
of them they read, objects the batch holds more than once, arrays whose memory
overlaps."""

from __future__ import annotations

import dataclasses
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:  # NumPy 2
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # NumPy 1
    _byte_bounds = np.byte_bounds  # type: ignore[attr-defined]


class _StorageCounter(pickle.Pickler):
    """Walks a batch as pickling would, counting the tensors on each storage."""

    def __init__(self) -> None:
        super().__init__(_NullSink(), pickle.HIGHEST_PROTOCOL)
        # Storage (by address) → the strided tensors met on it, once per meeting.
        self.tensors: dict[int, list[torch.Tensor]] = {}
        self.objects: dict[int, int] = {}  # times each array or tensor object is met
        self.arrays: dict[int, tuple[int, int]] = {}  # each array's memory, by id

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.objects[id(obj)] = self.objects.get(id(obj), 0) + 1
            if type(obj) is torch.Tensor and obj.layout == torch.strided and not obj.is_nested:
                ptr = obj.untyped_storage().data_ptr()
                self.tensors.setdefault(ptr, []).append(obj)
            return 0
        if isinstance(obj, np.ndarray):
            self.objects[id(obj)] = self.objects.get(id(obj), 0) + 1
            if obj.nbytes:
                low, high = _byte_bounds(obj)
                self.arrays[id(obj)] = (low, high)
            return 0
        return None

    def overlapping_arrays(self) -> frozenset[int]:
        """Ids of the arrays whose memory overlaps another array's."""
        found: set[int] = set()
        reach, last = -1, None
        for key, (low, high) in sorted(self.arrays.items(), key=lambda item: item[1]):
            if low < reach and last is not None:
                found.update((key, last))
            if high > reach:
                reach, last = high, key
        return frozenset(found)


class _NullSink(io.RawIOBase):
    def write(self, b: Any) -> int:
        return len(b)


@dataclass(frozen=True, slots=True)
class Sharing:
    """What parts of one batch share, found before it is pickled."""

    storages: frozenset[int] = frozenset()  # storages (by address) several tensors view
    starts: tuple[int, ...] = ()  # where each tensor on one of them begins
    repeated: frozenset[int] = frozenset()  # ids of arrays and tensors held more than once
    # For each storage the batch's tensors view, the address ranges they cover,
    # overlapping ones merged, ascending (NOTE [ Views ]).
    spans: Mapping[int, tuple[tuple[int, int], ...]] = dataclasses.field(default_factory=dict)
    overlapping: frozenset[int] = frozenset()  # ids of arrays whose memory overlaps


NOTHING_SHARED = Sharing()


def sharing(batch: Any) -> Sharing:
    """What the tensors and arrays of ``batch`` share (NOTE [ Views ])."""
    if isinstance(batch, torch.Tensor):  # the most common batch: nothing to share
        return NOTHING_SHARED
    counter = _StorageCounter()
    try:
        counter.dump(batch)
    except Exception:
        return NOTHING_SHARED  # the real pickling will say what is wrong
    shared = frozenset(ptr for ptr, met in counter.tensors.items() if len(met) > 1 and ptr)
    repeated = frozenset(key for key, count in counter.objects.items() if count > 1)
    if not shared and not repeated and len(counter.arrays) < 2:
        return NOTHING_SHARED  # the usual batch: no need to know what its tensors read
    ranges = {ptr: [extent(t) for t in counter.tensors[ptr]] for ptr in shared}
    return Sharing(
        shared,
        tuple(start for ptr in shared for start, _ in ranges[ptr]),
        repeated,
        {ptr: _merged(found) for ptr, found in ranges.items()},
        counter.overlapping_arrays(),
    )


def address(tensor: torch.Tensor) -> int:
    """Where ``tensor``'s first element is: ``data_ptr()``, which says 0 for a tensor
    with no elements (``x[5:5]``) wherever it lies in its storage."""
    found = tensor.data_ptr()
    if found or tensor.numel():
        return found
    offset = int(tensor.storage_offset()) * tensor.element_size()
    return tensor.untyped_storage().data_ptr() + offset


def extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The addresses ``[start, end)`` of the bytes a strided tensor reads."""
    start = address(tensor)
    if tensor.numel() == 0:
        return start, start
    last = sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def _merged(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``ranges`` sorted, overlapping (or touching) ones made one."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)
