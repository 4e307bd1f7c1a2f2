"""StreamDataset: batches of many streams read side by side, for recurrent models.

::

    main process                                    worker w (serves part w's slots)
    ────────────                                    ────────────────────────────────
    StreamSampler ─► StreamStep (one chunk or
                     padding per slot)
      DataLoader splits it ─── StreamPart w ──────► StreamDataset[part]
                                                      read(stream, start, stop), or the
                                                      slot's open iterator's next chunk
                                                      ─► StreamBatch of its slots
      StreamBatch.merge_slots ◄────────────────────── (rows in its slot order)
      ─► StreamBatch of the step: data [T, B, ...], mask [T, B], first [B], ...

With ``num_workers=0`` the dataset gets the whole :class:`StreamStep` in the main process
and builds the same batch in one go.

NOTE [ Stream affinity ]
~~~~~~~~~~~~~~~~~~~~~~~~
An iterator-style stream (``iterate(stream)`` yields its chunks in order) can only go
forward, so every chunk of it must be read by the process that holds its iterator. A
stream stays in its slot from its first chunk to its last, and a slot is read by the same
worker for the whole epoch (:meth:`StreamStep.poolloader_split`; NOTE [ Stream worker
layout ] in ``samplers/_stream_steps.py``), so the stream stays in one worker; the loader
runs the parts pinned to a worker in the order of the steps, and delivers the batches in
that order too (keep the loader's ``in_order=True``, the default: batches out of order
would not continue each other). Each
process keeps at most one open iterator per slot it serves, keyed by slot, and closes it
after the stream's last chunk, at the epoch's last step (streams cut by the end of the
epoch), when the slot moves to another stream, or when the process stops serving the slot.

An open iterator is used only if it is exactly where the chunk starts (same stream, next
chunk); otherwise the stream is opened again and read up to the chunk. That is what
happens after a resume mid-stream, when a worker was replaced after a crash, or after
``loader.reload_prefetched()``: the batch is still right, it only costs a re-read.
Random-access readers (``read(stream, start, stop)``) are split the same way, which
spreads each step over the workers; they keep no state. torch's own ``DataLoader`` does not
split steps: with its workers, iterator-style streams still give the right batches, but
are re-read from their start at almost every chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import Dataset

from poolloader import _seeding
from poolloader.samplers import StreamChunk, StreamPart, StreamStep

from ._stream_batch import StreamBatch

__all__ = ["StreamBatch", "StreamDataset"]

#: ``read(stream, start, stop)``: time steps ``[start, stop)`` of a stream, ``[stop-start, ...]``.
Reader = Callable[[int, int, int], Any]
#: ``iterate(stream)``: the stream's chunks in order, ``chunk_size`` steps each but the last.
Opener = Callable[[int], Iterable[Any]]
#: The feature shape (after the time axis) and dtype of a dataset's chunks.
Template = tuple[torch.Size, torch.dtype]


class StreamDataset(Dataset[StreamBatch]):
    """Reads the chunks a :class:`~poolloader.samplers.StreamSampler` step asks for and
    builds the :class:`StreamBatch`.

    Say how to read one stream, in one of two ways:

    * ``read(stream, start, stop)``: random access, returning time steps ``[start, stop)``
      of the stream as an array or tensor of shape ``[stop - start, ...]``;
    * ``iterate=fn``: ``fn(stream)`` returns an iterable over the stream's chunks in order,
      each ``[chunk_size, ...]`` (the last may be shorter, or padded to ``chunk_size``).
      Each open iterator stays in the worker that holds its stream
      (NOTE [ Stream affinity ] in this module), so no stream is read twice to reach a
      chunk; iterators are closed (``close()`` if they have it) after the last chunk.

    Chunks of one dataset must share their shape after the time axis. A process that must
    build a batch of padding alone before it has read any chunk learns that shape and the
    dtype by reading the first time step of stream 0 once. The function must pickle when
    ``num_workers > 0`` (a module-level function or a callable object).

    Use it as ``DataLoader(dataset, sampler=stream_sampler, batch_size=None,
    num_workers=n)``: any ``n`` gives the same batches.

    Args:
        read: Random-access reader, or ``None`` when ``iterate`` is given.
        iterate: Iterator factory over one stream's chunks, or ``None`` when ``read`` is.
        batch_first: Make ``data`` ``[B, T, ...]`` and ``mask`` ``[B, T]``.
        pad_value: Value of ``data`` where ``mask`` is False.

    Raises:
        TypeError: Neither or both of ``read`` and ``iterate`` were given, or one is not
            callable.

    Example:
        >>> from poolloader import DataLoader
        >>> from poolloader.samplers import StreamSampler
        >>> lengths = [5, 3]
        >>> dataset = StreamDataset(lambda s, a, b: torch.arange(a, b) + 10 * s)
        >>> sampler = StreamSampler(lengths, batch_size=2, chunk_size=2)
        >>> with DataLoader(dataset, sampler=sampler, batch_size=None) as loader:
        ...     for batch in loader:
        ...         print(batch.data.T.tolist(), batch.first.tolist())
        [[0, 1], [10, 11]] [True, True]
        [[2, 3], [12, 0]] [False, False]
        [[4, 0], [0, 0]] [False, False]
    """

    def __init__(
        self,
        read: Reader | None = None,
        *,
        iterate: Opener | None = None,
        batch_first: bool = False,
        pad_value: float = 0.0,
    ) -> None:
        self._source = _make_source(read, iterate)
        self.batch_first = bool(batch_first)
        self.pad_value = pad_value
        self._template: Template | None = None
        self._pad: torch.Tensor | None = None  # cached by _pad_rows
        self._pad_value: Any = None  # the pad_value _pad holds

    @property
    def open_streams(self) -> dict[int, int]:
        """In this process: the stream of each slot whose iterator is open (``iterate``)."""
        return self._source.open_streams()

    def __getitem__(self, index: StreamStep | StreamPart) -> StreamBatch:
        if not isinstance(index, (StreamStep, StreamPart)):
            raise TypeError(
                "StreamDataset is indexed by the steps of a StreamSampler, but got "
                f"{type(index).__name__} {index!r}; build the loader as DataLoader(dataset, "
                "sampler=StreamSampler(...), batch_size=None)"
            )
        self._source.retain(index.slot_ids)
        chunks = [
            self._read(slot_id, slot, index.chunk_size) if isinstance(slot, StreamChunk) else None
            for slot_id, slot in zip(index.slot_ids, index.slots, strict=True)
        ]
        if index.final:  # streams cut by the end of the epoch end here
            self._source.retain(())
        return self._assemble(index, chunks)

    def _read(self, slot_id: int, chunk: StreamChunk, chunk_size: int) -> torch.Tensor:
        # A step's chunks are split over the workers, as many parts as there are
        # workers, each part seeded as the whole step is: each chunk is seeded for
        # itself, so that random augmentation in ``read`` draws the same numbers
        # for any num_workers, and different ones in each chunk.
        _seeding.seed_part(chunk.stream, chunk.start)
        return self._source.read(slot_id, chunk, chunk_size)

    def __getitems__(self, indices: list[Any]) -> NoReturn:
        raise TypeError(
            "StreamDataset builds whole batches itself, but the DataLoader asked it for "
            f"items to collate ({type(indices).__name__}), as it does with a batch_size or "
            "a batch_sampler; give the StreamSampler as the sampler and batch_size=None: "
            "DataLoader(dataset, sampler=StreamSampler(...), batch_size=None)"
        )

    def close(self) -> None:
        """Close the iterators this process holds open (``iterate``); reading reopens them."""
        self._source.retain(())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_source"] = self._source.fresh()  # open iterators stay where they are
        state["_template"] = state["_pad"] = state["_pad_value"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"StreamDataset({self._source!r}, batch_first={self.batch_first}, "
            f"pad_value={self.pad_value!r})"
        )

    # -- building the batch

    def _assemble(
        self, index: StreamStep | StreamPart, chunks: list[torch.Tensor | None]
    ) -> StreamBatch:
        feature, dtype = self._template_for(chunks)
        pad = self._pad_rows(index.chunk_size, feature, dtype)
        rows = [
            pad if chunk is None else _full_row(chunk, pad, slot)
            for chunk, slot in zip(chunks, index.slots, strict=True)
        ]
        data = torch.stack(rows, 0 if self.batch_first else 1)
        return StreamBatch(data, *_row_info(index, self.batch_first), self.batch_first)

    def _pad_rows(self, size: int, feature: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """``[size, *feature]`` of ``pad_value``: a padding row, and the tail of short ones."""
        pad = self._pad
        if (
            pad is None or pad.shape != (size, *feature) or pad.dtype != dtype
            or self._pad_value is not self.pad_value
        ):  # fmt: skip
            pad = self._pad = torch.full((size, *feature), self.pad_value, dtype=dtype)
            self._pad_value = self.pad_value  # (a change through loader.dataset sets a new one)
        return pad

    def _template_for(self, chunks: list[torch.Tensor | None]) -> Template:
        """Feature shape and dtype: from this batch, else from earlier ones, else a probe."""
        for chunk in chunks:
            if chunk is not None:
                self._template = (chunk.shape[1:], chunk.dtype)
                return self._template
        if self._template is None:
            probe = self._source.probe()
            self._template = (probe.shape[1:], probe.dtype)
        return self._template


def _make_source(read: Reader | None, iterate: Opener | None) -> _RandomAccess | _Iterators:
    if (read is None) == (iterate is None):
        raise TypeError(
            "StreamDataset needs exactly one of read(stream, start, stop) and "
            f"iterate=fn(stream), but got read={read!r} and iterate={iterate!r}"
        )
    if read is not None:
        if not callable(read):
            raise TypeError(f"read should be callable, but got read={read!r}")
        return _RandomAccess(read)
    if not callable(iterate):
        raise TypeError(f"iterate should be callable, but got iterate={iterate!r}")
    return _Iterators(iterate)


def _row_info(
    index: StreamStep | StreamPart, batch_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mask``, ``first``, ``streams``, ``starts`` and ``repeat`` of a step's rows.

    One small tensor holds the flags, stream, start and length of every row (a chunk of
    ``[start, stop)`` always gives ``stop - start`` time steps), and the rest are views or
    casts of it: each tensor made costs microseconds, as much as copying the data.
    """
    rows = [
        (c.first, c.stream, c.start, c.repeat, c.stop - c.start)
        if isinstance(c, StreamChunk)
        else _NO_CHUNK
        for c in index.slots
    ]
    table = torch.tensor(list(zip(*rows, strict=True)), dtype=torch.int64)
    steps, lengths = torch.arange(index.chunk_size), table[4]
    mask = steps < lengths[:, None] if batch_first else steps[:, None] < lengths
    return mask, table[0].bool(), table[1], table[2], table[3].bool()


