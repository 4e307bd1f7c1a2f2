"""The messages that travel between the main process and its workers.

Each message is a small frozen dataclass with one meaning. Main → worker:
:class:`Task`, :class:`BeginEpoch`, the control updates (:class:`SetAttr`,
:class:`DelAttr`, :class:`SetItem`, :class:`SetItems`, :class:`DelItem`, :class:`Call`,
:class:`Broadcast`, :class:`Replace`, and :class:`Changes` grouping several),
:class:`Sync`, :class:`Forget`, :class:`StartedSlot` and
:class:`Stop`. Worker → main:
:class:`Ready`, :class:`StartFailed`, :class:`Done`, :class:`Failed`, :class:`Exhausted`
and :class:`Synced`. Main →
template process (NOTE [ Templates ] in ``_template.py``): :class:`ForkWorker`,
:class:`Advance` and :class:`Stop`; template → main: :class:`TemplateReady`,
:class:`TemplateUnsafe`, :class:`StartFailed`, :class:`Forked`, :class:`Advanced` and
:class:`Exited`.

Values chosen by the user (attribute values, broadcast functions, datasets) are
pickled once in the main process, when the change is made, and travel as
``bytes``: a value that cannot be pickled fails at the assignment, and the same
bytes serve every worker, including workers started later to replace dead ones.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .errors import RemoteTraceback

#: One step of a path from the dataset to a nested object: ("attr", name), ("item", key)
#: or ("call", pickled (fn, args, kwargs)) for an object a call returned that shares
#: memory with the one before it (``w.reshape(4, 4)``, ``t.T``); :data:`THIS` in the
#: arguments stands for that object.
Step = tuple[str, Any]
Path = tuple[Step, ...]


_M = TypeVar("_M")


def message(cls: type[_M]) -> type[_M]:
    """Let a frozen, slotted dataclass pickle as its constructor call.

    A slotted dataclass otherwise pickles through ``__getstate__`` and
    ``__setstate__``, which look up the fields on every call: several
    microseconds per message. (The two messages of every batch take a shorter
    form still on the wire: NOTE [ Hot messages ] in ``_wire.py``.)"""
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def __reduce__(self: Any) -> tuple[Any, tuple[Any, ...]]:
        return cls, tuple([getattr(self, name) for name in names])

    cls.__reduce__ = __reduce__  # type: ignore[method-assign]
    return cls


# ---------------------------------------------------------------- main → worker


@message
@dataclass(frozen=True, slots=True)
class Task:
    """Load one batch: ``index`` is what the sampler yielded for batch ``position``.

    With the slab transport, ``slab`` names the slab of the pool the batch is to
    be collated into (0: none is free and big enough); ``slab_size`` > 0 says this
    worker does not map it yet, and its descriptor follows the task on the
    connection; ``may_make`` whether the worker may make a new slab when the
    batch fits none it was given (NOTE [ One pool of slabs ] in ``_slab_transport.py``)."""

    seq: int
    epoch: int
    position: int
    index: Any
    slab: int = 0
    slab_size: int = 0
    may_make: bool = True


@message
@dataclass(frozen=True, slots=True)
class BeginEpoch:
    """Sent to a worker before its first task of an epoch.

    ``begun``: which beginning of the epoch this is, one count per
    ``Pool.begin_epoch`` (an ``iter()`` that raised begins the same epoch number
    again): a worker goes back to an epoch it paused only when the count is the
    same. ``shared_seed``: for an ``IterDataPipe`` dataset, the seed its random
    operations (shuffle) take this epoch, the same in every worker, as torch
    seeds them."""

    epoch: int
    begun: int
    base_seed: int
    shared_seed: int | None = None


@message
@dataclass(frozen=True, slots=True)
class SetAttr:
    path: Path
    name: str
    value: bytes


@message
@dataclass(frozen=True, slots=True)
class DelAttr:
    path: Path
    name: str


@message
@dataclass(frozen=True, slots=True)
class SetItem:
    path: Path
    key: bytes
    value: bytes


@message
@dataclass(frozen=True, slots=True)
class SetItems:
    """Several item writes into one container: ``items`` pickles ``[(key, value), ...]``.

    What a run of small writes (a shuffle, a loop of assignments) between two
    batches becomes: one message, a few bytes a write."""

    path: Path
    items: bytes


@message
@dataclass(frozen=True, slots=True)
class DelItem:
    path: Path
    key: bytes


@message
@dataclass(frozen=True, slots=True)
class This:
    """Stands for the object at a :class:`Call`'s path among the call's arguments."""


#: The one :class:`This` (compare with ``isinstance``: unpickling makes a new one).
THIS = This()


@message
@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(*args, **kwargs)`` on the object at ``path``.

    ``call`` pickles ``(fn, args, kwargs)``; :data:`THIS` among ``args`` (or in a
    tuple among them, as in ``out=(THIS,)``) and ``kwargs`` stands for that
    object. Records a mutating method implemented in C (``list.append``,
    ``ndarray.fill``, ``Tensor.add_``), an in-place NumPy or torch function, or
    a container's whole contents after many small changes."""

    path: Path
    call: bytes


