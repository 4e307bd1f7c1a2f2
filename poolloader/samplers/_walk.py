"""Lazy batches from groups of items: the engine under the dynamic and sorted samplers.

NOTE [ Lazy batches and exact resume ]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A *pass* is one sweep over the data. Its item order is fixed by ``seed + pass`` alone: a
list of *groups* (length buckets for the dynamic sampler, runs of the sorted order for the
sorted one), each an ordered array of items. Nothing about batches is fixed in advance.

Each step of a pass draws a group and cuts the next batch from that group's *cursor*: the
longest run that the constraint in effect admits (:func:`~._constraint.cut_batch`). When
shuffling, the group is drawn at random, weighted by the batches it still holds (so groups
run out together), with one PCG64 draw per step from a stream seeded by ``seed + pass``;
otherwise groups are taken in order. Batch contents therefore depend only on the item
order and the limits at the moment each batch is cut, and the batch order only on the
number of draws so far.

So the position is ``(pass, draws, formed, cursors)``: resuming regenerates the pass's item
order, advances the PCG64 stream by ``draws`` (O(1)) and puts every cursor back. That stays
exact when limits changed mid-pass, because what was consumed is recorded as cursors, not
as a number of batches to replay. The state is O(number of groups), independent of the
number of items.

Ranks: every rank runs the same global walk. In each *round* it cuts ``world_size``
batches and keeps the one at its rank, so a limit change on all ranks at the same step
applies from the next round (the next batch when ``world_size == 1``). When the pass runs
out mid-round, the formula in :mod:`._distributed` decides: drop the round, or pad it by
re-cutting batches from the start of the pass.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from poolloader.samplers._base import EpochIterator, SamplerBase, State
from poolloader.samplers._checks import check_non_negative_int, check_optional_positive_int
from poolloader.samplers._constraint import BatchConstraint, next_batch_end
from poolloader.samplers._distributed import batches_per_rank, shard_position

__all__ = ["ITEM_STREAM", "Group", "GroupEpochIterator", "GroupedSampler", "PassWalk", "pass_seed"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
#: A batch as cut from a walk: (group, start, stop) with items ``group.items[start:stop]``.
Cut = tuple[int, int, int]

#: Random stream that orders items within a pass (used by samplers that shuffle items).
ITEM_STREAM = 0
#: Random stream that draws the group of each batch.
_BATCH_STREAM = 1


def pass_seed(seed: int, pass_index: int, stream: int) -> np.random.SeedSequence:
    """The seed of one random stream of one pass: ``seed + pass`` split by stream."""
    return np.random.SeedSequence(seed + pass_index, spawn_key=(stream,))


@dataclasses.dataclass(frozen=True)
class Group:
    """An ordered run of items that batches are cut from, front to back.

    Args:
        items: Item indices, in order.
        lengths: Their lengths.
    """

    items: IntArray
    lengths: FloatArray
    #: ``prefix[i]`` is the total length of the first ``i`` items.
    prefix: FloatArray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", np.concatenate(([0.0], np.cumsum(self.lengths))))

    def mass_from(self, cursors: IntArray | int) -> FloatArray:
        """The total length of the items from ``cursors`` to the end."""
        return np.asarray(self.prefix[-1] - self.prefix[cursors], dtype=np.float64)

    @classmethod
    def of(cls, items: IntArray, all_lengths: FloatArray) -> Group:
        """The group of ``items``, their lengths looked up in ``all_lengths``."""
        return cls(items=items, lengths=all_lengths[items])


class PassWalk:
    """One pass over a list of groups, cutting batches lazily; owns the cursors.

    Args:
        groups: The pass's groups, in order.
        pass_index: Which pass this is (seeds the draws).
        seed: The sampler's base seed.
        shuffle: Draw groups at random (else take them in order).
        drop_last: Drop a group's final batch when it is not full.
        cursors: Where each group resumes (default: its start).
        draws: Random draws already made in this pass.
        formed: Batches already kept in this pass.
    """

    def __init__(
        self,
        groups: Sequence[Group],
        *,
        pass_index: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        cursors: Sequence[int] | None = None,
        draws: int = 0,
        formed: int = 0,
    ) -> None:
        self.groups = groups
        self.pass_index = pass_index
        self.draws = draws
        self.formed = formed
        self._shuffle = shuffle
        self._drop_last = drop_last
        self._sizes = np.array([group.items.size for group in groups], dtype=np.int64)
        start = np.zeros(len(groups), dtype=np.int64) if cursors is None else cursors
        self.cursors = np.array(start, dtype=np.int64)
        self._left_mass = np.array(
            [g.mass_from(c) for g, c in zip(groups, self.cursors.tolist(), strict=True)],
            dtype=np.float64,
        )
        bits = np.random.PCG64(pass_seed(seed, pass_index, _BATCH_STREAM))
        self._rng = np.random.Generator(bits.advance(draws))

    def next_cut(self, constraint: BatchConstraint) -> Cut | None:
        """Cut the next batch to keep, or return ``None`` when the pass is over."""
        while True:
            group = self._choose(constraint)
            if group is None:
                return None
            start = int(self.cursors[group])
            lengths = self.groups[group].lengths
            stop, keep = next_batch_end(lengths, start, constraint, self._drop_last)
            self.cursors[group] = stop
            self._left_mass[group] = self.groups[group].mass_from(stop)
            if keep:
                self.formed += 1
                return group, start, stop

    def _choose(self, constraint: BatchConstraint) -> int | None:
        counts = self._sizes - self.cursors
        live = np.flatnonzero(counts)
        if live.size == 0:
            return None
        if not self._shuffle:
            return int(live[0])
        weights = np.cumsum(constraint.estimated_batches(counts, self._left_mass))
        self.draws += 1
        pick = np.searchsorted(weights, self._rng.random() * weights[-1], side="right")
        return min(int(pick), int(live[-1]))

    def indices(self, cut: Cut) -> list[int]:
        """The item indices of a batch returned by :meth:`next_cut`."""
        group, start, stop = cut
        return self.groups[group].items[start:stop].tolist()

    def count_remaining(self, constraint: BatchConstraint) -> int:
        """How many more batches this pass keeps if ``constraint`` stays in effect."""
        total = 0
        for group, cursor in zip(self.groups, self.cursors.tolist(), strict=True):
            while cursor < group.items.size:
                cursor, keep = next_batch_end(group.lengths, cursor, constraint, self._drop_last)
                total += keep
        return total


class GroupEpochIterator(EpochIterator):
    """One epoch of a :class:`GroupedSampler` for one rank.

    Without ``batches_per_epoch`` the epoch is one pass, sharded by the formula in
    :mod:`._distributed`. With it, passes follow one another and the epoch ends after
    ``batches_per_epoch`` rounds.
    """

    def __init__(
        self, sampler: GroupedSampler, epoch: int, walk: PassWalk, yielded: int = 0
    ) -> None:
        super().__init__(sampler, epoch)
        self._group_sampler = sampler
        self._walk = walk
        self.yielded = yielded

    def _next_batch(self) -> list[int] | None:
        per_epoch = self._group_sampler.batches_per_epoch
        if per_epoch is None:
            own, complete = self._round(self._next_pass_cut)
            batch = own if complete else self._last_round(own)
        elif self.yielded < per_epoch:
            own, complete = self._round(self._next_stream_cut)
            batch = own if complete else None
        else:
            batch = None
        if batch is not None:
            self.yielded += 1
        return batch

    def _round(self, next_cut: Callable[[], Cut | None]) -> tuple[list[int] | None, bool]:
        """Cut one round of ``world_size`` batches: (this rank's batch, round complete?)."""
        sampler = self._group_sampler
        own: list[int] | None = None
        for slot in range(sampler.world_size):
            cut = next_cut()
            if cut is None:
                return own, False
            if slot == sampler.rank:
                own = self._walk.indices(cut)
        return own, True

    def _next_pass_cut(self) -> Cut | None:
        return self._walk.next_cut(self._group_sampler.constraint)

    def _last_round(self, own: list[int] | None) -> list[int] | None:
        """This rank's batch of a round the pass ran out in: its own, a pad, or none."""
        sampler = self._group_sampler
        total = self._walk.formed
        if self.yielded >= batches_per_rank(total, sampler.world_size, sampler.drop_last):
            return None
        if own is not None:
            return own
        return self._replay(shard_position(self.yielded, sampler.rank, sampler.world_size, total))

    def _replay(self, position: int) -> list[int]:
        """Re-cut the pass's batch at ``position`` from its start, with the current limits.

        Limits raised mid-pass can leave fewer batches than ``position``; the count wraps.
        """
        walk = self._group_sampler._walk(self._walk.pass_index)
        cuts: list[Cut] = []
        while len(cuts) <= position:
            cut = walk.next_cut(self._group_sampler.constraint)
            if cut is None:
                break
            cuts.append(cut)
        return walk.indices(cuts[position % len(cuts)])

    def _next_stream_cut(self) -> Cut | None:
        """The next cut of the endless stream of passes (``batches_per_epoch``)."""
        constraint = self._group_sampler.constraint
        cut = self._walk.next_cut(constraint)
        if cut is None:
            self._walk = self._group_sampler._walk(self._walk.pass_index + 1)
            cut = self._walk.next_cut(constraint)
        return cut

    def skip(self, count: int) -> None:
        """Cut and discard ``count`` batches (how an epoch starts mid-stream)."""
        for _ in range(count):
            self._next_stream_cut()

    def position(self) -> State:
        """``pass``, ``draws``, ``formed``, ``yielded`` and one ``cursors`` entry per group."""
        return {
            "pass": self._walk.pass_index,
            "draws": self._walk.draws,
            "formed": self._walk.formed,
            "yielded": self.yielded,
            "cursors": self._walk.cursors.tolist(),
        }

    def planned_length(self) -> int:
        """Batches this rank yields in this epoch with the limits now in effect."""
        sampler = self._group_sampler
        if sampler.batches_per_epoch is not None:
            return sampler.batches_per_epoch
        total = self._walk.formed + self._walk.count_remaining(sampler.constraint)
        return batches_per_rank(total, sampler.world_size, sampler.drop_last)


class GroupedSampler(SamplerBase):
    """A sampler whose passes are groups of items cut into batches lazily.

    Subclasses say what the groups of a pass are (:meth:`_groups`) and which limits they
    expose. See NOTE [ Lazy batches and exact resume ] in this module.

    Args:
        lengths: Validated item lengths.
        constraint: The initial limits.
        shuffle: Draw groups at random; subclasses may also shuffle items.
        drop_last: Drop incomplete batches and the incomplete last round.
        batches_per_epoch: Fixed rounds per epoch, passes following one another.
        seed: Base seed.
        rank: Rank, or ``None`` to resolve it.
        world_size: World size, or ``None`` to resolve it.
    """

    _POSITION_KEYS = ("pass", "draws", "formed", "yielded", "cursors")

    def __init__(
        self,
        lengths: FloatArray,
        constraint: BatchConstraint,
        *,
        shuffle: bool,
        drop_last: bool,
        batches_per_epoch: int | None,
        seed: int,
        rank: int | None,
        world_size: int | None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self._lengths = lengths
        self._constraint = constraint
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._batches_per_epoch = check_optional_positive_int(
            "batches_per_epoch", batches_per_epoch
        )

    @property
    def constraint(self) -> BatchConstraint:
        """The limits the next batch is cut with."""
        return self._constraint

    @property
    def num_items(self) -> int:
        """How many items the sampler draws from."""
        return int(self._lengths.size)

    @property
    def shuffle(self) -> bool:
        """Whether the order is shuffled each epoch."""
        return self._shuffle

    @property
    def drop_last(self) -> bool:
        """Whether incomplete batches and the incomplete last round are dropped."""
        return self._drop_last

    @property
    def batches_per_epoch(self) -> int | None:
        """Fixed batches per rank and epoch, or ``None`` for one pass per epoch."""
        return self._batches_per_epoch

    @abc.abstractmethod
    def _groups(self, pass_index: int) -> Sequence[Group]:
        """The groups of pass ``pass_index``; their sizes must not depend on the pass."""

    def _walk(self, pass_index: int, position: Mapping[str, Any] | None = None) -> PassWalk:
        saved = position or {}
        return PassWalk(
            self._groups(pass_index),
            pass_index=pass_index,
            seed=self._seed,
            shuffle=self._shuffle,
            drop_last=self._drop_last,
            cursors=saved.get("cursors"),
            draws=saved.get("draws", 0),
            formed=saved.get("formed", 0),
        )

    def _first_pass(self, epoch: int) -> tuple[int, int]:
        """``(pass, batches to skip)`` where a fresh epoch starts: pass ``epoch`` by default."""
        return epoch, 0

    def _begin_epoch(self, epoch: int, position: Mapping[str, Any] | None) -> GroupEpochIterator:
        if position is not None:
            walk = self._walk(position["pass"], position)
            return GroupEpochIterator(self, epoch, walk, position["yielded"])
        pass_index, skip = self._first_pass(epoch)
        iterator = GroupEpochIterator(self, epoch, self._walk(pass_index))
        iterator.skip(skip)
        return iterator

    def _parse_position(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        parsed: dict[str, Any] = {
            key: check_non_negative_int(f"state[{key!r}]", state[key])
            for key in ("pass", "draws", "formed", "yielded")
        }
        if self._batches_per_epoch is None and parsed["pass"] != state["epoch"]:
            raise ValueError(
                f"state['pass'] should equal state['epoch'] for a sampler without "
                f"batches_per_epoch, but got pass={parsed['pass']} and epoch={state['epoch']}"
            )
        parsed["cursors"] = self._parse_cursors(state["cursors"], parsed["pass"])
        return parsed

    def _parse_cursors(self, cursors: object, pass_index: int) -> list[int]:
        sizes = [group.items.size for group in self._groups(pass_index)]
        values = list(cursors) if isinstance(cursors, (list, tuple)) else None
        if values is None or len(values) != len(sizes):
            raise ValueError(
                f"state['cursors'] should be a list of {len(sizes)} ints (one per group), but "
                f"got {cursors!r}; was the state saved by a sampler built on other lengths?"
            )
        for index, (value, size) in enumerate(zip(values, sizes, strict=True)):
            cursor = check_non_negative_int(f"state['cursors'][{index}]", value)
            if cursor > size:
                raise ValueError(
                    f"state['cursors'][{index}] should be at most {size}, the size of group "
                    f"{index}, but got {cursor}; was the state saved on other lengths?"
                )
        return [int(value) for value in values]

    def _apply_limits(self, limits: Any) -> None:
        self._constraint = limits
