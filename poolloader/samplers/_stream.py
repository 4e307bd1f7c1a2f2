"""StreamSampler: temporally coherent steps over many streams, for recurrent models.

NOTE [ Stream schedule ]
~~~~~~~~~~~~~~~~~~~~~~~~
A stream of length ``L`` is read in ``ceil(L / chunk_size)`` chunks of ``chunk_size`` time
steps (the last may be shorter). A step gives each of ``batch_size`` *slots* one chunk, and
a slot keeps its stream until the stream ends, so row ``b`` of step ``t + 1`` continues row
``b`` of step ``t`` unless it is flagged ``first``.

Everything is a pure function of ``(stream lengths, arguments, seed + epoch)``:

1. *Order*: the epoch's stream order is ``arange(S)``, or with ``shuffle=True`` a PCG64
   permutation seeded by ``seed + epoch`` (the same on every rank).
2. *Shards* (:func:`shard_streams`): streams go to ranks in that order, each to the rank
   with the fewest chunks so far (the lowest rank on ties), so the shards are disjoint and
   their work is balanced.
3. *Slots* (:class:`SlotPlan`): within a rank, streams are assigned just in time. A slot
   whose stream's last chunk was at step ``t - 1`` takes the next unassigned stream at step
   ``t``; slots freed at the same step take streams in slot order. Long and short streams
   mix, and no slot idles while a stream is left.
4. *Length*: a rank's streams are delivered by step ``E_r`` (the latest slot end). The epoch
   has ``max_r E_r`` steps on every rank, so no rank waits for another. With
   ``drop_incomplete=True`` it ends instead at ``min_r F_r``, ``F_r`` being the first step
   at which a slot of rank ``r`` finds no stream left: every step is then full of real
   data, and the streams still running at that step are cut short.
5. *Padding*: a slot with nothing to read is a :class:`StreamPadding` (``pad="dummy"``),
   or (``pad="restream"``) reads a stream again from its start, flagged ``repeat``: the
   ``k``-th such read of rank ``r`` takes stream ``order[(k * world_size + r) % S]``, just
   in time like real streams, and is cut at the end of the epoch.

So the position in an epoch is the number of steps yielded: the state holds it and what
shapes the schedule; a resumed epoch rebuilds the schedule and continues at that step.
Each step also carries the chunks each slot reads in the epoch, from which the loader
gives every worker the same slots all epoch long (NOTE [ Stream worker layout ] in
``_stream_steps.py``); that changes which process reads a row, never what it holds.
"""

from __future__ import annotations

import bisect
import heapq
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.data import Sampler

from poolloader.samplers._base import SeededRanked
from poolloader.samplers._checks import (
    LengthsLike,
    as_lengths,
    check_non_negative_int,
    check_positive_int,
)
from poolloader.samplers._stream_steps import (
    Slot,
    StreamChunk,
    StreamPadding,
    StreamPart,
    StreamStep,
    worker_layout,
)

__all__ = [
    "EpochPlan", "SlotPlan", "StreamChunk", "StreamEpochIterator", "StreamPadding", "StreamPart",
    "StreamSampler", "StreamStep", "chunk_counts", "fill_with_restreams", "plan_rank",
    "shard_streams", "slot_loads", "stream_order", "worker_layout",
]  # fmt: skip

IntArray = npt.NDArray[np.int64]
StateValue = int | str | None
State = dict[str, StateValue]


# ------------------------------------------------------------------ the schedule (pure)


def chunk_counts(lengths: IntArray, chunk_size: int) -> IntArray:
    """Chunks per stream: ``ceil(length / chunk_size)``.

    Example:
        >>> chunk_counts(np.array([1, 4, 5]), 4).tolist()
        [1, 1, 2]
    """
    return np.asarray(-(-lengths // chunk_size), dtype=np.int64)


def stream_order(num_streams: int, seed: int, epoch: int, shuffle: bool) -> IntArray:
    """The epoch's stream order: ``arange``, or a PCG64 permutation seeded by ``seed + epoch``."""
    if not shuffle:
        return np.arange(num_streams, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed + epoch)))
    return rng.permutation(num_streams).astype(np.int64)


