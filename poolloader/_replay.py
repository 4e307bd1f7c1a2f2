"""The control channel's other end: a recorded change applied to a copy of the dataset.

Workers and the template process replay what the main process's
:class:`~poolloader._control.Channel` recorded (NOTE [ What is carried ] in
``_tracking_record.py``): each message names the object it changes by a path from the
dataset, and carries its values pickled, so only the receiver unpickles them.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any

import numpy as np
import torch

from ._messages import (
    Broadcast,
    Call,
    Changes,
    DelAttr,
    DelItem,
    Path,
    Refresh,
    SetAttr,
    SetItem,
    SetItems,
    This,
    Update,
)


def resolve(dataset: Any, path: Path) -> Any:
    """Follow ``path`` from ``dataset`` to the object a change applies to."""
    obj = dataset
    for kind, key in path:
        if kind == "attr":
            obj = getattr(obj, key)
        elif kind == "item":
            obj = obj[key]
        else:
            fn, args, kwargs = pickle.loads(key)
            obj = fn(*_put(args, obj), **_put(kwargs, obj))
    return obj


def _put(arguments: Any, obj: Any) -> Any:
    """``arguments`` with :data:`THIS` (also inside a tuple) replaced by ``obj``."""
    if isinstance(arguments, This):
        return obj
    if isinstance(arguments, tuple):
        return tuple(_put(a, obj) for a in arguments)
    if isinstance(arguments, dict):
        return {k: _put(v, obj) for k, v in arguments.items()}
    return arguments


def apply_update(dataset: Any, update: Update) -> None:
    """Apply a recorded change to a worker's copy of the dataset.

    A change other than a broadcast is replayed without autograd: it was legal
    where it was made, perhaps under ``torch.no_grad()`` (``load_state_dict``,
    an EMA's ``weight.mul_(0.5)``), and in place on a parameter that needs
    grad it would fail here otherwise; a dataset's copy needs no graph."""
    if isinstance(update, Changes):
        _apply_all(dataset, update.updates)
    elif isinstance(update, Broadcast):
        fn, args, kwargs = pickle.loads(update.call)
        fn(dataset, *args, **kwargs)
    else:
        with torch.no_grad():
            _apply_change(dataset, update)


def _apply_change(dataset: Any, update: Update) -> None:
    if isinstance(update, SetAttr):
        setattr(resolve(dataset, update.path), update.name, pickle.loads(update.value))
    elif isinstance(update, DelAttr):
        delattr(resolve(dataset, update.path), update.name)
    elif isinstance(update, SetItem):
        resolve(dataset, update.path)[pickle.loads(update.key)] = pickle.loads(update.value)
    elif isinstance(update, SetItems):
        obj = resolve(dataset, update.path)
        for key, value in pickle.loads(update.items):
            obj[key] = value
    elif isinstance(update, DelItem):
        del resolve(dataset, update.path)[pickle.loads(update.key)]
    elif isinstance(update, Call):
        obj = resolve(dataset, update.path)
        fn, args, kwargs = pickle.loads(update.call)
        fn(*_put(args, obj), **_put(kwargs, obj))
    elif not isinstance(update, Refresh):  # a fresh start changes no dataset
        raise TypeError(f"not a control update: {update!r}")


def _apply_all(dataset: Any, updates: tuple[Update, ...]) -> None:
    """Apply every update of a group, then raise the first that failed, if one did:
    a failure leaves the worker's copy as close to the main process's as it can."""
    failure: Exception | None = None
    for update in updates:
        try:
            apply_update(dataset, update)
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def assign_contents(obj: Any, value: Any) -> None:
    """Give ``obj`` the contents ``value`` (as :func:`~._folding.contents_call` took them)."""
    # An in-place operation may have changed the shape (``resize_(1)``,
    # ``unsqueeze_(0)``): the copy takes the new one, where writing the values in
    # would broadcast them over the old shape.
    if isinstance(obj, np.ndarray):
        if obj.shape != value.shape:
            try:
                obj.resize(value.shape, refcheck=False)
            except ValueError as exc:
                raise ValueError(
                    f"an array changed shape in place, {obj.shape} to {value.shape}, which "
                    f"this process's copy cannot follow ({exc}): assign a new array through "
                    "loader.dataset instead"
                ) from exc
        obj[...] = value
    elif isinstance(obj, torch.Tensor):
        with torch.no_grad():
            if obj.shape == value.shape:
                obj.copy_(value)
            else:
                obj.set_(value)
    elif isinstance(obj, dict):
        obj.clear()
        for key, item in value:
            obj[key] = item
    elif isinstance(obj, (list, bytearray)):
        obj[:] = value
    else:  # set, deque
        obj.clear()
        obj.extend(value) if isinstance(obj, collections.deque) else obj.update(value)


def call_ufunc(ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
    """``getattr(ufunc, method)(*inputs, **kwargs)``, picklable by reference."""
    return getattr(ufunc, method)(*inputs, **kwargs)
