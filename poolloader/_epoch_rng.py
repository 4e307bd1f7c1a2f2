"""The random state an epoch's order is drawn from, as a resume state saves it:
the generators a sampler draws from (``loader.generator``, a ``RandomSampler``'s
own) and torch's global one (NOTE [ Resume ] in ``_resume.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: How many ``.sampler`` / ``.batch_sampler`` links :func:`find_generators`
#: follows from the loader's sampler (BatchSampler → RandomSampler is one).
GENERATOR_SEARCH_DEPTH = 4


def find_generators(
    loader_generator: torch.Generator | None, sampler: Any
) -> tuple[torch.Generator, ...]:
    """Every ``torch.Generator`` an epoch's order may be drawn from: ``loader.generator``
    (the base seed is drawn from it), then those the sampler holds
    (``RandomSampler(generator=g)``, also inside a ``BatchSampler``), each once."""
    found = [loader_generator] if loader_generator is not None else []
    level = [sampler]
    for _ in range(GENERATOR_SEARCH_DEPTH):
        below = []
        for obj in level:
            generator = getattr(obj, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
            below += [getattr(obj, name, None) for name in ("sampler", "batch_sampler")]
        level = [obj for obj in below if obj is not None]
    return tuple(found)


def generator_states(generators: tuple[torch.Generator, ...]) -> list[torch.Tensor]:
    return [g.get_state() for g in generators]


def set_generator_states(
    generators: tuple[torch.Generator, ...], states: list[torch.Tensor]
) -> None:
    """Put ``generators`` back to ``states``, refusing a state saved with other generators."""
    if len(states) != len(generators):
        raise ValueError(
            f"the saved state holds {len(states)} random generator state(s), but this "
            f"loader draws from {len(generators)} (loader.generator and the generators of its "
            "sampler): build the loader with the same generator and sampler as the one that "
            "saved it"
        )
    for generator, state in zip(generators, states, strict=True):
        generator.set_state(state)


@dataclass(frozen=True)
class RngState:
    """The random state a sampler may draw from: its generators' and torch's global.

    ``generators`` holds the states of :func:`find_generators`' generators, in
    that order; ``None`` leaves the generators alone when applied."""

    generators: list[torch.Tensor] | None
    global_rng: torch.Tensor

    @classmethod
    def capture(cls, generators: tuple[torch.Generator, ...]) -> RngState:
        return cls(generator_states(generators), torch.get_rng_state())

    def apply(self, generators: tuple[torch.Generator, ...]) -> None:
        if self.generators is not None:
            set_generator_states(generators, self.generators)
        torch.set_rng_state(self.global_rng)

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors, so ``torch.load(weights_only=True)`` reads a saved state."""
        return {"generators": self.generators, "global": self.global_rng}

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> RngState:
        return cls(found["generators"], found["global"])


@dataclass
class Replay:
    """How a resumed epoch reproduces a sampler that cannot load a state."""

    before_draw: RngState  # the random state the saved epoch's first draw saw
    skip: int  # specs the saved epoch had yielded: drawn again and dropped
    # The caller's global random state, put back once the skipped specs are drawn.
    # The generators are left where the replay took them: that is where the saved
    # epoch's had been after those draws (their state when state_dict() ran also
    # holds draws for batches loaded ahead, which the resumed epoch makes again).
    after: RngState
    # The saved epoch had drawn nothing yet (num_workers=0, saved right after
    # iter()): its first draw came after the state was saved, so a caller who
    # restored the random state saved with it keeps what that draw did to it.
    undrawn: bool = False
