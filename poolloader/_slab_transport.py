"""The main process's half of the slab transport: one pool of slabs for all workers.

NOTE [ One pool of slabs ]: a batch needs a slab from the moment a worker starts
collating it until the consumer drops it. Slabs kept by each worker for itself
number, summed over the workers, what each needed at its own busiest, which is
more than the loader ever has alive at once: with 8 workers and 19 MB batches,
32 slabs (589 MiB) mapped where at most 18 batches were alive. So the slabs are
the main process's, which sees every batch arrive and die, and one pool serves
all workers:

- the I/O thread hands a free slab to each task as it sends it (the task names
  it, ``Task.slab``), the smallest that holds the biggest batch so far and,
  among equals, the one used last, so that slabs a burst added fall idle;
- the first time a worker is given a slab it does not map, the slab's
  descriptor follows the task on the connection (``Task.slab_size``);
- the worker collates into that slab; a batch that fits none it was given goes
  into a new slab the worker makes (its descriptor follows the ``Done``), which
  joins the pool;
- the slab is the task's until its reply arrives, then the batch's until the
  batch dies (or free at once when the batch went another way: inline, fresh
  shared memory, a new slab, an error);
- a free slab that none of the last :data:`SLAB_IDLE_BATCHES` batches per worker
  took is closed, as is every free slab once the loader is idle (NOTE [ Idle
  slabs ] in ``_transport.py``): the main process unmaps it, closes its
  descriptor and sends ``Forget`` to the workers that map it.

Only the I/O thread hands out slabs (tasks that need one wait for it, a thread
hop against a batch's memcpy), so no signal interrupts a slab half given.

The pool holds one descriptor per slab, to lend it. Tasks for tiny batches (no
batch through a slab yet) carry nothing, and no message goes back to a worker
when a batch dies.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.reduction import recvfds
from typing import Any

import numpy as np

from ._messages import Forget
from ._packing import InSlab, SlabPacker, descriptor_socket, map_shared, out_of_descriptors
from ._transport import (
    TransportError,
    _discard_plain,
    _nothing,
    _SkeletonUnpickler,
    _unpack_plain,
    descriptor_error,
)

#: A free slab that none of the last this many batches per worker took is closed
#: (NOTE [ One pool of slabs ]).
SLAB_IDLE_BATCHES = 32


@dataclass(frozen=True, slots=True)
class Grant:
    """What a task is given: the fields of its ``Task`` and the descriptor to send."""

    slab: int = 0
    slab_size: int = 0  # > 0: new to the worker; ``fd`` follows the task
    may_make: bool = True
    fd: int | None = None


@dataclass(eq=False, slots=True)
class _Slab:
    id: int
    size: int
    fd: int  # kept open to lend the slab to other workers
    array: np.ndarray  # the main process's mapping
    holders: set[Hashable] = field(default_factory=set)  # workers that were lent it
    taken: bool = True  # by a task, or by the batch it holds
    last_used: int = 0


class SlabTransport:
    """Main-process half of the slab transport; see the module docstring and
    ``_transport.py``.

    Workers are known by a hashable key (their identity: id and start time, not
    a bare pid, which a replacement may reuse)."""

    def __init__(self, max_slabs: int, max_batch_bytes: int | None) -> None:
        _TRANSPORTS.add(self)
        self._max_slabs = max_slabs
        self._max_batch_bytes = max_batch_bytes
        self._lock = threading.Lock()
        self._socks: dict[Hashable, Any] = {}
        self._slabs: dict[int, _Slab] = {}
        # (worker, seq) -> (slab, whether the slab's descriptor went with the task)
        self._grants: dict[tuple[Hashable, int], tuple[int, bool]] = {}
        # Slabs announced but not mapped, with why: their batches fail.
        self._unmapped: dict[int, BaseException] = {}
        self._released: deque[int] = deque()  # slabs whose batch died (any thread)
        self._forgets: deque[tuple[Hashable, Forget]] = deque()
        self._largest = 0  # the biggest batch through a slab so far
        self._grants_made = 0
        self.slab_batches = 0
        self.slab_reused = 0
        # Called when a batch dies, so that an idle pool closes its slab now.
        self.on_release: Callable[[], None] = _nothing

    def packer_factory(self) -> Callable[[Any], Any]:
        return functools.partial(SlabPacker, self._max_batch_bytes)

    @property
    def granting(self) -> bool:
        """Whether tasks are given slabs (a batch came through one), which only the
        I/O thread does (NOTE [ One pool of slabs ])."""
        return self._largest > 0

    def attach(self, key: Hashable, conn: Any) -> None:
        self._socks[key] = descriptor_socket(conn)

    def socket(self, key: Hashable) -> Any:
        """The socket that passes descriptors on worker ``key``'s connection."""
        return self._socks[key]

    def detach(self, key: Hashable, exited: bool = True) -> None:
        """Worker ``key`` is gone: what was given to its tasks is free again.

        ``exited=False``: a worker whose process the main process never learned
        (its template died between forking it and reporting it) may still run, and
        write into the slabs its tasks were given: those are closed, never given
        to another task."""
        sock = self._socks.pop(key, None)
        if sock is not None:
            sock.close()
        with self._lock:
            for slab in self._slabs.values():
                slab.holders.discard(key)
            for task in [t for t in self._grants if t[0] == key]:
                slab_id = self._grants.pop(task)[0]
                given = self._slabs.get(slab_id) if slab_id else None
                if given is not None and not exited:
                    self._close(given)
                else:
                    self._free(slab_id)

    # -- handing out

    def grant(self, key: Hashable, seq: int) -> Grant:
        """A slab for task ``seq`` of worker ``key`` as it is sent (I/O thread)."""
        with self._lock:
            self._take_released()
            self._grants_made += 1
            self._close_idle()
            free = [s for s in self._free_slabs() if s.size >= self._largest]
            if not free:
                may_make = len(self._slabs) < self._max_slabs or self._close_smallest_free()
                return Grant(may_make=may_make)
            # One this worker maps already if it can (a slab new to a worker
            # costs it a descriptor and page faults once); the smallest that fits;
            # among equals the one used last, so that slabs a burst added fall
            # idle and age out.
            slab = min(free, key=lambda s: (key not in s.holders, s.size, -s.last_used))
            slab.taken, slab.last_used = True, self._grants_made
            lent = key not in slab.holders
            self._grants[(key, seq)] = slab.id, lent
            if not lent:
                return Grant(slab.id)
            slab.holders.add(key)
            return Grant(slab.id, slab.size, True, slab.fd)

    def _close_idle(self) -> None:
        """Close the free slabs no batch took for a while (lock held)."""
        idle = SLAB_IDLE_BATCHES * max(1, len(self._socks))
        for slab in self._free_slabs():
            if self._grants_made - slab.last_used > idle:
                self._close(slab)

    def _close_smallest_free(self) -> bool:
        """Close the smallest free slab (too small for the batches now) to make room."""
        free = self._free_slabs()
        if not free:
            return False
        self._close(min(free, key=lambda s: s.size))
        return True

    def trim(self) -> None:
        """Close every free slab: the loader is idle (I/O thread)."""
        with self._lock:
            self._take_released()
            for slab in self._free_slabs():
                self._close(slab)

    def _free_slabs(self) -> list[_Slab]:
        """The slabs neither a task nor a batch holds (lock held), as a list: the
        callers close some of them."""
        return [s for s in self._slabs.values() if not s.taken]

    def _close(self, slab: _Slab) -> None:
        del self._slabs[slab.id]
        os.close(slab.fd)
        for key in slab.holders:
            self._forgets.append((key, Forget((slab.id,))))

    def take_forgets(self) -> list[tuple[Hashable, Forget]]:
        """``Forget`` messages for workers since the last call."""
        found = []
        while self._forgets:
            found.append(self._forgets.popleft())
        return found

    # -- replies

    def receive(self, key: Hashable, seq: int, payload: Any, sentinel: int | None = None) -> None:
        """Task ``seq`` of worker ``key`` is done: read a new slab's descriptor, which
        follows the ``Done``, and settle what the task was given (I/O thread).
        ``sentinel`` becomes ready when the worker exits.

        Never raises: a slab that cannot be mapped is remembered, its batch fails
        in :meth:`unpack`, and the worker is told to forget it."""
        made = None
        if isinstance(payload, InSlab) and payload.new_size:
            try:
                made = self._adopt(key, payload, sentinel)
            except Exception as exc:
                self._unmapped[payload.slab] = exc
                self._forgets.append((key, Forget((payload.slab,))))
        with self._lock:
            if made is not None:
                self._slabs[made.id] = made
            granted, _ = self._grants.pop((key, seq), (0, False))
            if isinstance(payload, InSlab):
                self._largest = max(self._largest, payload.used)
                if granted == payload.slab:
                    return  # the batch holds it now
            self._free(granted)

    def settle(self, key: Hashable, seq: int, sent: bool = True) -> None:
        """Task ``seq`` of worker ``key`` ended without a batch: what it was given is
        free. ``sent=False``: the task never reached the worker (it could not be
        pickled, or an interrupt kept it back), and neither did a slab lent with it,
        which the worker does not map then."""
        with self._lock:
            slab_id, lent = self._grants.pop((key, seq), (0, False))
            self._free(slab_id)
            slab = self._slabs.get(slab_id) if lent and not sent else None
            if slab is not None:
                slab.holders.discard(key)

    def _adopt(self, key: Hashable, payload: InSlab, sentinel: int | None) -> _Slab:
        sock = self._socks[key]
        # The descriptor follows the Done in a write of its own. A worker killed
        # between the two never sends it, and its connection need not reach end of
        # file: a process the dataset started may hold it open for ever.
        if sentinel is not None and sock not in wait([sock, sentinel]):
            raise EOFError("the worker exited before it sent the new slab's descriptor")
        (fd,) = recvfds(sock, 1)
        try:
            array = map_shared(fd, payload.new_size).numpy()
        except BaseException:
            os.close(fd)
            raise
        os.set_inheritable(fd, False)
        return _Slab(payload.slab, payload.new_size, fd, array, {key}, last_used=self._grants_made)

    def _free(self, slab_id: int) -> None:
        slab = self._slabs.get(slab_id) if slab_id else None
        if slab is not None:
            slab.taken = False

    def _take_released(self) -> None:
        while self._released:
            self._free(self._released.popleft())

    def unpack(self, key: Hashable, payload: Any) -> Any:
        if not isinstance(payload, InSlab):
            return _unpack_plain(payload)
        failure = self._unmapped.pop(payload.slab, None)
        if failure is not None:
            if isinstance(failure, (ConnectionError, EOFError)):
                # The worker died between its Done and the slab's descriptor: the
                # batch is lost with it, as a batch in fresh shared memory would be
                # (the pool runs it again).
                raise failure
            if out_of_descriptors(failure):
                raise descriptor_error(failure, "a batch's shared memory") from failure
            raise TransportError(
                f"the main process could not map a batch's shared memory: {failure!r}"
            ) from failure
        self.slab_batches += 1
        self.slab_reused += payload.new_size == 0
        owner = self._slabs[payload.slab].array[: payload.used]
        weakref.finalize(owner, self._release, payload.slab)
        return _SkeletonUnpickler(payload.skeleton, owner).load()

    def _release(self, slab: int) -> None:
        """The last view of a batch's slab died (any thread, perhaps inside the
        garbage collector: only a queue append and a wake-up)."""
        self._released.append(slab)
        self.on_release()

    def discard(self, key: Hashable, payload: Any) -> None:
        if not isinstance(payload, InSlab):
            _discard_plain(payload)
        elif self._unmapped.pop(payload.slab, None) is None:
            self._released.append(payload.slab)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the pool's slabs (not counting those only live batches still
        hold after the pool closed)."""
        return sum(s.size for s in list(self._slabs.values()))

    def close(self) -> None:
        """Close the pool's descriptors (batches still alive keep their mapping).
        One cut short by a Ctrl-C is redone by the next call (NOTE [ Closing and
        Ctrl-C ] in ``_pool.py``)."""
        for key in list(self._socks):
            self.detach(key)
        for slab in list(self._slabs.values()):
            fd, slab.fd = slab.fd, -1
            if fd >= 0:
                os.close(fd)
            self._slabs.pop(slab.id, None)

    def _forget_inherited(self) -> None:
        """In a process forked from this one: the pool is the parent's (no lock:
        the thread that held it is not here)."""
        slabs, self._slabs = list(self._slabs.values()), {}
        socks, self._socks = list(self._socks.values()), {}
        for fd in [slab.fd for slab in slabs if slab.fd >= 0]:
            try:
                os.close(fd)
            except OSError:
                pass
        for sock in socks:
            sock.close()


# NOTE [ Slabs across a fork ]: a process forked from the main process (a fork
# template, which poolloader forks anew for each epoch of non-persistent workers,
# and the workers it forks in turn) would inherit the pool's descriptors and
# mappings, and keep every slab alive for as long as it lives: an idle loader's
# trim then gave nothing back. The child drops them as it starts.
_TRANSPORTS: weakref.WeakSet[SlabTransport] = weakref.WeakSet()


def _drop_inherited_slabs() -> None:
    for transport in list(_TRANSPORTS):
        transport._forget_inherited()


os.register_at_fork(after_in_child=_drop_inherited_slabs)
