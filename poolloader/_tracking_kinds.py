"""What a type is to the views of ``loader.dataset`` (``_tracking.py``): a leaf
that comes back raw, an object whose attributes are viewed, a built-in container,
a NumPy array or a tensor; and the immutable types whose item writes are recorded
without pickling each."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import functools
import pathlib
import random
import re
import types

import numpy as np
import torch

from ._shared import SharedDict, SharedList

#: The view types that are not tensors: a view held inside the dataset is a leaf
#: (``_tracking.py`` sets this once its ``View`` exists; a tensor view is a tensor).
VIEWS: tuple[type, ...] = ()

_LEAF, _OBJECT, _CONTAINER, _ARRAY, _TENSOR = range(5)

#: Types whose values come back raw: immutable ones, and random generators
#: (each process draws from its own copy: a draw in the main process is no
#: change to carry).
_LEAF_TYPES: tuple[type, ...] = (
    str, bytes, int, float, complex, frozenset, range, slice, type, types.ModuleType,
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial,
    enum.Enum, pathlib.PurePath, decimal.Decimal, fractions.Fraction, datetime.date,
    datetime.time, datetime.timedelta, re.Pattern, random.Random, np.generic, np.dtype,
    torch.dtype, torch.device, torch.Size, torch.Generator, BaseException,
    SharedList, SharedDict,  # read-only: their methods read, and need their own memory
)  # fmt: skip
_CONTAINER_TYPES = (dict, list, set, collections.deque, bytearray, tuple)
_FOLDABLE = frozenset({_CONTAINER, _ARRAY, _TENSOR})
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python
_kinds: dict[type, int] = {}


def _kind(tp: type) -> int:
    kind = _kinds.get(tp)
    if kind is None:
        kind = _kinds[tp] = _classify(tp)
    return kind


def _classify(tp: type) -> int:
    if issubclass(tp, torch.Tensor):
        return _TENSOR
    if issubclass(tp, np.ndarray):
        return _ARRAY
    if issubclass(tp, _LEAF_TYPES) or issubclass(tp, VIEWS):
        return _LEAF
    if issubclass(tp, _CONTAINER_TYPES):
        return _CONTAINER
    return _OBJECT if tp.__flags__ & _HEAP_TYPE else _LEAF


def _base(tp: type) -> type:
    """The built-in container type ``tp`` is (or derives from)."""
    # (A loop, not next() over a generator: an interrupt landing as a generator
    # left unfinished is closed is lost, printed as "Exception ignored".)
    for base in _CONTAINER_TYPES:
        if issubclass(tp, base):
            return base
    raise TypeError(f"{tp.__qualname__} is not a container type")


#: Types of keys and values whose item writes are recorded without pickling
#: each (see ``Channel.record_atom``).
_ATOMS = frozenset({int, float, str, bool, bytes, complex, type(None)}) | frozenset(
    # NumPy's scalars are as immutable (``np.random.shuffle(loader.dataset.arr)``
    # writes them back one by one); not np.void, a structured record's view.
    t
    for t in set(np.sctypeDict.values())
    if issubclass(t, np.generic) and not issubclass(t, (np.void, np.object_))
)
