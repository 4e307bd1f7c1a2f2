"""The template process that a pool's workers are forked from.

NOTE [ Templates ]

A pool does not start its workers one by one from the main process. It starts
one *template* process, with the loader's start method (spawn, forkserver or
fork), that receives the dataset, ``collate_fn`` and ``worker_init_fn`` once,
and forks every worker from it::

    main process ──start──► template ──fork──► worker 0, worker 1, ...
         │                     ▲  (holds the dataset; never loads a batch)
         └── ForkWorker, Advance, Stop ┘   ◄── Forked, Exited

* The dataset is pickled once per loader and unpickled once, not once per
  worker: workers start in parallel, in milliseconds each, and share the
  template's memory copy-on-write. The template is started before the dataset
  is pickled (its arguments hold :class:`DatasetFollows` instead), and the
  pickle follows on its connection: pickling a big dataset in the main process
  overlaps the template's start (a new interpreter importing torch), where one
  after the other would add them up. The pickle travels in parts of
  :data:`DATASET_PART` bytes as it is made, sent by a thread once the template
  runs, and the template unpickles each part while the next is made and travels;
  the main process then takes the dataset's fingerprint (NOTE [ Fingerprints ]
  in ``_pickling.py``) while the last parts go. A million records: about 1.4 s
  to pickle, beside the template's start (0.7-1.6 s, torch's import); 0.5-1.2 s
  to unpickle (most of it the kernel handing the template fresh pages), all of
  it after the template's start and as much as the start leaves beside the
  pickling. A dataset found mid-pickle to need inheritance (below) or not to
  pickle at all ends that template, with whatever parts it got.
* The template runs one thread, so forking it is safe although the main process
  runs threads (the pool's I/O thread, torch's thread pools). With
  ``multiprocessing_context="fork"`` the template itself is forked from the main
  process, when the pool starts and before its I/O thread does: the dataset is
  inherited, never pickled, as with torch's fork workers.
* Objects that may only travel "through inheritance" (``multiprocessing`` locks,
  values, queues, manager proxies) reach the template in its process
  arguments; every worker, replacement workers included, inherits them.
* A forked worker starts from a clean process state, so each epoch of a loader
  with ``persistent_workers=False`` gets fresh workers, as torch's new
  processes, at the cost of a fork.

The template holds the dataset at the control channel's base generation (NOTE
[ Control ordering ] in ``_control.py``); the pool advances it with the changes
no unfinished task predates (:class:`~poolloader._messages.Advance`), and a new
worker applies the changes after that before ``worker_init_fn`` runs. The
template reaps the workers it forked and reports their exit codes; the main
process watches each through a pidfd, which the template opens while the child
cannot have been reaped yet, so a recycled pid is never mistaken for a worker.

NOTE [ Frozen objects ]

The template moves every object it holds into the collector's permanent
generation (``gc.freeze()``) right before it forks a worker. A forked worker
shares the template's pages until it writes to one, and a full collection in the
worker writes to every object it examines: without the freeze the first full
collection in each worker would copy the pages of the whole dataset (a million
records: hundreds of MB per worker). Frozen objects are never examined. They are
still freed by reference counting; a replaced dataset is unfrozen and collected
first, so cycles in the old copy do not stay.

If unpickling the dataset left the template with other threads running, or with
CUDA initialised, forking it would not be safe: it says so and exits, and the
pool starts each worker directly instead (each unpickles the dataset itself).

NOTE [ A template that does not start ]

A spawn or forkserver process imports the script's main module before it runs
anything of poolloader's. A script without a main guard runs its top level there
again: most often it then fails, and the template's error reaches the consumer
with the advice to add the guard. But code that waits instead
(``init_process_group`` under torchrun, waiting for ranks that never come; an
``input()``) leaves the template silent, and the loader waiting for a batch with
no error and no deadline but ``timeout``. The I/O thread therefore says so once
the template has not reported ready for :data:`TEMPLATE_SLOW_START` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

from . import _worker
from ._messages import (
    Advance,
    DatasetFollows,
    Exited,
    Forked,
    ForkWorker,
    Stop,
    Update,
)
from ._packing import descriptor_socket
from ._pickling import OnPart
from ._template_process import template_main
from ._threads import helper_thread, inherited_signal_mask

#: Seconds the template gets to exit after Stop before it is terminated.
TEMPLATE_STOP_GRACE = 2.0
#: Seconds after which a template that has not reported ready is said to be
#: slow (a warning, once): a few seconds are usual, a million records included.
TEMPLATE_SLOW_START = 60.0

logger = logging.getLogger("poolloader")

# ------------------------------------------------------------ in the main process


class Template:
    """The main process's handle on a template process (see NOTE [ Templates ])."""

    def __init__(self, context: Any, setup: _worker.WorkerSetup, generation: int) -> None:
        self._pidfd: int | None = None  # see sentinel
        self.conn, child = context.Pipe(duplex=True)
        self._sock = descriptor_socket(self.conn)
        forked = context.get_start_method() == "fork"
        main_ends = (self.conn.fileno(), self._sock.fileno()) if forked else ()
        self.process = context.Process(
            target=template_main, args=(setup, child, main_ends), name="poolloader-template",
            daemon=False,
        )  # fmt: skip
        self._starting: threading.Thread | None = None
        self._sending: threading.Thread | None = None
        self._stream: _DatasetStream | None = None
        self._start_error: BaseException | None = None
        if isinstance(setup.dataset, DatasetFollows):
            # The forkserver answers a start only once it runs (a new interpreter
            # importing torch): meanwhile this thread's caller pickles the dataset.
            # The server itself was started with the pool (_pool_start.start_pool).
            self._starting = helper_thread(self._start, "poolloader-template-start", (child,))
            self._starting.start()
        else:
            self._start(child)
            if self._start_error is not None:
                self._close_pipe()
                raise self._start_error
        self.generation = generation  # of the dataset the template holds
        # The newest generation it has said it holds (NOTE [ Pinned segments ] in
        # _control.py): where it started once ready, then each Advanced.
        self.acknowledged = -1
        self._start_generation = generation
        self.ready = False
        self._created = time.monotonic()
        self._said_slow = False
        self.stopped = False
        self._lock = threading.Lock()  # the I/O thread reads; a worker's join() may too
        self._exits: dict[int, int] = {}
        self._received: deque[tuple[object, int | None]] = deque()

    @property
    def sentinel(self) -> int:
        """Ready once the template has exited: a pidfd. Not multiprocessing's
        sentinel, a pipe whose other end the template holds and every worker it
        forks inherits: that one fires only once the workers are gone too, and a
        worker that died meanwhile would be asked of a dead template for ever."""
        pidfd = self._pidfd
        return pidfd if pidfd is not None else int(self.process.sentinel)

    def fork(
        self,
        worker_id: int,
        started: float,
        catch_up: tuple[Update, ...],
        generation: int,
        base_seed: int,
    ) -> Connection:
        """Ask for a worker; returns the main process's end of its connection.

        Messages sent on it before the worker runs wait for it there."""
        parent, child = multiprocessing.Pipe(duplex=True)
        try:
            self._send(ForkWorker(worker_id, started, catch_up, generation, base_seed))
            sendfds(self._sock, [child.fileno()])
        except OSError:
            pass  # the template died; its sentinel tells the I/O thread
        finally:
            child.close()
        return parent

    def _start(self, child: Connection) -> None:
        try:
            with inherited_signal_mask():  # NOTE [ Signals go to the main thread ]
                self.process.start()
            self._pidfd = os.pidfd_open(self.process.pid)  # templates need pidfds (Linux 5.3+)
        except BaseException as exc:
            self._start_error = exc
        finally:
            child.close()

    def _close_pipe(self) -> None:
        """Close the main process's ends of the template's connection."""
        self._sock.close()
        self.conn.close()

    def _raise_start_error(self) -> None:
        """Wait for the start on its thread to end; raise what it raised (each time)."""
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._start_error is not None:
            raise self._start_error

    def stream_dataset(self) -> OnPart:
        """Start sending the dataset's pickle, as it is made, to a template started
        with :class:`DatasetFollows`; returns what takes each part of it.

        A thread sends the parts once the template has started (the template
        unpickles each as it arrives), so that the caller goes on pickling
        meanwhile; :meth:`end_dataset` says the pickle is whole. Messages to the
        template wait for the last part. A template that dies first is left to its
        sentinel, as everywhere else; one stopped before its dataset arrived whole
        is killed (it has forked nothing and holds nothing anyone needs)."""
        stream = _DatasetStream(self.conn, self._starting)
        self._stream = stream
        self._sending = helper_thread(stream.send_all, "poolloader-dataset-send")
        self._sending.start()
        return stream.parts.put

    def end_dataset(self) -> None:
        """The dataset's pickle is whole (all of it went to :meth:`stream_dataset`'s
        taker); raises if the template failed to start."""
        assert self._stream is not None
        self._stream.parts.put(_DatasetStream.END)
        self._raise_start_error()

    def _wait_sent(self) -> None:
        """Wait until the dataset's last part is sent, so that what follows comes after it."""
        sending = self._sending  # read once: stop() and a send may both get here
        if sending is not None:
            sending.join()
            self._sending = None

    def check_start(self) -> None:
        """Say once, as a warning, that the template is slow to start. Most often
        the script's top level runs there again and waits (NOTE [ A template that
        does not start ])."""
        if self.ready or self._said_slow:
            return
        waited = time.monotonic() - self._created
        if waited < TEMPLATE_SLOW_START:
            return
        self._said_slow = True
        logger.warning(
            "poolloader: the process DataLoader workers are forked from (pid %s) has not "
            "started after %.0f s. With spawn and forkserver it first imports your main "
            "module: code at the top level of the script, outside `if __name__ == "
            "'__main__':` (init_process_group, a training loop, input()), runs there "
            "again and may wait for ever. Guard it, or pass "
            "multiprocessing_context='fork'. (Unpickling a very large dataset also "
            "takes a while: then this warning is all there is to it.)",
            self.process.pid, waited,
        )  # fmt: skip

    def on_ready(self) -> None:
        """It reported :class:`TemplateReady`: it holds the dataset it started with."""
        self.ready = True
        self.acknowledge(self._start_generation)

    def acknowledge(self, generation: int) -> None:
        """It said it holds the dataset at ``generation`` (or a later one)."""
        self.acknowledged = max(self.acknowledged, generation)

    def advance(self, updates: tuple[Update, ...], generation: int) -> None:
        """Bring the template's dataset to ``generation``."""
        if updates:
            try:
                self._send(Advance(updates, generation))
            except OSError:
                pass
        self.generation = generation

    def _send(self, message: object) -> None:
        self._wait_sent()
        self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self) -> None:
        """Read what the template sent into :meth:`take`'s queue (with the pidfd that
        follows each :class:`Forked`); exit codes are kept for :meth:`exit_code` too."""
        with self._lock:
            try:
                while self.conn.poll(0):
                    message = pickle.loads(self.conn.recv_bytes())
                    pidfd = recvfds(self._sock, 1)[0] if isinstance(message, Forked) else None
                    if isinstance(message, Exited):
                        self._exits[message.pid] = message.exitcode
                    self._received.append((message, pidfd))
            except (EOFError, OSError):
                pass  # the template is gone; its sentinel tells

    @property
    def has_news(self) -> bool:
        """Whether :meth:`receive` read messages nobody took yet: a worker's exit,
        joined in :class:`ForkedProcess`, reads whatever the template sent, the
        :class:`Forked` of another worker included."""
        with self._lock:
            return bool(self._received)

    def take(self) -> list[tuple[object, int | None]]:
        """The messages :meth:`receive` read, oldest first, each once."""
        with self._lock:
            found = list(self._received)
            self._received.clear()
        return found

    def exit_code(self, pid: int) -> int | None:
        return self._exits.get(pid)

    def stop(self) -> None:
        """Stop the template (its workers are stopped by the pool)."""
        if self.stopped:
            return
        self.stopped = True
        stream = self._stream
        if stream is not None:
            stream.parts.put(_DatasetStream.ABORT)  # nothing more follows the parts sent
        try:
            self._raise_start_error()
        except BaseException as exc:
            if exc is not self._start_error:
                raise  # an interrupt while the start ended (Workforce.kill ends it)
            self._wait_sent()  # it never started: nothing to stop
            self._close_pipe()
            return
        if stream is not None and not stream.delivered:
            # Stopped before its dataset arrived whole (see stream_dataset): once
            # it is gone, the rest fails to send.
            self.process.kill()
        self._wait_sent()
        try:
            self._send(Stop())
        except OSError:
            pass
        self.process.join(TEMPLATE_STOP_GRACE)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.release()

    def release(self) -> None:
        """Close what the main process holds of a template that has exited: its
        connection, process object and pidfd, and the pidfds of workers it forked
        for a pool that no longer waits. Again, it does nothing; a template whose
        stop() was interrupted is killed, then released (``Workforce.kill``)."""
        self.receive()
        for _, pidfd in self.take():
            if pidfd is not None:
                os.close(pidfd)
        self._close_pipe()
        with contextlib.suppress(ValueError):  # (not reaped yet: left to the collector)
            self.process.close()
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)


