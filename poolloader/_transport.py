"""Moving batches from workers to the main process.

A transport has two halves: a packer built inside each worker from a picklable
factory (``_packing.py``), which turns a batch into a small payload, and the
main process's transport, which turns the payload back into the batch.

:class:`~poolloader._slab_transport.SlabTransport` (the default,
``transport="shm"``) moves tensors and NumPy arrays through shared-memory
*slabs* that are mapped once and reused, one pool of them for all workers (NOTE
[ One pool of slabs ] in ``_slab_transport.py``)::

    worker                                         main process
    ──────                                         ────────────
                                       ◄── Task ── names a free slab of the pool
                                       ◄── fd ───  (the first time this worker
                                                    is given it)
    collate → batch (into that slab where
    it can, else private memory)
    pickle the batch's skeleton; each large
    tensor/array becomes (offset, dtype, shape)
    copy what is not in the slab yet   ── Done ──► unpickle: tensors and arrays are
    (a batch too big for it: a new                 views of the slab, no copy
     memfd slab   ── fd ───────────────────────►  (joins the pool)
                                                   the slab is free again when the
                                                   batch's last view dies

Fresh shared memory costs page faults on every batch (the stock loader
allocates new segments per batch); a reused slab costs one memcpy. Slabs are
anonymous ``memfd`` segments: nothing is ever created in ``/dev/shm``, its size
limit does not apply, and the memory goes back to the system when the last
process holding a slab exits, however it exits. When the pool may grow no more
(a consumer that keeps batches) and no slab is free, a batch goes through
:class:`PickleTransport`'s fresh memory instead of waiting (NOTE [ Slab
fallback ] in ``_packing.py``).

NOTE [ Idle slabs ]: slabs stay mapped while the loader runs, sized by what is in
flight and what the consumer holds. Once the loader has been idle for
:data:`IDLE_TRIM_SECONDS` (between epochs that do not follow each other at once,
during validation with another loader, at the end of training) the pool closes
its free slabs: the main process unmaps them and tells the workers that map
them to (``Forget``), so their memory goes back to the system. Slabs held by
batches the consumer keeps close once those die. Back-to-back epochs keep
their slabs.

NOTE [ Small parts ]: a batch's tensors and arrays arrive as views of its slab,
which goes back to the pool when the last of them dies. A consumer that keeps
a small part of each batch (its labels, its lengths) would keep every slab, and
the workers would make new ones: 900 MB held for 9 MB of labels kept. So a small
part of a bigger batch (at most :data:`COPY_OUT_BYTES`, and at most a
:data:`COPY_OUT_SHARE`-th of the batch's bytes in the slab) is copied out when the
batch is rebuilt, which costs a memcpy of at most that much; the big parts stay
views. Parts that are views of one storage (NOTE [ Views ] in ``_skeleton.py``)
stay views, so that they still share it.

NOTE [ File descriptors ]: the main process holds one descriptor per slab of the
pool (to lend it to the workers; ``_packing.map_shared`` maps without one), and
three per worker (its connection, a
second handle on it for receiving descriptors, the process sentinel), plus the
I/O thread's wake-up pipe, however many batches the consumer keeps. Batches
that travel through fresh shared memory (``transport="pickle"``, or the
fallback) are torch's: with torch's default ``file_descriptor`` sharing
strategy each of their tensors holds a descriptor while it lives. When the
process runs out of descriptors anyway, the batch fails with
:class:`~poolloader.errors.TransportError`, which names the limit and the fix,
and the loader goes on.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import resource
from collections.abc import Callable, Hashable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from ._messages import Forget
from ._packing import Inline, Pickled, PicklePacker
from .errors import TransportError

# ------------------------------------------------------------------ unpickling


def _torch_dtype(name: str) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(name)
    if dtype is None:
        dtype = getattr(torch, name.removeprefix("torch."))
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"not a torch dtype: {name}")
        _TORCH_DTYPES[name] = dtype
    return dtype


#: The dtypes met so far by name (asked for every tensor of every batch).
_TORCH_DTYPES: dict[str, torch.dtype] = {}


class _SkeletonUnpickler(pickle.Unpickler):
    """Rebuilds a batch from its skeleton: descriptors become views of ``owner``."""

    def __init__(self, data: bytes, owner: np.ndarray | None) -> None:
        super().__init__(io.BytesIO(data))
        self._owner = owner
        self._storages: dict[int, torch.Tensor] = {}  # NOTE [ Views ] in _skeleton.py
        self._aliases: dict[int, Any] = {}  # an object the batch holds more than once

    def _view_of_storage(
        self, dtype: str, shape: Any, stride: Any, offset: int, index: int, where: Any
    ) -> torch.Tensor:
        if where is not None:
            if where[0] == "inline" and not where[1]:  # an empty storage (frombuffer refuses)
                flat = torch.empty(0, dtype=torch.uint8)
            elif where[0] == "inline":
                flat = torch.frombuffer(bytearray(where[1]), dtype=torch.uint8)
            elif self._owner is None:
                raise TypeError("a batch laid out in a slab arrived without its slab")
            else:
                flat = torch.frombuffer(self._owner, dtype=torch.uint8, count=where[2],
                                        offset=where[1])  # fmt: skip
            self._storages[index] = flat
        torch_dtype = _torch_dtype(dtype)
        flat = self._storages[index]
        whole = flat.numel() // torch_dtype.itemsize * torch_dtype.itemsize
        # (a storage of an odd size, such as a WAV file's bytes, viewed as int16)
        typed = (flat if whole == flat.numel() else flat[:whole]).view(torch_dtype)
        return typed.as_strided(shape, stride, offset)

    def persistent_load(self, pid: Any) -> Any:
        if pid[0] == "again":
            return self._aliases[pid[1]]
        if pid[0] == "first":
            found = self._aliases[pid[1]] = self.persistent_load(pid[2])
            return found
        if pid[0] == "view":
            return self._view_of_storage(*pid[1:])
        where, kind, dtype, shape = pid[:4]
        if where == "inline":
            return _from_bytes(kind, dtype, shape, pid[4])
        offset, size = pid[4], pid[5]
        if self._owner is None:
            raise TypeError("a batch laid out in a slab arrived without its slab")
        found = _view(self._owner, kind, dtype, shape, offset, size)
        if size <= COPY_OUT_BYTES and size * COPY_OUT_SHARE <= self._owner.nbytes:
            # A small part of a big batch (its labels): a copy of its own, so that a
            # consumer keeping it does not keep the whole slab (NOTE [ Small parts ]).
            return found.clone() if kind == "tensor" else np.array(found, order="K")
        return found


def _from_bytes(kind: str, dtype: str, shape: tuple[int, ...], raw: bytes) -> Any:
    if kind == "array_t":
        return _from_bytes("array", dtype, shape, raw).T
    if kind == "array":
        return np.frombuffer(bytearray(raw), dtype=np.dtype(dtype)).reshape(shape)
    return _view(bytearray(raw), kind, dtype, shape, 0, len(raw))  # (torch reads any buffer)


def _view(
    owner: np.ndarray | bytearray,
    kind: str,
    dtype: str,
    shape: tuple[int, ...],
    offset: int,
    size: int,
) -> Any:
    if kind == "array_t":  # a Fortran-order array, sent as its transpose
        return _view(owner, "array", dtype, shape, offset, size).T
    if kind == "array":
        # Through a memoryview: a plain slice would have the slab's whole mapping
        # as its base (NumPy collapses chains of views), not ``owner``, whose
        # death releases the slab; the batch's array must keep ``owner`` alive.
        np_dtype = np.dtype(dtype)
        exported = memoryview(owner)  # type: ignore[arg-type]
        return np.frombuffer(exported, np_dtype, size // np_dtype.itemsize, offset).reshape(shape)
    torch_dtype = _torch_dtype(dtype)
    if size == 0:
        return torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(
        owner, dtype=torch_dtype, count=size // torch_dtype.itemsize, offset=offset
    )
    # No view where the shape is already flat: each torch call costs microseconds,
    # a sizeable share of a tiny batch's unpacking.
    return flat if len(shape) == 1 else flat.view(shape)


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


def descriptor_error(exc: BaseException, what: str) -> TransportError:
    """The error for a batch lost because this process ran out of file descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = -1
    counted = f"; {open_now} are open now" if open_now >= 0 else ""
    return TransportError(
        f"Too many open files: the main process could not receive {what} "
        f"({type(exc).__name__}: {exc}). Its limit of open files (`ulimit -n`) is "
        f"{soft}{counted}. Raise it (`ulimit -n 65536` in the shell, or "
        "resource.setrlimit(resource.RLIMIT_NOFILE, ...) at the start of your program), "
        "keep fewer batches alive, or use fewer workers or a smaller prefetch_factor. "
        "Batches that travel through fresh shared memory (transport='pickle') hold a "
        "descriptor per tensor under torch's default sharing strategy: "
        "torch.multiprocessing.set_sharing_strategy('file_system') avoids that."
    )


