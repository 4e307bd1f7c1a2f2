"""Views of lists, dicts, sets, deques, bytearrays and tuples (NOTE [ View forms ]
in ``_tracking.py``): which of their C methods change them, how such a call is
recorded, and the forms that are real lists, dicts and tuples.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import operator
import pickle
from typing import Any, cast

from . import _pickling
from ._folding import contents
from ._messages import THIS, Path
from ._replay import assign_contents
from ._tracking import View, unwrap, unwrap_deep
from ._tracking_kinds import _ATOMS, _CONTAINER, _base, _kind
from ._tracking_record import _get, _state, record_call, record_contents_if_interrupted

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
    try:
        return _call_mutator(view, name, fn, args, kwargs)
    except BaseException as exc:  # NOTE [ A C call and Ctrl-C ] in _tracking_record.py
        target = _get(view, "_pl_target")
        record_contents_if_interrupted(exc, (view,), _kind(type(target)) == _CONTAINER)
        raise


def _call_mutator(view: View, name: str, fn: Any, args: tuple[Any, ...], kwargs: Any) -> Any:
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
    # Where the call does not pickle, its result travels, if that pickles: known only
    # after the call, so what the container held is kept to put back if it does not
    # (a lambda appended is refused, as assigning it is: here and in no worker).
    saved = contents(target) if container and channel.active and call is None else None
    result = fn(target, *args, **kwargs)
    if channel.active and (length < 0 or len(target) != length):
        try:
            record_call(view, call, target if container else None)
        except BaseException:
            if saved is not None:
                assign_contents(target, saved)
            raise
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


#: The whole of a list, as a slice.
_ALL = slice(None)


def _identical_lists(a: list[Any], b: list[Any]) -> bool:
    """Whether lists ``a`` and ``b`` hold the very same items (their own, for views)."""
    return list.__len__(a) == list.__len__(b) and all(
        map(operator.is_, list.__iter__(a), list.__iter__(b))
    )


def _identical_dicts(a: dict[Any, Any], b: dict[Any, Any]) -> bool:
    """:func:`_identical_lists` for dicts."""
    missing = object()
    return dict.__len__(a) == dict.__len__(b) and all(
        dict.get(b, key, missing) is value for key, value in dict.items(a)
    )


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


class _Settling(_Mirrored):
    """A real-container view whose own items C code can write into: a list or a dict.

    NOTE [ Writes into a view's own items ]

    C code that takes a real list or dict may write into the view's own items
    without calling its methods: ``heapq.heappush(self.queue, x)`` appends and
    swaps through the C API, as does ``list.__setitem__(view, ...)`` called
    directly. Such a write reaches neither the object nor the workers by
    itself, and the next refresh of the items would undo it. So each view keeps
    a copy of the items it last took from the object (``_pl_seen``); where its
    own items no longer equal that copy, C code wrote into them, and the view
    *settles*: the object takes the view's items (a list by slice assignment, a
    dict by ``clear`` and ``update``), recorded as that change made through the
    view would be. A view settles before every change made through it, before
    it refreshes its items, and, through the channel that watches every such
    view, before each batch is submitted (``Channel.stamp``), so the write is
    ordered against the batches as if it had gone through a method.

    Reading a view again (``self.lengths[i]`` in a loop) compares instead of
    copying: when its own items equal the copy and the object's items do too
    (items compare by identity first, so this is as fast as a copy), nothing
    is copied. An item that code outside the view replaced in the object by an
    equal one (``1`` by ``1.0``) then reaches C code reading the view as the
    old one until the next change through the view.
    """

    __slots__ = ()

    #: The container type's ``==`` (at C speed, identical items compared by
    #: identity), and the item-by-identity comparison for when that cannot answer
    #: (an item that is a NumPy array or a tensor): set by each form.
    _pl_eq: Any
    _pl_identical: Any

    @classmethod
    def make(cls, target: Any, path: Path, channel: Any) -> Any:
        view = super().make(target, path, channel)
        object.__setattr__(view, "_pl_seen", view._pl_own())
        channel.settling.watch(view)
        return view

    def _pl_own(self) -> Any:
        """A copy of the view's own items (not the object's)."""
        raise NotImplementedError

    def _pl_adopt(self, items: Any) -> None:
        """Give the object ``items`` through the view (recorded)."""
        raise NotImplementedError

    def _pl_mirror(self) -> None:
        """Take the object's items as the view's own, and as its copy of them."""
        raise NotImplementedError

    def _pl_same(self, a: Any, b: Any) -> bool:
        """Whether containers ``a`` and ``b`` hold the same items."""
        try:
            return bool(_get(self, "_pl_eq")(a, b))
        except Exception:
            return bool(_get(self, "_pl_identical")(a, b))

    def _pl_settle(self) -> None:
        """Record what C code wrote into the view's own items, if it wrote."""
        if not self._pl_same(self, _get(self, "_pl_seen")):
            # Settled from here on (a copy of its own: a refresh while the object
            # takes the items writes into the view's copy).
            object.__setattr__(self, "_pl_seen", self._pl_own())
            self._pl_adopt(self._pl_own())

    def _pl_refresh(self) -> None:
        self._pl_settle()
        self._pl_mirror()

    def _pl_reread(self) -> None:
        # On every read of the view: the common case inline (a call to _pl_same
        # costs a third of a reread).
        seen, eq = _get(self, "_pl_seen"), _get(self, "_pl_eq")
        try:
            if eq(self, seen) and eq(_get(self, "_pl_target"), seen):
                return
        except Exception:
            if self._pl_same(self, seen) and self._pl_same(_get(self, "_pl_target"), seen):
                return
        self._pl_refresh()


