"""A pool's worker processes: starting them (forked from the pool's template, or
directly with the start method), retiring them, and stopping them together with
every process they started.

NOTE [ Templates ] in ``_template.py`` says why workers are forked from a
template; NOTE [ Process trees ] in ``_proctree.py`` how the processes they
start are found and ended.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import pickle
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import sendfds
from typing import TYPE_CHECKING, Any

import psutil

from . import _pickling, _proctree, _worker
from ._deaths import (
    EXIT_INBOX_FAILED,
    INBOX_FAILED,
    INBOX_FAILED_AT,
    STARTED_SLOT_BYTES,
    InboxFailed,
    descendants,
    describe_exit,
    silent_start_error,
    start_error,
)
from ._messages import (
    Advanced,
    DatasetFollows,
    Forked,
    PickledObject,
    StartedSlot,
    StartFailed,
    Stop,
    TemplateReady,
    TemplateUnsafe,
    Update,
)
from ._packing import descriptor_socket
from ._pickling import OnPart
from ._template import ForkedProcess, Template
from ._threads import inherited_signal_mask
from ._wire import encode
from .errors import PoolBrokenError

if TYPE_CHECKING:
    from ._tasks import TaskRecord

logger = logging.getLogger("poolloader")

#: Seconds workers get to finish after Stop before they are terminated.
STOP_GRACE = 2.0
#: Seconds after SIGTERM before SIGKILL.
TERMINATE_GRACE = 1.0
#: Seconds to wait for a process known to have exited to report its exit code.
EXIT_CODE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """One worker process: its id in the pool and when the main process started it
    (``time.monotonic()``), never a bare pid, which a replacement may reuse."""

    id: int
    started: float


@dataclass(eq=False)
class Worker:
    """A worker process as the pool sees it.

    A worker forked from the template has a connection at once (what is sent on
    it waits there) but a process only once the template reports it forked."""

    id: int
    conn: Connection
    generation: int
    started: float = field(default_factory=time.monotonic)
    process: Any = None
    template: Template | None = None  # the template it was forked from
    pid: int = 0
    created: float = 0.0  # its start on psutil's create_time() clock
    ready: bool = False
    # Started in place of a worker that had started (after its death, or afresh for
    # a new epoch), not by start(): a silent death while it starts is no start error.
    replacement: bool = False
    dead: bool = False  # its exit was handled; the I/O thread no longer watches it
    epoch: int = -1
    # Tasks sent to it, in the order sent: it runs them in that order, so the
    # first is the one running and the others only wait in its inbox.
    tasks: dict[int, TaskRecord] = field(default_factory=dict)
    # Where it writes the seq of each task it starts (NOTE [ Started tasks ] in
    # _iothread.py); None if the shared memory could not be made.
    started_slot: mmap.mmap | None = None
    # The newest generation it has said it applied (NOTE [ Pinned segments ] in
    # _control.py): where it started once Ready, then its finished tasks' and Synced.
    acknowledged: int = -1
    # An Audit sent to it and not answered yet: its token and the tasks it held
    # then (NOTE [ Tasks never sent ] in _iothread.py).
    audit: tuple[int, tuple[int, ...]] | None = None
    start_generation: int = field(init=False)

    def __post_init__(self) -> None:
        self.start_generation = self.generation

    def acknowledge(self, generation: int) -> None:
        self.acknowledged = max(self.acknowledged, generation)

    def exit_code(self) -> int:
        """Its process's exit code (``-SIGKILL`` if none can be had), as an
        :class:`~poolloader._deaths.InboxFailed` where it exited because its
        message thread failed."""
        code = self.process.exitcode
        if code is None:
            return -signal.SIGKILL
        slot = self.started_slot
        ours = code == EXIT_INBOX_FAILED and slot is not None and not slot.closed
        if ours and struct.unpack_from("q", slot, INBOX_FAILED_AT)[0] == INBOX_FAILED:  # type: ignore[arg-type]
            return InboxFailed(code)
        return code

    def has_started(self, record: TaskRecord) -> bool:
        """Whether it began ``record`` (its first task): ``False`` when it died
        before it read it, for instance killed together with another worker."""
        slot = self.started_slot
        if slot is None or slot.closed:
            return True  # unknown: as if it had
        return bool(struct.unpack_from("q", slot)[0] == record.seq)

    @functools.cached_property
    def identity(self) -> WorkerIdentity:
        # id and start never change; the I/O thread asks for each batch.
        return WorkerIdentity(self.id, self.started)

    def attach(self, process: Any) -> None:
        self.process, self.pid = process, process.pid
        self.created = _proctree.created(process.pid)


#: How a pool gets the dataset it ships to its template (:meth:`Workforce.start`):
#: called with what takes each part of the pickle as it is made, or ``None``.
Ship = Callable[[OnPart | None], Any]


class Workforce:
    """Starts and stops the workers of one pool.

    With a template (the default, see NOTE [ Templates ]) workers are forked from
    it; when there is none, or forking it would not be safe, each worker is
    started directly with the pool's start method and receives the dataset
    itself: the channel's base snapshot, or the dataset object when it may only
    be pickled while a process starts."""

    def __init__(
        self, context: Any, setup: _worker.WorkerSetup, transport: Any, *, template: bool
    ) -> None:
        self._context = context
        self._setup = setup
        self._transport = transport
        self.template: Template | None = None
        self.retired_templates: list[Template] = []  # replaced; their workers still run
        self._use_template = template
        self.base_seed = setup.base_seed  # the current epoch's: new workers are seeded with it
        # How a worker's connection is closed: the pool's outbox closes it once no
        # write is under way (NOTE [ Writes and Ctrl-C ] in _outbox.py).
        self.close_connection: Callable[[Connection], None] = Connection.close

    def start(self, generation: int, ship: Ship | None = None) -> None:
        """Start the template (workers are asked for with :meth:`launch` at once).

        ``ship``: the dataset is not in the setup yet; ``ship(on_part)`` gives it as
        it travels (:func:`~poolloader._pickling.ship`), handing each part of its
        pickle to ``on_part`` (if not ``None``) as it is made. The template starts
        first and receives the pickle while it is made (NOTE [ Templates ]); a
        dataset that must travel in a process's arguments gets a template started
        with it."""
        if not self._use_template:
            if ship is not None:
                self._setup = replace(self._setup, dataset=ship(None))
            return
        if ship is None:
            self.template = Template(self._context, self._setup, generation)
            return
        early = Template(self._context, replace(self._setup, dataset=DatasetFollows()), generation)
        try:
            dataset = ship(early.stream_dataset())
            pickled = isinstance(dataset, PickledObject)
            if pickled:
                early.end_dataset()  # raises if the template failed to start
                self.template = early  # (the pool's close stops it from here on)
        except BaseException:  # (a Ctrl-C too: no template is left running)
            early.stop()
            raise
        self._setup = replace(self._setup, dataset=dataset)
        if not pickled:
            early.stop()
            self.template = Template(self._context, self._setup, generation)

    def launch(
        self,
        worker_id: int,
        *,
        generation: int,
        direct_dataset: Any,
        catch_up: tuple[Update, ...] = (),
        replacement: bool = False,
    ) -> Worker:
        """Ask for worker ``worker_id``, starting at ``generation``: forked from the
        template (after applying ``catch_up`` to its copy of the dataset), or started
        directly with ``direct_dataset``."""
        template = self.template
        if template is not None:
            started = time.monotonic()
            conn = template.fork(worker_id, started, catch_up, generation, self.base_seed)
            w = Worker(worker_id, conn, generation, started, template=template,
                       replacement=replacement)  # fmt: skip
        else:
            w = self._start_directly(worker_id, generation, direct_dataset, replacement)
        w.started_slot = _send_started_slot(w.conn)  # first on the connection
        self._transport.attach(w.identity, w.conn)
        return w

    def _start_directly(
        self, worker_id: int, generation: int, dataset: Any, replacement: bool
    ) -> Worker:
        setup = replace(self._setup, worker_id=worker_id, dataset=dataset, base_seed=self.base_seed)
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker.run,
            args=(setup, child),
            name=f"poolloader-worker-{worker_id}",
            daemon=False,
        )
        with inherited_signal_mask():  # NOTE [ Signals go to the main thread ]
            process.start()
        child.close()
        w = Worker(worker_id, parent, generation, replacement=replacement)
        w.attach(process)
        logger.debug("worker %d started (pid %s)", worker_id, process.pid)
        return w

    # -- the template's messages

    @property
    def inherits(self) -> bool:
        """Whether workers inherit the dataset through ``fork`` (it is never pickled)."""
        return bool(self._context.get_start_method() == "fork")

    def restart_template(self, dataset: Any, generation: int) -> None:
        """Start a new template holding ``dataset`` (the main process's object, at
        ``generation``); the old one stays until the workers it forked are gone."""
        setup = replace(self._setup, dataset=dataset, base_seed=self.base_seed)
        try:
            template = Template(self._context, setup, generation)
        except (TypeError, AttributeError, pickle.PicklingError) as exc:
            if self._context.get_start_method() == "fork":
                raise
            # spawn, forkserver: the dataset travels in the new template's arguments,
            # and pickling them failed; say which part, as a new loader would.
            raise _pickling.not_picklable(dataset, "dataset", exc) from exc
        if self.template is not None:
            self.retired_templates.append(self.template)
        self.template = template

    def stop_idle_templates(self, workers: list[Worker]) -> None:
        """Stop the replaced templates none of ``workers`` came from."""
        for old in list(self.retired_templates):
            if all(w.template is not old for w in workers):
                self.retired_templates.remove(old)
                old.stop()

    def on_template(self, template: Template, workers: list[Worker]) -> TemplateNews:
        """Handle what ``template`` sent: give each forked worker among ``workers``
        its process. Returns what the pool must act on."""
        news = TemplateNews()
        template.receive()
        for message, pidfd in template.take():
            if isinstance(message, TemplateReady):
                template.on_ready()
            elif isinstance(message, Advanced):
                template.acknowledge(message.generation)
            elif isinstance(message, Forked) and pidfd is not None:
                self._forked(workers, message, ForkedProcess(template, message.pid, pidfd))
            elif isinstance(message, TemplateUnsafe):
                news.unsafe = message.reason
            elif isinstance(message, StartFailed):
                news.failure = start_error(message)
        return news

    @staticmethod
    def _forked(workers: list[Worker], message: Forked, process: ForkedProcess) -> None:
        identity = WorkerIdentity(message.worker_id, message.started)
        for w in workers:
            if w.identity == identity and w.process is None:
                w.attach(process)
                logger.debug("worker %d forked (pid %s)", w.id, message.pid)
                return
        process.kill()  # a worker the pool no longer knows (it was closed meanwhile)
        process.close()

    def drop_template(self, reason: str) -> None:
        """Start workers directly from now on: forking the template is unsafe."""
        logger.warning(
            "poolloader starts each worker on its own (the dataset is unpickled in each): "
            "forking a template process is not safe, as %s", reason,
        )  # fmt: skip
        template, self.template = self.template, None
        if template is not None:
            template.stop()

    def template_died(self, workers: list[Worker]) -> PoolBrokenError | None:
        """The template exited unasked: forget it. Before it was ready, that is the
        error that breaks the pool (it could not start); after, workers start on
        their own from now on (``None``), as when forking it is unsafe: the
        workers it forked live on, and a dead one is still replaced."""
        template = self.template
        assert template is not None
        template.process.join(EXIT_CODE_WAIT)
        pid, code = int(template.process.pid or 0), template.process.exitcode
        self.on_template(template, workers)  # what it sent before it died (forked workers)
        self.template = None
        ready = template.ready
        template.stop()
        exit_code = code if code is not None else -9
        if not ready:
            return silent_start_error(-1, pid, exit_code)
        logger.warning(
            "poolloader: the process DataLoader workers are forked from (pid %s) exited "
            "(%s); workers are started on their own from now on (each unpickles the dataset)",
            pid, describe_exit(exit_code),
        )  # fmt: skip
        return None

    def advance(self, updates: tuple[Update, ...], generation: int) -> None:
        """Bring the template's dataset to ``generation`` (new workers start there)."""
        if self.template is not None:
            self.template.advance(updates, generation)

    # -- ending

    def retire(self, w: Worker) -> None:
        """Let ``w`` finish what it has and exit (it is not replaced)."""
        _send(w, Stop())

    def release(self, w: Worker) -> None:
        """Forget a worker whose exit was handled, or one its template never
        reported (``w.process`` is None), which may still run."""
        self._transport.detach(w.identity, exited=w.process is not None)
        self.close_connection(w.conn)
        if w.started_slot is not None:
            w.started_slot.close()
        if w.process is not None:
            w.process.close()

    def stop(self, workers: list[Worker]) -> None:
        """Stop ``workers``, every process they started, and the templates."""
        for template in [*self.retired_templates, self.template]:
            if template is not None:  # workers forked meanwhile get their process
                self.on_template(template, workers)
        # See NOTE [ Process trees ] in _proctree.py.
        alive = [w for w in workers if not w.dead and w.process is not None]
        pids = {w.pid for w in alive}
        family = _family(pids)
        for w in workers:
            _send(w, Stop())
        self._join(alive)
        # Started while the workers were being stopped: created before now.
        since = min((w.created for w in alive), default=0.0)
        strays = _proctree.group_members(pids, since, _proctree.process_clock())
        _proctree.terminate_all(_proctree.unique([p for p in [*family, *strays] if p.is_running()]))
        for w in workers:
            self.release(w)
        for template in [*self.retired_templates, self.template]:
            if template is not None:
                template.stop()

    def kill(self, workers: list[Worker]) -> None:
        """End ``workers``, the processes they started and the templates at once,
        with SIGKILL: :meth:`stop` was interrupted (a second Ctrl-C while it waited
        for a worker in a long ``__getitem__``), and the user wants out now."""
        alive = [w for w in workers if not w.dead and w.process is not None]
        family = _family({w.pid for w in alive})  # before the workers die (and orphan them)
        templates = [t for t in [*self.retired_templates, self.template] if t is not None]
        processes = [*(w.process for w in alive), *(t.process for t in templates)]
        for process in processes:
            try:
                process.kill()
            except (ValueError, OSError):
                pass  # closed already: an earlier stop() got that far (NOTE in Pool.close)
        for proc in _proctree.unique(family):
            try:
                proc.kill()
            except psutil.Error:
                pass
        for process in processes:
            try:
                process.join(TERMINATE_GRACE)  # (reaped: no zombie left)
            except (ValueError, OSError):
                pass
        for w in workers:
            try:
                self.release(w)
            except (ValueError, OSError):
                pass  # not reaped yet: the process object is left to the collector
        for template in templates:
            template.stop()  # (returns at once if an interrupted stop() began it)
            template.release()

    def _join(self, workers: list[Worker]) -> None:
        deadline = time.monotonic() + STOP_GRACE
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        stubborn = [w.process for w in workers if w.process.is_alive()]
        for process in stubborn:
            process.terminate()
        for process in stubborn:
            process.join(TERMINATE_GRACE)
            if process.is_alive():
                process.kill()
                process.join(TERMINATE_GRACE)