#: A padding row: not first, no stream, no start, not a repeat, no time steps.
_NO_CHUNK = (False, -1, -1, False, 0)


def _full_row(chunk: torch.Tensor, pad: torch.Tensor, slot: Any) -> torch.Tensor:
    """``chunk`` as a full row: the dataset's dtype, padded to ``chunk_size`` time steps."""
    if chunk.shape == pad.shape and chunk.dtype == pad.dtype:  # the common case
        return chunk
    if chunk.shape[1:] != pad.shape[1:]:
        raise ValueError(
            f"chunks of one StreamDataset must share their shape after the time axis, but "
            f"stream {slot.stream} gave {tuple(chunk.shape[1:])} where others gave "
            f"{tuple(pad.shape[1:])}; make every stream's time steps the same shape"
        )
    if chunk.dtype != pad.dtype:
        chunk = chunk.to(pad.dtype)
    steps = chunk.shape[0]
    return chunk if steps == pad.shape[0] else torch.cat((chunk, pad[steps:]))


def _as_tensor(value: Any, describe: Callable[[], str]) -> torch.Tensor:
    """A chunk as a tensor with a time axis first; ``describe()`` names it in errors."""
    if type(value) is torch.Tensor and value.dim() > 0:
        return value
    what = describe()
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()  # torch.as_tensor warns about read-only arrays
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{what} should give an array or tensor of shape [time, ...], but got "
            f"{type(value).__name__}: {exc}"
        ) from exc
    if tensor.dim() == 0:
        raise ValueError(f"{what} should give an array of shape [time, ...], but got a scalar")
    return tensor