def shard_streams(order: IntArray, chunks: IntArray, world_size: int) -> list[IntArray]:
    """Disjoint shards: each stream, in ``order``, goes to the rank with the fewest chunks.

    Ties go to the lowest rank, so the result depends on nothing else.

    Example:
        >>> [s.tolist() for s in shard_streams(np.array([0, 1, 2]), np.array([5, 1, 1]), 2)]
        [[0], [1, 2]]
    """
    heap = [(0, rank) for rank in range(world_size)]
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for stream in order.tolist():
        load, rank = heapq.heappop(heap)
        shards[rank].append(stream)
        heapq.heappush(heap, (load + int(chunks[stream]), rank))
    return [np.asarray(shard, dtype=np.int64) for shard in shards]


class SlotPlan:
    """Which stream each slot of one rank reads, from which step on: just-in-time assignment.

    :meth:`assign` gives the next stream to the slot that frees first (the lowest slot among
    those freeing at the same step).

    Example:
        >>> plan = SlotPlan(2)
        >>> for stream, chunks in [(0, 3), (1, 1), (2, 1)]:
        ...     plan.assign(stream, chunks)
        >>> plan.starts, plan.locate(1, 1), plan.last_free
        ([[0], [0, 1]], (2, 0, False), 3)
    """

    def __init__(self, batch_size: int) -> None:
        #: Per slot, the step each of its streams starts at.
        self.starts: list[list[int]] = [[] for _ in range(batch_size)]
        #: Per slot, ``(stream, chunks, repeat)`` of each of its streams.
        self.runs: list[list[tuple[int, int, bool]]] = [[] for _ in range(batch_size)]
        self._free = [(0, slot) for slot in range(batch_size)]  # heap: (step it frees, slot)

    @property
    def first_free(self) -> int:
        """The earliest step at which some slot has nothing to read."""
        return self._free[0][0]

    @property
    def last_free(self) -> int:
        """The step by which every assigned stream has been read."""
        return max(step for step, _ in self._free)

    def assign(self, stream: int, chunks: int, repeat: bool = False) -> None:
        """Give ``stream`` (``chunks`` chunks long) to the slot that frees first."""
        step, slot = heapq.heappop(self._free)
        self.starts[slot].append(step)
        self.runs[slot].append((stream, chunks, repeat))
        heapq.heappush(self._free, (step + chunks, slot))

    def locate(self, slot: int, step: int) -> tuple[int, int, bool] | None:
        """``(stream, chunk index, repeat)`` that ``slot`` reads at ``step``, if any."""
        i = bisect.bisect_right(self.starts[slot], step) - 1
        if i < 0:
            return None
        stream, chunks, repeat = self.runs[slot][i]
        index = step - self.starts[slot][i]
        return (stream, index, repeat) if index < chunks else None


def plan_rank(streams: IntArray, chunks: IntArray, batch_size: int) -> SlotPlan:
    """The just-in-time slot plan of one rank's ``streams``, in order."""
    plan = SlotPlan(batch_size)
    for stream in streams.tolist():
        plan.assign(stream, int(chunks[stream]))
    return plan


def fill_with_restreams(
    plan: SlotPlan, num_steps: int, order: IntArray, chunks: IntArray, rank: int, world_size: int
) -> None:
    """Fill the idle slot-steps before ``num_steps`` by re-reading streams (NOTE, point 5)."""
    draw = 0
    while plan.first_free < num_steps:
        stream = int(order[(draw * world_size + rank) % order.size])
        plan.assign(stream, int(chunks[stream]), repeat=True)
        draw += 1