@message
@dataclass(frozen=True, slots=True)
class Broadcast:
    """Run ``fn(dataset, *args, **kwargs)``; ``call`` pickles ``(fn, args, kwargs)``."""

    call: bytes


@message
@dataclass(frozen=True, slots=True)
class Replace:
    """Swap in a fresh copy of the dataset and run ``worker_init_fn`` again."""

    dataset: bytes


@message
@dataclass(frozen=True, slots=True)
class Refresh:
    """Workers from here on start afresh (a new epoch with ``persistent_workers=False``)
    from the dataset as it was: it has not changed since the last snapshot.

    Only recorded when workers are forked from a template, which keeps that
    dataset: the fresh workers are forked from it, and no one unpickles anything."""


@message
@dataclass(frozen=True, slots=True)
class Changes:
    """Several changes made between two task submissions, applied in order.

    One message whatever their number: a method that sets ten attributes, or a
    shuffle that writes every item of a list, costs one message per worker."""

    updates: tuple[SetAttr | DelAttr | SetItem | SetItems | DelItem | Call | Broadcast, ...]


Update = (
    SetAttr
    | DelAttr
    | SetItem
    | SetItems
    | DelItem
    | Call
    | Broadcast
    | Replace
    | Refresh
    | Changes
)


@message
@dataclass(frozen=True, slots=True)
class Forget:
    """The main process closed these slabs (idle, aged, or one it could not map):
    the worker unmaps them; no task names them again.

    Handled by the worker's inbox thread at once, not queued behind tasks."""

    slabs: tuple[int, ...]


@message
@dataclass(frozen=True, slots=True)
class Stop:
    """Finish: stop the processes the worker started, then exit."""


@message
@dataclass(frozen=True, slots=True)
class StartedSlot:
    """The first message on a worker's connection, followed by a descriptor of a
    little shared memory: the worker writes there the ``seq`` of each task as it
    starts it, so that the main process knows which task a dead worker was running
    (NOTE [ Started tasks ] in ``_iothread.py``). Handled by the inbox thread."""


@message
@dataclass(frozen=True, slots=True)
class Audit:
    """Answer :class:`Audited` once every message before this one is handled: a task
    the pool counts as sent that the worker has not answered by then never reached
    it (NOTE [ Tasks never sent ] in ``_iothread.py``)."""

    token: int


@message
@dataclass(frozen=True, slots=True)
class Sync:
    """Follows the changes sent to a worker with no task: once it has applied
    them, it answers :class:`Synced` (NOTE [ Pinned segments ] in ``_control.py``)."""

    generation: int


# ---------------------------------------------------------------- worker → main