# ------------------------------------------------------------------ the two sources


class _RandomAccess:
    """``read(stream, start, stop)``: no state to keep."""

    def __init__(self, read: Reader) -> None:
        self.read_fn = read

    def read(self, slot: int, chunk: StreamChunk, chunk_size: int) -> torch.Tensor:
        def what() -> str:
            return f"read(stream={chunk.stream}, start={chunk.start}, stop={chunk.stop})"

        tensor = _as_tensor(self.read_fn(chunk.stream, chunk.start, chunk.stop), what)
        if tensor.shape[0] != chunk.stop - chunk.start:
            raise ValueError(
                f"{what()} should give {chunk.stop - chunk.start} time steps (stop - start), but "
                f"gave shape {tuple(tensor.shape)}; fix read() or the stream_lengths given "
                "to StreamSampler"
            )
        return tensor

    def probe(self) -> torch.Tensor:
        return _as_tensor(self.read_fn(0, 0, 1), lambda: "read(stream=0, start=0, stop=1)")

    def retain(self, slots: Iterable[int]) -> None:
        pass

    def open_streams(self) -> dict[int, int]:
        return {}

    def fresh(self) -> _RandomAccess:
        return self

    def __repr__(self) -> str:
        return f"read={self.read_fn!r}"


@dataclasses.dataclass
class _Open:
    """An open iterator over a stream, and the time step its next chunk starts at."""

    stream: int
    position: int
    chunks: Iterator[Any]


