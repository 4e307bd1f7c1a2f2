"""Tracking views of NumPy arrays and tensors (see NOTE [ View forms ] in ``_tracking.py``).

In-place changes to arrays and tensors happen in C, out of sight of Python
attribute hooks, so these views listen where NumPy and torch let other types
take part in their operations: NumPy's ``__array_ufunc__`` and
``__array_function__``, and torch's ``__torch_function__``. A change is
recorded as the call itself (``Call(path, (ndarray.fill, (THIS, 0), {}))``),
replayed in the workers. Whatever an operation returns that shares memory with
the array or tensor (``w[2:5]``, ``w.reshape(4, 4)``, ``t.T``, ``t.numpy()``)
comes back as a view too, at a path that repeats the operation, so writes into
it are recorded as well.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import numpy as np
import torch

from . import _pickling, _replay, _tracking, _tracking_paths
from ._messages import THIS, Path, SetAttr, SetItem
from ._tracking import Tracked, View
from ._tracking_containers import _mutator, call_mutator
from ._tracking_record import _payload, _state, record_call, record_contents_if_interrupted

#: Tensors up to this many bytes carry their new values after an in-place
#: operation instead of the operation: no larger than the call itself, and
#: exact whatever the operation drew at random.
TENSOR_CONTENTS_LIMIT = 4096

#: ndarray methods that change the array (the others only read it).
_ARRAY_MUTATORS = frozenset(
    {"fill", "sort", "put", "resize", "partition", "setfield", "itemset", "setflags"}
)
#: NumPy functions that write into their first argument.
_ARRAY_WRITERS = frozenset(
    getattr(np, name)
    for name in ("copyto", "put", "place", "putmask", "fill_diagonal", "put_along_axis")
    if hasattr(np, name)
)
#: In-place tensor operations that draw random numbers: replaying them in a
#: worker would draw other numbers, so their results travel instead.
_RANDOM_FILLS = frozenset({
    "uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "dropout_", "alpha_dropout_", "feature_alpha_dropout_",
    "rrelu_",
})  # fmt: skip
_OPERATORS = (
    "add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift",
    "and", "xor", "or",
)  # fmt: skip
_INPLACE_OPERATORS = frozenset(f"__i{op}__" for op in _OPERATORS)


def _raw(obj: Any) -> Any:
    """``obj`` with views replaced by their objects, inside tuples, lists and dicts too."""
    if isinstance(obj, _tracking._VIEWS):
        return _tracking.unwrap(obj)
    if type(obj) in (tuple, list):
        return type(obj)(_raw(x) for x in obj)
    if type(obj) is dict:
        return {k: _raw(v) for k, v in obj.items()}
    return obj


def _mark(obj: Any, target: Any) -> Any:
    """Like :func:`_raw`, but a view of ``target`` becomes :data:`THIS`."""
    if isinstance(obj, _tracking._VIEWS):
        inner = _tracking.unwrap(obj)
        return THIS if inner is target else inner
    if type(obj) in (tuple, list):
        return type(obj)(_mark(x, target) for x in obj)
    if type(obj) is dict:
        return {k: _mark(v, target) for k, v in obj.items()}
    return obj


def _pickled_call(fn: Any, args: Any, kwargs: Any, target: Any) -> bytes | None:
    try:
        return pickle.dumps((fn, _mark(args, target), _mark(kwargs, target)), _pickling.PROTOCOL)
    except Exception:
        return None


def _change(views: list[Any], fn: Any, args: Any, kwargs: Any, run: Any) -> Any:
    """Run an operation that changes the objects of ``views``, and record it: as
    the call when one object changes and the call pickles, else as contents."""
    targets = {id(v._pl_target): v for v in views}
    try:
        return _run_and_record(views, targets, fn, args, kwargs, run)
    except BaseException as exc:  # NOTE [ A C call and Ctrl-C ] in _tracking_record.py
        record_contents_if_interrupted(exc, targets.values())
        raise


def _run_and_record(
    views: list[Any], targets: dict[int, Any], fn: Any, args: Any, kwargs: Any, run: Any
) -> Any:
    first = views[0]
    active = first._pl_channel.active
    if active:
        for view in targets.values():
            _state(view)  # a reference kept across a change: checked first
    one = active and len(targets) == 1
    call = None
    if one:
        with first._pl_channel.pinning():
            call = _pickled_call(fn, args, kwargs, first._pl_target)
    result = run()
    if active:
        for view in targets.values():
            record_call(view, call if view is first else None)
    for view in views:  # (loops, not next() over a generator: NOTE in _tracking._base)
        if view._pl_target is result:
            return view
    return result


# ------------------------------------------------------------------- arrays


class _Flat:
    """``view.flat``: reads go to the array's own flat iterator; a write is made as
    ``np.put`` on the view (which fills the same places, repeating the value the
    same way), so it is recorded and reaches the workers."""

    __slots__ = ("_view",)

    def __init__(self, view: ArrayView) -> None:
        self._view = view

    def __getitem__(self, key: Any) -> Any:
        return self._view._pl_target.flat[_raw(key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        key, size = _raw(key), self._view._pl_target.size
        if isinstance(key, slice):
            places: Any = np.arange(*key.indices(size))
        elif isinstance(key, (int, np.integer)):
            places = key  # np.put takes a negative index as indexing does
        else:  # an index array or a mask
            places = np.arange(size)[key]
        np.put(self._view, places, _raw(value))  # type: ignore[arg-type]

    def __iter__(self) -> Any:
        return iter(self._view._pl_target.flat)

    def __len__(self) -> int:
        return int(self._view._pl_target.size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._view._pl_target.flat, name)


class ArrayView(Tracked):
    """A view of a NumPy array: a proxy that speaks NumPy's protocols."""

    __slots__ = ()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        target = self._pl_target
        if copy:
            return np.array(target, dtype=dtype, copy=True)
        out = target.view(np.ndarray)
        out.flags.writeable = False  # a write through it would reach no worker: refuse it
        return out if dtype is None else out.astype(dtype, copy=False)

    def _pl_getattr(self, name: str) -> Any:
        if name in ("__array_interface__", "__array_struct__"):
            # NumPy would build a writable alias from these: it must use __array__.
            raise AttributeError(name)
        if name == "flat":  # reads as NumPy's; a write (arr.flat[i] = v) is recorded
            return _Flat(self)
        return super()._pl_getattr(name)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out", ())
        outs = out if isinstance(out, tuple) else (out,)
        changed = [o for o in outs if isinstance(o, ArrayView)]
        if method == "at" and isinstance(inputs[0], ArrayView):
            changed.append(inputs[0])
        raw_inputs, raw_kwargs = _raw(inputs), _raw(kwargs)

        def run() -> Any:
            return getattr(ufunc, method)(*raw_inputs, **raw_kwargs)

        if not changed:
            return run()
        call_args = (ufunc, method, *inputs)
        return _change(changed, _replay.call_ufunc, call_args, kwargs, run)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        changed = [o for o in _outs(kwargs) if isinstance(o, ArrayView)]
        if func in _ARRAY_WRITERS and args and isinstance(args[0], ArrayView):
            changed.append(args[0])
        raw_args, raw_kwargs = _raw(args), _raw(kwargs)
        if changed:
            return _change(changed, func, args, kwargs, lambda: func(*raw_args, **raw_kwargs))
        return _aliases(func(*raw_args, **raw_kwargs), func, args, kwargs)

    def __getitem__(self, key: Any) -> Any:
        target, path = self._pl_target, self._pl_path
        key = _raw(key)
        value = target[key]
        if isinstance(value, np.ndarray) and np.may_share_memory(value, target):
            return ArrayView(value, (*path, ("item", key)), self._pl_channel)
        return value

    def __iter__(self) -> Any:
        target = self._pl_target
        if target.ndim <= 1:
            return iter(target)
        return (self[i] for i in range(len(target)))

    def _pl_builtin(self, name: str, bound: Any) -> Any:
        unbound = getattr(type(self._pl_target), name)
        if name in _ARRAY_MUTATORS:
            return functools.partial(_mutator, self, name, unbound)
        if name.startswith("__"):
            return bound
        return functools.partial(_array_method, self, name, unbound, bound)


