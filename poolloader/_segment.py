"""Sealed, anonymous shared memory that pickles to a small handle: the floor under SharedList.

NOTE [ Shared segments ]
~~~~~~~~~~~~~~~~~~~~~~~~
A segment is an anonymous ``memfd``, written once by the process that builds it, then
sealed (no process may write, grow or shrink it again) and mapped read-only. Nothing is
created in ``/dev/shm`` (and its size limit, 64 MB in a default Docker container, does
not apply); the kernel frees the memory when the last descriptor and the last mapping
of it are gone, however the processes holding them end: a SIGKILLed main process cannot
leave it behind, and its workers keep it for as long as they run.

Pickling a segment yields a :class:`SegmentHandle` that names a descriptor of the
pickling process, ``(pid, fd)``, and the file it must be, ``(st_dev, st_ino)``. The
receiver opens ``/proc/<pid>/fd/<fd>``, which gives it a descriptor of its own for the
same file (the kernel allows it to a process of the same user, unless the holder made
itself undumpable), then checks the inode, since the pid or the descriptor number may
have been reused by then (the handle is refused, never misread), and the seals, so that
what it maps cannot change under it. So one handle can be unpickled by any number of
processes for as long as the sender holds the segment, and every holder pickles with
its own descriptor, so a container travels on after the process that built it exited.
Where ``/proc`` does not show our descriptors (checked once per process), the handle
carries multiprocessing's ``DupFd`` instead: the descriptor is passed along while a
process is started, or through the sender's resource sharer; such a handle can be
unpickled once.

A process maps a segment once: a registry keyed by ``(st_dev, st_ino)`` hands the same
:class:`Segment` to every later unpickle, so a fresh copy of a dataset each epoch costs
no new descriptor or mapping. A fork child inherits descriptor, mapping and registry and
pickles with its own pid. The descriptor is closed when the process's last
:class:`Segment` object for it goes; the mapping when the last array or memoryview of it
goes as well.

Layout: sections one after another, each aligned to :data:`ALIGN`, then a JSON table of
the sections and the container's metadata, then a trailer (the table's length and
:data:`MAGIC`), so the handle need not carry the layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import mmap
import os
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from types import TracebackType
from typing import Any

import numpy as np

__all__ = [
    "Segment",
    "SegmentHandle",
    "SegmentWriter",
    "is_sealed_array",
    "open_segment",
    "pinning",
]

#: Sections start at multiples of this: a cache line, and a multiple of every dtype's size.
ALIGN = 64
#: Marks a segment written by this module (and the layout's version) in its trailer.
MAGIC = b"PLSHM\x00\x00\x01"
_TRAILER = struct.Struct("<Q8s")
#: Seals a receiver insists on: with them no process can change what it maps.
_REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
_SEALS = _REQUIRED_SEALS | fcntl.F_SEAL_SEAL

_names = itertools.count()
_registry: weakref.WeakValueDictionary[tuple[int, int], Segment] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_proc_shows_fds: bool | None = None  # probed on the first pickle
_pinning = threading.local()  # .pinned: the list pinning() collects into, if any


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_reset_after_fork)


@dataclass(frozen=True, slots=True)
class SegmentHandle:
    """What a pickled segment carries: where to open it, and which file it must be.

    Attributes:
        name: the memfd's name (``/memfd:<name>`` in ``/proc/<pid>/maps``), for messages.
        size: the segment's size in bytes.
        dev, ino: the file's ``st_dev`` and ``st_ino``, checked after opening.
        pid, fd: the pickling process and its descriptor, opened as ``/proc/<pid>/fd/<fd>``.
        dup: multiprocessing's ``DupFd`` where ``/proc`` is unusable, else ``None``.
    """

    name: str
    size: int
    dev: int
    ino: int
    pid: int
    fd: int
    dup: Any = None


class _SealedMap(mmap.mmap):
    """A read-only mapping of a sealed segment; arrays backed by one cannot change."""

    __slots__ = ()


class Segment:
    """One process's descriptor and read-only mapping of a sealed memfd.

    Built by :class:`SegmentWriter` or :func:`open_segment`; pickles to a
    :class:`SegmentHandle` (see NOTE [ Shared segments ]).

    Attributes:
        name: the memfd's name.
        size: bytes mapped.
        meta: the metadata the writer stored (JSON values).
    """

    __slots__ = ("__weakref__", "dev", "fd", "ino", "map", "meta", "name", "sections", "size")

    def __init__(self, fd: int, name: str) -> None:
        """Map ``fd`` (whose ownership passes to the segment once this returns)."""
        status = os.fstat(fd)
        self.fd, self.name, self.size = fd, name, status.st_size
        self.dev, self.ino = status.st_dev, status.st_ino
        self.map = _SealedMap(fd, self.size, access=mmap.ACCESS_READ)
        table = _read_table(self.map, name)
        self.sections: dict[str, tuple[str, int, tuple[int, ...]]] = {
            key: (dtype, offset, tuple(shape))
            for key, (dtype, offset, shape) in table["sections"].items()
        }
        self.meta: dict[str, Any] = table["meta"]
        weakref.finalize(self, os.close, fd).atexit = False

    def array(self, name: str) -> np.ndarray:
        """Return section ``name`` as a read-only NumPy array (no copy)."""
        dtype, offset, shape = self.sections[name]
        count = math.prod(shape)
        flat = np.frombuffer(self.map, dtype=np.dtype(dtype), count=count, offset=offset)
        return flat.reshape(shape)

    def view(self, name: str, format: str = "B") -> memoryview:
        """Return section ``name`` as a memoryview cast to ``format`` (no copy)."""
        dtype, offset, shape = self.sections[name]
        size = np.dtype(dtype).itemsize * math.prod(shape)
        return memoryview(self.map)[offset : offset + size].cast(format)  # type: ignore[call-overload]

    def handle(self) -> SegmentHandle:
        """A handle that lets another process open this segment (through this process)."""
        pid = os.getpid()
        pinned = getattr(_pinning, "pinned", None)
        if pinned is not None:
            pinned.append(self)
        dup = None if _proc_usable(pid, self.fd, self.ino) else reduction.DupFd(self.fd)
        return SegmentHandle(self.name, self.size, self.dev, self.ino, pid, self.fd, dup)

    def __reduce__(self) -> tuple[Any, tuple[SegmentHandle]]:
        return open_segment, (self.handle(),)

    def __repr__(self) -> str:
        return f"<Segment {self.name} {self.size} bytes, fd {self.fd}>"


class SegmentWriter:
    """Writes the sections of a new segment, then seals and maps it.

    Use as a context manager, so that the descriptor is closed if building fails::

        with SegmentWriter("list") as writer:
            writer.add_array("values", np.arange(3.0))
            segment = writer.finish({"kind": "array"})
    """

    def __init__(self, label: str) -> None:
        self.name = f"poolloader-{label}-{os.getpid()}-{next(_names)}"
        if not hasattr(os, "memfd_create"):
            raise OSError(
                "SharedList and SharedDict need Linux's memfd_create (Linux 3.17 or later), "
                "which this platform lacks; keep the records in a plain list here"
            )
        self._fd: int | None = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._size = 0
        self._sections: dict[str, tuple[str, int, list[int]]] = {}

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` (C order, native byte order) as section ``name``."""
        array = np.ascontiguousarray(array)
        offset = self._align()
        self._write(array.reshape(-1).view(np.uint8).data)
        self._sections[name] = (array.dtype.str, offset, list(array.shape))

    def add_bytes(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
        """Write ``chunks`` back to back as a uint8 section ``name``; return its length."""
        offset = self._align()
        for chunk in chunks:
            self._write(memoryview(chunk))
        length = self._size - offset
        self._sections[name] = (np.dtype(np.uint8).str, offset, [length])
        return length

    def finish(self, meta: dict[str, Any]) -> Segment:
        """Write the table and trailer, seal, map read-only and return the segment."""
        fd = self._take_fd()
        try:
            table = json.dumps({"sections": self._sections, "meta": meta}).encode()
            self._write(memoryview(table), fd)
            self._write(memoryview(_TRAILER.pack(len(table), MAGIC)), fd)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            segment = Segment(fd, self.name)
        except BaseException:
            os.close(fd)
            raise
        return _register(segment)

    def _take_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"segment {self.name} was already finished or closed")
        fd, self._fd = self._fd, None
        return fd

    def _align(self) -> int:
        padding = -self._size % ALIGN
        if padding:
            self._write(memoryview(bytes(padding)))
        return self._size

    def _write(self, data: memoryview, fd: int | None = None) -> None:
        target = self._fd if fd is None else fd
        if target is None:
            raise RuntimeError(f"segment {self.name} was already finished or closed")
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while data:
            written = os.write(target, data)
            data = data[written:]
            self._size += written


