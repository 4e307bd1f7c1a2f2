"""Moving batches from workers to the main process.

A transport has two halves: a packer built inside each worker from a picklable
factory, which turns a batch into a small payload, and the main process's
transport, which turns the payload back into the batch.

:class:`SlabTransport` (the default, ``transport="shm"``) moves tensors and
NumPy arrays through shared-memory *slabs* that are mapped once and reused::

    worker                                         main process
    ──────                                         ────────────
    collate → batch (private memory)
    pickle the batch's skeleton; each large
    tensor/array becomes (offset, dtype, shape)
    copy the data into a free slab     ── Done ──► map the slab (first time only,
    (a memfd segment; its fd travels   ── fd ───►  the fd arrives once)
     once, right after the first Done)             unpickle: tensors and arrays are
                                                   views of the slab, no copy
    mark the slab free again ◄──── Release ──────  when the last view dies

Fresh shared memory costs page faults on every batch (the stock loader
allocates new segments per batch); a reused slab costs one memcpy. Slabs are
anonymous ``memfd`` segments: nothing is ever created in ``/dev/shm``, its size
limit does not apply, and the memory goes back to the system when the last
process holding a slab exits, however it exits. When every slab of a worker is
still held (a consumer that keeps batches), the worker falls back to
:class:`PickleTransport`'s fresh memory for that batch instead of waiting.

:class:`PickleTransport` (``transport="pickle"``) pickles the batch with
multiprocessing's ``ForkingPickler``, for which torch registers reducers that
move tensors through fresh shared memory: the stock loader's path.
"""

from __future__ import annotations

import functools
import io
import math
import mmap
import os
import pickle
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler, recvfds, sendfds
from typing import Any

import numpy as np
import torch

from .errors import ResultTooLargeError

#: Tensors and arrays smaller than this travel inside the pickled skeleton:
#: for small data one pipe write beats a slab's bookkeeping and release message.
INLINE_BYTES = 32 * 1024
#: Data offsets in a slab are aligned to this (a cache line, and any dtype's size).
ALIGN = 64
#: Slabs grow in steps of this many bytes, so similar batches fit the same slab.
SLAB_GRANULE = 1 << 20


def nbytes(batch: Any) -> int:
    """Bytes of tensor and array data in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return batch.element_size() * batch.numel()
    if isinstance(batch, np.ndarray):
        return int(batch.nbytes)
    if isinstance(batch, Mapping):
        return sum(nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(nbytes(v) for v in batch)
    return 0


# ------------------------------------------------------------------ payloads


@dataclass(frozen=True, slots=True)
class Pickled:
    """A batch pickled with ForkingPickler (tensors in fresh shared memory)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Inline:
    """A batch whose data all travelled inside its pickled skeleton."""

    skeleton: bytes


@dataclass(frozen=True, slots=True)
class InSlab:
    """A batch whose large tensors and arrays are in slab ``slab`` of the worker."""

    slab: int
    new_size: int  # > 0: a new slab of this size; its fd follows on the connection
    used: int
    skeleton: bytes
    retired: tuple[int, ...]  # slabs the worker closed; the main process may unmap them


# ------------------------------------------------------------------ skeletons


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"not a torch dtype: {name}")
    return dtype


def _slab_candidate(obj: Any) -> tuple[str, Any] | None:
    """``("tensor", contiguous tensor)`` or ``("array", contiguous array)`` if ``obj``
    should travel as raw bytes; ``None`` to pickle it as usual."""
    if type(obj) is torch.Tensor:
        if obj.device.type != "cpu" or obj.layout != torch.strided or obj.requires_grad:
            return None
        return "tensor", obj.resolve_conj().resolve_neg().contiguous()
    if type(obj) is np.ndarray and not obj.dtype.hasobject:
        return "array", np.ascontiguousarray(obj)
    return None