class _Iterators:
    """``iterate(stream)``: one open iterator per slot (NOTE [ Stream affinity ])."""

    def __init__(self, iterate: Opener) -> None:
        self.iterate = iterate
        self._open: dict[int, _Open] = {}

    def read(self, slot: int, chunk: StreamChunk, chunk_size: int) -> torch.Tensor:
        current = self._open.get(slot)
        if current is None or current.stream != chunk.stream or current.position != chunk.start:
            self._close(slot)
            current = self._open[slot] = self._open_at(chunk, chunk_size)
        try:
            tensor = self._next(current, chunk, chunk_size)
        except BaseException:
            self._close(slot)
            raise
        current.position = chunk.stop
        if chunk.last:
            self._close(slot)
        return tensor

    def _open_at(self, chunk: StreamChunk, chunk_size: int) -> _Open:
        """Open the stream and read up to ``chunk`` (a re-read unless it is the first)."""
        opened = _Open(chunk.stream, 0, iter(self.iterate(chunk.stream)))
        while opened.position < chunk.start:
            if next(opened.chunks, _END) is _END:
                _close_iterator(opened.chunks)
                raise _ended_early(chunk, opened.position // chunk_size)
            opened.position += chunk_size
        return opened

    def _next(self, current: _Open, chunk: StreamChunk, chunk_size: int) -> torch.Tensor:
        value = next(current.chunks, _END)
        if (
            type(value) is torch.Tensor
            and value.dim()
            and value.shape[0] == chunk.stop - chunk.start
        ):
            return value  # the common case, checked at the least cost
        return _checked_chunk(value, chunk, chunk_size)

    def probe(self) -> torch.Tensor:
        chunks = iter(self.iterate(0))
        try:
            value = next(chunks, _END)
        finally:
            _close_iterator(chunks)
        if value is _END:
            raise ValueError("iterate(0) yielded no chunk; every stream needs at least one")
        return _as_tensor(value, lambda: "iterate(0) chunk 0")

    def retain(self, slots: Iterable[int]) -> None:
        keep = set(slots)
        for slot in [slot for slot in self._open if slot not in keep]:
            self._close(slot)

    def open_streams(self) -> dict[int, int]:
        return {slot: opened.stream for slot, opened in self._open.items()}

    def fresh(self) -> _Iterators:
        return _Iterators(self.iterate)

    def _close(self, slot: int) -> None:
        opened = self._open.pop(slot, None)
        if opened is not None:
            _close_iterator(opened.chunks)

    def __repr__(self) -> str:
        return f"iterate={self.iterate!r}"


_END = object()


def _checked_chunk(value: Any, chunk: StreamChunk, chunk_size: int) -> torch.Tensor:
    """What ``iterate()`` yielded for ``chunk``, as a tensor of its time steps, or an error."""
    if value is _END:
        raise _ended_early(chunk, chunk.start // chunk_size)

    def what() -> str:
        return f"iterate({chunk.stream}) chunk {chunk.start // chunk_size}"

    tensor = _as_tensor(value, what)
    want, steps = chunk.stop - chunk.start, tensor.shape[0]
    if steps == want:
        return tensor
    if chunk.last and steps == chunk_size:
        return tensor[:want]
    raise ValueError(
        f"{what()} should have {want} time steps (time steps [{chunk.start}, {chunk.stop}) "
        f"of the stream), but has shape {tuple(tensor.shape)}; yield chunk_size="
        f"{chunk_size} steps per chunk (the last may be shorter), or fix stream_lengths"
    )


def _close_iterator(chunks: Iterator[Any]) -> None:
    close = getattr(chunks, "close", None)
    if callable(close):
        close()


def _ended_early(chunk: StreamChunk, index: int) -> ValueError:
    return ValueError(
        f"iterate({chunk.stream}) ended after {index} chunk(s), but StreamSampler expects "
        f"time steps [{chunk.start}, {chunk.stop}) of it; the stream is shorter than its "
        "stream_lengths entry says: fix stream_lengths"
    )