def _outs(kwargs: Any) -> tuple[Any, ...]:
    out = kwargs.get("out")
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _array_method(
    view: ArrayView, name: str, unbound: Any, bound: Any, *args: Any, **kw: Any
) -> Any:
    """A reading ndarray method; its result comes back as a view if it shares memory."""
    if name == "byteswap" and (kw.get("inplace") or (args and args[0])):
        return call_mutator(view, name, unbound, args, kw)
    result = bound(*_raw(args), **_raw(kw))
    return _aliases(result, unbound, (view, *args), kw)


def _aliases(result: Any, fn: Any, args: Any, kwargs: Any) -> Any:
    """``result``, as a view when it shares memory with an array or tensor of ``args``."""
    if not isinstance(result, (np.ndarray, torch.Tensor)):
        return result
    views: list[Any] = [a for a in args if isinstance(a, _tracking._VIEWS)]
    for view in views:
        target = view._pl_target
        if not _shares(result, target):
            continue
        step = _step(fn, args, kwargs, target)
        if step is not None:
            return _tracking.view_of(result, (*view._pl_path, step), view._pl_channel)
        if isinstance(result, np.ndarray):
            result = result.view()  # shares memory we cannot follow: refuse writes
            result.flags.writeable = False
        break
    return result


def _shares(result: Any, target: Any) -> bool:
    try:
        if isinstance(result, np.ndarray) and isinstance(target, np.ndarray):
            return bool(np.may_share_memory(result, target))
        if isinstance(result, torch.Tensor) and isinstance(target, torch.Tensor):
            return bool(result.untyped_storage().data_ptr() == target.untyped_storage().data_ptr())
        if isinstance(result, np.ndarray) and isinstance(target, torch.Tensor):
            start = target.untyped_storage().data_ptr()
            end = start + target.untyped_storage().nbytes()
            return bool(start <= result.__array_interface__["data"][0] < end)
    except Exception:  # sparse, nested, meta tensors: nothing to follow
        return False
    return False


