"""Packing a batch in a worker: the worker half of the transports.

A packer turns a batch into a small payload for the main process
(``_transport.py`` turns it back). Tensors and NumPy arrays are *laid out*:
the batch is pickled as a skeleton in which each one is replaced by a
descriptor of its bytes, and the bytes go either inline (small data) or into a
shared-memory slab. Anything that cannot be laid out as plain bytes (nested,
sparse and quantized tensors, tensor subclasses, tensors that need grad, object
arrays) is pickled the way torch's own loader pickles it, with
multiprocessing's ``ForkingPickler`` and torch's reducers.

NOTE [ Slab fallback ]: when a batch fits no slab and no slab is free (the
consumer holds them all), the batch travels through fresh shared memory
instead. Tensors that collation already wrote into a slab are *copied* out
first: torch's reducer would otherwise move the slab's own storage into new
shared memory (``share_memory_()`` swaps a storage's memory in place), so the
slab would stop being the memory the main process maps, and every later batch
placed in it would arrive stale.

NOTE [ Slab ageing ]: a worker makes a slab only when none of its own is free,
so its slabs number what it has in flight plus what the consumer holds of its
batches, at their highest so far. A burst raises that for a while (the first
batch of a pool takes seconds and the others run ahead of it; a consumer that
held batches for a moment), and the slabs it added would stay mapped for the
loader's life. So a batch takes the free slab used last, and a free slab that
none of the worker's last :data:`SLAB_IDLE_BATCHES` batches took is closed:
the worker names it in its next payload and the main process unmaps it
(``InSlab.retired``). A pool that needs the slab again pays one new slab's page
faults. Closing free slabs when the whole loader is idle is NOTE [ Idle slabs ]
in ``_transport.py``.
"""

from __future__ import annotations

import copyreg
import errno
import io
import math
import os
import socket
import threading
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler, sendfds
from typing import Any

import torch

from ._messages import message
from ._skeleton import (
    CopyOutOfSlabs,
    SkeletonPickler,
    TorchPickler,
    aligned,
    nbytes,
    sharing,
)
from .errors import ResultTooLargeError

#: Slabs grow in steps of this many bytes, so similar batches fit the same slab.
SLAB_GRANULE = 1 << 20
#: A free slab that none of a worker's last this many batches used is closed
#: (NOTE [ Slab ageing ]).
SLAB_IDLE_BATCHES = 32


def check_size(size: int, limit: int | None) -> None:
    """Refuse a batch holding more than ``limit`` bytes of tensor and array data."""
    if limit is not None and size > limit:
        raise ResultTooLargeError(
            f"this batch holds {size} bytes of tensor and array data, more than "
            f"max_batch_bytes={limit} allows. Make batches smaller (a lower max_duration "
            "or batch_size), or raise max_batch_bytes."
        )


# ------------------------------------------------------------------ payloads


@message
@dataclass(frozen=True, slots=True)
class Pickled:
    """A batch pickled with ForkingPickler (tensors in fresh shared memory)."""

    data: bytes


@message
@dataclass(frozen=True, slots=True)
class Inline:
    """A batch whose data all travelled inside its pickled skeleton."""

    skeleton: bytes


@message
@dataclass(frozen=True, slots=True)
class InSlab:
    """A batch whose large tensors and arrays are in slab ``slab`` of the worker."""

    slab: int
    new_size: int  # > 0: a new slab of this size; its fd follows on the connection
    used: int
    skeleton: bytes
    retired: tuple[int, ...]  # slabs the worker closed; the main process may unmap them


# ------------------------------------------------------------------ shared memory


