"""Packing a batch in a worker: the worker half of the transports.

A packer turns a batch into a small payload for the main process
(``_transport.py`` turns it back). Tensors and NumPy arrays are *laid out*:
the batch is pickled as a skeleton in which each one is replaced by a
descriptor of its bytes, and the bytes go either inline (small data) or into a
shared-memory slab. Anything that cannot be laid out as plain bytes (nested,
sparse and quantized tensors, tensor subclasses, tensors that need grad, object
arrays) is pickled the way torch's own loader pickles it, with
multiprocessing's ``ForkingPickler`` and torch's reducers.

NOTE [ Slab fallback ]: when a batch fits no slab it was given and the pool may
not grow (the consumer holds its slabs), the batch travels through fresh shared
memory instead. No slab's memory may reach torch's reducers, there or in a
batch that does go into a slab but holds a tensor its skeleton cannot describe
(one that needs grad, or of a subclass, written into ``batch_buffer()``):
torch's reducer would send the slab's storage by a descriptor the mapping does
not have (``EBADF``), or, with the ``file_system`` strategy, move it into new
shared memory in place (``share_memory_()`` swaps a storage's memory), so the
slab would stop being the memory the main process maps and every later batch
placed in it would arrive stale. A storage in a slab is therefore pickled as a
copy (``TorchPickler(slab_bases=...)``, one copy per slab and batch, so tensors
sharing the slab share the copy); the tensor keeps its type, attributes and
``requires_grad``. The default collate does not put subclasses into slabs at
all (``_worker._stack_into_slab``).

The slabs themselves are the main process's to hand out (NOTE [ One pool of
slabs ] in ``_slab_transport.py``): a task names the slab its batch is collated
into, and a worker makes a new one only when the batch fits none it was given.
A slab made for a batch that then went another way (inline, too big for it) is
closed at once: no one else knows it.
"""

from __future__ import annotations

import copyreg
import errno
import io
import math
import os
import select
import socket
import threading
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler, recvfds, sendfds
from typing import Any

import torch

from . import _proctree
from ._batch_sharing import sharing
from ._messages import message
from ._skeleton import SkeletonPickler, TorchPickler, aligned, nbytes
from .errors import ResultTooLargeError

#: Slabs grow in steps of this many bytes, so similar batches fit the same slab.
SLAB_GRANULE = 1 << 20


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
    new_size: int  # > 0: a new slab of this size, made by the worker; its fd follows
    used: int
    skeleton: bytes


# ------------------------------------------------------------------ shared memory