class ListView(_Settling, list):  # type: ignore[misc]
    """A view of a list that is a real list (NOTE [ View forms ])."""

    __slots__ = ("__weakref__", "_pl_cache", "_pl_channel", "_pl_path", "_pl_seen", "_pl_target")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return list(*args, **kwargs)  # `type(view)(...)` builds a plain list

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        view = list.__new__(cls)
        list.extend(view, target)
        return view

    _pl_eq = staticmethod(list.__eq__)
    _pl_identical = staticmethod(_identical_lists)

    def _pl_own(self) -> Any:
        return list.__getitem__(self, _ALL)

    def _pl_adopt(self, items: Any) -> None:
        self[:] = items

    def _pl_mirror(self) -> None:
        target = _get(self, "_pl_target")
        list.__setitem__(self, _ALL, target)
        list.__setitem__(_get(self, "_pl_seen"), _ALL, target)

    def _pl_refresh_item(self, key: Any, value: Any) -> None:
        list.__setitem__(self, key, value)
        list.__setitem__(_get(self, "_pl_seen"), key, value)


class DictView(_Settling, dict):  # type: ignore[misc]
    """A view of a dict that is a real dict (NOTE [ View forms ])."""

    __slots__ = ("__weakref__", "_pl_cache", "_pl_channel", "_pl_path", "_pl_seen", "_pl_target")

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return dict(*args, **kwargs)

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        view = dict.__new__(cls)
        dict.update(view, target)
        return view

    _pl_eq = staticmethod(dict.__eq__)
    _pl_identical = staticmethod(_identical_dicts)

    def _pl_own(self) -> Any:
        return dict(dict.items(self))

    def _pl_adopt(self, items: Any) -> None:
        self.clear()
        self.update(items)

    def _pl_mirror(self) -> None:
        target, seen = _get(self, "_pl_target"), _get(self, "_pl_seen")
        dict.clear(self)
        dict.update(self, target)
        dict.clear(seen)
        dict.update(seen, target)

    def _pl_refresh_item(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, value)
        dict.__setitem__(_get(self, "_pl_seen"), key, value)


class TupleView(_Mirrored, tuple):
    """A view of a tuple that is a real tuple (NOTE [ View forms ])."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return tuple(*args, **kwargs)

    @classmethod
    def _pl_new(cls, target: Any) -> Any:
        return tuple.__new__(cls, target)


#: The container types that have a real-container form.
MIRRORED: dict[type, Any] = {list: ListView, dict: DictView, tuple: TupleView}
