"""Skeletons: a batch pickled with its tensors and arrays replaced by descriptors
of their bytes, which travel inline or in a slab (``_packing.py``).

NOTE [ Views ]: a tensor that is a view (strided, offset, or part of a bigger
storage) travels as the part of its storage that the batch's tensors on it read,
once per batch, plus its size, strides and offset, so that it arrives as torch's
loader delivers it: the same strides, and views of one storage in a batch that
overlap still share it (a write through one shows in the others). Only that
part: a window of a big token tensor, or of a file's bytes, sends the window
(its ``storage_offset()`` then counts from the window's start), where torch's
loader moves the whole storage into shared memory once per worker. Views that
do not overlap travel as parts of their own. A part that would save less than
itself (or than ``INLINE_BYTES``) is the whole storage, with torch's offsets.
Other tensors travel as their own contiguous bytes. A tensor collated into the
staging slab (``poolloader.batch_buffer``, the default collate's stack) is where
it will be read already; its "storage" is the allocation it lies in:
``out[:, :10]`` and ``out.t()`` of one ``batch_buffer()`` arrive as views of one
storage, as torch delivers them.
"""

from __future__ import annotations

import bisect
import ctypes
import io
import math
import pickle
import types
from collections.abc import Callable, Collection, Mapping
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch.multiprocessing.reductions import reduce_tensor

from ._batch_sharing import NOTHING_SHARED, Sharing, address, extent

if TYPE_CHECKING:
    from ._packing import Slab

#: Tensors and arrays smaller than this travel inside the pickled skeleton:
#: for small data one pipe write beats a slab's bookkeeping and release message.
INLINE_BYTES = 32 * 1024
#: Data offsets in a slab are aligned to this (a cache line, and any dtype's size).
ALIGN = 64
#: The part of a storage a view travels with starts this many bytes into it, or a
#: multiple (the largest element size, complex128's).
SPAN_ALIGN = 16


def nbytes(batch: Any) -> int:
    """Bytes of tensor and array data in a batch, wherever pickling it would find
    them: in containers, in object arrays, in the attributes of objects (a
    dataclass of tensors). Each object counts once, as it is pickled once."""
    return _data_bytes(batch, set())


#: Types that hold no tensor or array data (and the most common).
_NO_DATA = (str, bytes, int, float, bool, complex, type(None), type, range, slice)

#: Exact types :class:`SkeletonPickler` never describes (containers are pickled as
#: containers; their items are asked about one by one).
_NEVER_DESCRIBED = frozenset((*_NO_DATA, tuple, list, dict))


def _data_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, _NO_DATA) or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.is_nested:
            return sum(_data_bytes(t, seen) for t in obj.unbind())
        return obj.element_size() * obj.numel()
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:  # pointers: the objects they point to are the data
            return sum(_data_bytes(item, seen) for item in obj.flat)
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(_data_bytes(k, seen) + _data_bytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_data_bytes(item, seen) for item in obj)
    if isinstance(obj, (types.ModuleType, types.FunctionType, types.MethodType)):
        return 0
    state = getattr(obj, "__dict__", None)
    found = sum(_data_bytes(v, seen) for v in state.values()) if isinstance(state, dict) else 0
    for name in _slot_names(type(obj)):
        found += _data_bytes(getattr(obj, name, None), seen)
    return found


