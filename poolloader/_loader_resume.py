"""The resume half of :class:`~poolloader.DataLoader`: ``state_dict()``,
``load_state_dict()``, and what an epoch's start takes from them (the ledger and
what it records are in ``_resume.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._epoch_rng import RngState, find_generators, set_generator_states
from ._resume import (
    STATE_VERSION,
    EpochBeginning,
    EpochPosition,
    apply_limits,
    limits_of,
    order_of,
)
from ._resume_checks import check_order, check_state


class Resumable:
    """The methods of :class:`~poolloader.DataLoader` that save and restore where it is."""

    if TYPE_CHECKING:  # the loader's state these methods share (see DataLoader.__init__)
        _epoch_index: int
        _position: EpochPosition | None
        _resume: dict[str, Any] | None
        _resume_limits: dict[str, Any] | None
        _resume_generators: list[torch.Tensor] | None
        _resume_base_seed: int | None
        _persistent_seed: int | None
        _state_at_iter: Place | None
        _iterators: Any
        _iterator: Any
        _index_sampler: Any
        generator: torch.Generator | None
        persistent_workers: bool
        num_workers: int

    # NOTE [ A state taken in iter() ]: iter() takes what the next epoch starts from
    # (a loaded state, the kept base seed) off the loader well before the new
    # epoch's position is in place, and starting workers takes seconds. A
    # state_dict() in between (a signal handler saving a checkpoint) said the
    # epoch was starting afresh, and so did every state after an iter() that
    # failed or was interrupted (a Ctrl-C while the workers start): a resumed
    # epoch began again at its first batch, and the batches yielded before the
    # state was saved came a second time. So iter() keeps where the loader was
    # (:class:`Place`): until it returns, state_dict() describes that place (the
    # new epoch has yielded nothing yet), and when it raises, the loader goes back
    # there, random state included, and the next iter() starts the same epoch,
    # under the same number (the pool has the workers still in it start it
    # afresh: Pool.begin_epoch).

    def _place(self) -> Place:
        return Place(
            self._epoch_index, self._position, self._resume, self._resume_generators,
            self._resume_base_seed, self._resume_limits, self._persistent_seed,
            RngState.capture(self._generators()), limits_of(self._index_sampler), self._iterator,
        )  # fmt: skip

    def _go_back(self, place: Place) -> None:
        """Undo an iter() that raised (NOTE [ A state taken in iter() ]): the
        persistent iterator it made ends, one it reset gives up the epoch it
        began, and the loader is where it was. Other iterators are left alone."""
        iterator = self._iterator
        if iterator is not None and iterator is not place.iterator:
            self.__dict__["_held_iterator"] = None  # (not through the setter: it ends the pool)
            with contextlib.suppress(Exception):  # (a half-made one may fail to)
                iterator.close()
        elif iterator is not None:
            with contextlib.suppress(Exception):  # (its next reset starts the epoch again)
                iterator._withdraw()
        if place.resume is not None and place.limits is not None:
            # Starting the resumed epoch loaded the sampler's saved state, and with it
            # the saved limits: the caller's, set after load_state_dict, come back.
            apply_limits(self._index_sampler, place.limits)
        place.rng.apply(self._generators())
        self.__dict__.update(  # one C call: an interrupt lands before or after all of it
            _epoch_index=place.epoch_index, _position=place.position, _resume=place.resume,
            _resume_generators=place.resume_generators, _resume_base_seed=place.resume_base_seed,
            _resume_limits=place.resume_limits, _persistent_seed=place.persistent_seed,
        )  # fmt: skip

    def _before_iter(self) -> EpochBeginning:
        """Called by an iterator right before it iterates the sampler for a new epoch."""
        in_epoch, self._resume = self._resume, None
        saved, self._resume_generators = self._resume_generators, None
        kept, self._resume_base_seed = self._resume_base_seed, None
        loaded, self._resume_limits = self._resume_limits, None
        now = limits_of(self._index_sampler) if in_epoch is not None else loaded
        limits_set = now if now != loaded else None
        return EpochBeginning.begin(
            self._index_sampler, self._generators(), in_epoch, saved, kept, limits_set
        )

    def _generators(self) -> tuple[torch.Generator, ...]:
        """The generators an epoch's order is drawn from (``loader.generator`` first)."""
        return find_generators(self.generator, self._index_sampler)

    def _next_epoch(self, iterator: Any) -> EpochPosition:
        """The position of the epoch ``iterator`` starts (its ledger and base seed
        set); it becomes the current one, and its number the next epoch's minus one."""
        position = EpochPosition(self._epoch_index, iterator._ledger, int(iterator._base_seed))
        self._position = position
        self._epoch_index += 1
        return position

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is, so that a fresh one can continue exactly from here.

        Taken after k batches of an epoch, the state makes a new loader (new
        processes, same arguments) yield exactly batches k+1, k+2, ... of that
        epoch, then the following epochs, as this one would have: batches loaded
        ahead but not yet yielded are neither lost nor skipped. The state is a
        dict of plain values and tensors (``torch.save`` it with your checkpoint).

        Example::

            checkpoint = {"model": model.state_dict(), "loader": loader.state_dict()}
            ...
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4)
            loader.load_state_dict(checkpoint["loader"])
            for batch in loader:   # continues the saved epoch
                ...
        """
        place = self._state_at_iter  # NOTE [ A state taken in iter() ]
        if place is None:
            place = self._place()
        generators = place.resume_generators
        if generators is None:
            generators = place.rng.generators
        order = order_of(self._index_sampler)
        state = {"version": STATE_VERSION, "generators": generators, "order": order}
        if place.resume is not None:
            return {**state, "epoch": place.epoch_index, "in_epoch": place.resume}
        position = place.position
        if position is None or position.finished:
            state = {**state, "epoch": place.epoch_index, "in_epoch": None}
            kept = self._kept_base_seed(place)
            return state if kept is None else {**state, "base_seed": kept}
        return {**state, "epoch": position.epoch, "in_epoch": position.state()}

    def _kept_base_seed(self, place: Place) -> int | None:
        """The base seed the next epoch keeps: torch's persistent iterator draws one
        when it is made and keeps it (its reset draws none), so every epoch of a
        persistent loader has the first one's. A state saved between epochs
        carries it, or a fresh loader's new iterator would draw another (and take
        one more number from ``loader.generator``, shifting every later order).
        For the same reason a persistent iterator dropped mid-epoch (a peek with
        ``next(iter(loader))``, a ``break``) leaves its base seed to the next one."""
        if place.resume_base_seed is not None:
            return place.resume_base_seed
        return place.persistent_seed if self.persistent_workers and self.num_workers > 0 else None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state returned by :meth:`state_dict` at the next ``iter()``.

        Raises:
            ValueError: ``state`` is not a poolloader state, or was saved with a
                sampler this loader's sampler cannot load.
        """
        check_state(state)
        check_order(state, order_of(self._index_sampler))
        in_epoch, validated = state["in_epoch"], getattr(self._index_sampler, "_validated", None)
        if in_epoch is not None and in_epoch["sampler"] is not None and callable(validated):
            validated(in_epoch["sampler"])  # a poolloader sampler's: refused now, not at iter()
        for iterator in list(self._iterators):
            iterator.close()
        if self._position is not None:  # a loop still in it raises (replaced_error)
            self._position.replaced = True
        self._position = None
        self._epoch_index = int(state["epoch"])
        self._resume = dict(state["in_epoch"]) if state["in_epoch"] is not None else None
        # The sampler's limits now: different ones at the next iter() were set since
        # (NOTE [ Limits changed mid-epoch ] in _resume.py).
        self._resume_limits = limits_of(self._index_sampler)
        self._resume_base_seed = state.get("base_seed") if self._resume is None else None
        self._persistent_seed = None
        if self._resume is None:
            set_generator_states(self._generators(), state["generators"])  # drawn as saved
        else:
            self._resume_generators = list(state["generators"])


