"""The steps a StreamSampler yields, and how a step is split across workers.

NOTE [ Stream worker layout ]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With workers, every step is split: each worker reads the same slots from the first step of
an epoch to the last, so a stream never leaves the worker that opened it. Which slots go
together is the *layout* (:func:`worker_layout`), a pure function of the epoch's
``slot_loads`` (the chunks each slot reads in the epoch, which every step carries) and of
the number of parts:

* every part has ``batch_size // parts`` slots, the first ``batch_size % parts`` parts one
  more, so the workers read about as many rows at every step and keep pace with each
  other (the loader only lets a worker run a few steps ahead of the slowest);
* within that, slots are dealt heaviest first (the lowest slot on ties) to the part with
  the fewest chunks so far that has room (then the fewest slots, then the lowest part).

The epoch ends when its busiest worker is done, so evening the chunks out shortens it: on
the streams of ``benchmarks/streams_vs_stream_dataloader.py`` over 20 epochs, slot ``b`` to worker
``b % 2`` gave the busier of two workers 0.6 to 10.3 % more chunks than the other, this
layout 0 to 1.1 %. When all slots are equally loaded (``pad="restream"``) or
``slot_loads`` is empty, the layout is slot ``b`` to part ``b % parts``.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Slot", "StreamChunk", "StreamPadding", "StreamPart", "StreamStep", "worker_layout"]

_Spec = TypeVar("_Spec")

#: Layouts remembered by :func:`worker_layout`: one per epoch and number of workers in use.
#: A few cover a training loader, a validation loader and a resume; each is a few tuples.
LAYOUT_CACHE = 16


def _pickled_as_tuples(cls: type[_Spec]) -> type[_Spec]:
    """Pickle a frozen slots dataclass as the tuple of its fields.

    Every step travels to the workers pickled, a part holding a dozen of these objects, and
    dataclasses' own ``__setstate__`` for frozen slots classes looks the fields up again
    for every object it restores: a third of the time it takes to unpickle a part.
    """
    names = tuple(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    values_of = operator.attrgetter(*names)

    def __getstate__(self: _Spec) -> tuple[Any, ...]:
        return values_of(self)

    def __setstate__(self: _Spec, values: tuple[Any, ...]) -> None:
        for name, value in zip(names, values, strict=True):
            object.__setattr__(self, name, value)

    cls.__getstate__ = __getstate__  # type: ignore[attr-defined]
    cls.__setstate__ = __setstate__  # type: ignore[attr-defined]
    return cls


@_pickled_as_tuples
@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What a slot reads at one step: time steps ``[start, stop)`` of ``stream``.

    Attributes:
        stream: The stream's index into ``stream_lengths``.
        start: First time step of the chunk.
        stop: One past its last time step (``stop - start <= chunk_size``).
        first: The chunk begins the stream: reset the recurrent state of this row.
        last: The chunk ends the stream: the slot takes another stream next step.
        repeat: The stream is read again to fill the slot (``pad="restream"``).
    """

    stream: int
    start: int
    stop: int
    first: bool
    last: bool
    repeat: bool = False


@dataclass(frozen=True, slots=True)
class StreamPadding:
    """A slot with nothing to read at this step (``pad="dummy"``): mask it out."""

    def __reduce__(self) -> tuple[type[StreamPadding], tuple[()]]:
        return (StreamPadding, ())  # no state: cheaper than dataclasses' frozen pickling


#: What one slot of a step holds.
Slot = StreamChunk | StreamPadding


@_pickled_as_tuples
@dataclass(frozen=True, slots=True)
class StreamPart:
    """The slots of one :class:`StreamStep` that one worker reads.

    Attributes:
        step: The step's position in the epoch.
        chunk_size: Time steps per chunk.
        slot_ids: Which slots of the step these are, ascending (see NOTE [ Stream worker
            layout ] in ``_stream_steps.py``).
        slots: What each of them reads, in the order of ``slot_ids``.
        final: This is the epoch's last step.
    """

    step: int
    chunk_size: int
    slot_ids: tuple[int, ...]
    slots: tuple[Slot, ...]
    final: bool = False