def descriptor_socket(conn: Any) -> socket.socket:
    """A socket on a duplicate of ``conn``'s descriptor, to send or receive file
    descriptors on the connection (``sendfds``, ``recvfds``); closing it leaves
    ``conn`` open."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno()))


def receive_fd(sock: socket.socket, main: tuple[int, float], interval: float) -> int | None:
    """The descriptor that follows the message just read from the main process
    (``main``: its pid and start time), or ``None`` once that is gone (looked in
    on every ``interval`` seconds).

    It comes in a write of its own. A main process killed between the two leaves
    a connection that need not ever reach end of file (a process it forked may
    hold it open), so the wait looks in on the main process, as the wait for
    messages does."""
    while not select.select([sock], [], [], interval)[0]:
        if not _proctree.still_running(*main):
            return None
    (fd,) = recvfds(sock, 1)
    return fd


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


def new_slab_id() -> int:
    """An id for a slab a worker makes: random, so that the slabs of every worker
    (and of the workers that replace them) share one namespace in the pool."""
    return int.from_bytes(os.urandom(8), "little") >> 1 or 1


class Slab:
    """A shared-memory slab as a worker maps it: one it made (``fd`` is ``None``)
    or one the main process lent it (``fd``: the descriptor that came with a task)."""

    def __init__(self, slab_id: int, size: int, fd: int | None = None) -> None:
        self.id, self.size = slab_id, size
        made = fd is None
        if fd is None:
            fd = os.memfd_create(f"poolloader-slab-{slab_id}", os.MFD_CLOEXEC)
        self.fd: int | None = fd
        try:
            if made:
                os.ftruncate(fd, size)
            self.bytes = map_shared(fd, size)
        except (OSError, RuntimeError):
            self.close()
            raise
        if not made:
            self.sent()  # mapped: the lent descriptor is not needed any more
        self.base = self.bytes.data_ptr()
        self.top = 0  # bump pointer while the slab stages a batch
        self.allocations: list[tuple[int, int]] = []  # (offset, size) staged, ascending

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
    """Worker half of :class:`~poolloader._slab_transport.SlabTransport`."""

    def __init__(self, max_batch_bytes: int | None, conn: Any) -> None:
        self._limit = max_batch_bytes
        self._sock = descriptor_socket(conn)
        self._lock = threading.Lock()  # forget() runs on the inbox thread
        self._slabs: dict[int, Slab] = {}
        self._largest = 0
        self._staging: Slab | None = None
        self._may_make = True
        self._made: Slab | None = None  # made for the batch being packed; fd not sent yet
        self._made_used = False  # the batch went into it
        self._skeleton_pickler: SkeletonPickler | None = None  # see _pickler
        self._registry: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})

    # -- the slabs the main process names

    def lend(self, slab_id: int, size: int, fd: int) -> None:
        """Map slab ``slab_id``, lent by the main process with ``fd`` (the
        worker's thread, as the task that names it begins: a slab that cannot be
        mapped here is one this task does without)."""
        try:
            slab = Slab(slab_id, size, fd)
        except (OSError, RuntimeError):
            return
        with self._lock:
            self._slabs[slab_id] = slab
            self._largest = max(self._largest, size)

    def forget(self, slabs: tuple[int, ...]) -> None:
        """Unmap slabs the main process closed (inbox thread)."""
        with self._lock:
            for slab_id in slabs:
                slab = self._slabs.pop(slab_id, None)
                if slab is not None:
                    slab.close()

    # -- staging: collation writes straight into a slab

    def begin(self, task: Any = None) -> None:
        """Take the slab ``task`` names for the batch's collation to write into: or,
        when it names none and the worker may make one, a new slab of the size of
        the biggest batch so far (it joins the pool if the batch goes into it)."""
        self._forget_unsent()
        self._may_make = task is None or task.may_make
        slab = self._slabs.get(task.slab) if task is not None and task.slab else None
        if slab is None and self._may_make and self._largest:
            try:
                slab = self._made = self._make(self._largest)
            except ResultTooLargeError:
                slab = None  # (collated in private memory; packing says what failed)
        self._staging = slab
        if slab is not None:
            slab.top, slab.allocations = 0, []

    def _forget_unsent(self) -> None:
        """Close a slab made for a batch that did not go into it: no one knows it."""
        if self._made is not None:
            self.forget((self._made.id,))
        self._made, self._made_used = None, False

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
        """The batch is packed (or failed): the slab it was given is the main
        process's again, with the reply."""
        self._staging = None
        if not self._made_used:
            self._forget_unsent()

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
        check_size(pickler.data_bytes, self._limit)
        if not pickler.blocks and not pickler.staged:
            self.end()
            return Inline(buffer.getvalue()), buffer.tell()
        slab, new = self._place(pickler)
        if slab is None:
            fallback = Pickled(self._pickle_out_of_slabs(batch))
            self.end()  # only now: the batch's staged tensors were copied out
            return fallback, pickler.data_bytes
        slab.write(pickler.blocks)
        self.end()
        payload = InSlab(slab.id, slab.size if new else 0, pickler.size, buffer.getvalue())
        return payload, pickler.size

    def _pickler(self) -> SkeletonPickler:
        """This worker's pickler, made again once the reducers it copied changed
        (NOTE [ One pickler per worker ] in ``_skeleton.py``)."""
        registry = (copyreg.dispatch_table, ForkingPickler._extra_reducers)  # type: ignore[attr-defined]
        if self._skeleton_pickler is None or self._registry != registry:
            self._registry = (dict(registry[0]), dict(registry[1]))
            self._skeleton_pickler = SkeletonPickler(io.BytesIO(), self._slab_bases)
        return self._skeleton_pickler

    def _place(self, pickler: SkeletonPickler) -> tuple[Slab | None, bool]:
        """The slab the batch goes into: the one it was given if it fits, else a
        new one (with the staged part copied over), else ``None`` (fresh memory)."""
        staging = self._staging
        if staging is not None and pickler.size <= staging.size:
            self._made_used = staging is self._made
            return staging, self._made_used
        if not self._may_make:
            return None, False
        slab = self._make(pickler.size)
        if staging is not None:
            slab.bytes[: staging.top].copy_(staging.bytes[: staging.top])
        self._forget_unsent()  # the staging slab, if this worker made it
        self._made, self._made_used = slab, True
        return slab, True

    def _pickle_out_of_slabs(self, batch: Any) -> bytes:
        buffer = io.BytesIO()
        TorchPickler(buffer, self._slab_bases).dump(batch)
        return buffer.getvalue()

    def _slab_bases(self) -> set[int]:
        """Where the slabs this worker maps begin (NOTE [ Slab fallback ])."""
        with self._lock:
            return {slab.base for slab in self._slabs.values()}

    def after_send(self, payload: Any) -> None:
        """Send a new slab's fd, right after the message that announced it."""
        slab = self._made
        if isinstance(payload, InSlab) and payload.new_size:
            assert slab is not None and slab.id == payload.slab and slab.fd is not None
            sendfds(self._sock, [slab.fd])
            slab.sent()
            self._made, self._made_used = None, False  # the pool's now

    def _make(self, size: int) -> Slab:
        size = -(-max(size, self._largest) // SLAB_GRANULE) * SLAB_GRANULE
        try:
            slab = Slab(new_slab_id(), size)
        except (OSError, RuntimeError) as exc:
            raise ResultTooLargeError(
                f"could not allocate {size} bytes of shared memory for a batch: {exc}"
            ) from exc
        with self._lock:
            self._slabs[slab.id] = slab
            self._largest = max(self._largest, size)
        return slab


class PicklePacker:
    """Worker half of :class:`~poolloader._transport.PickleTransport`: torch's path."""

    def __init__(self, max_batch_bytes: int | None, conn: Any) -> None:
        del conn
        self._limit = max_batch_bytes

    def begin(self, task: Any = None) -> None:
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

    def lend(self, slab_id: int, size: int, fd: int) -> None:
        os.close(fd)

    def forget(self, slabs: tuple[int, ...]) -> None:
        pass