def descriptor_socket(conn: Any) -> socket.socket:
    """A socket on a duplicate of ``conn``'s descriptor, to send or receive file
    descriptors on the connection (``sendfds``, ``recvfds``); closing it leaves
    ``conn`` open."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno()))


def map_shared(fd: int, size: int) -> torch.Tensor:
    """Map ``size`` bytes of the shared-memory file ``fd`` as a flat uint8 tensor.

    The mapping holds no file descriptor (torch's file mapping closes the one it
    opens), so the number of slabs a process maps costs it no descriptors; the
    memory is unmapped when the last tensor or array viewing it dies."""
    try:
        storage = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", True, size)
    except (RuntimeError, OSError):  # no /proc: a mapping that keeps a descriptor
        import mmap

        return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[arg-type]


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the process running out of descriptors."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if "Too many open files" in str(exc) or "received 0 items of ancdata" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


# ------------------------------------------------------------------ slabs


@dataclass(frozen=True, slots=True)
class SlabConfig:
    max_slabs: int
    max_batch_bytes: int | None


class Slab:
    def __init__(self, slab_id: int, size: int) -> None:
        self.id, self.size = slab_id, size
        self.busy = False  # holds a batch the main process has not released
        self.dropped = False  # the main process could not map it
        self.fd: int | None = os.memfd_create(f"poolloader-slab-{slab_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.bytes = map_shared(self.fd, size)
        except (OSError, RuntimeError):
            self.close()
            raise
        self.base = self.bytes.data_ptr()
        self.top = 0  # bump pointer while the slab stages a batch
        self.allocations: list[tuple[int, int]] = []  # (offset, size) staged, ascending
        self.last_used = 0  # the worker's batch count when a batch last took it

    def region(self, offset: int, size: int, dtype: torch.dtype, shape: Any) -> torch.Tensor:
        return self.bytes[offset : offset + size].view(dtype).view(shape)

    def write(self, blocks: list[tuple[int, Any]]) -> None:
        for offset, data in blocks:
            if isinstance(data, torch.Tensor):
                size = data.element_size() * data.numel()
                self.region(offset, size, data.dtype, data.shape).copy_(data)
            else:
                target = self.bytes[offset : offset + data.nbytes].numpy()
                target.view(data.dtype).reshape(data.shape)[...] = data

    def sent(self) -> None:
        """The main process has the descriptor now; the mapping needs none."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Forget the slab; its memory goes once no tensor views it any more."""
        self.bytes = torch.empty(0, dtype=torch.uint8)
        self.sent()


