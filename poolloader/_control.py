"""The control channel: changes made in the main process reach every worker.

``loader.dataset`` is a :class:`Tracked` view of the dataset. Reading through
it is an ordinary attribute read in the main process (no IPC); assigning or
deleting through it, at any depth (``loader.dataset.transform.p = 0.3``,
``loader.dataset.cfg["crop"] = 2.0``), changes the main process's dataset and
records the change in the :class:`Channel`. ``loader.broadcast(fn, ...)``
records a call. Each recorded change bumps the channel's *generation*.

NOTE [ Control ordering ]

Guarantee: a change is seen by every batch whose task is submitted after the
change, in every worker, and by no batch submitted before it.

Every task is stamped, in the main process only, with the generation current
when it was submitted. Each worker has one FIFO connection from the main
process, and the pool remembers the generation each worker has reached. Before
sending a worker a task of generation g, the pool sends it the changes it lacks
up to g, and only those. So:

* a worker applies a change exactly before the first task that must see it;
* the pool never gives a worker a task older than the generation it has
  reached (the task waits for a worker that is not ahead of it), so no task
  submitted before a change sees it;
* when nothing changes, nothing extra is sent: tasks carry no generation and
  a change costs one message per worker, sent once, lazily;
* a worker started to replace a dead one starts from the channel's base
  snapshot and catches up the same way.

A change whose value cannot be pickled fails at the assignment, before the main
process's dataset is touched, naming the attribute.

Not tracked: mutations made by calling methods (``loader.dataset.set_epoch(3)``,
``loader.dataset.items.append(x)``) and in-place changes of tensors and arrays.
Use ``loader.broadcast`` for those.
"""

from __future__ import annotations

import copy
import enum
import functools
import pickle
import threading
import types
from typing import Any

import numpy as np
import torch

from . import _pickling
from ._messages import Broadcast, DelAttr, DelItem, Path, Replace, SetAttr, SetItem, Update

# ------------------------------------------------------------------ the channel


