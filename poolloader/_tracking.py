"""Tracking views: ``loader.dataset`` and everything reached through it.

A view stands for one object of the main process's dataset, at a *path* from
the dataset (``dataset.transform``, ``dataset.cfg['crop']``). Reading through
it reads the object; changing something through it changes the object and
records the change (``_tracking_record.py``) in the control channel
(``_control.py``), which replays it in every worker. What is carried:
NOTE [ What is carried ] in ``_tracking_record.py``.

NOTE [ View forms ]

A view must be a good stand-in for its object, or code that reads through it
breaks. Four forms, chosen by the object's type:

* objects of Python classes, sets, deques, bytearrays, and lists, dicts and
  tuples of more than :data:`MIRROR_LIMIT` items: :class:`Tracked`, a proxy.
  ``isinstance`` holds (it reports the object's class), and every operator,
  comparison, ``len``, iteration, ``copy``, ``pickle`` and ``weakref`` works
  as on the object; C code that insists on the real type raises ``TypeError``
  (``json.dumps`` of a large list says "Object of type list is not JSON
  serializable"): pass ``poolloader.unwrap(view)`` to such code;
* lists, dicts and tuples of up to :data:`MIRROR_LIMIT` items:
  :class:`~._tracking_containers.ListView`, ``DictView``, ``TupleView``, real subclasses
  that also hold the object's items (refreshed whenever the view is handed
  out and after each change made through it), so that C code reading a real
  list or dict (``json.dumps``, ``torch.zeros(loader.dataset.shape)``) gets
  the object's items. Copying the items costs about 2 ns each, which is why
  large containers are proxies instead;
* NumPy arrays: :class:`~._tracking_numeric.ArrayView`, a proxy speaking
  NumPy's protocols (``np.asarray`` gives a read-only view of the array, so a
  write through it raises instead of being lost);
* tensors: :class:`~._tracking_numeric.TensorView`, a real tensor sharing the
  object's memory, whose ``__torch_function__`` records in-place operations.
  (A proxy that claims to be a tensor crashes torch's C code.)

Values of immutable types, and C objects other than the containers above
(files, locks, generators), come back raw.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import types
from typing import Any

from . import _tracking_kinds
from ._messages import DelAttr, DelItem, Path, SetAttr, SetItem
from ._tracking_kinds import (
    _ARRAY,
    _ATOMS,
    _CONTAINER,
    _FOLDABLE,
    _LEAF,
    _OBJECT,
    _TENSOR,
    _kind,
    _kinds,
)
from ._tracking_paths import render
from ._tracking_record import (
    _get,
    _payload,
    _state,
    _untracked_call,
    change_and_record,
    made,
)

#: Lists, dicts and tuples up to this many items come back as real ones (see
#: NOTE [ View forms ]). Their items are copied each time the view is handed
#: out, about 2 µs at this size; larger ones come back as proxies, since that
#: copy would then outweigh the read (a method reading ``self.lengths[i]`` in a
#: loop hands the view out once per item).
MIRROR_LIMIT = 1024


def view_of(value: Any, path: Path, channel: Any) -> Any:
    """The view of ``value`` at ``path``, or ``value`` itself when it needs none."""
    kind = _kind(type(value))
    if kind == _LEAF or isinstance(value, _VIEWS):
        return value
    if kind == _TENSOR:
        return _tracking_numeric.TensorView.make(value, path, channel)
    if kind == _ARRAY:
        return _tracking_numeric.ArrayView(value, path, channel)
    mirrored = _tracking_containers.MIRRORED.get(type(value))
    if mirrored is not None and len(value) <= MIRROR_LIMIT:
        return mirrored.make(value, path, channel)
    if hasattr(type(value), "__dataclass_fields__"):
        return _dataclass_view(type(value))(value, path, channel)
    return Tracked(value, path, channel)


def _dataclass_view(cls: type) -> Any:
    """The view class for instances of the dataclass ``cls``: ``dataclasses``
    goes by ``type(obj)``, so ``is_dataclass``, ``fields``, ``asdict`` and
    ``replace`` (a frozen config's ``set_epoch``) need its fields on the view's type."""
    found = _dataclass_views.get(cls)
    if found is None:
        namespace = {
            "__slots__": (),
            "__module__": __name__,
            "__dataclass_fields__": cls.__dataclass_fields__,  # type: ignore[attr-defined]
            "__dataclass_params__": getattr(cls, "__dataclass_params__", None),
        }
        found = _dataclass_views[cls] = _ViewClass(
            f"Tracked[{cls.__qualname__}]", (Tracked,), namespace
        )
    return found


_dataclass_views: dict[type, Any] = {}
_DATACLASS_ATTRIBUTES = frozenset({"__dataclass_fields__", "__dataclass_params__"})


def root_view(dataset: Any, channel: Any) -> Any:
    """``loader.dataset``: the view of the whole dataset; the channel snapshots it."""
    channel.attach(dataset)
    view = view_of(dataset, (), channel)
    return view if isinstance(view, _VIEWS) else Tracked(dataset, (), channel)


# ------------------------------------------------------------------ unwrapping


def unwrap(obj: Any) -> Any:
    """The object behind a view of ``loader.dataset`` (or ``obj`` itself)."""
    while isinstance(obj, _VIEWS):
        obj = _get(obj, "_pl_target")
    return obj


def unwrap_deep(obj: Any) -> Any:
    """``obj`` unwrapped, and so are views inside the lists, tuples, sets and dicts
    it is made of, so the dataset never ends up holding views. Of a container of
    more than :data:`MIRROR_LIMIT` items only views among its own items are
    looked for (``[u for u in self.all if ...]`` built through the view): looking
    inside a million records would cost more than pickling them."""
    obj = unwrap(obj)
    kind = type(obj)
    if kind in (list, tuple, set, dict):
        items = obj.values() if kind is dict else obj
        if not _holds_views(items, containers=len(obj) <= MIRROR_LIMIT):
            return obj
        if kind is dict:
            return {k: unwrap_deep(v) for k, v in obj.items()}
        return kind(unwrap_deep(x) for x in obj)
    if hasattr(kind, "__dataclass_fields__") and hasattr(obj, "__dict__"):
        # dataclasses.replace(view, ...) builds the new object from the view's
        # fields: those that are objects arrive as views; the object holds them.
        for name, value in list(vars(obj).items()):
            if isinstance(value, _VIEWS) or type(value) in _UNWRAPPED:
                object.__setattr__(obj, name, unwrap_deep(value))
    return obj


#: Values assigned through a view that may hold views inside them.
_UNWRAPPED = frozenset({list, tuple, dict, set})


def _item(container: Any, key: Any) -> Any:
    try:
        return container[key]
    except Exception:
        return _MISSING


def _holds_views(items: Any, containers: bool = True) -> bool:
    """Whether ``items`` are or (``containers``) may hold views. Read by type, at C
    speed: a million plain records take milliseconds."""
    kinds = set(map(type, items))
    return any(issubclass(t, _VIEWS) or (containers and t in _UNWRAPPED) for t in kinds)


# ----------------------------------------------------------------- recording


def _nothing() -> None:
    pass


def _holds_item(target: Any, key: Any, value: Any) -> bool:
    """Whether ``target[key]`` is ``value`` now (for a slice: holds its items)."""
    current = target[key]
    return current is value or (isinstance(key, slice) and list(current) == list(value))


def _foldable(target: Any) -> Any:
    """``target`` when many writes into it may fold into its contents, else None."""
    return target if _kinds.get(type(target)) in _FOLDABLE else None


def _rebinds(value: Any, path: Path, current: Any) -> bool:
    """Whether assigning ``value`` at ``path`` puts back the object already there:
    the second half of ``w += 1`` (the first half was recorded)."""
    return (
        isinstance(value, _VIEWS)
        and _get(value, "_pl_path") == path
        and _get(value, "_pl_target") is current
    )


# ----------------------------------------------------------------- the views

_MISSING = object()


class _ViewClass(type):
    """The type of the view classes: they take no attributes once made. A method
    run through ``loader.dataset`` has the view as ``self``, and ``type(self).x =
    v`` there would set ``x`` on poolloader's view class, for every dataset's
    view, instead of on the dataset's class."""

    _sealed = False

    def __setattr__(cls, name: str, value: Any) -> None:
        if cls._sealed:
            raise TypeError(
                f"cannot set {name!r} on {cls.__name__}: inside a method called through "
                "loader.dataset, type(self) is poolloader's view class. Set it on the "
                f"dataset's class by name (MyDataset.{name} = ...); class attributes do "
                "not reach the workers, so also pass it with loader.broadcast(fn)"
            )
        super().__setattr__(name, value)

    def __delattr__(cls, name: str) -> None:
        if cls._sealed:
            raise TypeError(f"cannot delete {name!r} from poolloader's view class {cls.__name__}")
        super().__delattr__(name)


class View(metaclass=_ViewClass):
    """What every form of view shares; the state lives in each form's slots."""

    __slots__ = ()
    _pl_target: Any
    _pl_path: Path
    _pl_channel: Any
    _pl_cache: dict[str, Any] | None

    def _pl_init(self, target: Any, path: Path, channel: Any) -> None:
        object.__setattr__(self, "_pl_target", target)
        object.__setattr__(self, "_pl_path", path)
        object.__setattr__(self, "_pl_channel", channel)
        object.__setattr__(self, "_pl_cache", None)

    def _pl_refresh(self) -> None:
        """Bring the items a real-container view holds up to date (see NOTE [ View forms ])."""

    def _pl_reread(self) -> None:
        """Handed out again (from its parent's cache): bring its items up to date."""
        self._pl_refresh()

    def _pl_settle(self) -> None:
        """Record what C code wrote into a real-container view's own items."""

    def _pl_refresh_item(self, key: Any, value: Any) -> None:
        """After ``object[key] = value``: bring that item of a real-container view up to date."""

    # -- attributes
    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_pl_") or name in _OWN:
            return object.__getattribute__(self, name)
        if name == "__class__":
            return type(object.__getattribute__(self, "_pl_target"))
        return object.__getattribute__(self, "_pl_getattr")(name)

    def _pl_getattr(self, name: str) -> Any:
        target = _get(self, "_pl_target")
        value = getattr(target, name)
        if name in _DATACLASS_ATTRIBUTES:
            return value  # dataclasses reads these (and compares their parts with `is`)
        if type(value) is types.MethodType and value.__self__ is target:
            # A Python method runs against the view: what it changes is recorded.
            return types.MethodType(value.__func__, self)
        if type(value) in _BUILTIN_BOUND and getattr(value, "__self__", None) is target:
            return self._pl_builtin(name, value)
        return self._pl_child(value, ("attr", name))

    def _pl_builtin(self, name: str, bound: Any) -> Any:
        """A method implemented in C, bound to the object."""
        tp = type(_get(self, "_pl_target"))
        if _kind(tp) == _CONTAINER:
            return _tracking_containers.method(self, name, bound)
        if name in vars(object) or name.startswith("__"):
            return bound  # object's own methods and special methods only read
        return functools.partial(_untracked_call, self, name, bound)

    def _pl_child(self, value: Any, step: tuple[str, Any]) -> Any:
        if _kind(type(value)) == _LEAF:
            return value
        if step[0] != "attr":
            return view_of(value, (*_get(self, "_pl_path"), step), _get(self, "_pl_channel"))
        cache = _get(self, "_pl_cache")
        child = cache.get(step[1]) if cache is not None else None
        if child is not None and _get(child, "_pl_target") is value:
            child._pl_reread()
            return child
        child = view_of(value, (*_get(self, "_pl_path"), step), _get(self, "_pl_channel"))
        if cache is None:
            object.__setattr__(self, "_pl_cache", {step[1]: child})
        else:
            cache[step[1]] = child
        return child

    def __setattr__(self, name: str, value: Any) -> None:
        target, path, channel = _state(self)
        setter = _python_setter(type(target), name)
        if setter is not None:  # runs here, against the view, as a method does
            setter(self, value)
            return
        if isinstance(value, _VIEWS) and _rebinds(
            value, (*path, ("attr", name)), getattr(target, name, _MISSING)
        ):
            return
        value = unwrap_deep(value)
        payload = _payload(channel, value, lambda: f"{render(path)}.{name}")
        change_and_record(
            channel,
            lambda: setattr(target, name, value),
            None if payload is None else SetAttr(path, name, payload),
            lambda: getattr(target, name, _MISSING) is value,
        )

    def __delattr__(self, name: str) -> None:
        target, path, channel = _state(self)
        change_and_record(
            channel,
            lambda: delattr(target, name),
            DelAttr(path, name) if channel.active else None,
            lambda: not hasattr(target, name),
        )

    # -- items
    def __getitem__(self, key: Any) -> Any:
        target = _get(self, "_pl_target")
        if isinstance(key, _VIEWS):
            key = unwrap(key)
        if type(target) is dict or not isinstance(target, dict):
            value = target[key]
        else:  # a dict subclass may make the item (defaultdict): that is a change
            length = len(target)
            value = target[key]
            if len(target) != length:
                self._pl_record_item(key, value)
        if _kinds.get(type(value)) == _LEAF or _kind(type(value)) == _LEAF:
            return value
        if not _get(self, "_pl_path") and _kind(type(target)) == _OBJECT:
            return value  # the dataset's items are built for the caller: untouched
        return self._pl_child(value, ("item", key))

    def __setitem__(self, key: Any, value: Any) -> None:
        target, path, channel = _state(self)
        if type(key) in _ATOMS and type(value) in _ATOMS and channel.active:
            # Immutable: pickled later, with the writes around it. Recorded twice
            # after an interrupt (NOTE [ A change and Ctrl-C ] in _tracking_record.py),
            # the write is made twice, to the same value.
            try:
                target[key] = value
                channel.record_atom(path, target, key, value)
            except BaseException:
                if made(lambda: _holds_item(target, key, value)):
                    channel.record_atom(path, target, key, value)
                raise
            if type(self) is not Tracked:
                _get(self, "_pl_refresh_item")(key, value)
            return
        key = unwrap(key)
        if isinstance(value, _VIEWS) and _rebinds(
            value, (*path, ("item", key)), _item(target, key)
        ):
            return
        if type(value) in _UNWRAPPED or isinstance(value, _VIEWS):
            value = unwrap_deep(value)
        self._pl_record_item(key, value, lambda: target.__setitem__(key, value))

    def _pl_record_item(self, key: Any, value: Any, change: Any = None) -> None:
        """Record ``self[key] = value``, made by calling ``change()`` (or made already)."""
        target, path, channel = _state(self)

        def where() -> str:
            return f"{render(path)}[{key!r}]"

        key_payload = _payload(channel, key, lambda: f"the key of {where()}")
        payload = _payload(channel, value, where)
        recorded = payload is not None and key_payload is not None
        change_and_record(
            channel,
            change or _nothing,
            SetItem(path, key_payload, payload) if recorded else None,  # type: ignore[arg-type]
            lambda: _holds_item(target, key, value),
            _foldable(target),
            whole=None if isinstance(target, collections.abc.Mapping) else self,
        )
        self._pl_refresh()

    def __delitem__(self, key: Any) -> None:
        target, path, channel = _state(self)
        key = unwrap(key)
        key_payload = _payload(channel, key, lambda: f"the key of {render(path)}[{key!r}]")

        def delete() -> None:
            del target[key]

        mapping = isinstance(target, collections.abc.Mapping)
        change_and_record(
            channel,
            delete,
            None if key_payload is None else DelItem(path, key_payload),
            lambda: mapping and key not in target,
            _foldable(target),
            whole=None if mapping else self,  # (a sequence's delete, run twice, deletes two)
        )
        self._pl_refresh()

    # -- protocols: reads go to the object; Python code runs against the view
    def __len__(self) -> int:
        return len(_get(self, "_pl_target"))

    def __iter__(self) -> Any:
        target = _get(self, "_pl_target")
        if isinstance(target, (list, tuple, collections.deque)):
            if set(map(type, target)) <= _ATOMS:
                return iter(target)  # nothing in it to track: the object's own, at C speed
            return self._pl_items()
        python = _python_special(type(target), "__iter__")
        return python(self) if python is not None else iter(target)

    def _pl_items(self) -> Any:
        child = self._pl_child
        for i, value in enumerate(_get(self, "_pl_target")):
            yield child(value, ("item", i))

    def __reversed__(self) -> Any:
        target = _get(self, "_pl_target")
        if isinstance(target, (list, tuple, collections.deque)):
            return reversed(list(self._pl_items()))
        return reversed(target)

    def __contains__(self, item: Any) -> bool:
        return unwrap(item) in _get(self, "_pl_target")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        target = _get(self, "_pl_target")
        python = _python_special(type(target), "__call__")
        return python(self, *args, **kwargs) if python is not None else target(*args, **kwargs)

    def __enter__(self) -> Any:
        python = _python_special(type(_get(self, "_pl_target")), "__enter__")
        return python(self) if python is not None else _get(self, "_pl_target").__enter__()

    def __exit__(self, *exc: Any) -> Any:
        python = _python_special(type(_get(self, "_pl_target")), "__exit__")
        return python(self, *exc) if python is not None else _get(self, "_pl_target").__exit__(*exc)

    def __bool__(self) -> bool:
        return bool(_get(self, "_pl_target"))

    def __hash__(self) -> int:
        return hash(_get(self, "_pl_target"))

    def __repr__(self) -> str:
        return repr(_get(self, "_pl_target"))

    def __str__(self) -> str:
        return str(_get(self, "_pl_target"))

    def __format__(self, spec: str) -> str:
        return format(_get(self, "_pl_target"), spec)

    def __dir__(self) -> list[str]:
        return dir(_get(self, "_pl_target"))

    def __sizeof__(self) -> int:
        return int(_get(self, "_pl_target").__sizeof__())

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_identity, (_get(self, "_pl_target"),))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_identity, (_get(self, "_pl_target"),))

    def __copy__(self) -> Any:
        import copy

        return copy.copy(_get(self, "_pl_target"))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        import copy

        return copy.deepcopy(_get(self, "_pl_target"), memo)


