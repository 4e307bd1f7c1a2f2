"""Views of lists, dicts, sets, deques, bytearrays and tuples (NOTE [ View forms ]
in ``_tracking.py``): which of their C methods change them, how such a call is
recorded, and the forms that are real lists, dicts and tuples.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import pickle
from typing import Any, cast

from . import _pickling
from ._messages import THIS, Path
from ._tracking import (
    _ATOMS,
    _CONTAINER,
    View,
    _base,
    _get,
    _kind,
    _state,
    record_call,
    unwrap,
    unwrap_deep,
)

#: The C methods of each container that change it (the others only read), each
#: with whether it changes the container only by changing its length: such a
#: call that leaves the length alone changed nothing (``pop(k, None)`` of a
#: missing key, ``extend([])``) and is not recorded.
_MUTATORS: dict[type, dict[str, bool]] = {
    list: {
        "append": True, "extend": True, "insert": True, "pop": True, "remove": True,
        "clear": True, "sort": False, "reverse": False,
    },
    dict: {
        "update": False, "pop": True, "popitem": True, "clear": True, "move_to_end": False,
    },
    set: {
        "add": True, "discard": True, "remove": True, "pop": True, "clear": True,
        "update": True, "difference_update": True, "intersection_update": True,
        "symmetric_difference_update": True,
    },
    collections.deque: {
        "append": True, "appendleft": True, "extend": True, "extendleft": True, "pop": True,
        "popleft": True, "remove": True, "clear": True, "insert": True, "rotate": False,
        "reverse": False,
    },
    bytearray: {
        "append": True, "extend": True, "insert": True, "pop": True, "remove": True,
        "clear": True, "reverse": False,
    },
    tuple: {},
}  # fmt: skip


def _materialise(arg: Any) -> Any:
    """An argument as it can be both used here and pickled for the workers."""
    arg = unwrap_deep(arg)
    if isinstance(arg, collections.abc.Iterator | collections.abc.MappingView):
        return list(cast(Any, arg))  # consumed by the call here: the workers get what it held
    return arg


def call_mutator(view: View, name: str, fn: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
    """Run the C mutator ``fn`` (``list.append``, ``ndarray.fill``) on the view's
    object and record the call, or the object's contents when the arguments do
    not pickle (a ``sort`` with a lambda key)."""
    target, _, channel = _state(view)  # a reference kept across a change: checked first
    args = tuple(_materialise(a) for a in args)
    kwargs = {k: _materialise(v) for k, v in kwargs.items()}
    call = None
    if channel.active:
        try:
            with channel.pinning():
                call = pickle.dumps((fn, (THIS, *args), kwargs), _pickling.PROTOCOL)
        except Exception:  # a lambda sort key: the contents travel instead
            call = None
    container = _kind(type(target)) == _CONTAINER
    by_length = container and _MUTATORS[_base(type(target))].get(name, False)
    length = len(target) if by_length else -1
    result = fn(target, *args, **kwargs)
    if channel.active and (length < 0 or len(target) != length):
        record_call(view, call, target if container else None)
    view._pl_refresh()
    return view if result is target else result


def _mutator(view: View, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return call_mutator(view, name, fn, args, kwargs)


def method(view: View, name: str, bound: Any) -> Any:
    """What ``view.name`` gives for a C method of a container: a recording call for
    a mutator, a reader that hands out views of the items, or the method itself."""
    tp = type(_get(view, "_pl_target"))
    if name in _MUTATORS[_base(tp)]:
        return functools.partial(_mutator, view, name, getattr(tp, name))
    reader = _READERS.get(name)
    if reader is not None and isinstance(_get(view, "_pl_target"), dict):
        return functools.partial(reader, view)
    return bound


# ------------------------------------------------------ readers of dict items


def _dict_get(view: View, key: Any, default: Any = None) -> Any:
    return view[key] if unwrap(key) in _get(view, "_pl_target") else default


def _dict_setdefault(view: View, key: Any, default: Any = None) -> Any:
    if unwrap(key) in _get(view, "_pl_target"):
        return view[key]
    view[key] = default
    return view[key]


def _dict_items(view: View) -> Any:
    target = _get(view, "_pl_target")
    if _atoms_only(target.values()):
        return target.items()  # nothing in them to track: the object's own, at C speed
    return collections.abc.ItemsView(cast(Any, view))


def _dict_values(view: View) -> Any:
    target = _get(view, "_pl_target")
    if _atoms_only(target.values()):
        return target.values()
    return collections.abc.ValuesView(cast(Any, view))


def _atoms_only(values: Any) -> bool:
    """Whether ``values`` are all numbers, strings or None (checked at C speed)."""
    return set(map(type, values)) <= _ATOMS


_READERS: dict[str, Any] = {
    "get": _dict_get,
    "setdefault": _dict_setdefault,
    "items": _dict_items,
    "values": _dict_values,
}


# ------------------------------------------------------------------ the forms


class _Mirrored(View):
    """A view that is also a real container holding the object's items."""

    __slots__ = ()

    @classmethod
    def make(cls, target: Any, path: Path, channel: Any) -> Any:
        view = cls._pl_new(target)
        view._pl_init(target, path, channel)
        return view

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        raise NotImplementedError


class ListView(_Mirrored, list):  # type: ignore[misc]
    """A view of a list that is a real list (NOTE [ View forms ])."""

    __slots__ = ("__weakref__", "_pl_cache", "_pl_channel", "_pl_path", "_pl_target")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return list(*args, **kwargs)  # `type(view)(...)` builds a plain list

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        view = list.__new__(cls)
        list.extend(view, target)
        return view

    def _pl_refresh(self) -> None:
        list.__setitem__(self, slice(None), _get(self, "_pl_target"))

    def _pl_refresh_item(self, key: Any, value: Any) -> None:
        list.__setitem__(self, key, value)


class DictView(_Mirrored, dict):  # type: ignore[misc]
    """A view of a dict that is a real dict (NOTE [ View forms ])."""

    __slots__ = ("__weakref__", "_pl_cache", "_pl_channel", "_pl_path", "_pl_target")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return dict(*args, **kwargs)

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        view = dict.__new__(cls)
        dict.update(view, target)
        return view

    def _pl_refresh(self) -> None:
        dict.clear(self)
        dict.update(self, _get(self, "_pl_target"))

    def _pl_refresh_item(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, value)


class TupleView(_Mirrored, tuple):
    """A view of a tuple that is a real tuple (NOTE [ View forms ])."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return tuple(*args, **kwargs)

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        return tuple.__new__(cls, target)


#: The container types that have a real-container form.
MIRRORED: dict[type, Any] = {list: ListView, dict: DictView, tuple: TupleView}