def slot_loads(plan: SlotPlan, num_steps: int) -> tuple[int, ...]:
    """Chunks each slot reads in the epoch's first ``num_steps`` steps, padding excluded.

    Example:
        >>> plan = SlotPlan(2)
        >>> for stream, chunks in [(0, 3), (1, 1), (2, 4)]:
        ...     plan.assign(stream, chunks)
        >>> slot_loads(plan, 4)
        (3, 4)
    """
    return tuple(
        sum(max(0, min(run[1], num_steps - start)) for start, run in zip(starts, runs, strict=True))
        for starts, runs in zip(plan.starts, plan.runs, strict=True)
    )


@dataclass(frozen=True)
class EpochPlan:
    """One rank's schedule of one epoch: its slot plan and the epoch's number of steps."""

    plan: SlotPlan
    num_steps: int
    streams: IntArray  # this rank's shard, in assignment order
    lengths: IntArray
    chunk_size: int
    slot_loads: tuple[int, ...]  # see NOTE [ Stream worker layout ] in _stream_steps.py

    def step(self, step: int) -> StreamStep:
        """The spec of step ``step`` (``0 <= step < num_steps``)."""
        slots = tuple(self._slot(slot, step) for slot in range(len(self.plan.starts)))
        final = step == self.num_steps - 1
        return StreamStep(step, self.chunk_size, slots, final, self.slot_loads)

    def _slot(self, slot: int, step: int) -> Slot:
        found = self.plan.locate(slot, step)
        if found is None:
            return StreamPadding()
        stream, index, repeat = found
        length = int(self.lengths[stream])
        start = index * self.chunk_size
        stop = min(start + self.chunk_size, length)
        last = stop == length
        return StreamChunk(stream, start, stop, first=index == 0, last=last, repeat=repeat)


# ------------------------------------------------------------------ the sampler


class StreamEpochIterator(Iterator[StreamStep]):
    """One epoch of a :class:`StreamSampler` for one rank; owns the position: ``step``,
    the steps yielded so far (a resumed epoch starts past 0)."""

    def __init__(self, sampler: StreamSampler, epoch: int, plan: EpochPlan, step: int = 0):
        self._sampler = sampler
        self.epoch = epoch
        self._plan = plan
        self.step = step

    @property
    def exhausted(self) -> bool:
        """Whether every step of the epoch has been yielded."""
        return self.step >= self._plan.num_steps

    def __next__(self) -> StreamStep:
        if self.exhausted:
            raise StopIteration
        spec = self._plan.step(self.step)
        self.step += 1
        return spec

    def state_dict(self) -> State:
        """The sampler's state at this iterator's position."""
        return self._sampler._state_at(self.epoch, self.step)


