"""What the pool tracks per task: the task record, and the outcomes its future
resolves to (the batch, the dataset's exception, a batch lost on the way, the end
of an IterableDataset's shard)."""

from __future__ import annotations

import copy
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from ._messages import RemoteError


@dataclass(frozen=True, slots=True)
class Loaded:
    data: Any
    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Raised:
    error: RemoteError
    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Lost:
    """The batch loaded, but could not be moved to the main process."""

    error: BaseException
    worker_id: int
    pid: int


@dataclass(frozen=True, slots=True)
class Ended:
    worker_id: int


Outcome = Loaded | Raised | Lost | Ended

#: What ``Future.done()`` checks for (``concurrent.futures._base``'s states).
_DONE_STATES = frozenset({"CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"})


class TaskFuture(Future[Outcome]):
    """A task's future, whose :meth:`done` reads the state without taking the
    future's lock (one attribute read, atomic): the consumer asks it of the
    batches in its window for every batch it takes. A ``False`` that turns
    ``True`` a moment later loses nothing: the done-callbacks, which wake the
    consumer, run after the state is set."""

    def done(self) -> bool:
        return self._state in _DONE_STATES


@dataclass(eq=False)
class TaskRecord:
    """A submitted task, as the main process tracks it until its outcome arrives."""

    seq: int
    epoch: int
    position: int
    index: Any
    generation: int
    pin: int | None
    future: Future[Outcome] = field(default_factory=TaskFuture)
    worker: int | None = None
    killed: list[int] = field(default_factory=list)  # exit codes of workers that died running it
    cancelled: bool = False
    started: float = 0.0  # when its worker began it (time.monotonic()), once running


class WorkerGone(Exception):
    """A loaded batch could not be read because its worker is gone."""


def unreadable(exc: Exception) -> RemoteError:
    """The error for a batch that pickled in its worker but fails to unpickle here."""
    error = RuntimeError(
        f"the batch cannot be rebuilt in the main process: unpickling it raised "
        f"{type(exc).__name__}: {exc}. Objects in a batch must unpickle in the main process "
        "too: their classes importable there, their __setstate__ or __reduce__ working."
    )
    error.__cause__ = exc
    return RemoteError.capture(error)


def resolve(future: Future[Outcome], outcome: Outcome) -> None:
    try:
        future.set_result(outcome)
    except InvalidStateError:
        pass  # cancelled by the consumer meanwhile


def fail(records: list[TaskRecord], error: BaseException) -> None:
    for record in records:
        try:
            record.future.set_exception(error)
        except InvalidStateError:
            pass


def raisable(error: BaseException) -> BaseException:
    """A copy of ``error`` to raise (its cause and notes kept), so that ``error``
    itself, kept by a pool, never takes a traceback: the traceback's frames hold
    the caller's loader, and the pool, held by its I/O thread, would keep that
    loader and its processes alive until the interpreter exits."""
    found = copy.copy(error)
    found.__cause__, found.__suppress_context__ = error.__cause__, error.__suppress_context__
    return found
