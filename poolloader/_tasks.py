"""What the pool tracks per task: the task record, and the outcomes its future
resolves to (the batch, the dataset's exception, a batch lost on the way, the end
of an IterableDataset's shard); and a batch loaded in parts (:class:`GroupRecord`)."""

from __future__ import annotations

import _thread
import copy
import logging
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._messages import RemoteError

logger = logging.getLogger("poolloader")


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


class TaskFuture:
    """A task's future: :class:`concurrent.futures.Future`'s interface, for what
    the pool and the iterator ask of it (``done``, ``result``, ``exception``,
    ``cancel``, ``cancelled``, ``add_done_callback``, ``set_result``,
    ``set_exception``), at a fraction of its cost.

    NOTE [ Task futures ]: every batch makes one future, which the consumer adds a
    callback to and reads and the I/O thread resolves. ``concurrent.futures.Future``
    builds a ``threading.Condition`` for each (an RLock and a waiter deque, in
    Python) and takes it in every call, ``done()`` included, which the consumer
    asks of the batches in its window for every batch it takes: about 20 µs per
    batch here, a tenth of a tiny batch's cost in the main process. This one holds
    a plain lock, taken only where the state changes or a callback is added;
    ``done()`` and a finished future's ``result()`` read one attribute (atomic),
    and a thread that waits for a result (none of the pool's do: the consumer
    waits on its news queue) makes its own lock to wait on. Callbacks run after
    the state is set, outside the lock, as ``Future``'s do."""

    __slots__ = ("_callbacks", "_exception", "_lock", "_result", "_state", "_waiters")

    def __init__(self) -> None:
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Any], object]] | None = None
        self._lock = _thread.allocate_lock()
        self._waiters: list[Any] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def running(self) -> bool:
        return False

    def cancel(self) -> bool:
        """Cancel a future not resolved yet (``True``); a resolved one stays so."""
        with self._lock:
            if self._state == _FINISHED:
                return False
            if self._state == _CANCELLED:
                return True
            self._state = _CANCELLED
        self._settled()
        return True

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        with self._lock:
            if self._state != _PENDING:
                raise InvalidStateError(f"a {_STATE_NAMES[self._state]} future")
            # The outcome first: done() reads the state without the lock.
            self._result, self._exception = result, exception
            self._state = _FINISHED
        self._settled()

    def _settled(self) -> None:
        # The state is set; no callback or waiter is added from here on.
        for waiter in self._waiters or ():
            waiter.release()
        for callback in self._callbacks or ():
            self._call(callback)

    def _call(self, callback: Callable[[Any], object]) -> None:
        try:
            callback(self)
        except Exception:
            logger.exception("exception calling callback for %r", self)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(future)`` once it is done (at once, here, if it is)."""
        with self._lock:
            if self._state == _PENDING:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _wait(self, timeout: float | None) -> None:
        if self._state != _PENDING:
            return
        waiter = _thread.allocate_lock()
        waiter.acquire()
        with self._lock:
            if self._state != _PENDING:
                return
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
        if not waiter.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError()

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _PENDING:
            self._wait(timeout)
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                # The exception keeps this frame (its traceback), which would keep
                # the future and so the exception: a cycle, and with it whatever the
                # caller's frames hold (a loader, its processes), until the garbage
                # collector runs. Future.result breaks it the same way.
                self = None  # type: ignore[assignment]
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _PENDING:
            self._wait(timeout)
        if self._state == _CANCELLED:
            raise CancelledError()
        return self._exception

    def __repr__(self) -> str:
        return f"<TaskFuture {_STATE_NAMES[self._state]}>"


#: What the consumer waits on: a task's future, or (``pin_memory=True``) the
#: future of its batch in pinned memory.
AnyFuture = TaskFuture | Future[Outcome]

_PENDING, _CANCELLED, _FINISHED = 0, 1, 2
_STATE_NAMES = {_PENDING: "pending", _CANCELLED: "cancelled", _FINISHED: "finished"}


@dataclass(eq=False, slots=True)
class TaskRecord:
    """A submitted task, as the main process tracks it until its outcome arrives."""

    seq: int
    epoch: int
    position: int
    index: Any
    generation: int
    pin: int | None
    future: TaskFuture = field(default_factory=TaskFuture)
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


def resolve(future: TaskFuture, outcome: Outcome) -> None:
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

        def done(_: TaskFuture) -> None:  # holds the group's future, not the group
            remaining[0] -= 1
            if remaining[0] == 0:
                _merge_into(future, parts, merge)

        for part in parts:
            part.future.add_done_callback(done)
        return group


def _merge_into(future: TaskFuture, parts: list[TaskRecord], merge: Any) -> None:
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