class StreamSampler(SeededRanked, Sampler[StreamStep]):
    """Temporally coherent steps over many streams, for recurrent models (truncated BPTT).

    Each step is a :class:`StreamStep`: ``batch_size`` slots, each with the next chunk of
    ``chunk_size`` time steps of the stream it holds (flagged ``first`` when it begins the
    stream). A slot keeps its stream to the end, then takes the next unassigned stream at
    the very next step. Idle slots are :class:`StreamPadding` (``pad="dummy"``) or read
    streams again (``pad="restream"``, flagged ``repeat``). The epoch ends when every
    stream has been delivered; with ``drop_incomplete=True`` it ends as soon as a slot can
    get no new stream, so every step is full of real data and the streams still running
    are cut. Ranks read disjoint shards and yield the same number of steps. See
    NOTE [ Stream schedule ] in this module.

    The samplers' protocol (NOTE [ Sampler protocol ] in ``_base.py``) holds, except that
    steps are :class:`StreamStep` rather than lists of indices. Use it with
    :class:`~poolloader.datasets.StreamDataset` and ``DataLoader(..., batch_size=None)``.

    Args:
        stream_lengths: Time steps in each stream, one positive integer per stream.
        batch_size: Slots per step (streams read side by side).
        chunk_size: Time steps per chunk.
        shuffle: Shuffle the stream order each epoch with ``seed + epoch``.
        seed: Base seed.
        pad: ``"dummy"`` or ``"restream"``: what idle slots get.
        drop_incomplete: End the epoch when a slot can get no new stream.
        rank: This process's rank, or ``None`` to resolve it.
        world_size: Number of ranks, or ``None`` to resolve it.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.

    Example:
        >>> sampler = StreamSampler([5, 2, 3], batch_size=2, chunk_size=2)
        >>> for step in sampler:
        ...     print(step)
        StreamStep(step=0, slots=[0[0:2]^, 1[0:2]^])
        StreamStep(step=1, slots=[0[2:4], 2[0:2]^])
        StreamStep(step=2, slots=[0[4:5], 2[2:3]])
    """

    def __init__(
        self,
        stream_lengths: LengthsLike,
        *,
        batch_size: int,
        chunk_size: int,
        shuffle: bool = False,
        seed: int = 0,
        pad: str = "dummy",
        drop_incomplete: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self._lengths = _stream_lengths(stream_lengths)
        self._batch_size = check_positive_int("batch_size", batch_size)
        self._chunk_size = check_positive_int("chunk_size", chunk_size)
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if pad not in ("dummy", "restream"):
            raise ValueError(
                f"pad should be 'dummy' or 'restream', but got pad={pad!r} "
                "(pytorch-stream-dataloader's 'zeros' is 'dummy', its 'data' is 'restream')"
            )
        self._pad = pad
        self._shuffle = bool(shuffle)
        self._drop_incomplete = bool(drop_incomplete)
        self._chunks = chunk_counts(self._lengths, self._chunk_size)
        # CRC-32 of the stream lengths and the options that shape the schedule
        options = f"{self._shuffle},{self._pad},{self._drop_incomplete}".encode()
        self._fingerprint = zlib.crc32(options, zlib.crc32(self._lengths.tobytes()))
        self._active: StreamEpochIterator | None = None
        self._pending: StreamEpochIterator | None = None
        self._cached: tuple[int, EpochPlan] | None = None

    # -- properties

    @property
    def num_streams(self) -> int:
        """How many streams there are (all ranks together)."""
        return int(self._lengths.size)

    @property
    def batch_size(self) -> int:
        """Slots per step."""
        return self._batch_size

    @property
    def chunk_size(self) -> int:
        """Time steps per chunk."""
        return self._chunk_size

    @property
    def shuffle(self) -> bool:
        """Whether the stream order is shuffled each epoch."""
        return self._shuffle

    @property
    def pad(self) -> str:
        """``"dummy"`` or ``"restream"``."""
        return self._pad

    @property
    def drop_incomplete(self) -> bool:
        """Whether the epoch ends as soon as a slot can get no new stream."""
        return self._drop_incomplete

    def rank_streams(self, epoch: int | None = None) -> list[int]:
        """The streams this rank reads in ``epoch`` (default: the current one), in order.

        Restreamed padding is not included: it may read any stream.
        """
        chosen = self._epoch if epoch is None else check_non_negative_int("epoch", epoch)
        return self._epoch_plan(chosen).streams.tolist()

    # -- the protocol

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` runs (a non-negative integer).

        Setting the epoch a loaded state belongs to keeps that state; any other epoch
        discards it.
        """
        epoch = check_non_negative_int("epoch", epoch)
        if epoch != self._epoch:
            self._active = None
            self._pending = None
        self._epoch = epoch

    def __iter__(self) -> StreamEpochIterator:
        iterator = self._pending if self._pending is not None else self._fresh()
        self._pending = None
        self._active = iterator
        return iterator

    def __len__(self) -> int:
        """Steps every rank yields in the current epoch."""
        return self._epoch_plan(self._epoch).num_steps

    def state_dict(self) -> State:
        """The state at the current position: the latest iterator's, or the epoch's start.

        Returns:
            A small dict of ints and strings, the same on every rank.
        """
        current = self._pending if self._pending is not None else self._active
        if current is None:
            return self._state_at(self._epoch, 0)
        return self._state_at(current.epoch, current.step)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next ``iter()`` resumes there.

        Args:
            state: A dict returned by ``state_dict()`` of a sampler built with the same
                stream lengths and arguments (any rank's).

        Raises:
            TypeError: ``state`` is not a mapping, or a value has the wrong type.
            ValueError: Keys are unknown or missing, the state was saved by another kind
                of sampler or with other arguments, or its step is past the epoch's end.
        """
        _check_state(state, self._state_at(0, 0))
        epoch = check_non_negative_int("state['epoch']", state["epoch"])
        step = check_non_negative_int("state['step']", state["step"])
        plan = self._epoch_plan(epoch)
        if step > plan.num_steps:
            raise ValueError(
                f"state['step'] should be at most {plan.num_steps}, the steps of epoch "
                f"{epoch}, but got step={step}; was the state saved on other stream lengths?"
            )
        self._epoch = epoch
        self._active = None
        self._pending = StreamEpochIterator(self, epoch, plan, step)

    # -- internals

    def _fresh(self) -> StreamEpochIterator:
        return StreamEpochIterator(self, self._epoch, self._epoch_plan(self._epoch))

    def _state_at(self, epoch: int, step: int) -> State:
        return {
            "sampler": type(self).__name__,
            "epoch": epoch,
            "seed": self._seed,
            "world_size": self._world_size,
            "batch_size": self._batch_size,
            "chunk_size": self._chunk_size,
            "fingerprint": self._fingerprint,
            "step": step,
        }

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build_plan(epoch))
        return self._cached[1]

    def _build_plan(self, epoch: int) -> EpochPlan:
        order = stream_order(self.num_streams, self._seed, epoch, self._shuffle)
        shards = shard_streams(order, self._chunks, self._world_size)
        plans = [plan_rank(shard, self._chunks, self._batch_size) for shard in shards]
        if self._drop_incomplete:
            num_steps = min(plan.first_free for plan in plans)
        else:
            num_steps = max(plan.last_free for plan in plans)
        own = plans[self._rank]
        if self._pad == "restream" and not self._drop_incomplete:
            fill_with_restreams(own, num_steps, order, self._chunks, self._rank, self._world_size)
        loads = slot_loads(own, num_steps)
        return EpochPlan(own, num_steps, shards[self._rank], self._lengths, self._chunk_size, loads)


def _check_state(state: Mapping[str, Any], mine: State) -> None:
    """Refuse a state with other keys, or saved by another sampler or other arguments."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state should be a dict returned by state_dict(), but got {type(state).__name__}"
        )
    unknown = sorted(set(state) - set(mine))
    missing = [key for key in mine if key not in state]
    if unknown or missing:
        raise ValueError(
            f"StreamSampler.load_state_dict() got a state with unknown keys {unknown} and "
            f"missing keys {missing}; it expects exactly {list(mine)}. Pass a dict returned "
            "by StreamSampler.state_dict()"
        )
    if state["sampler"] != mine["sampler"]:
        raise ValueError(
            f"this state was saved by a {state['sampler']!r}, not a 'StreamSampler'; load it "
            "into the kind of sampler that saved it"
        )
    for key in ("seed", "world_size", "batch_size", "chunk_size", "fingerprint"):
        if state[key] != mine[key]:
            what = (
                "stream lengths, shuffle, pad and drop_incomplete" if key == "fingerprint" else key
            )
            raise ValueError(
                f"this state was saved with {key}={state[key]!r}, but this StreamSampler has "
                f"{key}={mine[key]!r}; build the sampler with the same {what} to resume"
            )


def _stream_lengths(stream_lengths: LengthsLike) -> IntArray:
    """Validate ``stream_lengths``: a non-empty 1-D sequence of positive integers."""
    values = as_lengths(stream_lengths)
    bad = np.flatnonzero((values < 1) | (values != np.floor(values)))
    if bad.size:
        first = int(bad[0])
        raise ValueError(
            "stream_lengths should hold positive integers (time steps per stream), but got "
            f"stream_lengths[{first}]={float(values[first])!r} ({bad.size} such stream(s) in "
            "all); drop empty streams and pass whole numbers of time steps"
        )
    lengths = values.astype(np.int64)
    lengths.flags.writeable = False
    return lengths