class _SkeletonPickler(pickle.Pickler):
    """Pickles a batch, replacing tensors and arrays by descriptors of their bytes.

    Tensors that collation already wrote into the staging slab are described
    where they lie; the others are assigned space after them (``blocks``)."""

    def __init__(self, file: io.BytesIO, staging: _Slab | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.staging = staging
        self.blocks: list[tuple[int, Any]] = []  # (offset, tensor or array) still to copy
        self.staged = 0  # tensors found already in the staging slab
        self.size = staging.top if staging is not None else 0
        self.data_bytes = 0  # bytes of every tensor and array, wherever it travels

    def persistent_id(self, obj: Any) -> Any:
        found = _slab_candidate(obj)
        if found is None:
            return None
        kind, data = found
        size = data.element_size() * data.numel() if kind == "tensor" else data.nbytes
        self.data_bytes += size
        dtype = str(data.dtype) if kind == "tensor" else data.dtype.str
        offset = self._staged_offset(data, size)
        if offset is not None:
            self.staged += 1
            return ("slab", kind, dtype, tuple(data.shape), offset, size)
        if size < INLINE_BYTES:
            raw = data.numpy().tobytes() if kind == "tensor" and _numpy_ok(data) else None
            if raw is None:
                return None
            return ("inline", kind, dtype, tuple(data.shape), raw)
        offset = self.size
        self.blocks.append((offset, data))
        self.size = _aligned(offset + size)
        return ("slab", kind, dtype, tuple(data.shape), offset, size)

    def _staged_offset(self, data: Any, size: int) -> int | None:
        staging = self.staging
        if staging is None or not isinstance(data, torch.Tensor):
            return None
        offset = data.data_ptr() - staging.base
        if offset >= 0 and offset + size <= staging.top:
            return offset
        return None


def _numpy_ok(tensor: torch.Tensor) -> bool:
    return tensor.dtype not in (torch.bfloat16, torch.complex32) and not tensor.is_quantized


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, owner: np.ndarray | None) -> None:
        super().__init__(io.BytesIO(data))
        self._owner = owner

    def persistent_load(self, pid: Any) -> Any:
        where, kind, dtype, shape = pid[:4]
        if where == "inline":
            return _from_bytes(kind, dtype, shape, pid[4])
        offset, size = pid[4], pid[5]
        assert self._owner is not None
        return _view(self._owner, kind, dtype, shape, offset, size)


def _from_bytes(kind: str, dtype: str, shape: tuple[int, ...], raw: bytes) -> Any:
    if kind == "array":
        return np.frombuffer(bytearray(raw), dtype=np.dtype(dtype)).reshape(shape)
    array = np.frombuffer(bytearray(raw), dtype=np.uint8)
    return _view(array, kind, dtype, shape, 0, len(raw))


def _view(
    owner: np.ndarray, kind: str, dtype: str, shape: tuple[int, ...], offset: int, size: int
) -> Any:
    if kind == "array":
        return owner[offset : offset + size].view(np.dtype(dtype)).reshape(shape)
    torch_dtype = _torch_dtype(dtype)
    if size == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(
        owner, dtype=torch_dtype, count=size // torch_dtype.itemsize, offset=offset
    )
    return flat.view(shape)


# ------------------------------------------------------------------ worker side


def check_size(size: int, limit: int | None) -> None:
    """Refuse a batch holding more than ``limit`` bytes of tensor and array data."""
    if limit is not None and size > limit:
        raise ResultTooLargeError(
            f"this batch holds {size} bytes of tensor and array data, more than "
            f"max_batch_bytes={limit} allows. Make batches smaller (a lower max_duration "
            "or batch_size), or raise max_batch_bytes."
        )


@dataclass(frozen=True, slots=True)
class SlabConfig:
    max_slabs: int
    max_batch_bytes: int | None