# ------------------------------------------------------------------ transports

#: Parts of a batch in a slab up to this size, and at most 1 / COPY_OUT_SHARE of
#: the batch's bytes there, arrive as copies rather than views of the slab (NOTE
#: [ Small parts ]).
COPY_OUT_BYTES = 1 << 20
COPY_OUT_SHARE = 4

#: Seconds without an epoch running after which the pool closes its free slabs
#: (NOTE [ Idle slabs ]).
IDLE_TRIM_SECONDS = 2.0


def _nothing() -> None:
    pass


class PickleTransport:
    """Batches travel pickled, tensors through fresh shared memory (torch's path)."""

    slab_batches = 0
    slab_reused = 0

    def __init__(self, max_batch_bytes: int | None = None) -> None:
        self._max_batch_bytes = max_batch_bytes

    def packer_factory(self) -> Callable[[Any], Any]:
        return functools.partial(PicklePacker, self._max_batch_bytes)

    def attach(self, key: Hashable, conn: Any) -> None:
        pass

    def detach(self, key: Hashable, exited: bool = True) -> None:
        pass

    granting = False

    def receive(self, key: Hashable, seq: int, payload: Any, sentinel: int | None = None) -> None:
        pass

    def settle(self, key: Hashable, seq: int, sent: bool = True) -> None:
        pass

    def unpack(self, key: Hashable, payload: Any) -> Any:
        return _unpack_plain(payload)

    def discard(self, key: Hashable, payload: Any) -> None:
        _discard_plain(payload)

    def take_forgets(self) -> list[tuple[Hashable, Forget]]:
        return []

    def trim(self) -> None:
        pass

    @property
    def mapped_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass
