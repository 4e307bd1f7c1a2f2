"""The pool's I/O thread ("poolloader-io"): it waits on every worker's connection
and sentinel, the templates' connections and a wake-up pipe, handles what
arrives (results, a template's news, a death), replaces dead workers and hands
out the next tasks. See the picture in ``_pool.py``.

:class:`IOThread` is the part of :class:`~poolloader._pool.Pool` that runs on
that thread (a base class of it, sharing its state and its lock); the consumer's
side (submitting, dispatch, closing) stays in ``_pool.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._deaths import (
    Death,
    crash_error,
    describe_exit,
    reap_group_later,
    silent_start_error,
    start_error,
)
from ._messages import (
    Audit,
    Audited,
    Done,
    Exhausted,
    Failed,
    Ready,
    StartFailed,
    Synced,
)
from ._outbox import Outbox
from ._packing import out_of_descriptors
from ._polling import Entry, Waker, Watchlist
from ._processes import EXIT_CODE_WAIT, Worker, Workforce
from ._stats import PoolCounters
from ._tasks import (
    Ended,
    Loaded,
    Lost,
    Outcome,
    Raised,
    TaskRecord,
    WorkerGone,
    resolve,
    unreadable,
)
from ._transport import IDLE_TRIM_SECONDS, descriptor_error
from ._wire import decode, encode, recv
from .errors import PoolBrokenError, TransportError

logger = logging.getLogger("poolloader")

#: Seconds the I/O thread sleeps between checks when nothing happens. Events
#: (results, deaths, wake-ups) end the wait at once; this only bounds how long
#: a missed wake-up could go unnoticed.
IO_POLL_INTERVAL = 1.0


class IOThread:
    """The pool's methods that run on its I/O thread."""

    if TYPE_CHECKING:  # the pool's state these methods share (see Pool.__init__)
        _lock: threading.RLock
        _closing: bool
        _broken: PoolBrokenError | None
        _workers: list[Worker]
        _retiring: list[Worker]
        _pending: deque[TaskRecord]
        _workforce: Workforce
        _transport: Any
        _counters: PoolCounters
        _exitcodes: list[int]
        _max_restarts: int
        _resumable: bool
        _idle_since: float | None
        _trimmed: bool
        _loader_ref: Callable[[], Any] | None
        _watch: Watchlist
        _waker: Waker
        _wakeup_r: int
        _outbox: Outbox
        _audit_due: bool
        _audits: Iterator[int]

        def _dispatch(self) -> None: ...
        def _send_forgets(self) -> None: ...
        def _send(self, w: Worker, message: bytes) -> None: ...
        def _launch(self, worker_id: int, *, replacement: bool = False) -> Worker: ...
        def _break(self, error: PoolBrokenError, culprit: TaskRecord | None = None) -> None: ...
        def _release_pins(self) -> None: ...
        def _trim_when_due(self) -> None: ...
        def close(self) -> None: ...

    def _io_loop(self) -> None:
        self._outbox.serve_from_this_thread()
        try:
            while not self._closing:
                self._io_step()
        except BaseException as exc:
            logger.exception("poolloader I/O thread failed")
            self._break(PoolBrokenError(f"the worker pool's I/O thread failed: {exc!r}"))

    def _io_step(self) -> None:
        with self._lock:
            template = self._workforce.template
            signature = self._watch_signature(template)
        ready = self._watch.wait(signature, self._watch_entries, IO_POLL_INTERVAL)
        by_role: dict[str, list[Any]] = {}
        for role, obj in ready:
            by_role.setdefault(role, []).append(obj)
        if "wake" in by_role:
            os.read(self._wakeup_r, 4096)
        for t in by_role.get("template", ()):
            self._on_template(t)
        for w in by_role.get("conn", ()):
            self._drain(w, known_ready=True)
        for w in [*by_role.get("sentinel", ()), *by_role.get("retiring", ())]:
            with self._lock:
                retired = w in self._retiring  # perhaps since the wait began
            if retired:
                self._on_retired(w)
            elif not self._closing and not w.dead:
                self._on_exit(w)
        # Joining an exit above reads everything its template sent (ForkedProcess.join):
        # a replacement's Forked read there must reach its worker now, not when the
        # template next writes, or that worker runs with no process watched.
        with self._lock:
            unread = [t for t in [*self._workforce.retired_templates, template] if t and t.has_news]
        for t in unread:
            self._on_template(t)
        if template is not None and not template.ready:
            template.check_start()  # NOTE [ A template that does not start ] in _template.py
        if by_role.get("template-exit") and not self._closing:
            error = None
            with self._lock:  # (unless it was replaced meanwhile: then it was stopped)
                if self._workforce.template is template:
                    error = self._workforce.template_died([*self._workers, *self._retiring])
                    if error is None:
                        self._start_unforked()
            if error is not None:
                self._break(error)
        with self._lock:
            if not self._closing and self._broken is None:
                self._trim_when_due()
                self._dispatch()
                self._trim_when_idle()
                self._audit_when_due()
        self._outbox.flush()  # what the consumer leaves to this thread, or could not write
        loader = self._loader_ref
        if loader is not None and loader() is None and not self._closing:
            # Its loader was freed, and did not close it: a Ctrl-C landed as
            # DataLoader.__del__ began (Python drops it there). The workers go now,
            # not at the interpreter's exit.
            logger.debug("the pool's loader is gone: closing the pool")
            self.close()

    # NOTE [ Tasks never sent ]: the consumer's submit gives a worker a task: the
    # record joins the worker's tasks and leaves the pending queue, the worker's
    # epoch and generation move on, and the messages (the epoch's start, changes,
    # the task) are queued. A Ctrl-C (a signal's exception comes after any call
    # returns, and as any Python function begins) landing in the middle left a
    # task the pool counted as sent that never went, so the worker held a place
    # for it for ever: after a few such interrupts no batch could be handed out,
    # and a worker never idle could never start afresh for a new epoch. Or a
    # change counted as sent that never went, and later batches missed it. So
    # ``_send_task`` makes every call first and then does all of it with none in
    # between, ending with the outbox's C ``append``: an interrupt lands before
    # any of it or after all of it. And as a net for whatever else an interrupt
    # leaves half done, an exception out of submit has this thread audit the
    # workers: each holding tasks is sent Audit, which it answers in turn with its
    # other messages. A worker answers its tasks in the order it got them, so a
    # task held since before the Audit and not answered before Audited never
    # reached it: it goes back to be handed out again.

    def _audit_when_due(self) -> None:
        """Send each worker holding tasks an Audit, if one is due (lock held)."""
        if not self._audit_due:
            return
        self._audit_due = False
        for w in self._workers:
            if w.tasks and not w.dead:
                token = next(self._audits)
                w.audit = (token, tuple(w.tasks))
                self._send(w, encode(Audit(token)))

    def _on_audited(self, w: Worker, token: int) -> None:
        """Hand out again the tasks ``w`` held at Audit ``token`` and has not answered."""
        with self._lock:
            if w.audit is None or w.audit[0] != token:
                return
            held, w.audit = w.audit[1], None
            never = [w.tasks.pop(seq) for seq in held if seq in w.tasks]
            for record in never:  # what they were given is free again
                self._transport.settle(w.identity, record.seq, sent=False)
            self._queue_first(never)
            if never:
                logger.debug("worker %d never got tasks %s; handing them out again",
                             w.id, [r.seq for r in never])  # fmt: skip
            self._dispatch()

    def _trim_when_idle(self) -> None:
        """Close the free slabs once no epoch has run for :data:`IDLE_TRIM_SECONDS`
        (lock held; NOTE [ Idle slabs ] in ``_transport.py``)."""
        if self._trimmed or self._idle_since is None or self._pending:
            return
        if time.monotonic() - self._idle_since < IDLE_TRIM_SECONDS:
            return
        if any(w.tasks for w in self._workers):
            return
        self._trimmed = True
        self._send_forgets()  # (which closes the free slabs while trimmed)

    def _watch_signature(self, template: Any) -> tuple[Any, ...]:
        """What the I/O thread watches, as identities (lock held; NOTE [ Watch
        signature ] in ``_polling.py``)."""
        return (
            tuple((id(w), w.dead, id(w.process)) for w in self._workers),
            tuple(id(w.process) for w in self._retiring),
            id(template),
            tuple(map(id, self._workforce.retired_templates)),
        )

    def _watch_entries(self) -> list[Entry]:
        """The descriptors behind :meth:`_watch_signature`: each live worker's
        connection and sentinel, retiring workers' sentinels, the templates'
        connections, the current template's sentinel and the wake-up pipe."""
        with self._lock:
            live = [w for w in self._workers if not w.dead and not w.conn.closed]
            retiring = [w for w in self._retiring if w.process is not None]
            template = self._workforce.template
            templates = [t for t in [*self._workforce.retired_templates, template] if t]
            entries: list[Entry] = [(w.conn.fileno(), "conn", w) for w in live]
            entries += [(int(w.process.sentinel), "sentinel", w) for w in live if w.process]
            entries += [(int(w.process.sentinel), "retiring", w) for w in retiring]
            entries += [(t.conn.fileno(), "template", t) for t in templates if not t.conn.closed]
            if template is not None:
                entries.append((template.sentinel, "template-exit", template))
        entries.append((self._wakeup_r, "wake", None))
        return entries

    def _wake(self) -> None:
        self._waker.wake()

    def _wake_if_trimmed(self) -> None:
        """A batch died: an idle pool closes its slab (NOTE [ Idle slabs ])."""
        if self._trimmed:
            self._waker.wake()

    def _on_template(self, template: Any) -> None:
        with self._lock:
            news = self._workforce.on_template(template, [*self._workers, *self._retiring])
            self._release_pins()  # it may have acknowledged changes
            if news.unsafe:
                self._workforce.drop_template(news.unsafe)
                self._start_unforked()
        if news.failure is not None:
            self._break(news.failure)

    def _start_unforked(self) -> None:
        """Start directly the workers the template was asked for and never forked;
        what was sent to them is sent again (their tasks go back, first, in order)."""
        self._retiring = [w for w in self._retiring if w.process is not None]
        for i, w in enumerate(self._workers):
            if w.process is None:
                for record in sorted(w.tasks.values(), key=lambda r: r.seq, reverse=True):
                    record.worker = None
                    self._pending.appendleft(record)
                self._workforce.release(w)
                self._workers[i] = self._launch(w.id, replacement=w.replacement)

    def _on_retired(self, w: Worker) -> None:
        """A worker stopped to start afresh has exited: forget it (and the template
        it came from, if that was replaced and served no one else)."""
        with self._lock:
            self._retiring.remove(w)
        w.process.join(EXIT_CODE_WAIT)
        reap_group_later(w.pid, w.created)
        self._workforce.release(w)
        with self._lock:
            self._workforce.stop_idle_templates([*self._workers, *self._retiring])

    def _drain(self, w: Worker, known_ready: bool = False) -> None:
        """Handle every message waiting on ``w``'s connection (the first without
        looking when the watchlist said it is ready)."""
        while True:
            try:
                if not known_ready and not self._watch.readable(w.conn.fileno()):
                    return
                known_ready = False
                message = decode(recv(w.conn))
            except (EOFError, OSError, ValueError):
                return  # the worker died (its sentinel tells), or its connection closed
            if isinstance(message, Done):
                sentinel = int(w.process.sentinel) if w.process is not None else None
                self._transport.receive(w.identity, message.seq, message.payload, sentinel)
            elif isinstance(message, (Failed, Exhausted)):
                self._transport.settle(w.identity, message.seq)
            self._handle(w, message)

    def _handle(self, w: Worker, message: Any) -> None:
        if isinstance(message, Ready):
            with self._lock:
                w.ready = True
                w.acknowledge(w.start_generation)
                self._release_pins()
            return
        if isinstance(message, Synced):
            with self._lock:
                w.acknowledge(message.generation)
                self._release_pins()
            return
        if isinstance(message, Audited):
            self._on_audited(w, message.token)
            return
        if isinstance(message, StartFailed):
            self._break(start_error(message))
            return
        now = time.monotonic()
        with self._lock:
            record = w.tasks.pop(message.seq, None)
            wanted = record is not None and not record.cancelled
            if record is not None:  # it applied the changes the task needed
                w.acknowledge(record.generation)
                self._release_pins()
            following = next(iter(w.tasks.values()), None)
            if following is not None and not following.started:
                following.started = now  # it runs now
            self._dispatch()
        if isinstance(message, (Done, Failed)):
            self._counters.busy += message.elapsed
            self._counters.tasks_done += 1
            if record is not None and record.started:  # NOTE [ Late by the main process's clock ]
                self._counters.turnaround += now - record.started
                self._counters.turnarounds += 1
        if not wanted:
            if isinstance(message, Done):
                self._transport.discard(w.identity, message.payload)
            return
        assert record is not None
        try:
            outcome = self._outcome(w, message)
        except WorkerGone:
            self._run_again(record)
            return
        resolve(record.future, outcome)

    def _outcome(self, w: Worker, message: Done | Failed | Exhausted) -> Outcome:
        if isinstance(message, Done):
            self._counters.bytes_moved += message.nbytes
            try:
                return Loaded(self._transport.unpack(w.identity, message.payload), w.id, w.pid)
            except TransportError as exc:
                return Lost(exc, w.id, w.pid)
            except (ConnectionError, EOFError) as exc:
                # A batch in fresh shared memory is fetched from its worker while
                # unpickling (torch's fd passing), a new slab's descriptor right
                # after the Done: a worker killed right after it sent the batch
                # takes the batch with it.
                raise WorkerGone from exc
            except Exception as exc:  # that batch fails, not the I/O thread
                if out_of_descriptors(exc):
                    return Lost(descriptor_error(exc, "a batch's tensors"), w.id, w.pid)
                return Raised(unreadable(exc), w.id, w.pid)
        if isinstance(message, Failed):
            return Raised(message.error, w.id, w.pid)
        return Ended(w.id)

    def _run_again(self, record: TaskRecord) -> None:
        """Queue a task first again: its batch was lost with its worker after loading.

        Not a death of the batch's making (it loaded), so not counted towards a
        poison batch; the worker's death itself counts against
        ``max_worker_restarts`` when its sentinel fires."""
        with self._lock:
            self._queue_first([record])
            self._dispatch()

    def _queue_first(self, records: list[TaskRecord]) -> None:
        """Queue tasks taken back from a worker first again, in their order (lock
        held); those whose batches nobody waits for (an epoch left) are dropped."""
        for record in sorted(records, key=lambda r: r.seq, reverse=True):
            record.worker = None
            if not record.cancelled:
                self._pending.appendleft(record)

    # ---------------------------------------------------------------- deaths

    # NOTE [ Started tasks ]: a batch that killed two workers is not run a third
    # time (a poison batch, ``_deaths.crash_error``), so a death must count only
    # against a batch its worker really ran. The first task a dead worker held
    # need not be one: workers killed together (the out-of-memory killer on a
    # container, a user's ``pkill``) exit one after another, a process holding
    # much memory taking a while to, and batches sent meanwhile to one already
    # killed (the first death's batch run again, or a batch it was given for a
    # result that was still in its pipe) were never read. Each worker therefore
    # writes the ``seq`` of every task it starts into a little shared memory of
    # its own (:class:`~poolloader._messages.StartedSlot`, sent before anything
    # else on its connection): one store per batch, no message. A death counts
    # against the first task only if the slot names it; otherwise the tasks just
    # go to another worker.

    def _on_exit(self, w: Worker) -> None:
        """A worker's sentinel fired: reap its process tree, then replace it or break."""
        self._drain(w)
        w.process.join(EXIT_CODE_WAIT)
        code = w.exit_code()
        with self._lock:
            # The consumer's dispatch may have retired it for a fresh start meanwhile
            # (an idle worker whose death was not handled yet): it held no task and
            # its slot has a new worker, so it is forgotten as a retired one is.
            retired = w not in self._workers
            still_retiring = w in self._retiring
            w.dead = True  # from here on no dispatch sends it a task or retires it
        if retired:
            if still_retiring:
                self._on_retired(w)
            return
        reap_group_later(w.pid, w.created)
        if not w.ready and not w.replacement:
            self._break(silent_start_error(w.id, w.pid, code))
            return
        with self._lock:
            held = list(w.tasks.values())
            running = held[0] if held and w.ready else None
            if running is not None and not w.has_started(running):
                running = None  # killed before it read it (NOTE [ Started tasks ])
            # Batches nobody waits for (an epoch left with `break`) are not run
            # again, and a death while loading one is not held against anyone.
            lost = [r for r in held if not r.cancelled]
            if running is not None and running.cancelled:
                self._log_death(w, code, lost, "while loading a batch nobody waits for")
                self._replace(w, lost, None, code)
                return
            self._counters.deaths += 1
            self._exitcodes.append(code)
            failure = crash_error(
                Death(w.id, w.pid, code, running, bool(lost)),
                tuple(self._exitcodes), self._counters.deaths, self._max_restarts,
                self._resumable,
            )  # fmt: skip
            self._log_death(w, code, lost, "", fatal=failure is not None)
            if failure is None:
                self._replace(w, lost, running, code)
                return
        self._break(failure, running)  # fails the dead worker's tasks with the rest

    def _log_death(
        self, w: Worker, code: int, lost: list[TaskRecord], doing: str, fatal: bool = False
    ) -> None:
        if fatal:
            again = "not replaced: the loader raises WorkerCrashedError"
        elif lost:
            again = f"running batches {[r.position for r in lost]} again"
        else:
            again = "no batch lost"
        logger.warning(
            "poolloader worker %d (pid %d) died%s: %s; %s",
            w.id, w.pid, f" {doing}" if doing else "", describe_exit(code), again,
        )  # fmt: skip

    def _replace(
        self, w: Worker, lost: list[TaskRecord], running: TaskRecord | None, code: int
    ) -> None:
        """Start a worker in ``w``'s place (it ended with ``code``) and queue its tasks
        first, in their order.

        Only the task that was running counts the death: the others merely waited
        in the dead worker's inbox."""
        w.tasks.clear()
        self._workforce.release(w)
        fresh = self._launch(w.id, replacement=True)
        self._workers[self._workers.index(w)] = fresh
        self._counters.restarts += 1
        if running is not None:
            running.killed.append(code)
        self._queue_first(lost)  # (none cancelled: _on_exit left those out)