def _identity(obj: Any) -> Any:
    return obj


_BUILTIN_BOUND = (types.BuiltinMethodType, types.MethodWrapperType)


def _python_setter(tp: type, name: str) -> Any:
    """What assigning ``name`` on a ``tp`` runs when it is Python code: a property's
    setter, or a Python descriptor's ``__set__`` (bound to it); else None. Run
    against the view, what it assigns is recorded, and it does not run again in
    the workers (where, drawing random numbers say, it would differ)."""
    found = _setters.get((tp, name), _MISSING)
    if found is _MISSING:
        found = None
        for klass in tp.__mro__:
            if name in klass.__dict__:
                attr = klass.__dict__[name]
                if isinstance(attr, property):
                    found = attr.fset if isinstance(attr.fset, types.FunctionType) else None
                elif isinstance(getattr(type(attr), "__set__", None), types.FunctionType):
                    found = functools.partial(type(attr).__set__, attr)
                break
        _setters[(tp, name)] = found
    return found


_setters: dict[tuple[type, str], Any] = {}


def _python_special(tp: type, name: str) -> Any:
    """``tp``'s special method ``name`` when it is written in Python, else None."""
    fn = getattr(tp, name, None)
    return fn if isinstance(fn, types.FunctionType) else None


# ------------------------------------------------------------------ the forms


class Tracked(View):
    """A proxy for an object of the dataset (NOTE [ View forms ])."""

    __slots__ = ("__weakref__", "_pl_cache", "_pl_channel", "_pl_path", "_pl_target")

    def __init__(self, target: Any, path: Path, channel: Any) -> None:
        self._pl_init(target, path, channel)


#: Every view type (the tensor view joins from ``_tracking_numeric``).
_VIEWS: tuple[type, ...] = (View,)
_tracking_kinds.VIEWS = _VIEWS

from . import _tracking_containers, _tracking_operators  # noqa: E402, F401  (built on View)

#: Special methods a view answers itself when asked for them by name (the rest,
#: like ``__init__`` or ``__dict__``, are the object's).
_OWN = frozenset(
    name
    for name in vars(View)
    if name.startswith("__")
    and name not in ("__init__", "__doc__", "__module__", "__slots__", "__annotations__")
) | {"__weakref__"}

from . import _tracking_numeric  # noqa: E402  (the tensor view; adds to _OWN)

_ViewClass._sealed = True  # every view class is complete