@contextlib.contextmanager
def pinning() -> Iterator[list[Segment]]:
    """Collect the segments pickled in this thread inside the block.

    A handle opens only while the pickling process holds its segment. Code that keeps
    pickled bytes to unpickle later (a snapshot of a dataset that replacement workers
    start from, a log of changes) holds the collected list for as long as it keeps the
    bytes, so the containers in them stay openable even after the dataset dropped them::

        with pinning() as pinned:
            snapshot = pickle.dumps(dataset)
        self._snapshot, self._snapshot_pins = snapshot, pinned
    """
    outer = getattr(_pinning, "pinned", None)
    pinned: list[Segment] = []
    _pinning.pinned = pinned
    try:
        yield pinned
    finally:
        _pinning.pinned = outer
        if outer is not None:
            outer.extend(pinned)


def _read_table(mapped: mmap.mmap, name: str) -> dict[str, Any]:
    """Read the JSON table at the end of a segment, checking the trailer."""
    if len(mapped) >= _TRAILER.size:
        length, magic = _TRAILER.unpack_from(mapped, len(mapped) - _TRAILER.size)
        start = len(mapped) - _TRAILER.size - length
        if magic == MAGIC and start >= 0:
            table: dict[str, Any] = json.loads(mapped[start : start + length])
            return table
    raise ValueError(
        f"shared memory segment {name} was not written by this version of poolloader "
        "(no trailer); every process must import the same poolloader"
    )


