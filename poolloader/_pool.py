"""The worker process pool: dispatch, health, respawn, shutdown.

::

    consumer thread                I/O thread ("poolloader-io")          workers
    ───────────────                ───────────────────────────          ───────
    submit(task) ──► pending ──┐   wait(connections + sentinels)
                               └─► dispatch: a worker with a free slot  ──► inbox
                                   takes the first pending task it may      │
                                   run; missing control updates first       ▼
    future.result() ◄── Future ◄── Done / Failed / Exhausted ◄────────── result
                                   a sentinel fires: requeue the dead
                                   worker's tasks, fork a replacement
                                   from the template (_template.py)

Each worker has one duplex connection. The main process keeps at most
:data:`~poolloader._dispatch.TASKS_PER_WORKER` tasks at a worker and the rest in
``pending``, so a free worker always takes the next task (no queue of tasks
stuck behind a slow batch, as with per-worker index queues), and a dead
worker's tasks are known exactly. Workers are not daemonic: dataset code may
start processes of its own.
Starting and stopping the processes is ``_processes.py``'s; what runs on the I/O
thread (handling results, a template's news and deaths) is ``_iothread.py``'s;
handing out tasks and what goes with them is ``_dispatch.py``'s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _exit_hook, _worker
from ._control import Channel
from ._deaths import unloaded_error
from ._dispatch import Dispatcher
from ._iothread import IOThread
from ._messages import (
    BeginEpoch,
    PickledObject,
    Refresh,
)
from ._outbox import Outbox
from ._polling import Waker, Watchlist
from ._processes import Ship, Worker, Workforce
from ._stats import PoolCounters, PoolStatistics
from ._tasks import (
    TaskRecord,
    fail,
    raisable,
)
from ._threads import helper_thread
from .errors import LoaderClosedError, PoolBrokenError

logger = logging.getLogger("poolloader")

#: A running batch is late (the reorder allowance lets batches behind it finish,
#: see DataLoader.reorder_buffer) once it has run this many times the mean batch
#: (NOTE [ Late by the main process's clock ]).
LATE_FACTOR = 1.5

# NOTE [ Late by the main process's clock ]: a batch runs late once it has run
# LATE_FACTOR times the workers' mean time per batch, and longer than batches
# take on average from start to arrival here. Its running time is measured here,
# from when its worker started it (as the main process learns it: when it was
# handed to an idle worker, or when the worker's previous result arrived), and
# so holds what surrounds loading: the trip back, the I/O thread's turn. For tiny
# batches that is most of it: against the workers' 0.1 ms alone, the oldest batch
# looked late at a third of the checks, and the reorder allowance opened with no
# slow batch, the window running past prefetch_factor * num_workers and every
# batch paying the late path's lock and counting. Against the arrival time alone,
# batches of 10 ms turned late later than they do by their own time (by what the
# trip adds), and dynamic batches lost 2% of their throughput.

#: Seconds close() waits for the I/O thread, which stops within one event. Only
#: a thread blocked for good (a lock left held by an interrupted consumer) takes
#: this long; it is a daemon thread, and the workers are stopped without it.
IO_JOIN_TIMEOUT = 5.0


def can_fork_workers() -> bool:
    """Whether workers can be forked from a template here (pidfds: Linux 5.3+)."""
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


class Pool(Dispatcher, IOThread):
    """``num_workers`` workers, forked from a template process, fed from one
    pending queue."""

    def __init__(
        self,
        *,
        context: Any,
        num_workers: int,
        setup: _worker.WorkerSetup,
        channel: Channel,
        transport: Any,
        max_restarts: int,
        resumable: bool,
        dataset: Any,
    ) -> None:
        self._num_workers = num_workers
        self._channel = channel
        self._transport = transport
        self._max_restarts = max_restarts
        self._resumable = resumable
        # What a worker started directly receives: the live dataset object when it
        # may only be pickled while a process starts (else the channel's base).
        self._dataset = dataset
        self._workforce = Workforce(context, setup, transport, template=can_fork_workers())
        self._lock = threading.RLock()
        self._pending: deque[TaskRecord] = deque()
        self._workers: list[Worker] = []
        self._retiring: list[Worker] = []  # workers stopped to start afresh
        self._epochs: dict[int, BeginEpoch] = {}
        self._trimmed_at = -1  # the generation the control log was last trimmed at
        self._trim_due = False  # NOTE [ Trimming on the I/O thread ] in _dispatch.py
        self._idle_since: float | None = None  # no epoch running since (NOTE [ Idle slabs ])
        self._trimmed = False  # the free slabs were closed since
        self.epochs_begun = 0
        self._seq = itertools.count()
        # The last task queued, for a submitter an interrupt kept from taking it
        # (NOTE [ Drawing once ] in _resume.py); let go once it is taken, or its
        # epoch ends: its outcome holds a batch, and the batch its slab.
        self.last_submitted: TaskRecord | None = None
        self._broken: PoolBrokenError | None = None
        self._closing = False
        self._loader_ref: weakref.ref[Any] | None = None  # the loader (belongs_to)
        self._stopped = False  # close() stopped (or killed) the processes
        self._closed = False
        self._unreleased: list[Callable[[], None]] = []  # NOTE [ Closing and Ctrl-C ]
        self._exitcodes: list[int] = []
        self._counters = PoolCounters()
        self._started_at = time.monotonic()
        self._owner = os.getpid()  # a forked child holds a copy it must not act on
        self._deferring = False  # set by submit, under the lock
        self._audit_due = False  # NOTE [ Tasks never sent ] in _iothread.py
        self._audits = itertools.count(1)
        self._watch = Watchlist()
        self._thread = helper_thread(self._io_loop, "poolloader-io")
        self._wakeup_r, wakeup_w = os.pipe()
        try:
            self._waker = Waker(wakeup_w)
            # NOTE [ Sending outside the lock ] in _outbox.py
            self._outbox = Outbox(self._waker.wake)
        except BaseException:  # (a Ctrl-C: a pool never made closes nothing)
            os.close(self._wakeup_r)
            os.close(wakeup_w)
            raise
        if hasattr(transport, "on_release"):
            transport.on_release = self._wake_if_trimmed  # an idle pool closes the slab
        self._workforce.close_connection = self._outbox.close_connection

    # ---------------------------------------------------------------- life

    def start(
        self,
        ship: Ship | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> None:
        """Start the template (or the workers) and the I/O thread. ``ship``: see
        :meth:`Workforce.start`; ``meanwhile``: what to do while the dataset travels
        to the template, before any worker is asked for. What they raise is raised
        here, and then nothing is left running."""
        logger.debug("starting %d workers", self._num_workers)
        _exit_hook.ensure_exit_hook()
        # Whatever stops the start (a Ctrl-C too) leaves nothing running.
        try:
            with self._lock:
                # A fork-started template is forked here, before the I/O thread runs.
                self._workforce.start(self._channel.base_generation, ship)
                if meanwhile is not None:
                    meanwhile()
                for i in range(self._num_workers):
                    self._workers.append(self._launch(i))
            _exit_hook.live_pools.add(self)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def _launch(self, worker_id: int, *, replacement: bool = False) -> Worker:
        """Start worker ``worker_id`` from the template's dataset, or directly from
        the channel's base."""
        template = self._workforce.template
        if template is not None:
            generation = template.generation
            direct: Any = None
        else:
            generation, direct = self._direct_start()
        return self._workforce.launch(
            worker_id, generation=generation, direct_dataset=direct, replacement=replacement
        )

    def _direct_start(self) -> tuple[int, Any]:
        """What a worker started directly begins from: the channel's base snapshot,
        or the live dataset when it has none (it may only be pickled at a start)."""
        if self._channel.has_base:
            generation, data = self._channel.base
            return generation, PickledObject(data)
        return self._channel.stamp(settle=False), self._dataset

    @property
    def forks_workers(self) -> bool:
        """Whether new workers are forked from a template (a fresh start is cheap)."""
        return self._workforce.template is not None

    @property
    def inherits_dataset(self) -> bool:
        """Whether workers inherit the dataset through ``fork`` (it is never pickled)."""
        return self._workforce.inherits

    def restart_template(self, dataset: Any) -> bool:
        """Fork workers from a new template holding ``dataset`` as it is now (for a
        dataset that cannot be pickled here). Refused (``False``) while tasks whose
        batches are wanted are unfinished: a replacement for one of them could not
        start from the new template, which is ahead of it. Tasks of an epoch left
        early (cancelled) do not count: they are never run again, and the workers
        busy with them start afresh from the new template once done."""
        with self._lock:
            if any(not r.cancelled for r in self._all_records()):
                return False
            self._channel.record(Refresh())  # the workers start afresh, from the new template
            generation = self._channel.stamp()
            self._workforce.restart_template(dataset, generation)
            self._channel.move_base(generation)
            return True

    @property
    def foreign(self) -> bool:
        """Whether this is a forked copy of another process's pool (see :meth:`close`)."""
        return os.getpid() != self._owner

    @property
    def broken(self) -> PoolBrokenError | None:
        return self._broken

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    @property
    def mean_batch_bytes(self) -> float:
        """Mean bytes of the batches loaded so far (0 before the first)."""
        c = self._counters
        return c.bytes_moved / c.tasks_done if c.tasks_done else 0.0

    @property
    def template_pid(self) -> int | None:
        """The pid of the process workers are forked from (``None``: started directly)."""
        template = self._workforce.template
        return template.process.pid if template is not None else None

    @property
    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers]

    def close(self) -> None:
        """Stop every worker and every process they started; idempotent.

        In a process forked from the owner (a template, a fork-started worker, or
        any ``os.fork()`` child) the pool is only a copy: closing it there would
        stop the owner's workers, so it does nothing."""
        if self.foreign:
            return
        claimed = False  # NOTE [ Closing and Ctrl-C ]
        try:
            with self._lock:
                if self._closing:
                    if self._stopped:
                        self._release_resources()  # what an interrupt left
                    return
                self._closing = claimed = True
                self._unreleased = [self._waker.close, self._close_wakeup,
                                    self._transport.close, self._channel.stop]  # fmt: skip
                orphans = self._take_all_records()
            fail(orphans, LoaderClosedError("the DataLoader was closed"))
            self._wake()
            if threading.current_thread() is not self._thread and self._thread.is_alive():
                self._thread.join(IO_JOIN_TIMEOUT)
                if self._thread.is_alive():  # see NOTE [ Waiting and Ctrl-C ] in _iterator.py
                    logger.debug("the I/O thread did not stop; closing without it")
            self._workforce.stop([*self._workers, *self._retiring])
        except BaseException:
            if claimed:  # later calls return at once: end everything now
                self._workforce.kill([*self._workers, *self._retiring])
            raise
        finally:
            if claimed:
                self._stopped = True
                self._release_resources()
        logger.debug("pool closed")

    # NOTE [ Closing and Ctrl-C ]: close() claims the pool (``_closing``) and stops
    # it, all inside one try: a KeyboardInterrupt landing anywhere after the claim
    # (a second Ctrl-C as a ``with`` block closes the loader, one while the
    # workers finish a long ``__getitem__``) kills the workers, their processes
    # and the templates at once, then releases what the pool holds (pipes,
    # mapped slabs), each step once; a step an interrupt cut short is left to the
    # next close(). One landing before the claim leaves the pool as it was, for
    # the next close() (the loader keeps it until a close() returns).

    def _release_resources(self) -> None:
        """What the pool holds besides its processes, each step once: one an
        interrupt cut short is done again by the next close()."""
        while True:
            try:
                step = self._unreleased[0]
            except IndexError:  # (all done, here or by another close())
                break
            try:
                step()
            except Exception:
                logger.debug("closing the pool: %s failed", step, exc_info=True)
            with contextlib.suppress(ValueError):  # (gone: another close() did it)
                self._unreleased.remove(step)
        _exit_hook.live_pools.discard(self)
        self._closed = True

    def _close_wakeup(self) -> None:
        fd, self._wakeup_r = self._wakeup_r, -1
        if fd >= 0:
            os.close(fd)

    def belongs_to(self, loader: Any) -> None:
        """The pool closes itself if ``loader`` is freed without closing it (the
        I/O thread looks once a step)."""
        self._loader_ref = weakref.ref(loader)

    # ----------------------------------------------------------- submitting

    def begin_epoch(self, epoch: int, base_seed: int, shared_seed: int | None = None) -> None:
        with self._lock:
            self.epochs_begun += 1
            self._idle_since, self._trimmed = None, False
            self._epochs[epoch] = BeginEpoch(epoch, self.epochs_begun, base_seed, shared_seed)
            # An epoch begun again (an iter() that raised went back before it: NOTE
            # [ A state taken in iter() ] in _loader_resume.py): the workers still in
            # it start it afresh, their streams from the start, when it is sent again;
            # so do those that paused it for another epoch (``begun`` differs).
            for w in self._workers:
                if w.epoch == epoch:
                    w.epoch = -1
            self._workforce.base_seed = base_seed
            self._channel.stamp()
            self._trim_soon()

    def end_epoch(self, epoch: int) -> None:
        """Forget ``epoch``: the iterator yields nothing more of it, so tasks of it
        still waiting are dropped (a worker that ran one would need the epoch)."""
        with self._lock:
            self._epochs.pop(epoch, None)
            if not self._epochs:
                self._idle_since = time.monotonic()
            leftovers = [r for r in self._pending if r.epoch == epoch]
            last = self.last_submitted
            if last is not None and last.epoch == epoch:
                self.last_submitted = None  # (its batch would keep its slab)
        if leftovers:
            self.cancel(leftovers)

    def submit(self, epoch: int, position: int, index: Any, pin: int | None = None) -> TaskRecord:
        """Queue batch ``position`` of ``epoch``; its outcome arrives on ``record.future``."""
        try:
            with self._lock:
                self._check_usable(position, index)
                record = TaskRecord(next(self._seq), epoch, position, index, self._stamp(), pin)
                self.last_submitted = record  # before it is queued: no call between
                self._pending.append(record)
                self._deferring = True  # written once the lock is let go
                try:
                    self._dispatch()
                finally:
                    self._deferring = False
        except BaseException:
            # Perhaps a Ctrl-C between giving a worker a task and queuing it.
            self._audit_due = True  # NOTE [ Tasks never sent ] in _iothread.py
            self._waker.wake()
            raise
        finally:
            self._outbox.flush()
        return record

    def late_in(self, record: TaskRecord) -> float | None:
        """Seconds until ``record`` runs late (0.0: it does now): the task a started
        worker is running, it is late once it has run for longer than
        :data:`LATE_FACTOR` times the mean batch so far, and longer than batches
        take to arrive (NOTE [ Late by the main process's clock ]). ``None`` while
        it is not running, or before any batch has finished. Asked for every
        batch, so "not yet" comes without the lock (the counters may be a batch
        behind)."""
        started, late_after = record.started, self._late_after()
        if record.worker is None or not started or late_after is None:
            return None
        left = late_after - (time.monotonic() - started)
        if left > 0:
            return left  # (for a worker dead meanwhile: a wait wakes early, that is all)
        with self._lock:
            if record.worker is None or not record.started or record.future.done():
                return None
            w = self._workers[record.worker]
            if not w.ready or w.dead or next(iter(w.tasks), None) != record.seq:
                return None
            return max(0.0, late_after - (time.monotonic() - record.started))

    def _late_after(self) -> float | None:
        """Seconds after which a running batch is late (NOTE [ Late by the main
        process's clock ]); ``None`` before any batch has finished."""
        c = self._counters
        if not c.tasks_done or not c.turnarounds:
            return None
        return max(LATE_FACTOR * c.busy / c.tasks_done, c.turnaround / c.turnarounds)

    def whereabouts(self, record: TaskRecord) -> tuple[str, str]:
        """Where ``record`` stands, and what to look at, in words for a timeout."""
        hang = "or look for a dataset __getitem__ (or collate_fn) that hangs"
        with self._lock:
            if record.worker is None or record.worker >= len(self._workers):
                return "(no worker has taken it yet)", hang
            w = self._workers[record.worker]
            template = w.template or self._workforce.template
            if not w.ready and template is not None and not template.ready:
                return (
                    f"(worker {w.id} has not started: the process workers are forked from "
                    "is still starting, which takes a new interpreter, the import of torch "
                    "and the unpickling of the dataset)",
                    "counting the start (a second or more with spawn or forkserver), or make "
                    "the dataset quicker to unpickle (keep big data in poolloader.SharedList "
                    "or SharedDict, open files lazily)",
                )
            if not w.ready:
                return (
                    f"(worker {w.id} is still starting: unpickling the dataset or running "
                    "worker_init_fn)",
                    "or look for what makes a worker's start slow (a dataset slow to "
                    "unpickle, a worker_init_fn that hangs)",
                )
            queue = list(w.tasks)
            ahead = queue.index(record.seq) if record.seq in queue else 0
            if ahead:
                return f"at worker {w.id}, behind {ahead} batch(es) it has not finished", hang
            return f"at worker {w.id}", hang

    def cancel(self, records: list[TaskRecord]) -> None:
        """Forget tasks whose batches nobody will read."""
        with self._lock:
            for record in records:
                record.cancelled = True
                if record is self.last_submitted:
                    self.last_submitted = None
                if record.worker is None and record in self._pending:
                    self._pending.remove(record)
                record.future.cancel()

    def restamp(self, records: list[TaskRecord]) -> int:
        """Make the tasks among ``records`` that no worker has started see every
        change made so far; returns how many."""
        with self._lock:
            waiting = [r for r in records if r.worker is None and not r.cancelled]
            for record in waiting:
                record.generation = self._channel.stamp()
            self._dispatch()
        return len(waiting)

    def _check_usable(self, position: int, index: Any) -> None:
        """Raise unless the pool can take batch ``position`` (a broken pool's
        error says that batch was not loaded)."""
        if self._closing:
            raise LoaderClosedError("the DataLoader was closed; create a new one to load more")
        if self._broken is not None:
            raise unloaded_error(self._broken, position, index)

    def _break(self, error: PoolBrokenError, culprit: TaskRecord | None = None) -> None:
        """Fail every batch in flight with ``error``; each but the ``culprit`` (the
        batch it names) says that it was not loaded (NOTE [ A broken pool ] in
        ``_iterator.py``). The kept ``error`` itself never takes a traceback."""
        with self._lock:
            if self._broken is not None:
                return
            self._broken = error
            records = self._take_all_records()
        for record in records:
            if record is culprit:
                fail([record], raisable(error))
            else:
                fail([record], unloaded_error(error, record.position, record.index))

    def _all_records(self) -> list[TaskRecord]:
        return [*self._pending, *(r for w in self._workers for r in w.tasks.values())]

    def _take_all_records(self) -> list[TaskRecord]:
        records = self._all_records()
        self._pending.clear()
        for w in self._workers:
            w.tasks.clear()
        return records

    # ----------------------------------------------------------- statistics

    def statistics(self) -> PoolStatistics:
        with self._lock:
            running = sum(len(w.tasks) for w in self._workers)
            c = self._counters
            return PoolStatistics(
                tasks_done=c.tasks_done,
                restarts=c.restarts,
                bytes_moved=c.bytes_moved,
                busy_seconds=c.busy,
                uptime_seconds=time.monotonic() - self._started_at,
                pending=len(self._pending),
                running=running,
                control_messages=c.control_messages,
                control_bytes=c.control_bytes,
                bytes_sent=c.bytes_sent,
                slab_batches=self._transport.slab_batches,
                slab_reused=self._transport.slab_reused,
                slab_bytes=self._transport.mapped_bytes,
            )