@dataclass
class TemplateNews:
    """What the template's messages ask of the pool."""

    unsafe: str = ""  # why forking it is not safe: start workers directly
    failure: PoolBrokenError | None = None  # it could not start


def _send(w: Worker, message: object) -> None:
    try:
        w.conn.send_bytes(encode(message))
    except OSError:
        pass  # the worker is gone


#: What a started slot holds before the worker starts any task.
NO_TASK = -1


def _send_started_slot(conn: Connection) -> mmap.mmap | None:
    """Make a worker's started slot and send it as the first message on ``conn``
    (:class:`~poolloader._messages.StartedSlot` and its descriptor); ``None``
    when it could not be made or sent (deaths then count as before)."""
    try:
        fd = os.memfd_create("poolloader-started", os.MFD_CLOEXEC)
    except OSError:
        return None
    slot = None
    try:
        os.ftruncate(fd, STARTED_SLOT_BYTES)
        slot = mmap.mmap(fd, STARTED_SLOT_BYTES)
        struct.pack_into("q", slot, 0, NO_TASK)
        conn.send_bytes(encode(StartedSlot()))
        with descriptor_socket(conn) as sock:
            sendfds(sock, [fd])
        return slot
    except OSError:
        if slot is not None:
            slot.close()
        return None
    finally:
        os.close(fd)


def _family(pids: set[int]) -> list[psutil.Process]:
    """The processes the live workers ``pids`` started: their descendants and the
    other members of their process groups (NOTE [ Process trees ] in _proctree.py).
    Found while the workers live, their group ids cannot belong to anyone else."""
    return descendants(list(pids)) + _proctree.group_members(pids)