class _Slab:
    def __init__(self, slab_id: int, size: int) -> None:
        self.id, self.size, self.busy = slab_id, size, False
        self.fd = os.memfd_create(f"poolloader-slab-{slab_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        self.base = self.bytes.data_ptr()
        self.top = 0  # bump pointer while the slab stages a batch

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

    def close(self) -> None:
        del self.bytes
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it
        os.close(self.fd)


class SlabPacker:
    """Worker half of :class:`SlabTransport`."""

    def __init__(self, config: SlabConfig, conn: Any) -> None:
        self._config = config
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(conn.fileno()))
        self._lock = threading.Lock()  # release() runs on the inbox thread
        self._slabs: dict[int, _Slab] = {}
        self._next_id = 0
        self._retired: list[int] = []
        self._largest = 0
        self._staging: _Slab | None = None
        self._staging_new = False

    # -- staging: collation writes straight into a slab

    def begin(self) -> None:
        """Reserve a free slab for the next batch's collation to write into."""
        if self._largest:
            self._staging, self._staging_new = self._acquire(self._largest)
            if self._staging is not None:
                self._staging.top = 0

    def allocate(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """An uninitialised tensor in the staging slab, or ``None`` if it does not fit."""
        slab = self._staging
        if slab is None:
            return None
        size = dtype.itemsize * math.prod(shape)
        if slab.top + size > slab.size:
            return None
        tensor = slab.region(slab.top, size, dtype, shape)
        slab.top = _aligned(slab.top + size)
        return tensor

    def end(self) -> None:
        """Give back a staging slab that no payload took (the fetch failed)."""
        if self._staging is not None:
            self._staging_unused()

    def _staging_unused(self) -> None:
        slab, new = self._staging, self._staging_new
        self._staging = None
        assert slab is not None
        if new:
            self._discard(slab)
        else:
            self.release(slab.id)

    # -- packing

    def pack(self, batch: Any) -> tuple[Any, int]:
        buffer = io.BytesIO()
        pickler = _SkeletonPickler(buffer, self._staging)
        pickler.dump(batch)
        check_size(pickler.data_bytes, self._config.max_batch_bytes)
        if not pickler.blocks and not pickler.staged:
            self.end()
            return Inline(buffer.getvalue()), len(buffer.getbuffer())
        slab, new = self._place(pickler)
        if slab is None:
            return Pickled(bytes(ForkingPickler.dumps(batch))), nbytes(batch)
        slab.write(pickler.blocks)
        retired, self._retired = tuple(self._retired), []
        payload = InSlab(slab.id, slab.size if new else 0, pickler.size, buffer.getvalue(), retired)
        return payload, pickler.size

    def _place(self, pickler: _SkeletonPickler) -> tuple[_Slab | None, bool]:
        """The slab the batch goes into: the staging slab if it fits, else another
        (with the staged part copied over), else ``None`` (fresh memory)."""
        staging, staged_new = self._staging, self._staging_new
        self._staging = None
        if staging is not None and pickler.size <= staging.size:
            return staging, staged_new
        slab, new = self._acquire(pickler.size)
        if staging is not None:
            if slab is not None:
                slab.bytes[: staging.top].copy_(staging.bytes[: staging.top])
            self._staging, self._staging_new = staging, staged_new
            self._staging_unused()
        return slab, new

    def after_send(self, payload: Any) -> None:
        """Send a new slab's fd, right after the message that announced it."""
        if isinstance(payload, InSlab) and payload.new_size:
            sendfds(self._sock, [self._slabs[payload.slab].fd])

    def release(self, slab_id: int) -> None:
        with self._lock:
            slab = self._slabs.get(slab_id)
            if slab is not None:
                slab.busy = False

    def _acquire(self, size: int) -> tuple[_Slab | None, bool]:
        with self._lock:
            free = [s for s in self._slabs.values() if not s.busy and s.size >= size]
            if free:
                slab = min(free, key=lambda s: s.size)
                slab.busy = True
                return slab, False
            if len(self._slabs) >= self._config.max_slabs and not self._retire_one():
                return None, False
            return self._create(size), True

    def _retire_one(self) -> bool:
        """Close the smallest free slab (too small for this batch) to make room."""
        free = [s for s in self._slabs.values() if not s.busy]
        if not free:
            return False
        self._discard(min(free, key=lambda s: s.size))
        return True

    def _discard(self, slab: _Slab) -> None:
        del self._slabs[slab.id]
        slab.close()
        self._retired.append(slab.id)

    def _create(self, size: int) -> _Slab:
        largest = max((s.size for s in self._slabs.values()), default=0)
        size = -(-max(size, largest) // SLAB_GRANULE) * SLAB_GRANULE
        try:
            slab = _Slab(self._next_id, size)
        except OSError as exc:
            raise ResultTooLargeError(
                f"could not allocate {size} bytes of shared memory for a batch: {exc}"
            ) from exc
        self._next_id += 1
        slab.busy = True
        self._slabs[slab.id] = slab
        self._largest = max(self._largest, size)
        return slab


class _PicklePacker:
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
        data = bytes(ForkingPickler.dumps(batch))
        return Pickled(data), max(size, len(data))

    def after_send(self, payload: Any) -> None:
        pass

    def release(self, slab_id: int) -> None:
        pass


# ------------------------------------------------------------------ main side


class PickleTransport:
    """Batches travel pickled, tensors through fresh shared memory (torch's path)."""

    slab_batches = 0
    slab_reused = 0

    def __init__(self, max_batch_bytes: int | None = None) -> None:
        self._max_batch_bytes = max_batch_bytes

    def packer_factory(self) -> Callable[[Any], Any]:
        return functools.partial(_PicklePacker, self._max_batch_bytes)

    def attach(self, key: int, conn: Any) -> None:
        pass

    def detach(self, key: int) -> None:
        pass

    def receive(self, key: int, payload: Any) -> None:
        pass

    def unpack(self, key: int, payload: Any) -> Any:
        return _unpack_plain(payload)

    def discard(self, key: int, payload: Any) -> None:
        _discard_plain(payload)

    def take_releases(self) -> list[tuple[int, int]]:
        return []

    def close(self) -> None:
        pass


def _unpack_plain(payload: Any) -> Any:
    if isinstance(payload, Inline):
        return _SkeletonUnpickler(payload.skeleton, None).load()
    return ForkingPickler.loads(payload.data)


def _discard_plain(payload: Any) -> None:
    if isinstance(payload, Pickled):
        try:
            ForkingPickler.loads(payload.data)  # releases the shared memory torch handed over
        except Exception:
            pass


class SlabTransport:
    """Main-process half of the slab transport; see the module docstring."""

    def __init__(self, max_slabs_per_worker: int, max_batch_bytes: int | None) -> None:
        self._config = SlabConfig(max_slabs_per_worker, max_batch_bytes)
        self._socks: dict[int, socket.socket] = {}
        self._maps: dict[tuple[int, int], mmap.mmap] = {}
        self._released: deque[tuple[int, int]] = deque()
        self.slab_batches = 0
        self.slab_reused = 0

    def packer_factory(self) -> Callable[[Any], Any]:
        return functools.partial(SlabPacker, self._config)

    def attach(self, key: int, conn: Any) -> None:
        fd = os.dup(conn.fileno())
        self._socks[key] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)

    def detach(self, key: int) -> None:
        sock = self._socks.pop(key, None)
        if sock is not None:
            sock.close()
        for found in [k for k in self._maps if k[0] == key]:
            del self._maps[found]  # batches still alive keep their mapping

    def receive(self, key: int, payload: Any) -> None:
        """Read what follows a Done message on the connection (a new slab's fd)."""
        if not isinstance(payload, InSlab):
            return
        for slab in payload.retired:
            self._maps.pop((key, slab), None)
        if payload.new_size:
            (fd,) = recvfds(self._socks[key], 1)
            try:
                self._maps[(key, payload.slab)] = mmap.mmap(fd, payload.new_size)
            finally:
                os.close(fd)

    def unpack(self, key: int, payload: Any) -> Any:
        if not isinstance(payload, InSlab):
            return _unpack_plain(payload)
        self.slab_batches += 1
        self.slab_reused += payload.new_size == 0
        owner = np.frombuffer(self._maps[(key, payload.slab)], dtype=np.uint8, count=payload.used)
        weakref.finalize(owner, self._released.append, (key, payload.slab))
        return _SkeletonUnpickler(payload.skeleton, owner).load()

    def discard(self, key: int, payload: Any) -> None:
        if isinstance(payload, InSlab):
            self._released.append((key, payload.slab))
        else:
            _discard_plain(payload)

    def take_releases(self) -> list[tuple[int, int]]:
        """Slabs whose batches died since the last call: ``(worker key, slab id)``."""
        found = []
        while self._released:
            found.append(self._released.popleft())
        return found

    def close(self) -> None:
        for key in list(self._socks):
            self.detach(key)
        self._maps.clear()
