"""What the pool tracks per task: the task record, and the outcomes its future
resolves to (the batch, the dataset's exception, a batch lost on the way, the end
of an IterableDataset's shard); and a batch loaded in parts (:class:`GroupRecord`)."""

from __future__ import annotations

import copy
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, TypeVar

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

_E = TypeVar("_E", bound=BaseException)

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


def raisable(error: _E) -> _E:
    """A copy of ``error`` to raise (its cause and notes kept), so that ``error``
    itself, kept by a pool, never takes a traceback: the traceback's frames hold
    the caller's loader, and the pool, held by its I/O thread, would keep that
    loader and its processes alive until the interpreter exits."""
    found = copy.copy(error)
    found.__cause__, found.__suppress_context__ = error.__cause__, error.__suppress_context__
    return found


class GroupRecord(TaskRecord):
    """One batch loaded in parts by several workers and merged in the main process.

    A batch index may split itself: if it has ``poolloader_split(num_workers)``
    returning ``[(worker or None, part), ...]`` and ``poolloader_merge(parts)``
    returning the batch, each part becomes a task (pinned to its worker when
    one is named) and the batch is ``index.poolloader_merge([part batches])``,
    in the order the parts were given. Worker affinity for stateful readers
    (iterator-style streams) is built on this.
    """

    #: The part tasks; emptied once merged (see :func:`_merge_into`).
    parts: list[TaskRecord]

    @classmethod
    def of(cls, parts: list[TaskRecord], index: Any, position: int) -> GroupRecord:
        group = cls(parts[0].seq, parts[0].epoch, position, index, parts[0].generation, None)
        group.parts = parts
        future, merge, remaining = group.future, index.poolloader_merge, [len(parts)]

        def done(_: Future[Outcome]) -> None:  # holds the group's future, not the group
            remaining[0] -= 1
            if remaining[0] == 0:
                _merge_into(future, parts, merge)

        for part in parts:
            part.future.add_done_callback(done)
        return group


def _merge_into(future: Future[Outcome], parts: list[TaskRecord], merge: Any) -> None:
    """Resolve ``future`` with the merged batch, then forget the parts.

    Each part's future holds the callback that holds ``parts``: a reference
    cycle. Emptying ``parts`` breaks it, so the part batches (views of the
    workers' shared-memory slabs) die as soon as they are merged, not at the
    next garbage collection nor when the merged batch is consumed; otherwise
    the workers run out of slabs and send every part through fresh shared
    memory."""
    try:
        outcomes = [p.future.result() for p in parts]
        failed = [o for o in outcomes if not isinstance(o, Loaded)]
        if failed:
            future.set_result(failed[0])
            return
        loaded = [o for o in outcomes if isinstance(o, Loaded)]
        future.set_result(
            Loaded(merge([o.data for o in loaded]), loaded[0].worker_id, loaded[0].pid)
        )
    except BaseException as exc:  # a part failed, was cancelled, or merge raised
        if not future.done():
            future.set_exception(exc)
    finally:
        parts.clear()


def part_tasks(records: Any) -> list[TaskRecord]:
    """The pool's tasks behind window entries (a group's parts)."""
    found: list[TaskRecord] = []
    for record in records:
        found.extend(record.parts if isinstance(record, GroupRecord) else [record])
    return found