def _slot_names(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` attributes of ``cls`` and its bases (but ``__dict__``,
    ``__weakref__``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


def _slab_candidate(obj: Any) -> tuple[str, Any] | None:
    """``("tensor", contiguous tensor)``, ``("array", contiguous array)`` or
    ``("array_t", C-contiguous transpose of a Fortran-order array)`` if ``obj``
    can travel as raw bytes; ``None`` to pickle it as torch would."""
    if type(obj) is torch.Tensor:
        return ("tensor", _resolved(obj)) if _travels_as_bytes(obj) else None
    if type(obj) is np.ndarray and _plain_dtype(obj.dtype):
        obj = _native_order(obj)
        if obj.ndim > 1 and obj.flags.f_contiguous and not obj.flags.c_contiguous:
            # Fortran order arrives as Fortran order, as pickle keeps it: its
            # transpose's bytes, in C order, transposed back on arrival.
            return "array_t", obj.T
        # (Not np.ascontiguousarray: it makes a 0-d array 1-d.)
        return "array", obj if obj.flags.c_contiguous else obj.copy(order="C")
    return None


def _travels_as_bytes(tensor: torch.Tensor) -> bool:
    """Whether a tensor (of type exactly ``torch.Tensor``) can travel as raw bytes."""
    return not (
        tensor.is_nested
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or not tensor.is_cpu
        or tensor.requires_grad
    )


def _resolved(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its conjugate and negative bits applied, contiguous (itself
    when it is already all three: asking is cheaper than resolving)."""
    if tensor.is_conj() or tensor.is_neg() or not tensor.is_contiguous():
        return tensor.resolve_conj().resolve_neg().contiguous()
    return tensor


def _plain_dtype(dtype: np.dtype) -> bool:
    """Whether an array of ``dtype`` travels as bytes and ``dtype.str``: not objects,
    and not a structured or sub-array dtype, whose fields ``dtype.str`` drops."""
    return not dtype.hasobject and dtype.names is None and dtype.subdtype is None


def _native_order(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (a copy only when it is not): through torch's
    queue (pickle protocol 4) NumPy arrays arrive native, ``>f4`` as ``<f4``."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _raw_bytes(kind: str, data: Any) -> bytes:
    if kind != "tensor":
        return data.tobytes()  # any dtype (a memoryview refuses datetimes)
    # data is a contiguous CPU tensor: its bytes are the ones from data_ptr() on.
    return ctypes.string_at(data.data_ptr(), data.element_size() * data.numel())


class TorchPickler(ForkingPickler):
    """multiprocessing's pickler with torch's reducers (tensors through fresh shared
    memory), except where those lose what a tensor is:

    - a quantized tensor: torch's reducer drops its quantizer (it arrives unusable,
      "UnknownQuantizer"), so it takes the ordinary pickling path, which keeps it;
    - a view whose conjugation or negation is a lazy bit (``z.conj()``, its
      ``.imag``): torch's reducer sends the memory without the bit, so the tensor
      would arrive unconjugated or un-negated; its resolved values are sent, as a
      tensor (or ``nn.Parameter``) that needs grad if it did. (Other subclasses
      pickle the ordinary way, which keeps the bit; torch refuses to send a
      tensor that needs grad and is not a leaf.)

    NumPy arrays arrive in native byte order, as through torch's queue.

    With ``slab_bases`` (a function giving the addresses where the worker's slabs
    begin), a storage in a slab is sent as a copy (NOTE [ Slab fallback ] in
    ``_packing.py``)."""

    def __init__(
        self, file: io.BytesIO, slab_bases: Callable[[], Collection[int]] | None = None
    ) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.slab_bases = slab_bases
        # For the batch being pickled: the slabs' addresses, asked once, and a copy
        # of each slab a storage of the batch is in (slab base → its copy).
        self.slab_bases_now: Collection[int] | None = None
        self.slab_copies: dict[int, torch.UntypedStorage] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.UntypedStorage and self.slab_bases is not None:
            copy = self._out_of_slab(obj)
            if copy is not None:
                return _same, (copy,)
        if isinstance(obj, torch.Tensor) and obj.is_quantized:
            return obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        if type(obj) in _REDUCED and (obj.is_conj() or obj.is_neg()) and obj.is_leaf:
            return reduce_tensor(_bits_applied(obj))
        if type(obj) is np.ndarray and not obj.dtype.isnative and _plain_dtype(obj.dtype):
            # Protocol 5 would keep ">f4" (_native_order).
            return _native_order(obj).__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented

    def _out_of_slab(self, storage: torch.UntypedStorage) -> torch.UntypedStorage | None:
        """A copy of ``storage`` if it is a slab's (one per slab and batch, so that
        tensors sharing the slab still share a storage on arrival), else ``None``."""
        assert self.slab_bases is not None
        if storage.device.type != "cpu":
            return None
        bases = self.slab_bases_now
        if bases is None:
            bases = self.slab_bases_now = self.slab_bases()
        base = storage.data_ptr()
        if base not in bases:
            return None
        copy = self.slab_copies.get(base)
        if copy is None:
            copy = self.slab_copies[base] = torch.UntypedStorage(storage.nbytes())
            copy.copy_(storage)
        return copy

    @classmethod
    def to_bytes(cls, obj: Any) -> bytes:
        buffer = io.BytesIO()
        cls(buffer).dump(obj)
        return buffer.getvalue()


def _same(obj: Any) -> Any:
    """What a copy made while pickling is rebuilt with: itself."""
    return obj


#: The tensor types torch's shared-memory reducer sends (TorchPickler.reducer_override).
_REDUCED = (torch.Tensor, torch.nn.Parameter)


def _bits_applied(tensor: torch.Tensor) -> torch.Tensor:
    """A leaf ``tensor`` with its lazy conjugation and negation applied to its
    values, of its type, and needing grad if it did."""
    values = tensor.detach().resolve_conj().resolve_neg()
    if type(tensor) is torch.nn.Parameter:
        return torch.nn.Parameter(values, requires_grad=tensor.requires_grad)
    return values.requires_grad_(tensor.requires_grad)


class SkeletonPickler(TorchPickler):
    """Pickles a batch, replacing tensors and arrays by descriptors of their bytes.

    Tensors that collation already wrote into the staging slab are described
    where they lie; the others are assigned space after them (``blocks``).

    NOTE [ One pickler per worker ]: a worker packs every batch with the same
    pickler, each between :meth:`begin` and :meth:`end`. Making one costs more
    than pickling a tiny batch with it: ``ForkingPickler.__init__`` copies
    multiprocessing's table of reducers (78 entries with torch's) for every
    pickler, 7 µs against 2 µs for a plain one, and the fields here and a
    ``BytesIO`` add as much. A pickler keeps the reducers of when it was made, so
    :class:`~poolloader._packing.SlabPacker` makes a new one once the table has
    changed (a reducer registered since)."""

    def __init__(
        self, file: io.BytesIO, slab_bases: Callable[[], Collection[int]] | None = None
    ) -> None:
        super().__init__(file, slab_bases)
        self.buffer = file
        self.begin(None, NOTHING_SHARED)

    def begin(self, staging: Slab | None, sharing: Sharing) -> None:
        """Get ready to pickle one batch (NOTE [ One pickler per worker ])."""
        self.staging = staging
        self.shared = sharing.storages  # storages several tensors of the batch view
        self.starts = sharing.starts  # where each tensor on a shared storage begins
        self.spans = sharing.spans  # what the tensors on a shared storage read
        self.overlapping = sharing.overlapping  # arrays that must travel as copies
        self.repeated = sharing.repeated  # ids of objects the batch holds more than once
        self.aliases: dict[int, int] = {}  # id of such an object → its number
        self.blocks: list[tuple[int, Any]] = []  # (offset, tensor or array) still to copy
        self.staged = 0  # tensors found already in the staging slab
        self.size = staging.top if staging is not None else 0
        self.data_bytes = 0  # bytes of every tensor and array, wherever it travels
        self.storages: dict[tuple[int, int], int] = {}  # views' storages sent so far

    def end(self) -> None:
        """Let go of the batch: the memo and the blocks hold its objects."""
        self.clear_memo()
        self.staging, self.blocks = None, []
        if self.slab_bases_now is not None:
            self.slab_bases_now, self.slab_copies = None, {}

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) in _NEVER_DESCRIBED:
            # Pickle asks about every object it meets, the descriptors' own strings,
            # numbers and tuples among them: 6 of the 7 questions a one-tensor batch
            # asks, each answered without the checks below.
            return None
        # persistent_id comes before pickle's memo: an array or tensor the batch
        # holds twice (labels = input_ids) is described once, then named again,
        # so that it arrives as one object, as through torch's pickling.
        if not self.repeated or id(obj) not in self.repeated:
            return self._describe(obj)
        number = self.aliases.get(id(obj))
        if number is not None:
            return ("again", number)
        described = self._describe(obj)
        if described is None:
            return None  # pickled as torch pickles it: the memo keeps it one object
        number = self.aliases[id(obj)] = len(self.aliases)
        return ("first", number, described)

    def _describe(self, obj: Any) -> Any:
        found: tuple[str, Any] | None
        if type(obj) is torch.Tensor:
            as_bytes = _travels_as_bytes(obj)  # (asked once: each question costs)
            small = self._small_plain(obj) if as_bytes else None
            if small is not None:
                return small
            if as_bytes and self._keeps_layout(obj):
                return self._storage_view(obj)
            if self._in_staging(obj):
                view = self._staged_view(obj)
                if view is not None:
                    return view
            found = ("tensor", _resolved(obj)) if as_bytes else None
        else:
            found = _slab_candidate(obj)
        if found is None:
            if isinstance(obj, torch.Tensor):
                self.data_bytes += nbytes(obj)
            return None
        kind, data = found[0], cast(Any, found[1])
        size = data.element_size() * data.numel() if kind == "tensor" else data.nbytes
        self.data_bytes += size
        dtype = str(data.dtype) if kind == "tensor" else data.dtype.str  # array, array_t
        # NumPy arrays arrive as copies, as torch pickles them: two that overlap in
        # the staging slab (slices of one batch_buffer) must not arrive as views.
        staged = kind == "tensor" or id(obj) not in self.overlapping
        offset = self._staged_offset(data, size) if staged else None
        if offset is not None:
            self.staged += 1
            return ("slab", kind, dtype, tuple(data.shape), offset, size)
        if size < INLINE_BYTES:
            return ("inline", kind, dtype, tuple(data.shape), _raw_bytes(kind, data))
        offset = self.size
        self.blocks.append((offset, data))
        self.size = aligned(offset + size)
        return ("slab", kind, dtype, tuple(data.shape), offset, size)

    def _small_plain(self, tensor: torch.Tensor) -> tuple[Any, ...] | None:
        """The inline descriptor of a small tensor that is plainly its own storage
        (the most common part of a small batch), or ``None`` for the full path;
        ``tensor`` travels as bytes (:func:`_travels_as_bytes`).

        What the full path gives such a tensor, asking each question of torch once
        (each costs a call through its bindings: the full path asks some of them
        three times, a third of a tiny batch's packing)."""
        if self.staging is not None:
            return None  # a staged tensor is described where it lies
        size = tensor.nbytes
        if size >= INLINE_BYTES or tensor.is_conj() or tensor.is_neg():
            return None
        if tensor.storage_offset() or not _fresh_layout(tensor):
            return None
        storage = tensor.untyped_storage()
        if storage.nbytes() != size or storage.data_ptr() in self.shared:
            return None
        self.data_bytes += size
        raw = ctypes.string_at(tensor.data_ptr(), size)
        return ("inline", "tensor", str(tensor.dtype), tuple(tensor.shape), raw)

    def _keeps_layout(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view (strides, an offset, or a storage bigger than
        itself) that should arrive as one, as torch's loader delivers it: views of
        one storage keep sharing it. A plain tensor, or one that cannot travel as
        bytes (the caller asked), or one in the staging slab, goes the usual way."""
        if tensor.is_conj() or tensor.is_neg():
            return False
        storage = tensor.untyped_storage()
        staging = self.staging
        if staging is not None and storage.data_ptr() == staging.base:
            return False
        whole = storage.nbytes() == tensor.element_size() * tensor.numel()
        plain = _fresh_layout(tensor) and tensor.storage_offset() == 0 and whole
        return not plain or storage.data_ptr() in self.shared

    def _as_view(
        self, tensor: torch.Tensor, key: tuple[int, int], offset: int, place: Any
    ) -> tuple[Any, ...]:
        """``tensor`` as a view, at element ``offset``, of the storage ``key``
        (its address and size), which travels once per batch: the first time,
        ``place()`` says where its bytes are (NOTE [ Views ])."""
        view = ("view", str(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()), offset)
        index = self.storages.get(key)
        if index is not None:
            return (*view, index, None)
        index = self.storages[key] = len(self.storages)
        return (*view, index, place())

    def _storage_view(self, tensor: torch.Tensor) -> tuple[Any, ...]:
        """A view of the part of a storage the batch reads, sent once per batch
        (NOTE [ Views ])."""
        storage = tensor.untyped_storage()
        base, whole = storage.data_ptr(), storage.nbytes()
        start, end = self._span(tensor, base)
        # From a multiple of any element size into the storage (torch's are 1 to 16
        # bytes), so that each view's offset into the part is whole elements.
        first = (start - base) // SPAN_ALIGN * SPAN_ALIGN
        last = min(whole, aligned(end - base, SPAN_ALIGN))
        if whole - (last - first) < max(last - first, INLINE_BYTES):
            first, last = 0, whole  # little to save: the whole storage, torch's offsets

        def place() -> tuple[Any, ...]:
            flat = torch.empty(0, dtype=torch.uint8).set_(storage)[first:last]
            size = flat.numel()
            self.data_bytes += size
            if size < INLINE_BYTES:
                return ("inline", flat.numpy().tobytes())
            offset = self.size
            self.blocks.append((offset, flat))
            self.size = aligned(offset + size)
            return ("slab", offset, size)

        offset = (address(tensor) - base - first) // tensor.element_size()
        return self._as_view(tensor, (base, first), offset, place)

    def _span(self, tensor: torch.Tensor, base: int) -> tuple[int, int]:
        """The addresses of the part of ``tensor``'s storage that travels: what the
        batch's tensors on that storage read around ``tensor`` (a window of a big
        token tensor sends the window, not the whole storage)."""
        spans = self.spans.get(base)
        start, end = extent(tensor)
        if spans:
            i = bisect.bisect_right(spans, (start, math.inf)) - 1
            if i >= 0 and spans[i][0] <= start and end <= spans[i][1]:
                return spans[i]
        return start, end

    def _in_staging(self, tensor: torch.Tensor) -> bool:
        staging = self.staging
        return (
            staging is not None
            and tensor.layout == torch.strided
            and not tensor.is_nested
            and tensor.untyped_storage().data_ptr() == staging.base
        )

    def _staged_view(self, tensor: torch.Tensor) -> tuple[Any, ...] | None:
        """A tensor in the staging slab that is not simply the whole of its
        allocation, or shares it with another tensor of the batch, described as a
        view of that allocation (NOTE [ Views ]); ``None``: it travels as itself."""
        staging = self.staging
        assert staging is not None
        size, where = tensor.element_size(), address(tensor) - staging.base
        found = _allocation(staging.allocations, where)
        if found is None or tensor.is_conj() or tensor.is_neg() or tensor.requires_grad:
            return None
        offset, length = found
        if (where - offset) % size or length % size:
            return None
        whole = _fresh_layout(tensor) and where == offset and tensor.numel() * size == length
        start, end = staging.base + offset, staging.base + offset + length
        if whole and sum(start <= s < end for s in self.starts) <= 1:
            return None  # the usual case: the plain "slab" descriptor

        def place() -> tuple[Any, ...]:  # where the allocation lies already
            self.data_bytes += length
            self.staged += 1
            return ("slab", offset, length)

        return self._as_view(tensor, (start, length), (where - offset) // size, place)

    def _staged_offset(self, data: Any, size: int) -> int | None:
        staging = self.staging
        if staging is None:
            return None
        # A tensor stacked into the slab, or an array collated into
        # poolloader.batch_buffer(): it is there already, nothing to copy.
        start = address(data) if isinstance(data, torch.Tensor) else data.ctypes.data
        offset = start - staging.base
        if offset >= 0 and offset + size <= staging.top:
            return offset
        return None


def _fresh_layout(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has the strides of a new tensor of its shape, those it
    arrives with when it travels as its bytes. ``is_contiguous()`` is not enough:
    it overlooks the strides of dimensions of size 1 (``x.t()`` of a column, shape
    ``(1, n)``, strides ``(1, 1)``) and all of an empty tensor's, which torch's
    pickling keeps; such a tensor travels as a view, which keeps them too."""
    if not tensor.is_contiguous():
        return False
    shape = tensor.shape
    if 1 not in shape and 0 not in shape:
        return True  # contiguous: its strides are the only ones it can have
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tensor.stride() == tuple(reversed(strides))


def _allocation(allocations: list[tuple[int, int]], where: int) -> tuple[int, int] | None:
    """The staging allocation ``(offset, size)`` that byte ``where`` lies in."""
    i = bisect.bisect_right(allocations, (where, math.inf)) - 1
    if i >= 0 and allocations[i][0] <= where < sum(allocations[i]):
        return allocations[i]
    return None


def aligned(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to
