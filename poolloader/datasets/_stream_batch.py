"""The batch a :class:`~poolloader.datasets.StreamDataset` returns, and how the
batches of a step's parts, loaded by several workers, are merged into one."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex

import torch

#: Slot layouts whose merge is remembered: one per epoch and number of workers in use
#: (each costs an index tensor of ``batch_size`` entries).
JOINER_CACHE = 16


@dataclasses.dataclass(frozen=True)
class StreamBatch:
    """One step of many streams: what :class:`StreamDataset` returns.

    ``T`` is ``chunk_size`` and ``B`` the sampler's ``batch_size``; with
    ``batch_first=True`` the ``[T, B]`` axes of ``data`` and ``mask`` are ``[B, T]``.

    Attributes:
        data: ``[T, B, ...]``: row ``b`` continues row ``b`` of the previous step unless
            ``first[b]``. Padding holds the dataset's ``pad_value``.
        mask: ``[T, B]`` bool: True where ``data`` holds a real time step; False on padding
            slots and after the end of a stream's short last chunk.
        first: ``[B]`` bool: the row begins a stream; reset its recurrent state.
        streams: ``[B]`` int64: the stream each row reads, ``-1`` on padding.
        starts: ``[B]`` int64: the time step of the stream at ``data``'s first row, ``-1``
            on padding.
        repeat: ``[B]`` bool: the row re-reads a stream to pad (``pad="restream"``).
        batch_first: Whether ``data`` and ``mask`` are batch-major.

    Example:
        >>> from poolloader.datasets import StreamDataset
        >>> from poolloader.samplers import StreamChunk, StreamStep
        >>> batch = StreamDataset(lambda s, a, b: torch.arange(a, b))[
        ...     StreamStep(0, 3, (StreamChunk(0, 0, 2, first=True, last=True),))
        ... ]
        >>> batch.data[:, 0].tolist(), batch.mask[:, 0].tolist(), batch.first.tolist()
        ([0, 1, 0], [True, True, False], [True])
    """

    data: torch.Tensor
    mask: torch.Tensor
    first: torch.Tensor
    streams: torch.Tensor
    starts: torch.Tensor
    repeat: torch.Tensor
    batch_first: bool = False

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StreamBatch:
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> StreamBatch:
        """A copy in pinned memory (``DataLoader(..., pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def merge_slots(
        cls, parts: Sequence[StreamBatch], slot_ids: Sequence[Sequence[int]]
    ) -> StreamBatch:
        """The batch of a whole step from the batches of its parts.

        Args:
            parts: One batch per part, rows in the order of that part's slots.
            slot_ids: ``slot_ids[i]`` lists the slots of ``parts[i]``; together they are
                ``0 .. B - 1``, each once.

        Returns:
            A batch whose row ``b`` is slot ``b``.
        """
        join = _joiner(slot_ids)
        wide = 0 if parts[0].batch_first else 1

        def field(name: str, dim: int) -> torch.Tensor:
            return join([getattr(part, name) for part in parts], dim)

        data = join(_agreeing_data(parts, slot_ids), wide)
        return cls(
            data, field("mask", wide), field("first", 0), field("streams", 0),
            field("starts", 0), field("repeat", 0), parts[0].batch_first,
        )  # fmt: skip

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # NOTE [ Compact StreamBatch pickles ]: every part of a step travels from its
        # worker pickled, and pickling a torch tensor costs tens of microseconds each way,
        # however small. So the five small tensors (mask and the per-row flags) travel as
        # one block of bytes, and only ``data`` as a tensor (through the loader's shared
        # memory). Batches whose small tensors are not plain CPU tensors pickle as usual.
        small = (self.streams, self.starts, self.mask, self.first, self.repeat)
        if not _packable(small):
            return super().__reduce_ex__(protocol)
        raw = b"".join(tensor.numpy().tobytes() for tensor in small)
        rows, mask_shape = self.first.shape[0], tuple(self.mask.shape)
        return (_unpack_batch, (self.data, raw, rows, mask_shape, self.batch_first))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StreamBatch:
        return StreamBatch(
            fn(self.data), fn(self.mask), fn(self.first), fn(self.streams), fn(self.starts),
            fn(self.repeat), self.batch_first,
        )  # fmt: skip


def _agreeing_data(
    parts: Sequence[StreamBatch], slot_ids: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """The parts' ``data``, in the step's feature shape and dtype: those of the chunk
    of the lowest slot, as one process assembling the whole step makes them (it casts
    the other chunks to that dtype). A part of padding alone was made by a worker that
    read nothing of this step, from what it knew before (the dataset may have changed
    since): it is made again, of the same value, in that shape and dtype."""
    lowest: dict[int, int] = {}  # part → its lowest slot that reads a stream
    for i, (part, ids) in enumerate(zip(parts, slot_ids, strict=True)):
        streams = part.streams.tolist()
        reading = [slot for slot, stream in zip(ids, streams, strict=True) if stream >= 0]
        if reading:
            lowest[i] = min(reading)
    if not lowest:
        return [part.data for part in parts]
    template = parts[min(lowest, key=lowest.__getitem__)].data
    feature, dtype = template.shape[2:], template.dtype
    found = []
    for i, part in enumerate(parts):
        data = part.data
        if data.shape[2:] == feature and data.dtype == dtype:
            found.append(data)
        elif i not in lowest:
            value = data.flatten()[0].item() if data.numel() else 0
            shape = (*data.shape[:2], *feature)
            found.append(torch.full(shape, value, dtype=dtype))
        elif data.shape[2:] != feature:
            raise ValueError(
                "chunks of one StreamDataset must share their shape after the time axis, "
                f"but one step's chunks gave {tuple(data.shape[2:])} and {tuple(feature)}; "
                "make every stream's time steps the same shape"
            )
        else:
            found.append(data.to(dtype))
    return found


def _joiner(slot_ids: Sequence[Sequence[int]]) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """How to join the parts' tensors along the row axis ``dim`` into slot order."""
    return _cached_joiner(tuple(tuple(ids) for ids in slot_ids))


@functools.lru_cache(maxsize=JOINER_CACHE)
def _cached_joiner(
    slot_ids: tuple[tuple[int, ...], ...],
) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """Parts that interleave the slots evenly (part ``i`` holds ``i, i + n, ...``) are
    stacked and flattened, one copy; any other split is concatenated and put in slot
    order with one gather."""
    n, total = len(slot_ids), sum(len(ids) for ids in slot_ids)
    if total % n == 0 and all(
        tuple(ids) == tuple(range(i, total, n)) for i, ids in enumerate(slot_ids)
    ):
        return lambda tensors, dim: torch.stack(tensors, dim + 1).flatten(dim, dim + 1)
    order = torch.tensor([slot for ids in slot_ids for slot in ids], dtype=torch.long)
    where = torch.empty_like(order)
    where[order] = torch.arange(total)
    return lambda tensors, dim: torch.cat(tensors, dim).index_select(dim, where)


#: The dtypes of the small tensors of a StreamBatch, in the order they are packed.
_SMALL_DTYPES = (torch.int64, torch.int64, torch.bool, torch.bool, torch.bool)


def _packable(small: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``(streams, starts, mask, first, repeat)`` can travel as one block of bytes:
    plain CPU tensors of the usual dtypes, a 2-D mask and ``B`` entries in the others."""
    if not all(
        type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided
        and not t.requires_grad and t.dtype == dtype
        for t, dtype in zip(small, _SMALL_DTYPES, strict=True)
    ):  # fmt: skip
        return False
    streams, starts, mask, first, repeat = small
    rows = (first.shape[0],) if first.dim() == 1 else None
    return (
        bool(rows and rows[0])
        and mask.dim() == 2
        and streams.shape == starts.shape == rows == repeat.shape
    )


def _unpack_batch(
    data: torch.Tensor, raw: bytes, rows: int, mask_shape: tuple[int, int], batch_first: bool
) -> StreamBatch:
    """A :class:`StreamBatch` from its compact pickle (NOTE [ Compact StreamBatch pickles ])."""
    block = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    ints, cells = block[: 16 * rows].view(torch.int64), mask_shape[0] * mask_shape[1]
    flags = block[16 * rows :].view(torch.bool)
    return StreamBatch(
        data, flags[:cells].view(mask_shape), flags[cells : cells + rows], ints[:rows],
        ints[rows:], flags[cells + rows :], batch_first,
    )  # fmt: skip