@_pickled_as_tuples
@dataclass(frozen=True, slots=True)
class StreamStep:
    """One step of a :class:`StreamSampler`: a chunk (or padding) for each slot.

    Handed to the dataset whole when ``num_workers=0``. With workers, poolloader's
    ``DataLoader`` splits it into one :class:`StreamPart` per worker, and each worker
    reads the same slots for the whole epoch (NOTE [ Stream worker layout ]), so a stream
    stays in one worker from its first chunk to its last (an open iterator over it never
    moves). The parts are merged back in slot order by
    ``type(part_batch).merge_slots(part_batches, slot_ids)``, ``slot_ids[i]`` being the
    slots of part ``i`` (:class:`~poolloader.datasets.StreamBatch` has it).

    Attributes:
        step: The step's position in the epoch.
        chunk_size: Time steps per chunk (the batch's time dimension).
        slots: What each slot reads, ``batch_size`` of them.
        final: This is the epoch's last step: a reader may close what it holds open
            (streams cut by the end of the epoch).
        slot_loads: The chunks each slot reads in the whole epoch (the same for every
            step of it), to share them evenly between workers; empty: unknown.

    Example:
        >>> chunk = StreamChunk(7, 0, 4, first=True, last=False)
        >>> step = StreamStep(0, 4, (chunk, StreamPadding()))
        >>> [part.slot_ids for _, part in step.poolloader_split(2)]
        [(0,), (1,)]
    """

    step: int
    chunk_size: int
    slots: tuple[Slot, ...]
    final: bool = False
    slot_loads: tuple[int, ...] = ()

    @property
    def slot_ids(self) -> tuple[int, ...]:
        """All slots, ``0 .. batch_size - 1``."""
        return tuple(range(len(self.slots)))

    def layout(self, parts: int) -> tuple[tuple[int, ...], ...]:
        """The slots of each of ``parts`` parts (NOTE [ Stream worker layout ])."""
        return worker_layout(self.slot_loads, len(self.slots), parts)

    def part(self, worker: int, parts: int) -> StreamPart:
        """Part ``worker`` of ``parts``: the slots :meth:`layout` gives that worker."""
        ids = self.layout(parts)[worker]
        slots = tuple(self.slots[b] for b in ids)
        return StreamPart(self.step, self.chunk_size, ids, slots, self.final)

    def poolloader_split(self, num_workers: int) -> list[tuple[int, StreamPart]]:
        """Split across ``min(num_workers, batch_size)`` workers, part ``w`` to worker ``w``."""
        parts = min(num_workers, len(self.slots))
        return [(worker, self.part(worker, parts)) for worker in range(parts)]

    def poolloader_merge(self, parts: Sequence[Any]) -> Any:
        """The batch of the whole step from what the dataset returned for each part."""
        merge = getattr(type(parts[0]), "merge_slots", None)
        if merge is None:
            raise TypeError(
                f"the dataset returned a {type(parts[0]).__name__} for a StreamPart, which has "
                "no merge_slots() to join the parts of a StreamStep; return a StreamBatch "
                "(poolloader.datasets.StreamDataset does) or use num_workers=0"
            )
        return merge(parts, self.layout(len(parts)))

    def __repr__(self) -> str:
        shown = ", ".join(_slot_repr(slot) for slot in self.slots[:8])
        more = ", ..." if len(self.slots) > 8 else ""
        return f"StreamStep(step={self.step}, slots=[{shown}{more}])"


def _slot_repr(slot: Slot) -> str:
    if isinstance(slot, StreamPadding):
        return "pad"
    flags = ("^" if slot.first else "") + ("*" if slot.repeat else "")
    return f"{slot.stream}[{slot.start}:{slot.stop}]{flags}"


@functools.lru_cache(maxsize=LAYOUT_CACHE)
def worker_layout(
    slot_loads: tuple[int, ...], batch_size: int, parts: int
) -> tuple[tuple[int, ...], ...]:
    """The slots of each of ``parts`` parts, ascending (NOTE [ Stream worker layout ]).

    Args:
        slot_loads: Chunks each slot reads in the epoch, or ``()`` when unknown.
        batch_size: Slots per step.
        parts: Parts to split into, ``1 <= parts <= batch_size``.

    Example:
        >>> worker_layout((9, 1, 1, 9), 4, 2)
        ((0, 1), (2, 3))
        >>> worker_layout((), 5, 2)
        ((0, 2, 4), (1, 3))
    """
    loads = slot_loads or (0,) * batch_size
    room = [batch_size // parts + (part < batch_size % parts) for part in range(parts)]
    chunks = [0] * parts
    members: list[list[int]] = [[] for _ in range(parts)]
    for slot in sorted(range(batch_size), key=lambda b: (-loads[b], b)):
        part = min(
            (p for p in range(parts) if len(members[p]) < room[p]),
            key=lambda p: (chunks[p], len(members[p]), p),
        )
        members[part].append(slot)
        chunks[part] += loads[slot]
    return tuple(tuple(sorted(ids)) for ids in members)