class SlabPacker:
    """Worker half of :class:`~poolloader._transport.SlabTransport`."""

    def __init__(self, config: SlabConfig, conn: Any) -> None:
        self._config = config
        self._sock = descriptor_socket(conn)
        self._lock = threading.Lock()  # release() and drop() run on the inbox thread
        self._slabs: dict[int, Slab] = {}
        self._next_id = 0
        self._retired: list[int] = []
        self._largest = 0
        self._staging: Slab | None = None
        self._staging_new = False
        self._acquired = 0  # slabs handed to batches so far (NOTE [ Slab ageing ])
        self._skeleton_pickler: SkeletonPickler | None = None  # see _pickler
        self._registry: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})

    # -- staging: collation writes straight into a slab

    def begin(self) -> None:
        """Reserve a free slab for the next batch's collation to write into."""
        if self._largest:
            self._staging, self._staging_new = self._acquire(self._largest)
            if self._staging is not None:
                self._staging.top, self._staging.allocations = 0, []

    def allocate(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """An uninitialised tensor in the staging slab, or ``None`` if it does not fit."""
        slab = self._staging
        if slab is None:
            return None
        size = dtype.itemsize * math.prod(shape)
        if slab.top + size > slab.size:
            return None
        tensor = slab.region(slab.top, size, dtype, shape)
        slab.allocations.append((slab.top, size))
        slab.top = aligned(slab.top + size)
        return tensor

    def end(self) -> None:
        """Give back a staging slab that no payload took."""
        slab, new = self._staging, self._staging_new
        self._staging = None
        if slab is None:
            return
        if new:
            with self._lock:
                self._discard(slab)
        else:
            self.release(slab.id)

    # -- packing

    def pack(self, batch: Any) -> tuple[Any, int]:
        pickler = self._pickler()
        buffer = pickler.buffer
        buffer.seek(0)
        buffer.truncate()
        pickler.begin(self._staging, sharing(batch))
        try:
            pickler.dump(batch)
            return self._packed(pickler, batch)
        finally:
            pickler.end()

    def _packed(self, pickler: SkeletonPickler, batch: Any) -> tuple[Any, int]:
        buffer = pickler.buffer
        check_size(pickler.data_bytes, self._config.max_batch_bytes)
        if not pickler.blocks and not pickler.staged:
            self.end()
            return Inline(buffer.getvalue()), buffer.tell()
        slab, new = self._place(pickler)
        if slab is None:
            fallback = Pickled(self._pickle_out_of_slabs(batch))
            self.end()  # only now: the batch's staged tensors were copied out
            return fallback, pickler.data_bytes
        slab.write(pickler.blocks)
        self.end()  # the staging slab, if the batch moved to a bigger one
        with self._lock:
            retired, self._retired = tuple(self._retired), []
        payload = InSlab(slab.id, slab.size if new else 0, pickler.size, buffer.getvalue(), retired)
        return payload, pickler.size

    def _pickler(self) -> SkeletonPickler:
        """This worker's pickler, made again once the reducers it copied changed
        (NOTE [ One pickler per worker ] in ``_skeleton.py``)."""
        registry = (copyreg.dispatch_table, ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
        if self._skeleton_pickler is None or self._registry != registry:
            self._registry = (dict(registry[0]), dict(registry[1]))
            self._skeleton_pickler = SkeletonPickler(io.BytesIO())
        return self._skeleton_pickler

    def _place(self, pickler: SkeletonPickler) -> tuple[Slab | None, bool]:
        """The slab the batch goes into: the staging slab if it fits, else another
        (with the staged part copied over), else ``None`` (fresh memory)."""
        staging = self._staging
        if staging is not None and pickler.size <= staging.size:
            self._staging = None
            return staging, self._staging_new
        slab, new = self._acquire(pickler.size)
        if slab is not None and staging is not None:
            slab.bytes[: staging.top].copy_(staging.bytes[: staging.top])
        return slab, new

    def _pickle_out_of_slabs(self, batch: Any) -> bytes:
        buffer = io.BytesIO()
        with self._lock:
            storages = {s.base for s in self._slabs.values()}
        CopyOutOfSlabs(buffer, storages).dump(batch)
        return buffer.getvalue()

    def after_send(self, payload: Any) -> None:
        """Send a new slab's fd, right after the message that announced it."""
        if isinstance(payload, InSlab) and payload.new_size:
            slab = self._slabs[payload.slab]
            assert slab.fd is not None
            sendfds(self._sock, [slab.fd])
            slab.sent()

    def release(self, slab_id: int) -> None:
        """The main process is done with slab ``slab_id`` (inbox thread)."""
        with self._lock:
            slab = self._slabs.get(slab_id)
            if slab is not None:
                slab.busy = False

    def drop(self, slab_id: int) -> None:
        """The main process could not map slab ``slab_id`` (inbox thread)."""
        with self._lock:
            slab = self._slabs.get(slab_id)
            if slab is not None:
                slab.busy, slab.dropped = False, True

    def trim(self) -> tuple[int, ...]:
        """Close every slab no batch holds; their ids, and those of slabs closed
        earlier that no payload has named yet, for the main process to unmap (the
        loader is idle, NOTE [ Idle slabs ] in ``_transport.py``)."""
        with self._lock:
            for slab in [s for s in self._slabs.values() if not s.busy]:
                self._discard(slab)
            closed, self._retired = tuple(sorted(self._retired)), []
        return closed

    def _acquire(self, size: int) -> tuple[Slab | None, bool]:
        with self._lock:
            for slab in [s for s in self._slabs.values() if s.dropped]:
                self._discard(slab)
            self._acquired += 1
            self._close_idle()
            free = [s for s in self._slabs.values() if not s.busy and s.size >= size]
            if free:
                # The smallest that fits; among equals the one used last, so that
                # slabs a burst added fall idle and age out.
                slab = min(free, key=lambda s: (s.size, -s.last_used))
                slab.busy, slab.last_used = True, self._acquired
                return slab, False
            if len(self._slabs) >= self._config.max_slabs and not self._retire_one():
                return None, False
            return self._create(size), True

    def _close_idle(self) -> None:
        """Close the free slabs no batch took for :data:`SLAB_IDLE_BATCHES` (lock held)."""
        for slab in [s for s in self._slabs.values() if not s.busy]:
            if self._acquired - slab.last_used > SLAB_IDLE_BATCHES:
                self._discard(slab)

    def _retire_one(self) -> bool:
        """Close the smallest free slab (too small for this batch) to make room."""
        free = [s for s in self._slabs.values() if not s.busy]
        if not free:
            return False
        self._discard(min(free, key=lambda s: s.size))
        return True

    def _discard(self, slab: Slab) -> None:
        del self._slabs[slab.id]
        slab.close()
        self._retired.append(slab.id)

    def _create(self, size: int) -> Slab:
        largest = max((s.size for s in self._slabs.values()), default=0)
        size = -(-max(size, largest) // SLAB_GRANULE) * SLAB_GRANULE
        try:
            slab = Slab(self._next_id, size)
        except (OSError, RuntimeError) as exc:
            raise ResultTooLargeError(
                f"could not allocate {size} bytes of shared memory for a batch: {exc}"
            ) from exc
        self._next_id += 1
        slab.busy, slab.last_used = True, self._acquired
        self._slabs[slab.id] = slab
        self._largest = max(self._largest, size)
        return slab


class PicklePacker:
    """Worker half of :class:`~poolloader._transport.PickleTransport`: torch's path."""

    def __init__(self, max_batch_bytes: int | None, conn: Any) -> None:
        del conn
        self._limit = max_batch_bytes

    def begin(self) -> None:
        pass

    def allocate(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        return None

    def end(self) -> None:
        pass

    def pack(self, batch: Any) -> tuple[Any, int]:
        size = nbytes(batch)
        check_size(size, self._limit)
        data = TorchPickler.to_bytes(batch)
        return Pickled(data), max(size, len(data))

    def after_send(self, payload: Any) -> None:
        pass

    def release(self, slab_id: int) -> None:
        pass

    def drop(self, slab_id: int) -> None:
        pass

    def trim(self) -> tuple[int, ...]:
        return ()