class Channel:
    """The log of changes since the workers' base snapshot of the dataset."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._log: list[tuple[int, Update]] = []
        self._base_generation = 0
        self._base: bytes | None = None
        self.messages_recorded = 0

    @property
    def active(self) -> bool:
        """Whether workers exist that need changes (a snapshot has been taken)."""
        return self._base is not None

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def base(self) -> tuple[int, bytes]:
        """``(generation, pickled dataset)`` that a newly started worker begins from."""
        with self._lock:
            if self._base is None:
                raise RuntimeError("the control channel has no snapshot: no pool is running")
            return self._base_generation, self._base

    def start(self, dataset: bytes) -> None:
        """Take ``dataset`` (pickled) as the base for the workers about to start."""
        with self._lock:
            self._base, self._base_generation, self._log = dataset, self._generation, []

    def stop(self) -> None:
        with self._lock:
            self._base, self._log = None, []

    def record(self, update: Update) -> None:
        with self._lock:
            if self._base is None:
                return
            self._generation += 1
            self._log.append((self._generation, update))
            if not isinstance(update, Replace):  # epoch refreshes are not user changes
                self.messages_recorded += 1

    def updates(self, after: int, upto: int) -> list[Update]:
        """The changes a worker at generation ``after`` needs to reach ``upto``.

        A worker behind the base gets the base itself as a :class:`Replace`; a
        :class:`Replace` in the log makes everything before it unnecessary.
        """
        with self._lock:
            found: list[Update] = []
            if after < self._base_generation and self._base is not None:
                found.append(Replace(self._base))
            found.extend(u for g, u in self._log if max(after, self._base_generation) < g <= upto)
        for i in range(len(found) - 1, 0, -1):
            if isinstance(found[i], Replace):
                return found[i:]
        return found

    def rebase(self, oldest_needed: int) -> None:
        """Drop what no worker can need: everything before the newest Replace at or
        below ``oldest_needed`` (the oldest generation of any unfinished task)."""
        with self._lock:
            replaces = [
                (g, u) for g, u in self._log if isinstance(u, Replace) and g <= oldest_needed
            ]
            if not replaces:
                return
            generation, newest = replaces[-1]
            self._base, self._base_generation = newest.dataset, generation
            self._log = [(g, u) for g, u in self._log if g > generation]


# ------------------------------------------------------------ tracked views

_NEVER_TRACKED: tuple[type, ...] = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
    enum.Enum,
    torch.Tensor,
    np.ndarray,
    np.generic,
)


def _trackable(value: object) -> bool:
    if isinstance(value, (dict, list)):
        return True
    return hasattr(value, "__dict__") and not isinstance(value, _NEVER_TRACKED)


def unwrap(obj: Any) -> Any:
    """The object behind a :class:`Tracked` view (or ``obj`` itself)."""
    while type(obj) is Tracked:
        obj = object.__getattribute__(obj, "_pl_target")
    return obj


def render(path: Path) -> str:
    """``(("attr", "cfg"), ("item", "crop"))`` → ``"dataset.cfg['crop']"``."""
    parts = ["dataset"]
    for kind, key in path:
        parts.append(f".{key}" if kind == "attr" else f"[{key!r}]")
    return "".join(parts)


class Tracked:
    """A view of a dataset (or of an object inside it) that records changes.

    ``isinstance(view, type(target))`` holds, reads cost nothing but a call, and
    the view pickles and copies as its target. ``loader.dataset[i]`` returns
    items untouched; attribute values that are plain objects, dicts or lists
    come back as views too, so changes inside them are recorded.
    """

    __slots__ = ("_pl_channel", "_pl_path", "_pl_target")

    def __init__(self, target: Any, path: Path, channel: Channel) -> None:
        object.__setattr__(self, "_pl_target", target)
        object.__setattr__(self, "_pl_path", path)
        object.__setattr__(self, "_pl_channel", channel)

    # -- identity
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return type(object.__getattribute__(self, "_pl_target"))

    def _pl(self) -> tuple[Any, Path, Channel]:
        get = object.__getattribute__
        return get(self, "_pl_target"), get(self, "_pl_path"), get(self, "_pl_channel")

    def _pl_child(self, value: Any, step: tuple[str, Any]) -> Any:
        if not _trackable(value):
            return value
        _, path, channel = self._pl()
        return Tracked(value, (*path, step), channel)

    # -- attributes
    def __getattr__(self, name: str) -> Any:
        target = object.__getattribute__(self, "_pl_target")
        return self._pl_child(getattr(target, name), ("attr", name))

    def __setattr__(self, name: str, value: Any) -> None:
        target, path, channel = self._pl()
        value = unwrap(value)
        payload = _payload(channel, value, f"{render(path)}.{name}")
        setattr(target, name, value)
        if payload is not None:
            channel.record(SetAttr(path, name, payload))

    def __delattr__(self, name: str) -> None:
        target, path, channel = self._pl()
        delattr(target, name)
        channel.record(DelAttr(path, name))

    # -- items
    def __getitem__(self, key: Any) -> Any:
        target, path, _ = self._pl()
        value = target[key]
        return value if not path else self._pl_child(value, ("item", key))

    def __setitem__(self, key: Any, value: Any) -> None:
        target, path, channel = self._pl()
        value = unwrap(value)
        where = f"{render(path)}[{key!r}]"
        key_payload = _payload(channel, key, f"the key of {where}")
        payload = _payload(channel, value, where)
        target[key] = value
        if payload is not None and key_payload is not None:
            channel.record(SetItem(path, key_payload, payload))

    def __delitem__(self, key: Any) -> None:
        target, path, channel = self._pl()
        key_payload = _payload(channel, key, f"the key of {render(path)}[{key!r}]")
        del target[key]
        if key_payload is not None:
            channel.record(DelItem(path, key_payload))

    # -- the protocols datasets and transforms use, forwarded
    def __len__(self) -> int:
        return len(self._pl()[0])

    def __iter__(self) -> Any:
        return iter(self._pl()[0])

    def __contains__(self, item: Any) -> bool:
        return item in self._pl()[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pl()[0](*args, **kwargs)

    def __bool__(self) -> bool:
        return bool(self._pl()[0])

    def __eq__(self, other: object) -> bool:
        return bool(self._pl()[0] == unwrap(other))

    def __hash__(self) -> int:
        return hash(self._pl()[0])

    def __add__(self, other: Any) -> Any:
        return self._pl()[0] + unwrap(other)

    def __radd__(self, other: Any) -> Any:
        return unwrap(other) + self._pl()[0]

    def __repr__(self) -> str:
        return repr(self._pl()[0])

    def __str__(self) -> str:
        return str(self._pl()[0])

    def __dir__(self) -> list[str]:
        return dir(self._pl()[0])

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_identity, (self._pl()[0],))

    def __copy__(self) -> Any:
        return copy.copy(self._pl()[0])

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self._pl()[0], memo)


def _identity(obj: Any) -> Any:
    return obj


def _payload(channel: Channel, value: Any, where: str) -> bytes | None:
    """Pickle a value for the workers (``None`` when no workers need it)."""
    if not channel.active:
        return None
    return _pickling.dumps(value, where)


def broadcast_payload(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a broadcast call, failing with the function's name when it cannot be."""
    name = getattr(fn, "__qualname__", repr(fn))
    _pickling.dumps(fn, f"the broadcast function {name}")
    return _pickling.dumps((fn, args, kwargs), f"the arguments of broadcast({name}, ...)")


# ------------------------------------------------------------- in a worker


def resolve(dataset: Any, path: Path) -> Any:
    """Follow ``path`` from ``dataset`` to the object a change applies to."""
    obj = dataset
    for kind, key in path:
        obj = getattr(obj, key) if kind == "attr" else obj[key]
    return obj


def apply_update(dataset: Any, update: Update) -> None:
    """Apply a recorded change to a worker's copy of the dataset."""
    if isinstance(update, SetAttr):
        setattr(resolve(dataset, update.path), update.name, pickle.loads(update.value))
    elif isinstance(update, DelAttr):
        delattr(resolve(dataset, update.path), update.name)
    elif isinstance(update, SetItem):
        resolve(dataset, update.path)[pickle.loads(update.key)] = pickle.loads(update.value)
    elif isinstance(update, DelItem):
        del resolve(dataset, update.path)[pickle.loads(update.key)]
    elif isinstance(update, Broadcast):
        fn, args, kwargs = pickle.loads(update.call)
        fn(dataset, *args, **kwargs)
    else:
        raise TypeError(f"not a control update: {update!r}")