class _DatasetStream:
    """The main process's side of a dataset sent while it is pickled: the pickling
    thread puts parts into :attr:`parts`, and :meth:`send_all`, on a thread of its
    own, sends them once the template has started (``starting``: the thread that
    starts it), each in one message (parts are :data:`DATASET_PART` bytes at most,
    the size of the template's buffer), then the empty part that ends them."""

    END = object()  # the pickle is whole
    ABORT = object()  # no more parts: the template is to be stopped

    def __init__(self, conn: Connection, starting: threading.Thread | None) -> None:
        self.parts: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.delivered = False  # the template got every part and the end
        self._conn = conn
        self._starting = starting

    def send_all(self) -> None:
        if self._starting is not None:
            self._starting.join()
        failing = False  # a send failed: the template is gone; the rest is dropped
        while True:
            part = self.parts.get()
            if part is self.ABORT:
                return
            if part is self.END:
                if not failing:
                    failing = not self._send(b"")
                self.delivered = not failing
                return
            if not failing:
                failing = not self._send(part)

    def _send(self, part: bytes) -> bool:
        try:
            self._conn.send_bytes(part)
        except OSError:  # the template is gone (a failed start, a crash, a kill)
            return False
        return True


class ForkedProcess:
    """A worker forked by a template: the part of ``multiprocessing.Process`` the
    pool uses, with a pidfd as its sentinel and the template's report as its exit
    code."""

    def __init__(self, template: Template, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.sentinel = pidfd
        self._template = template

    @property
    def exitcode(self) -> int | None:
        return self._template.exit_code(self.pid)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the template reported the exit (or ``timeout`` passed). With the
        template gone, wait for the exit alone: its code is not known then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            if self._template.stopped:
                wait([self.sentinel], left)
                return
            if wait([self._template.conn, self._template.sentinel], left):
                self._template.receive()
                if not self._template.process.is_alive() and self.exitcode is None:
                    return  # the template died: nobody will report this exit

    def is_alive(self) -> bool:
        return self.exitcode is None and not wait([self.sentinel], 0)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.sentinel, signum)
        except (ProcessLookupError, OSError):
            pass  # already gone

    def close(self) -> None:
        try:
            os.close(self.sentinel)
        except OSError:
            pass
