"""Handing out tasks: which worker runs which pending task, the messages that
go with it, and the control log those messages come from.

:class:`Dispatcher` is the part of :class:`~poolloader._pool.Pool` that decides
what each worker is sent (a base class of it, sharing its state and its lock),
from the consumer's thread as it submits and from the I/O thread as results
come back. The picture is in ``_pool.py``; what is sent is written by the
:class:`~poolloader._outbox.Outbox`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ._control import Channel
from ._messages import BeginEpoch, Sync, Task
from ._outbox import Descriptor, Outbox
from ._pickling import not_picklable
from ._polling import Waker
from ._processes import Worker, Workforce
from ._slab_transport import Grant
from ._stats import PoolCounters
from ._tasks import TaskRecord, fail
from ._wire import encode

logger = logging.getLogger("poolloader")

#: Tasks handed to one worker at a time: one running and one waiting in its
#: inbox, so it never idles for a round trip to the main process. More would
#: let tasks queue behind a slow batch; fewer leaves the worker waiting for the
#: I/O thread (which may wait for the GIL) after every batch.
TASKS_PER_WORKER = 2


class Dispatcher:
    """The pool's methods that hand out tasks and the messages that go with them."""

    if TYPE_CHECKING:  # the pool's state these methods share (see Pool.__init__)
        _lock: threading.RLock
        _pending: deque[TaskRecord]
        _workers: list[Worker]
        _retiring: list[Worker]
        _workforce: Workforce
        _channel: Channel
        _transport: Any
        _counters: PoolCounters
        _outbox: Outbox
        _waker: Waker
        _epochs: dict[int, BeginEpoch]
        _deferring: bool
        _trimmed: bool
        _trimmed_at: int
        _trim_due: bool

        def _all_records(self) -> list[TaskRecord]: ...

    def _stamp(self) -> int:
        """The generation a new task sees (lock held); see NOTE [ Control ordering ]."""
        generation = self._channel.stamp()
        if generation != self._trimmed_at:  # nothing new to drop otherwise
            self._trim_soon()
        return generation

    # NOTE [ Trimming on the I/O thread ]: trimming the control log sends the
    # template the changes it takes (the channel's base moves with them), brings
    # idle workers up to date and drops what no one needs: several steps, each
    # changing what the others rely on. A KeyboardInterrupt between moving the
    # base and sending the template its changes left the template behind the
    # base for good: every worker forked from it later missed those changes. So
    # only the I/O thread, which no signal interrupts, trims; a new generation or
    # epoch asks it to.

    def _trim_soon(self) -> None:
        """Have the I/O thread trim the control log (lock held)."""
        self._trim_due = True
        if not self._outbox.on_io_thread():
            self._waker.wake()

    def _trim_when_due(self) -> None:
        """Trim the control log if asked to (I/O thread, lock held)."""
        if self._trim_due:
            self._trim_due = False
            generation = self._channel.generation
            self._trim_control_log(generation)
            self._trimmed_at = generation

    def _trim_control_log(self, generation: int) -> None:
        """Let the control log drop what no worker needs (NOTE [ Control log ];
        I/O thread, NOTE [ Trimming on the I/O thread ]).

        A worker with no task is brought up to date first, as far as no pending
        task is older, so that it does not hold on to old changes (one that must
        start afresh for them is replaced by a fresh one); the template takes the
        changes no unfinished task predates."""
        oldest = min((r.generation for r in self._all_records()), default=generation)
        if self._workforce.template is not None:
            updates = tuple(self._channel.advance_base(oldest))
            self._workforce.advance(updates, oldest)
        upto = min((r.generation for r in self._pending), default=generation)
        for i, w in enumerate(self._workers):
            if not w.dead and not w.tasks and w.generation < upto:
                if self._fresh_start(w, upto) is not None:
                    self._workers[i] = self._recycle(w, upto)
                else:
                    messages = self._update_messages(w, upto)
                    if messages:  # its answer lets what the changes named go
                        messages.append(encode(Sync(upto)))
                    frames = tuple(messages)
                    self._counters.bytes_sent += sum(map(len, frames))
                    w.generation = upto  # as they are queued: no call between
                    if frames:
                        self._outbox.put((w, frames, False))
                        self._outbox.flush()  # (the I/O thread: nothing defers it)
        self._channel.compact(oldest, [w.generation for w in self._workers if not w.dead])
        self._release_pins()

    def _release_pins(self) -> None:
        """Let the channel drop the segments every live worker and the template
        have unpickled (lock held; NOTE [ Pinned segments ] in _control.py)."""
        if not self._channel.holds_released:
            return
        marks = [w.acknowledged for w in self._workers if not w.dead]
        template = self._workforce.template
        if template is not None:
            marks.append(template.acknowledged)
        self._channel.release(min(marks, default=self._channel.generation))

    # ------------------------------------------------------------- dispatch

    def _dispatch(self) -> None:
        """Give each worker with a free slot the first pending task it may run (lock held)."""
        self._send_forgets()
        if self._transport.granting and not self._outbox.on_io_thread():
            # Only the I/O thread hands out slabs (NOTE [ One pool of slabs ]).
            # (A loop, not any() over a generator: a Ctrl-C landing as a
            # generator is closed is lost.)
            for w in self._workers if self._pending else ():
                if len(w.tasks) < TASKS_PER_WORKER:
                    self._waker.wake()
                    break
            return
        progress = True
        while progress and self._pending:
            progress = False
            for w in sorted(self._workers, key=lambda w: len(w.tasks)):
                # A dead worker waits for the I/O thread to replace it (_on_exit).
                if not w.dead and len(w.tasks) < TASKS_PER_WORKER:
                    found = self._take_for(w)
                    if found is not None:
                        at, record = found
                        if self._fresh_start(w, record.generation) is not None:
                            if not self._may_recycle():
                                continue
                            slot = self._workers.index(w)
                            w = self._workers[slot] = self._recycle(w, record.generation)
                        self._send_task(w, record, at)
                        progress = True

    def _take_for(self, w: Worker) -> tuple[int, TaskRecord] | None:
        """The first pending task ``w`` may run, and its place in the queue (it stays
        there until it is given: NOTE [ Tasks never sent ] in _iothread.py)."""
        # See NOTE [ Control ordering ] in _control.py: a worker never runs a
        # task older than the newest change it has applied. A task for which the
        # worker must start afresh waits for it to be idle (NOTE [ Templates ]).
        for i, record in enumerate(self._pending):
            if (record.pin is None or record.pin == w.id) and record.generation >= w.generation:
                if w.tasks and self._fresh_start(w, record.generation) is not None:
                    continue
                return i, record
        return None

    def _fresh_start(self, w: Worker, upto: int) -> int | None:
        """Where ``w`` must start afresh to reach ``upto`` (a new epoch of
        non-persistent workers in between), when workers are forked from a template."""
        if self._workforce.template is None or upto <= w.generation:
            return None
        return self._channel.fresh_start(w.generation, upto)

    # NOTE [ Starting afresh on the I/O thread ]: for an epoch of non-persistent
    # workers forked from a template, the pool retires each idle worker and forks
    # a fresh one into its slot: a Stop to the old one, which joins the retiring,
    # a ForkWorker to the template, a new Worker in the slot. A KeyboardInterrupt
    # landing in the middle, on the consumer's thread, left the slot holding the
    # retired worker, marked dead, which no one replaces: no task went to that slot
    # again (with one worker, the epoch waited for ever), or forked a worker the
    # pool never knew. So only the I/O thread, which no signal interrupts, does it:
    # the consumer's thread wakes it and leaves the task pending.

    def _may_recycle(self) -> bool:
        """Whether this thread may start a worker afresh (lock held): only the I/O
        thread, which the others wake for it (NOTE [ Starting afresh on the I/O
        thread ])."""
        if self._outbox.on_io_thread():
            return True
        self._waker.wake()
        return False

    def _recycle(self, w: Worker, upto: int) -> Worker:
        """Retire idle worker ``w`` and fork a fresh one in its place, at the newest
        fresh start at or before ``upto``."""
        start = self._channel.fresh_start(w.generation, upto)
        template = self._workforce.template
        assert start is not None and template is not None
        catch_up = tuple(self._channel.updates(template.generation, start))
        self._workforce.retire(w)
        w.dead = True
        self._retiring.append(w)
        logger.debug("worker %d (pid %d) starts afresh", w.id, w.pid)
        # Once a worker of this slot has started, a silent death of the fresh one
        # while it starts is a death like any other (replaced, counted against
        # max_worker_restarts), not a sign that workers cannot start.
        return self._workforce.launch(w.id, generation=start, direct_dataset=None,
                                      catch_up=catch_up,
                                      replacement=w.replacement or w.ready)  # fmt: skip

    def _send_task(self, w: Worker, record: TaskRecord, at: int) -> None:
        """Give ``w`` the task of ``record``, ``at`` its place among the pending."""
        # Only the I/O thread hands out slabs (NOTE [ One pool of slabs ]); the
        # consumer's dispatch found no slab batch yet, but one may have come since.
        granting = self._transport.granting and self._outbox.on_io_thread()
        grant = self._transport.grant(w.identity, record.seq) if granting else None
        try:
            task = encode(self._task(record, grant))
        except Exception as exc:
            if grant is not None:
                self._transport.settle(w.identity, record.seq, sent=False)
            del self._pending[at]
            fail(
                [record], not_picklable(record.index, f"the index of batch {record.position}", exc)
            )
            return
        messages: list[bytes] = []
        if w.epoch != record.epoch:
            messages.append(encode(self._epochs[record.epoch]))
        messages += self._update_messages(w, record.generation)
        frames: tuple[bytes | Descriptor, ...] = (*messages, task)
        self._counters.bytes_sent += sum(map(len, messages)) + len(task)
        task_alone = not messages
        if grant is not None and grant.fd is not None:  # the slab's descriptor follows
            fd = Descriptor(self._transport.socket(w.identity), grant.fd)
            frames, task_alone = (*frames, fd), False
        started = 0.0 if w.tasks else time.monotonic()
        # From here to the outbox, no call: a Ctrl-C lands before or after all of
        # it (NOTE [ Tasks never sent ] in _iothread.py).
        w.epoch = record.epoch
        if record.generation > w.generation:
            w.generation = record.generation
        record.worker = w.id
        if started:
            record.started = started
        w.tasks[record.seq] = record
        del self._pending[at]
        self._outbox.put((w, frames, task_alone))
        if not self._deferring:
            self._outbox.flush()

    @staticmethod
    def _task(record: TaskRecord, grant: Grant | None) -> Task:
        if grant is None:
            return Task(record.seq, record.epoch, record.position, record.index)
        return Task(record.seq, record.epoch, record.position, record.index,
                    grant.slab, grant.slab_size, grant.may_make)  # fmt: skip

    def _update_messages(self, w: Worker, upto: int) -> list[bytes]:
        """The control messages that bring ``w`` to generation ``upto``; the caller
        sets ``w.generation`` as it queues them."""
        if upto <= w.generation:
            return []
        messages = [encode(u) for u in self._channel.updates(w.generation, upto)]
        self._counters.control_messages += len(messages)
        self._counters.control_bytes += sum(len(m) for m in messages)
        return messages

    def _send_forgets(self) -> None:
        """Tell the workers which slabs the pool closed (lock held)."""
        if self._trimmed and self._outbox.on_io_thread():
            self._transport.trim()  # idle: slabs that held kept batches close too
        forgets = self._transport.take_forgets()
        if not forgets:
            return
        by_identity = {w.identity: w for w in self._workers}
        for identity, message in forgets:
            w = by_identity.get(identity)
            if w is not None and not w.dead:  # a dead worker's mappings went with it
                self._send(w, encode(message))

    def _send(self, w: Worker, message: bytes) -> None:
        """Send ``message`` to ``w`` (lock held): at once, or once the consumer's
        submit lets the lock go (NOTE [ Sending outside the lock ] in ``_outbox.py``)."""
        self._counters.bytes_sent += len(message)
        self._outbox.put((w, (message,), False))
        if not self._deferring:
            self._outbox.flush()