def _register(segment: Segment) -> Segment:
    """Record ``segment`` as this process's mapping of its file, or return the one already there."""
    with _registry_lock:
        existing = _registry.get((segment.dev, segment.ino))
        if existing is not None:
            return existing
        _registry[segment.dev, segment.ino] = segment
    return segment


def _registered(handle: SegmentHandle) -> Segment | None:
    with _registry_lock:
        return _registry.get((handle.dev, handle.ino))


def _proc_usable(pid: int, fd: int, ino: int) -> bool:
    """Whether ``/proc/<pid>/fd`` shows this process's descriptors (probed once)."""
    global _proc_shows_fds
    if _proc_shows_fds is None:
        try:
            _proc_shows_fds = os.stat(f"/proc/{pid}/fd/{fd}").st_ino == ino
        except OSError:
            _proc_shows_fds = False
    return _proc_shows_fds


def open_segment(handle: SegmentHandle) -> Segment:
    """Map the segment a handle names: the one this process has already, else open it.

    Raises:
        FileNotFoundError: the process that pickled it no longer holds it (it exited,
            or dropped the container before this process unpickled it).
        PermissionError: ``/proc/<pid>/fd`` of that process may not be opened here.
        ValueError: the file is not a sealed poolloader segment.
    """
    passed = None if handle.dup is None else handle.dup.detach()  # one use: take it anyway
    found = _registered(handle)
    if found is not None:
        if passed is not None:
            os.close(passed)
        return found
    fd = _open_proc(handle) if passed is None else passed
    try:
        _check(fd, handle)
        segment = Segment(fd, handle.name)
    except BaseException:
        os.close(fd)
        raise
    return _register(segment)


def _open_proc(handle: SegmentHandle) -> int:
    path = f"/proc/{handle.pid}/fd/{handle.fd}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        alive = os.path.exists(f"/proc/{handle.pid}")
        why = "it released the container" if alive else "it has exited"
        raise FileNotFoundError(exc.errno, _gone(handle, why)) from exc
    except PermissionError as exc:
        raise PermissionError(
            exc.errno,
            f"cannot open shared memory {handle.name} through {path}: permission denied. The "
            "processes must run as the same user, and the sender must not be undumpable "
            "(prctl PR_SET_DUMPABLE 0)",
        ) from exc


def _check(fd: int, handle: SegmentHandle) -> None:
    """Refuse a descriptor that is not the sealed file the handle names."""
    status = os.fstat(fd)
    if (status.st_dev, status.st_ino, status.st_size) != (handle.dev, handle.ino, handle.size):
        raise FileNotFoundError(_gone(handle, "that descriptor number now names another file"))
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise ValueError(f"shared memory {handle.name} is not sealed read-only; refusing to map it")


def _gone(handle: SegmentHandle, why: str) -> str:
    return (
        f"cannot open shared memory {handle.name}: process {handle.pid}, which pickled it as "
        f"descriptor {handle.fd}, no longer holds it ({why}). A pickled SharedList or "
        "SharedDict can be unpickled while the process that pickled it keeps the container "
        "alive; keep a reference there until every receiver has loaded it"
    )


def is_sealed_array(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a sealed segment's mapping (so it can never change)."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, _SealedMap)