@dataclass(frozen=True)
class Place:
    """Where a loader is, taken at one moment: what :meth:`DataLoader.state_dict`
    is made of, and what an iter() that raised goes back to (NOTE [ A state taken
    in iter() ])."""

    epoch_index: int  # the number the next epoch gets
    position: EpochPosition | None  # the newest epoch's
    resume: dict[str, Any] | None  # a loaded state's epoch, to continue at the next iter()
    resume_generators: list[torch.Tensor] | None  # ... and its generators' states
    resume_base_seed: int | None  # a loaded state's kept base seed (_kept_base_seed)
    resume_limits: dict[str, Any] | None  # the sampler's limits when the state was loaded
    persistent_seed: int | None  # a persistent iterator's base seed
    rng: RngState  # the generators orders are drawn from, and torch's global one
    limits: dict[str, Any] | None  # a poolloader sampler's limits
    iterator: Any  # the persistent iterator


def replaced_error(epoch: int, yielded: int) -> RuntimeError:
    """What a loop over an epoch that ``load_state_dict()`` left raises."""
    return RuntimeError(
        f"loader.load_state_dict() was called during epoch {epoch}, after {yielded} of its "
        "batches: this loop's epoch was left there, the rest of its batches not loaded. "
        "Iterate the loader again (for batch in loader) to continue from the state loaded"
    )
