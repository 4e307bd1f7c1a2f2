"""What the pool's I/O thread waits on, kept in one ``poll`` object.

``multiprocessing.connection.wait`` builds a selector, registers every object,
polls once and throws the selector away: about 8 µs for a handful of
descriptors, paid on every step of the I/O thread, and again by each
``Connection.poll(0)``. With small batches that is a sizeable share of the
main process's time per batch. :class:`Watchlist` registers the descriptors
once and polls the same object until the set of watched objects changes.

NOTE [ Watch signature ]: the pool says what it watches as a *signature*, a
tuple of object identities (workers, their processes, templates), computed
under its lock at the start of each step; the registrations are rebuilt only
when the signature differs from the last one. An identity cannot be reused
while it is registered, because the watchlist holds a reference to each
registered object. A descriptor closed while registered reports ``POLLNVAL``:
the watchlist then rebuilds on the next step (the pool has changed its
signature by then, or will on the step after).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

#: A registration: the descriptor, what it is for, and the object it belongs to.
Entry = tuple[int, str, Any]

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


class Watchlist:
    """Descriptors registered once, polled until the watched set changes."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._signature: Hashable | None = None
        self._roles: dict[int, tuple[str, Any]] = {}
        self._probes: dict[int, Any] = {}  # see readable

    def wait(
        self, signature: Hashable, entries: Callable[[], list[Entry]], timeout: float
    ) -> list[tuple[str, Any]]:
        """``(role, object)`` for each watched descriptor that is ready, waiting up
        to ``timeout`` seconds; ``entries`` is called only when ``signature``
        differs from the last one (see NOTE [ Watch signature ])."""
        if signature != self._signature:
            self._rebuild(entries())
            self._signature = signature
        ready = []
        for fd, events in self._poll.poll(max(0, int(timeout * 1000))):
            if events & select.POLLNVAL:
                self._signature = None  # closed while registered: rebuild next step
                time.sleep(0.001)  # and do not spin should the pool not have moved on
                continue
            role = self._roles.get(fd)
            if role is not None:
                ready.append(role)
        return ready

    def readable(self, fd: int) -> bool:
        """Whether ``fd`` has data (or its end closed) right now; works for any
        descriptor number, unlike ``select.select``. Each number keeps its own
        poll object (a poll object watches a number, whatever file it names)."""
        probe = self._probes.get(fd)
        if probe is None:
            probe = self._probes[fd] = select.poll()
            probe.register(fd, _READ)
        return bool(probe.poll(0))

    def _rebuild(self, entries: list[Entry]) -> None:
        self._poll = select.poll()
        self._roles = {}
        for fd, role, obj in entries:
            self._poll.register(fd, _READ)
            self._roles[fd] = (role, obj)


class Waker:
    """The write end of the I/O thread's wake-up pipe, safe to use from any
    thread, from a finalizer (a batch that dies hands back its slab), and after
    the pool closed. It references nothing of the pool: a finalizer that holds
    it keeps no batch alive through the pool."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._lock = threading.RLock()  # re-entrant: a finalizer may run inside

    def wake(self) -> None:
        with self._lock:
            if self._fd < 0:
                return  # closed: its number may belong to another file by now
            try:
                os.write(self._fd, b"\0")
            except OSError:
                pass  # full (a wake-up is pending anyway)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1  # (first: interrupted, it is not closed twice)
            if fd >= 0:
                os.close(fd)
