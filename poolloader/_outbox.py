"""Writing to the workers: what the pool decides to send, queued in order and
written outside the pool's lock.

NOTE [ Sending outside the lock ]: what the pool sends is decided under its
lock, and must reach each worker in that order (a change before the task that
needs it). Writing it there too kept the lock over a system call, which lets
the other thread have the GIL, and for a submitted batch that thread was the
I/O thread, woken by a result, which then blocked on the lock: two more thread
switches, for a third of the tiny batches. Messages therefore queue in an
:class:`Outbox` under the pool's lock, in the order decided, and are written
under the outbox's own lock: the consumer's submit writes its task after it lets
the pool's lock go, everyone else at once.

NOTE [ Writes and Ctrl-C ]: a KeyboardInterrupt (or whatever a signal handler
raises) lands in the main thread between any two calls, also in the middle of a
write. A write from there must not leave the outbox's lock held (every later
write would wait for it, and the loader would hang), lose a message (a task a
worker never gets: its batch is waited for in vain) or send one twice (a change
applied twice, a slab released twice). So:

- the lock is taken with ``with``, whose exit runs whatever lands once the lock
  is taken (a ``try`` after ``acquire()`` leaves a gap for the interrupt);
- a thread other than the I/O thread writes only the tasks at the head of the
  queue, and takes one off only once it is written: an interrupt in between
  leaves it there, to be written again, and a worker drops a task that repeats
  the one before it (``_worker._Inbox``). Any other message at the head waits
  for the I/O thread, which no signal interrupts, woken for it;
- a signal handler (or a finalizer) that runs inside its own thread's write,
  closing the loader, say, finds the lock its thread's and does not wait for it;
- a worker's connection is closed while no write is under way (by the thread
  writing, as it lets go, when one is), so that a write never goes to a
  descriptor number that another file took meanwhile.

An interrupt in the middle of a task written in several parts (only when the
worker's socket is full) leaves a broken message: that worker fails to read it,
exits and is replaced, and its batches run elsewhere.
"""

from __future__ import annotations

import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import sendfds
from typing import Any

from ._wire import send


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A file descriptor to send right after the message before it (a slab lent
    with a task: NOTE [ One pool of slabs ] in ``_slab_transport.py``). Only the
    I/O thread writes it: the entry holding it is never a task alone."""

    sock: socket.socket
    fd: int

    def send(self) -> None:
        sendfds(self.sock, [self.fd])


class Outbox:
    """Messages for the workers, written in the order they were queued."""

    def __init__(self, wake_io: Callable[[], None]) -> None:
        # (worker, messages, whether they are one Task alone), in the order queued.
        self._queue: deque[tuple[Any, tuple[bytes | Descriptor, ...], bool]] = deque()
        #: Queue ``(worker, messages, task)``: a C method, so that a caller may queue
        #: with no Python call in between, where a Ctrl-C could land (NOTE [ Tasks
        #: never sent ] in _iothread.py).
        self.put = self._queue.append
        self._lock = threading.Lock()
        self._writer = 0  # the thread writing, while it holds the lock
        self._io_thread = -1  # the I/O thread's ident, once it runs
        self._doomed: deque[Any] = deque()  # connections to close once no write is under way
        self._wake_io = wake_io

    def serve_from_this_thread(self) -> None:
        """Called by the I/O thread: it writes every message, not only tasks."""
        self._io_thread = threading.get_ident()

    def on_io_thread(self) -> bool:
        """Whether the caller is the I/O thread (once it runs)."""
        return threading.get_ident() == self._io_thread

    def flush(self) -> None:
        """Write what this thread may of the queue (NOTE [ Writes and Ctrl-C ])."""
        if not (self._queue or self._doomed):
            return
        me = threading.get_ident()
        if me == self._io_thread:
            # No signal lands on this thread, so a plain acquire is safe here; it
            # never waits, as it may hold the pool's lock, which a signal handler
            # on the thread holding this one may be waiting for (closing the loader).
            if self._lock.acquire(blocking=False):
                try:
                    self._write(everything=True)
                finally:
                    self._lock.release()
            return  # (else the holder wakes this thread for what it leaves)
        if self._writer == me:
            return  # inside this thread's own write: that write goes on afterwards
        with self._lock:
            self._writer = me
            try:
                self._write(everything=False)
            finally:
                self._writer = 0
        if self._queue:
            self._wake_io()

    def _write(self, everything: bool) -> None:
        queue = self._queue
        while queue:
            worker, messages, task = queue[0]
            if not (task or everything):
                break
            try:
                for message in messages:
                    if type(message) is bytes:
                        send(worker.conn, message)
                    else:
                        message.send()  # type: ignore[union-attr]
            except OSError:
                pass  # the worker died; its sentinel tells the I/O thread
            queue.popleft()
        self._close_doomed()

    def _close_doomed(self) -> None:
        """Close the connections left to the thread writing (its lock held)."""
        while self._doomed:
            self._doomed.popleft().close()

    def close_connection(self, conn: Any) -> None:
        """Close a worker's connection once no write is under way: now, or when
        the thread writing lets go."""
        if self._writer == threading.get_ident():
            conn.close()  # (this thread's write, interrupted, finds it closed)
            return
        self._doomed.append(conn)
        if self._lock.acquire(blocking=False):  # (I/O thread or closing: see the note)
            try:
                self._close_doomed()
            finally:
                self._lock.release()