@message
@dataclass(frozen=True, slots=True)
class RemoteError:
    """An exception raised in a worker, packed so it can be re-raised as its own type."""

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None
    #: The exception's class, pickled by name, for an exception that does not
    #: pickle itself (one holding a lock, say).
    pickled_type: bytes | None = None

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteError:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        pickled: bytes | None
        pickled_type: bytes | None = None
        try:
            pickled = pickle.dumps(exc)
            pickle.loads(pickled)
        except Exception:
            pickled = None
            try:
                pickled_type = pickle.dumps(type(exc))
            except Exception:
                pass
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return cls(name, str(exc), text, pickled, pickled_type)

    def rebuild(self) -> BaseException:
        """The original exception if it survived pickling; else one of its class
        made from its message, as torch re-raises every worker exception; else a
        RuntimeError naming it."""
        exc: BaseException | None = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                exc = None
        if exc is None and self.pickled_type is not None:
            try:
                kind = pickle.loads(self.pickled_type)
                exc = (
                    kind(self.message)
                    if isinstance(kind, type) and issubclass(kind, BaseException)
                    else None
                )
            except Exception:
                exc = None
        if exc is None:
            exc = RuntimeError(f"{self.type_name}: {self.message}")
        exc.__cause__ = RemoteTraceback(f'\n"""\n{self.traceback}"""')
        return exc


@message
@dataclass(frozen=True, slots=True)
class Ready:
    worker_id: int
    pid: int


@message
@dataclass(frozen=True, slots=True)
class StartFailed:
    worker_id: int
    pid: int
    error: RemoteError


@message
@dataclass(frozen=True, slots=True)
class Done:
    """Batch ``seq`` loaded; ``payload`` is the transport's reference to it."""

    seq: int
    payload: Any
    nbytes: int
    elapsed: float


@message
@dataclass(frozen=True, slots=True)
class Failed:
    """Dataset or collate code raised while loading batch ``seq``."""

    seq: int
    error: RemoteError
    elapsed: float


@message
@dataclass(frozen=True, slots=True)
class Exhausted:
    """The worker's iterable-dataset shard has no more items for this epoch."""

    seq: int


@message
@dataclass(frozen=True, slots=True)
class Synced:
    """The worker applied every change up to ``generation`` (the answer to :class:`Sync`)."""

    generation: int


@message
@dataclass(frozen=True, slots=True)
class Audited:
    """The answer to :class:`Audit` ``token``: every task sent before it was answered."""

    token: int


# ------------------------------------------------------ main ↔ template process


@message
@dataclass(frozen=True, slots=True)
class PickledObject:
    """An object the main process pickled once; the template process unpickles it
    once. (Objects that may only be pickled while a process is being started, such
    as ``multiprocessing.Lock``, travel as themselves in the template's arguments.)"""

    data: bytes


@message
@dataclass(frozen=True, slots=True)
class DatasetFollows:
    """Stands for the dataset in a template's arguments: the main process pickles
    the dataset while the template starts, and sends it as the first message on
    the template's connection (NOTE [ Templates ])."""


@message
@dataclass(frozen=True, slots=True)
class ForkWorker:
    """Fork worker ``worker_id``; its connection's descriptor follows the message.

    The child applies ``catch_up`` to its copy of the template's dataset before
    ``worker_init_fn`` runs, so it starts at ``generation``; ``base_seed`` is the
    current epoch's."""

    worker_id: int
    started: float  # when the main process asked for it: with the id, the worker's identity
    catch_up: tuple[Update, ...]
    generation: int
    base_seed: int


@message
@dataclass(frozen=True, slots=True)
class Advance:
    """Apply these changes to the template's dataset: workers forked from now on
    start from them."""

    updates: tuple[Update, ...]
    generation: int


@message
@dataclass(frozen=True, slots=True)
class TemplateReady:
    """The template holds the dataset and functions and may fork workers."""

    pid: int


@message
@dataclass(frozen=True, slots=True)
class TemplateUnsafe:
    """Forking the template would not be safe (``reason``): start workers directly."""

    reason: str


@message
@dataclass(frozen=True, slots=True)
class Forked:
    """The worker asked for as ``(worker_id, started)`` runs as ``pid``; its pidfd
    follows the message."""

    worker_id: int
    started: float
    pid: int


@message
@dataclass(frozen=True, slots=True)
class Advanced:
    """The template applied :class:`Advance` up to ``generation``: what the changes
    named may go (NOTE [ Pinned segments ] in ``_control.py``)."""

    generation: int


@message
@dataclass(frozen=True, slots=True)
class Exited:
    """A worker forked by the template exited (the template reaped it)."""

    pid: int
    exitcode: int
