"""The protocol every poolloader batch sampler follows, and the base class that carries it.

NOTE [ Sampler protocol ]
~~~~~~~~~~~~~~~~~~~~~~~~~
* Iterating a sampler yields batches: lists of int indices into the items it was built on.
  ``iter(sampler)`` returns a fresh per-epoch iterator object (:class:`EpochIterator`); the
  iterator, not the sampler, owns the position in the epoch (torchdata's habit).
* ``set_epoch(epoch)`` picks the epoch the next ``iter()`` runs. Randomness derives from
  ``seed + epoch`` only (NumPy ``SeedSequence``/``PCG64``), so every process and platform
  sees the same order.
* ``rank`` and ``world_size`` resolve, each on its own, from the explicit argument, then the
  environment (``RANK`` / ``WORLD_SIZE``), then an initialised ``torch.distributed``, then
  ``0`` / ``1`` (:func:`~poolloader.samplers._distributed.resolve_rank_world_size`). They
  are fixed when the sampler is built.
* ``len(sampler)`` is exact: the number of batches this rank yields in the current epoch
  with the current limits, after any ``set_epoch``, for any rank, ``drop_last`` and
  ``batches_per_epoch``. While an epoch is in progress (or resumed and not yet finished)
  it counts the batches already yielded plus those still to come. A limit changed
  mid-epoch changes the count from then on, so a ``len()`` taken *before* the change is
  not exact for that epoch; ``len()`` taken after it is (until the next change). With
  ``batches_per_epoch`` the count is fixed and limits do not change it.
* Limits (``sampler.max_duration = x`` and friends) may change between batches; the change
  takes effect from the next batch drawn. Samplers form batches lazily from a
  deterministic item order, so nothing ahead of the next batch is fixed in advance.
* ``state_dict()`` may be called after every batch, so it is cheap: a small dict of ints,
  floats, strings and ``None`` (and at most a short list of ints, one per bucket) whose size
  does not grow with the data. It captures the position exactly, as a cursor into the
  epoch's deterministic item order plus the limits in effect, never as a batch count to
  replay. A fresh sampler built with the same arguments, after
  ``load_state_dict(state)``, yields from its next ``iter()`` exactly the batches the
  original had left in that epoch, and after ``set_epoch(e + 1)`` exactly what the original
  would. The resume applies to one ``iter()``: once that epoch is over, a plain ``iter()``
  starts the epoch from its beginning again. ``set_epoch`` with a different epoch discards
  a loaded position.
* ``load_state_dict`` rejects unknown or missing keys, a state saved by another kind of
  sampler, and one saved with a different seed or world size, with a ``ValueError`` that
  says which.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from torch.utils.data import Sampler

from poolloader.samplers._checks import check_non_negative_int
from poolloader.samplers._distributed import resolve_rank_world_size

__all__ = ["EpochIterator", "SamplerBase", "State", "StateValue"]

StateValue = int | float | str | None | list[int]
State = dict[str, StateValue]


class EpochIterator(Iterator[list[int]], abc.ABC):
    """One epoch's iteration over a sampler; owns the position in that epoch.

    Args:
        sampler: The sampler it iterates; limits are read from it for every batch.
        epoch: The epoch this iterator runs.
    """

    def __init__(self, sampler: SamplerBase, epoch: int) -> None:
        self._sampler = sampler
        self.epoch = epoch
        self.exhausted = False

    def __iter__(self) -> EpochIterator:
        return self

    def __next__(self) -> list[int]:
        if not self.exhausted:
            batch = self._next_batch()
            if batch is not None:
                return batch
            self.exhausted = True
        raise StopIteration

    @abc.abstractmethod
    def _next_batch(self) -> list[int] | None:
        """The next batch of this rank, or ``None`` when the epoch is over."""

    @abc.abstractmethod
    def position(self) -> State:
        """The position keys of the state: cheap, and exact enough to resume from."""

    @abc.abstractmethod
    def planned_length(self) -> int:
        """Batches this rank yields in this epoch: those yielded plus those to come."""

    def state_dict(self) -> State:
        """The sampler's full state at this iterator's position."""
        return self._sampler._state_at(self)


class SeededRanked:
    """What every poolloader sampler knows about itself: its base seed, its rank
    among ``world_size`` ranks (resolved once, when it is built) and its epoch."""

    def __init__(self, *, seed: int, rank: int | None, world_size: int | None) -> None:
        super().__init__()
        self._seed = check_non_negative_int("seed", seed)
        self._rank, self._world_size = resolve_rank_world_size(rank, world_size)
        self._epoch = 0

    @property
    def seed(self) -> int:
        """The base seed; epoch ``e`` is shuffled with ``seed + e``."""
        return self._seed

    @property
    def rank(self) -> int:
        """This process's rank, resolved when the sampler was built."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of ranks, resolved when the sampler was built."""
        return self._world_size

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` runs."""
        return self._epoch


class SamplerBase(SeededRanked, Sampler[list[int]], abc.ABC):
    """Base of the poolloader batch samplers: epoch, seed, ranks and the state plumbing.

    Subclasses provide the per-epoch iterator (:meth:`_begin_epoch`), the limit keys
    (:meth:`_limit_state`, :meth:`_parse_limits`, :meth:`_apply_limits`) and the position
    keys (:meth:`_parse_position`). See NOTE [ Sampler protocol ] in this module.

    Args:
        seed: Base seed; epoch ``e`` is shuffled with ``seed + e``.
        rank: This process's rank, or ``None`` to resolve it.
        world_size: Number of ranks, or ``None`` to resolve it.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument is out of range.
    """

    #: Keys of the limits in the state, in the order ``state_dict`` writes them.
    _LIMIT_KEYS: ClassVar[tuple[str, ...]] = ()
    #: Keys of the position in the state, in the order ``state_dict`` writes them.
    _POSITION_KEYS: ClassVar[tuple[str, ...]] = ()
    _COMMON_KEYS: ClassVar[tuple[str, ...]] = ("sampler", "epoch", "seed", "world_size")

    def __init__(self, *, seed: int, rank: int | None, world_size: int | None) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self._active: EpochIterator | None = None
        self._pending: EpochIterator | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next ``iter()`` runs.

        Setting the epoch a loaded state belongs to keeps that state, so the usual
        ``load_state_dict(state); set_epoch(state["epoch"])`` resumes; any other epoch
        discards it.

        Args:
            epoch: A non-negative integer.

        Raises:
            TypeError: ``epoch`` is not an integer.
            ValueError: ``epoch`` is negative.
        """
        epoch = check_non_negative_int("epoch", epoch)
        if epoch != self._epoch:
            self._active = None
            self._pending = None
        self._epoch = epoch

    def __iter__(self) -> EpochIterator:
        iterator = self._pending if self._pending is not None else self._fresh()
        self._pending = None
        self._active = iterator
        return iterator

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch with the limits in effect.

        Exact while the limits stay as they are: iterating the epoch yields this many
        batches, the same number on every rank. While an epoch is in progress (or loaded and
        not finished), that is the batches already yielded plus those still to come;
        otherwise a whole fresh epoch of :attr:`epoch`. Changing a limit mid-epoch changes
        the count from the next batch on, and a ``len()`` taken before the change cannot
        foresee that: call ``len()`` again after it. (With ``batches_per_epoch`` the count
        is fixed.)
        """
        return self._in_progress().planned_length()

    def state_dict(self) -> State:
        """The state at the current position: the latest iterator's, or the epoch's start.

        Returns:
            A small dict (see NOTE [ Sampler protocol ]); safe to ``torch.save`` or dump as
            JSON.
        """
        if self._pending is not None:
            return self._state_at(self._pending)
        return self._state_at(self._active if self._active is not None else self._fresh())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next ``iter()`` resumes there.

        The state's limits replace this sampler's. Nothing changes if the state is refused.

        Args:
            state: A dict returned by ``state_dict()`` of a sampler built with the same
                arguments (any rank's: the position is the same on every rank).

        Raises:
            TypeError: ``state`` is not a mapping, or a value has the wrong type.
            ValueError: Keys are unknown or missing, or the state belongs to another kind
                of sampler, seed or world size, or a value is out of range.
        """
        epoch, limits, pending = self._validated(state)
        self._apply_limits(limits)
        self._epoch = epoch
        self._active = None
        self._pending = pending

    def _validated(self, state: Mapping[str, Any]) -> tuple[int, Any, EpochIterator]:
        """What :meth:`load_state_dict` puts in effect for ``state``: its epoch, its
        limits and the epoch's iterator at its position, each checked (raising as
        :meth:`load_state_dict` does); nothing changes. A loader's
        ``load_state_dict`` asks too, so that a state is refused when it is loaded."""
        self._check_keys(state)
        self._check_identity(state)
        epoch = check_non_negative_int("state['epoch']", state["epoch"])
        limits = self._parse_limits(state)
        return epoch, limits, self._begin_epoch(epoch, self._parse_position(state))

    def _state_at(self, iterator: EpochIterator) -> State:
        state: State = {
            "sampler": type(self).__name__,
            "epoch": iterator.epoch,
            "seed": self._seed,
            "world_size": self._world_size,
        }
        state.update(self._limit_state())
        state.update(iterator.position())
        return state

    def _in_progress(self) -> EpochIterator:
        if self._pending is not None:
            return self._pending
        if self._active is not None and not self._active.exhausted:
            return self._active
        return self._fresh()

    def _fresh(self) -> EpochIterator:
        return self._begin_epoch(self._epoch, None)

    def _check_keys(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state should be a dict returned by state_dict(), but got {type(state).__name__}"
            )
        expected = (*self._COMMON_KEYS, *self._LIMIT_KEYS, *self._POSITION_KEYS)
        unknown = sorted(set(state) - set(expected), key=str)
        missing = [key for key in expected if key not in state]
        if unknown or missing:
            wrong = [
                f"{what} keys {keys}"
                for what, keys in (("unknown", unknown), ("missing", missing))
                if keys
            ]
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() got a state with {' and '.join(wrong)}; "
                f"it expects exactly {list(expected)}. Pass a dict returned by state_dict() of "
                "the same kind of sampler"
            )

    def _check_identity(self, state: Mapping[str, Any]) -> None:
        name = type(self).__name__
        if state["sampler"] != name:
            raise ValueError(
                f"this state was saved by a {state['sampler']!r}, not a {name!r}; load it "
                "into the kind of sampler that saved it"
            )
        for key, mine in (("seed", self._seed), ("world_size", self._world_size)):
            if state[key] != mine:
                raise ValueError(
                    f"this state was saved with {key}={state[key]!r}, but this {name} has "
                    f"{key}={mine!r}; build the sampler with the same {key} to resume"
                )

    @property
    def paced(self) -> bool:
        """Whether a loader must read this sampler exactly ``prefetch_factor *
        num_workers`` batches ahead of the training loop, as torch's does: its limits
        may change mid-epoch, and a change made after batch ``k`` must land at the
        same batch in every run (as torch's loader lands it), and with several ranks
        in the same round on every rank. (poolloader's loader otherwise draws
        further ahead behind a slow batch, by an amount that depends on timing: the
        epoch's batches, and their number, would change from run to run.)"""
        return bool(self._LIMIT_KEYS)

    @abc.abstractmethod
    def _begin_epoch(self, epoch: int, position: Mapping[str, Any] | None) -> EpochIterator:
        """A new iterator for ``epoch``, at its start or at a validated ``position``."""

    @abc.abstractmethod
    def _limit_state(self) -> State:
        """The limits in effect, keyed by :attr:`_LIMIT_KEYS`."""

    @abc.abstractmethod
    def _parse_limits(self, state: Mapping[str, Any]) -> object:
        """Validate the limit keys of ``state``; returns what :meth:`_apply_limits` takes."""

    @abc.abstractmethod
    def _apply_limits(self, limits: Any) -> None:
        """Put limits returned by :meth:`_parse_limits` in effect."""

    @abc.abstractmethod
    def _parse_position(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        """Validate the position keys of ``state``; raise ``ValueError`` if they cannot be."""
