"""Exact mid-epoch resume: ``loader.state_dict()`` and ``loader.load_state_dict()``
(which checks a state first: ``_resume_checks.py``).

NOTE [ Resume ]

The state after k batches of an epoch must make a fresh loader yield exactly
batches k+1, k+2, ... of that epoch, although the first loader has already
drawn more specs from its sampler (its prefetch window) than it yielded. So
the state never comes from the sampler's *current* position. Instead each epoch
keeps an :class:`EpochLedger`:

* If the sampler (or its per-epoch iterator) has ``state_dict()`` and the
  sampler has ``load_state_dict()`` (poolloader's samplers, lhotse's,
  torchdata's stateful ones), the ledger snapshots the sampler's state right
  after drawing each spec and keeps the snapshot of the last *yielded* one.
  Resuming loads that snapshot into the sampler.
* Otherwise (torch's samplers) the ledger keeps the random state the epoch
  started from (``loader.generator``'s, or torch's global one when there is
  none). Resuming restores it, lets the sampler draw its order again, and
  skips the specs already yielded. Only indices are drawn; nothing is loaded.

Either way the state also holds the epoch's base seed and number, so per-batch
seeding (``seeding="batch"``) gives resumed batches the random state they
would have had. With ``in_order=False`` batches may be yielded out of order:
the state records which batches beyond the contiguous prefix were already
yielded, and the resumed epoch skips them.

An IterableDataset has no sampler to replay: its streams start again, and the
resumed epoch loads the batches the saved one had yielded once more and drops
them (with a warning), which reproduces the epoch when the streams are
deterministic.

NOTE [ Drawing once ]

A KeyboardInterrupt (or any signal handler's exception) can land in the main
process wherever a call returns, also between the sampler giving a spec and the
spec reaching the window, which used to lose that batch: the next ``next()``
drew the one after. So the ledger draws in steps that leave nothing between:

* the sampler's spec goes straight into ``_ahead`` by C code (``list.extend``
  of one ``next(sampler_iter)``, or of ``_END`` after its last): once the
  sampler's ``next()`` returned, the spec is held;
* taking it from ``_ahead`` makes it the ledger's *unclaimed* spec, with no call
  between the two;
* it stays unclaimed until the iterator has it in its window (``claimed()``)
  or, loading in place, its outcome reached the consumer (``consumed()``); a
  draw before that returns it again, and the iterator does not submit again a
  position it has taken into its window already.

An IterableDataset's batch is given its worker (the round robin) only once
its spec is drawn and not yet in the window, and keeps it until it joins the
window, so that an interrupt in between does not move the turn on. A task that
was queued before an interrupt kept it from the window is taken into the window
when the spec comes again (the pool's ``last_submitted``), not queued a second
time: a stream's worker would run the first for nobody, and its items would be
lost.

An exception raised inside the sampler's own code is another matter: a
generator that raised is finished, and its next ``next()`` ends the epoch
(torch's loader ends it there too). The ledger cannot draw on from such an
iterator, so when the sampler ends right after it raised, the epoch's end
(after its last batch, so that the warning turned into an error costs no batch)
says so with a warning instead of ending the epoch silently short. An iterator
that goes on after raising (an object, not a generator) gives its next spec,
and nothing is said.

NOTE [ Limits changed mid-epoch ]

A poolloader sampler's limits (``max_duration``, ``batch_size``) may change while
an epoch runs (a curriculum); each batch is cut with the limits in effect when it
is drawn, up to a prefetch window before it is yielded. The snapshot of the last
yielded batch holds the limits it was drawn with, and the batches drawn after it
may have been drawn with others. So the state lists, as ``[position, limits]``
pairs, where the limits changed among the drawn batches not yet yielded, and the
limits in effect now from the next position to draw on; the resumed epoch puts
each in effect right before it draws that position, and cuts every batch as the
uninterrupted epoch did. The state also counts the batches drawn (``drawn``):
limits the caller sets after ``load_state_dict``, before iterating, take effect
from there, as the same change made in the loop when the state was taken would
have (the batches drawn by then keep the limits they were drawn with).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch
from torch.utils.data.dataloader import _DatasetKind

from ._epoch_rng import GENERATOR_SEARCH_DEPTH, Replay, RngState

STATE_VERSION = 1


#: Drawn ahead in place of a spec: the sampler had none left.
_END = object()
_ENDING = (_END,)


#: Where the frames between the caller's next() and the ledger are.
_INTERNAL = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.utils.data.__file__)) + os.sep,
)


def _callers_level() -> int:
    """The ``stacklevel`` that names the first frame outside poolloader and torch's
    data loading (the caller's ``next()``), for a warning raised where this is called."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    return level


class EpochLedger:
    """Draws an epoch's specs and records which batches were yielded (NOTE [ Resume ])."""

    def __init__(
        self,
        generators: tuple[torch.Generator, ...],
        before_iter: RngState,
        snapshot: Callable[[], Any] | None,
        limits: Callable[[], Mapping[str, Any]] | None = None,
        apply_limits: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self._generators = generators
        self.before_iter = before_iter
        self.before_draw: RngState | None = None
        self.snapshot = snapshot
        # The sampler's limits as they are now (a poolloader sampler's): a position's
        # snapshot holds those in effect when it was drawn, up to a window earlier
        # (NOTE [ Limits changed mid-epoch ]).
        self._limits = limits
        self._apply_limits = apply_limits
        self._limit_changes: dict[int, Mapping[str, Any]] = {}  # to apply, by position
        self.next_position = 0
        self.yielded = 0  # every position below this reached the consumer
        self.yielded_after: set[int] = set()
        #: The position of the batch next() counted and has not returned yet, set by
        #: the iterator (NOTE [ The batch in hand ]).
        self.in_hand: int | None = None
        self._before_hand: tuple[int, Any] | None = None  # that position, and resume_state then
        self.resume_state: Any = snapshot() if snapshot is not None else None
        self._snapshots: dict[int, Any] = {}
        self._replay: Replay | None = None
        self._skip: set[int] = set()  # positions a resumed epoch had yielded already
        self._ahead: list[Any] = []  # a spec drawn already (by _first_draw), or _END
        self._unclaimed: tuple[int, Any] | None = None  # drawn, not in the window yet
        self._sampler_raised: tuple[str, int] | None = None  # out of its next(): what, where
        self._cut_short_by: tuple[str, int, int] | None = None  # what, where, after how many
        self._replaying: Replay | None = None  # until the first spec to load is drawn
        self._drawing: Iterator[Any] | None = None  # what _pull draws from, and from what
        self._drawing_from: Any = None
        self._drop: set[int] = set()  # positions a resumed stream loads again and drops

    def resume(
        self,
        in_epoch: Mapping[str, Any],
        replay: Replay | None,
        iterable: bool = False,
        limits_set: Mapping[str, Any] | None = None,
    ) -> None:
        """Continue the saved epoch: positions, already-yielded batches, sampler state.

        An IterableDataset cannot be told where to start: its streams begin again,
        and the batches the saved epoch yielded are loaded again and dropped
        (:meth:`dropped`), so that the epoch goes on from the first it had not."""
        if iterable:
            done = int(in_epoch["yielded"])
            self._drop = set(range(done)) | set(in_epoch["yielded_after"])
            if self._drop:
                warnings.warn(
                    f"resuming an IterableDataset's epoch loads again the {len(self._drop)} "
                    "batch(es) it had yielded and drops them: a stream cannot be told where "
                    "to start",
                    UserWarning,
                    stacklevel=6,
                )
            self._replay = replace(replay, skip=0) if replay is not None else None
            # Counted from the start: a state taken before the streams are back there
            # (right after iter(), or inside the first next(), which loads them) says
            # what the saved one said, not that this epoch has yielded nothing.
            self.yielded = done
            self.yielded_after = set(in_epoch["yielded_after"])
            return
        self.next_position = self.yielded = int(in_epoch["yielded"])
        self.yielded_after = set(in_epoch["yielded_after"])
        self._skip = set(self.yielded_after)
        self.resume_state = in_epoch["sampler"]
        self._limit_changes = {int(p): limits for p, limits in in_epoch.get("limits", ())}
        if limits_set is not None:
            self._limits_set_since(in_epoch, limits_set)
        self._replay = replay
        if replay is not None:
            self.next_position = 0  # the skipped specs are drawn again

    def _limits_set_since(self, in_epoch: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
        """Limits the caller set between ``load_state_dict`` and this epoch's start
        take effect where the saved epoch had drawn up to: the batches it had drawn
        are cut as they were, the others with the caller's limits, as when the same
        change is made in the loop at the moment the state was taken (NOTE [ Limits
        changed mid-epoch ]). A state without that count (an earlier version's)
        puts them in effect at once."""
        drawn = in_epoch.get("drawn")
        if drawn is None:
            self._limit_changes = {self.next_position: dict(mine)}
            return
        changes = {p: limits for p, limits in self._limit_changes.items() if p < drawn}
        changes[int(drawn)] = dict(mine)
        self._limit_changes = changes

    def draw(self, sampler_iter: Any) -> tuple[int, Any]:
        """The next spec to load and its position; raises StopIteration at the epoch's end.
        The spec is the ledger's until :meth:`claimed` (or :meth:`consumed`): a draw
        before that returns it again (NOTE [ Drawing once ])."""
        if self._unclaimed is not None:
            self._end_replay()  # (one an interrupt cut short)
            return self._unclaimed
        if self.before_draw is None:
            self._first_draw(sampler_iter)
        while True:
            if not self._ahead:
                self._pull(sampler_iter)
            index = self._ahead[-1]
            if index is _END:
                self._end_replay()
                self._ended()
            position = self.next_position
            if self.snapshot is not None:
                self._snapshots[position] = self.snapshot()
            # No call from here until the spec is the ledger's: an interrupt lands
            # before all of it or after it.
            skip = position in self._skip
            drawn = (position, index)
            self._unclaimed = None if skip else drawn
            self.next_position = position + 1
            self._ahead.pop()
            if not skip:
                self._end_replay()
                return drawn
            self._skip.discard(position)

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the loader copies its epoch's ledger: not the sampler's iterator
        # (a generator does not copy), which _pull wraps again when it is given one.
        state = self.__dict__.copy()
        state["_drawing"] = state["_drawing_from"] = None
        return state

    def claimed(self) -> None:
        """The spec :meth:`draw` gave is in the window: the next draw takes a new one."""
        self._unclaimed = None

    def _pull(self, sampler_iter: Any) -> None:
        """Draws the sampler's next spec into ``_ahead`` (NOTE [ Drawing once ])."""
        position = self.next_position
        changes = self._limit_changes.get(position)
        if changes is not None and self._apply_limits is not None:
            self._apply_limits(changes)
        self._limit_changes.pop(position, None)
        # The specs, then _END when the sampler has none left. Through next(): iter()
        # of some samplers' iterators starts them again (lhotse's are their own).
        drawing = self._drawing
        if drawing is None or self._drawing_from is not sampler_iter:
            drawing = itertools.chain(map(next, itertools.repeat(sampler_iter)), _ENDING)
            self._drawing, self._drawing_from = drawing, sampler_iter
        try:
            self._ahead.extend(itertools.islice(drawing, 1))
        except BaseException as exc:
            if not self._ahead:  # (not an interrupt landing as extend returned)
                self._sampler_raised = (type(exc).__name__, position)
                self._end_replay()
            raise
        if self._ahead[-1] is not _END:
            self._sampler_raised = None  # it went on after all (an iterator, not a generator)

    def _ended(self) -> NoReturn:
        raised = self._sampler_raised
        if raised is not None:  # said at the epoch's end (warn_if_cut_short), not here:
            self._sampler_raised = None  # a warning turned error would fail a batch
            self._cut_short_by = (*raised, self.next_position)
        raise StopIteration

    def warn_if_cut_short(self) -> None:
        """At the epoch's end: warn if the sampler's iterator raised and then had no
        spec left (NOTE [ Drawing once ]), naming the caller's ``next()``."""
        cut = self._cut_short_by
        if cut is None:
            return
        self._cut_short_by = None
        name, position, drawn = cut
        warnings.warn(
            f"the sampler's iterator raised {name} while drawing batch {position} of this "
            "epoch, and then had no batch left: a generator cannot go on after an "
            f"exception, so this epoch may have ended early, after {drawn} batches. "
            "Start the next epoch with iter(loader)",
            RuntimeWarning,
            stacklevel=_callers_level(),
        )

    def _first_draw(self, sampler_iter: Any) -> None:
        replay = self._replay
        if replay is None:
            self.before_draw = RngState.capture(self._generators)
            return
        # The specs the saved epoch had yielded are drawn again, under its random
        # state, and skipped by draw()'s own loop, which an interrupt leaves whole
        # (NOTE [ Drawing once ]). The first spec to load is drawn under that state
        # too: a sampler may draw its randomness on its first next() (torch's
        # RandomSampler without a generator takes its seed from the global generator
        # there), which is this one when nothing is skipped (saved before batch 0
        # reached the consumer). Then _end_replay puts the caller's state back.
        self._skip.update(range(replay.skip))
        replay.before_draw.apply(self._generators)
        self._replaying = replay
        self.before_draw = replay.before_draw  # last: the next draw starts here again

    def _end_replay(self) -> None:
        """The first spec to load is drawn (or the sampler ended or failed): put back
        the caller's random state, as it was after the saved epoch's draws."""
        replay = self._replaying
        if replay is None:
            return
        restored = torch.equal(replay.after.global_rng, replay.before_draw.global_rng)
        if not (replay.undrawn and restored):
            replay.after.apply(self._generators)
        self._replaying = None

    def will_drop(self, position: int) -> bool:
        """Whether batch ``position`` is one :meth:`dropped` will drop."""
        return position in self._drop

    def dropped(self, position: int) -> bool:
        """Whether batch ``position``, just consumed, is one a resumed IterableDataset
        epoch loaded again to reach where the saved epoch was: not for the consumer."""
        if position in self._drop:
            self._drop.discard(position)
            return True
        return False

    def consumed(self, position: int) -> None:
        """Batch ``position`` reached the consumer (as data or as its exception);
        said again, as when an interrupt makes it delivered twice, nothing."""
        if self._unclaimed is not None and self._unclaimed[0] == position:
            self._unclaimed = None  # loaded in place (num_workers=0): the outcome is out
        if position >= self.yielded:
            if position == self.yielded:  # the fold moves past it: keep where it was
                self._before_hand = (position, self.resume_state)
            self.yielded_after.add(position)
            self._fold()

    def _fold(self) -> None:
        """Move ``yielded`` past the positions consumed right after it. Each step
        leaves the record whole wherever an interrupt lands (a position is counted
        before it leaves ``yielded_after``), and a later fold finishes the rest."""
        while self.yielded in self.yielded_after:
            done = self.yielded
            if done in self._snapshots:
                self.resume_state = self._snapshots[done]
            self.yielded = done + 1
            self.yielded_after.discard(done)
        floor, hand = self.yielded, self.in_hand
        if hand is not None and hand < floor:
            floor = hand  # (the limits drawn since it are the state's while it is in hand)
        # Over a copy made in one C call, each key let go by pop: a state_dict() in a
        # signal handler runs this too, and may land inside this loop.
        for stale in list(self._snapshots):
            if stale < floor:
                self._snapshots.pop(stale, None)

    # NOTE [ The batch in hand ]: next() counts its batch as yielded before it
    # returns it, so that an interrupt between the two cannot lose it (NOTE
    # [ Handing a batch over ] in ``_iterator.py``). A state taken in between (by a
    # signal handler that saves a checkpoint, as a cluster's pre-emption handler
    # does, or in an ``except KeyboardInterrupt`` after an interrupt landed there)
    # must not count it: the caller has not had it, and a resume would skip it.
    # The iterator names that position in ``in_hand`` before it counts it and
    # clears it as next() returns, with no call between either; ``consumed`` keeps
    # what the record was before the fold moved past it; and ``state`` leaves the
    # position out: out of ``yielded_after``, or, when the fold moved ``yielded``
    # past it, back to it, with the sampler's snapshot as it was then.

    def state(self, base_seed: int) -> dict[str, Any]:
        self._fold()  # one an interrupt left unfinished
        yielded, resume_state = self.yielded, self.resume_state
        after = {p for p in list(self.yielded_after) if p >= yielded}  # (as in _fold)
        hand, before = self.in_hand, self._before_hand
        if hand is not None and hand in after:
            after.discard(hand)
        elif hand is not None and before is not None and before[0] == hand < yielded:
            after.update(range(hand + 1, yielded))
            yielded, resume_state = before
        rng: dict[str, Any] | None = None
        if self.snapshot is None:
            before_draw, undrawn = self.before_draw, False
            if before_draw is None and self._replay is not None:  # resumed, nothing drawn
                before_draw, undrawn = self._replay.before_draw, self._replay.undrawn
            elif before_draw is None:  # the first draw is still to come
                before_draw, undrawn = RngState.capture(self._generators), True
            rng = {
                "before_iter": self.before_iter.to_dict(),
                "before_draw": before_draw.to_dict(),
            }
            if undrawn:
                rng["undrawn"] = True
        sampler = resume_state if self.snapshot is not None else None
        state = {
            "base_seed": base_seed,
            "yielded": yielded,
            "yielded_after": sorted(after),
            "sampler": sampler,
            "rng": rng,
        }
        if isinstance(sampler, Mapping) and self._limits is not None:
            state["limits"] = self._changes_since(sampler, yielded)
            state["drawn"] = self.next_position
        return state

    def _changes_since(self, sampler: Mapping[str, Any], yielded: int) -> list[list[Any]]:
        """The limit changes a resumed epoch makes from ``yielded`` on, as
        ``[position, limits]`` pairs (NOTE [ Limits changed mid-epoch ])."""
        assert self._limits is not None
        now = dict(self._limits())
        last = {key: sampler.get(key) for key in now}
        changes: list[list[Any]] = []
        for position in range(yielded, self.next_position):
            drawn = self._snapshots.get(position)
            if isinstance(drawn, Mapping):
                limits = {key: drawn.get(key) for key in now}
                if limits != last:
                    changes.append([position, limits])
                    last = limits
        pending = self._limit_changes  # resumed, and not drawn that far yet
        changes += [[p, dict(limits)] for p, limits in sorted(pending.items())]
        if now != last and not pending:
            changes.append([self.next_position, now])
        return changes


@dataclass(eq=False)
class EpochPosition:
    """Where the consumer is in the loader's newest epoch: what ``state_dict()``
    describes. The loader holds it, not the iterator, so the position outlives an
    iterator dropped mid-epoch (``break``)."""

    epoch: int
    ledger: EpochLedger
    base_seed: int
    finished: bool = False  # the consumer was told the epoch ended (StopIteration)
    replaced: bool = False  # load_state_dict() gave the loader another place meanwhile

    def state(self) -> dict[str, Any]:
        return self.ledger.state(self.base_seed)


@dataclass
class EpochBeginning:
    """Taken by the loader right before an iterator iterates its sampler for an epoch."""

    generators: tuple[torch.Generator, ...]
    before_iter: RngState
    in_epoch: Mapping[str, Any] | None  # the saved epoch to continue, if resuming
    replay: Replay | None
    after: RngState | None  # when resuming: the random state to leave behind
    base_seed: int | None = None  # a persistent iterator's, kept between epochs
    # When resuming: the sampler's limits that the caller set after load_state_dict.
    limits_set: Mapping[str, Any] | None = None

    @classmethod
    def begin(
        cls,
        sampler: Any,
        generators: tuple[torch.Generator, ...],
        in_epoch: Mapping[str, Any] | None,
        saved_generators: list[torch.Tensor] | None,
        base_seed: int | None = None,
        limits_set: Mapping[str, Any] | None = None,
    ) -> EpochBeginning:
        """Capture the random state; when resuming, put the sampler (or the random
        state it draws from) back where the saved epoch had it.

        A resumed epoch's iterator draws its base seed (and a replayed sampler its
        order) again; those draws happened before the state was saved, so
        afterwards the caller's global random state is put back, and a sampler
        that loads its own state finds the generators as they were saved
        (:meth:`settle`). ``base_seed``: the base seed a persistent loader's
        iterator keeps (a state saved between epochs, an iterator made again): the
        new iterator draws its own from a generator of its own
        (:meth:`init_iterator`), so that the caller's are left as a reset leaves
        them, the sampler's draws in ``iter()`` included. ``limits_set``: the sampler's limits
        as the caller set them after ``load_state_dict`` (loading the sampler's
        state puts the saved ones back; the ledger sets these where they belong)."""
        before = RngState.capture(generators)
        if in_epoch is None:
            return cls(generators, before, None, None, None, base_seed)
        if in_epoch["sampler"] is not None:
            _load_sampler(sampler, in_epoch["sampler"])
            after = RngState(saved_generators, before.global_rng)
            return cls(generators, before, in_epoch, None, after, limits_set=limits_set)
        rng = in_epoch["rng"]
        saved = RngState.from_dict(rng["before_iter"])
        after = RngState(None, before.global_rng)
        first = RngState.from_dict(rng["before_draw"])
        replay = Replay(first, int(in_epoch["yielded"]), after, bool(rng.get("undrawn", False)))
        saved.apply(generators)
        return cls(generators, saved, in_epoch, replay, after)

    def init_iterator(self, loader: Any, init: Callable[[], None]) -> None:
        """Run torch's iterator ``init``, which draws a base seed: when the epoch keeps
        one, from a generator of its own (swapped in and back with no call between)."""
        own = loader.__dict__.get("generator")
        if self.in_epoch is None and self.base_seed is not None:
            loader.__dict__["generator"] = torch.Generator()
        try:
            init()
        finally:
            loader.__dict__["generator"] = own

    def settle(self) -> None:
        """After the iterator drew its base seed: undo that draw's effect when resuming."""
        if self.after is not None and self.replay is None:
            self.after.apply(self.generators)

    def ledger(self, iterator: Any) -> EpochLedger:
        """The ledger of the epoch ``iterator`` is starting (its sampler iterated)."""
        self.settle()
        sampler = iterator._index_sampler
        snapshot = sampler_snapshot(sampler, iterator._sampler_iter)
        limits = getattr(sampler, "_limit_state", None) if snapshot is not None else None
        apply = functools.partial(apply_limits, sampler) if limits is not None else None
        ledger = EpochLedger(self.generators, self.before_iter, snapshot, limits, apply)
        if self.in_epoch is not None:
            iterable = iterator._dataset_kind == _DatasetKind.Iterable
            ledger.resume(self.in_epoch, self.replay, iterable, self.limits_set)
        return ledger


def limits_of(sampler: Any) -> dict[str, Any] | None:
    """A poolloader sampler's limits as they are now (``None`` for other samplers)."""
    limit_state = getattr(sampler, "_limit_state", None)
    return dict(limit_state()) if callable(limit_state) else None


def apply_limits(sampler: Any, limits: Mapping[str, Any]) -> None:
    """Put a poolloader sampler's ``limits`` (some of its ``_limit_state()``) in effect."""
    sampler._apply_limits(sampler._parse_limits({**sampler._limit_state(), **limits}))


def _load_sampler(sampler: Any, state: Any) -> None:
    if not callable(getattr(sampler, "load_state_dict", None)):
        raise ValueError(
            f"the saved state holds a sampler state, but this loader's sampler "
            f"{type(sampler).__name__} has no load_state_dict(): build the loader with "
            "the same sampler as the one that saved it"
        )
    sampler.load_state_dict(state)


def sampler_snapshot(sampler: Any, sampler_iter: Any) -> Callable[[], Any] | None:
    """How to read the position of this epoch's sampler, or ``None`` if it cannot resume.

    Prefers the per-epoch iterator's ``state_dict`` (it belongs to exactly this
    epoch); needs ``load_state_dict`` on the sampler to resume at all.
    """
    if not callable(getattr(sampler, "load_state_dict", None)):
        return None
    for source in (sampler_iter, sampler):
        state_dict = getattr(source, "state_dict", None)
        if callable(state_dict):
            return state_dict
    return None


def order_of(sampler: Any) -> dict[str, Any]:
    """What decides an epoch's order, as a state records it: the index sampler's
    kind (with the samplers it wraps) and, for one replayed (NOTE [ Resume ]),
    its number of batches (or indices); ``None`` where it has no length or
    loads a state of its own, which it checks itself."""
    kinds, level = [], sampler
    for _ in range(GENERATOR_SEARCH_DEPTH):
        if level is None:
            break
        kinds.append(type(level).__name__)
        level = getattr(level, "sampler", None) or getattr(level, "batch_sampler", None)
    length: int | None = None
    if not callable(getattr(sampler, "load_state_dict", None)):  # else it checks its own state
        length = sampler_length(sampler)
    return {"sampler": "(".join(kinds) + ")" * (len(kinds) - 1), "length": length}


def sampler_length(sampler: Any) -> int | None:
    """``len(sampler)``, or ``None`` for a sampler without one, or one that refuses
    (an IterableDataset's)."""
    try:
        return len(sampler)
    except Exception:
        return None