def _step(fn: Any, args: Any, kwargs: Any, target: Any) -> tuple[str, Any] | None:
    """The path step that repeats ``fn(*args, **kwargs)`` on ``target`` in a worker."""
    name = getattr(fn, "__name__", "")
    if name == "__get__":  # a property: t.T, t.data
        return ("attr", fn.__self__.__name__)
    if name == "__getitem__" and len(args) == 2:
        return ("item", _raw(args[1]))
    call = _pickled_call(fn, args, kwargs, target)
    return None if call is None else ("call", call)


# ------------------------------------------------------------------ tensors


class TensorView(torch.Tensor):
    """A view of a tensor: a real tensor sharing its memory, whose torch
    operations run on the tensor itself and record what they change."""

    _pl_target: Any
    _pl_path: Path
    _pl_channel: Any

    @staticmethod
    def make(target: torch.Tensor, path: Path, channel: Any) -> Any:
        try:
            view = torch.Tensor._make_subclass(TensorView, target.detach(), False)
        except Exception:  # layouts a subclass cannot share (sparse, nested): raw
            return target
        state = view.__dict__
        state.update(_pl_target=target, _pl_path=path, _pl_channel=channel)
        if isinstance(target, torch.nn.Parameter):
            state["_is_param"] = True  # isinstance(view, nn.Parameter) holds
        return view

    def _pl_refresh(self) -> None:
        """Nothing to refresh: the view shares the tensor's memory."""

    def _pl_settle(self) -> None:
        """Nothing to settle: a write into the view is a write into the tensor."""

    def _pl_reread(self) -> None:
        """Nothing to reread: the view shares the tensor's memory."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        changed = _changed_tensor(name, args, kwargs)
        raw_args, raw_kwargs = _raw(args), _raw(kwargs)
        if changed is not None:
            return _change_tensor(changed, func, name, args, kwargs, (raw_args, raw_kwargs))
        if name == "__iter__":
            view = args[0]
            return iter([view[i] for i in range(len(view._pl_target))])
        result = func(*raw_args, **raw_kwargs)
        if name == "__array__":
            result.flags.writeable = False
            return result
        return _aliases_of_tensor(result, func, args, kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_pl_") or hasattr(torch.Tensor, name):
            super().__setattr__(name, value)  # a tensor property: __torch_function__ records
            return
        target, path, channel = _state(self)
        value = _tracking.unwrap_deep(value)
        payload = _payload(channel, value, f"{_tracking_paths.render(path)}.{name}")
        setattr(target, name, value)
        if payload is not None:
            channel.record(SetAttr(path, name, payload))


def _changed_tensor(name: str, args: Any, kwargs: Any) -> Any:
    """The tensor view an operation changes, if it changes one."""
    # torch.nn.init passes the tensor by keyword: uniform_(tensor=..., a=..., b=...)
    first = args[0] if args else kwargs.get("tensor", kwargs.get("input"))
    if isinstance(first, TensorView) and (
        name in _INPLACE_OPERATORS
        or name in ("__setitem__", "__set__")
        or (name.endswith("_") and not name.startswith("_"))
        or kwargs.get("inplace") is True
    ):
        return first
    for out in _outs(kwargs):
        if isinstance(out, TensorView):
            return out
    return None


def _change_tensor(view: Any, func: Any, name: str, args: Any, kwargs: Any, raw: Any) -> Any:
    try:
        return _run_tensor_change(view, func, name, args, kwargs, raw)
    except BaseException as exc:  # NOTE [ A C call and Ctrl-C ] in _tracking_record.py
        record_contents_if_interrupted(exc, (view,))
        raise


def _run_tensor_change(view: Any, func: Any, name: str, args: Any, kwargs: Any, raw: Any) -> Any:
    raw_args, raw_kwargs = raw
    target, path, channel = _state(view)
    if name == "__set__":  # t.data = x, t.requires_grad = False
        prop, value = func.__self__.__name__, raw_args[1]
        payload = _payload(channel, value, f"{_tracking_paths.render(path)}.{prop}")
        func(*raw_args)
        if payload is not None:
            channel.record(SetAttr(path, prop, payload))
        return None
    if name == "__setitem__":
        _set_tensor_item(view, raw_args[1], raw_args[2])
        return None
    small = target.numel() * target.element_size() <= TENSOR_CONTENTS_LIMIT
    drawn = name in _RANDOM_FILLS or getattr(func, "__module__", "") == "torch.nn.init"
    if small or drawn:  # the values travel (record_call with no call)
        result = func(*raw_args, **raw_kwargs)
        if channel.active:
            record_call(view, None)
        return view if result is target else result
    return _change([view], func, args, kwargs, lambda: func(*raw_args, **raw_kwargs))


def _set_tensor_item(view: Any, key: Any, value: Any) -> None:
    target, path, channel = _state(view)
    where = f"{_tracking_paths.render(path)}[{key!r}]"
    key_payload = _payload(channel, key, f"the key of {where}")
    payload = _payload(channel, value, where)
    target[key] = value
    if payload is not None and key_payload is not None:
        channel.record(SetItem(path, key_payload, payload), target)


def _aliases_of_tensor(result: Any, func: Any, args: Any, kwargs: Any) -> Any:
    """Like :func:`_aliases`, also for the tuples ``chunk`` and ``unbind`` return."""
    if isinstance(result, tuple) and result and all(isinstance(r, torch.Tensor) for r in result):
        views = [a for a in args if isinstance(a, TensorView)]
        if views and all(_shares(r, views[0]._pl_target) for r in result):
            step = _step(func, args, kwargs, views[0]._pl_target)
            if step is not None:
                base = (*views[0]._pl_path, step)
                channel = views[0]._pl_channel
                return type(result)(
                    TensorView.make(r, (*base, ("item", i)), channel) for i, r in enumerate(result)
                )
    return _aliases(result, func, args, kwargs)


_tracking._VIEWS = (View, TensorView)
_tracking._OWN |= {"__array__", "__array_ufunc__", "__array_function__"}
