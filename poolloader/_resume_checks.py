"""Checking a saved state before ``loader.load_state_dict()`` takes it: its keys,
its values, and that it was saved by a loader drawing the same order as this one
(``_resume.py`` makes the state; NOTE [ Resume ] there says what it holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._resume import STATE_VERSION

_KEYS = {"version", "epoch", "in_epoch", "generators"}
#: Between epochs, a persistent loader's state also holds the base seed its
#: iterator keeps for the next epoch (torch's persistent iterator draws none).
_OPTIONAL_KEYS = frozenset({"base_seed", "order"})
_EPOCH_KEYS = {"base_seed", "yielded", "yielded_after", "sampler", "rng"}
_EPOCH_OPTIONAL_KEYS = frozenset({"limits", "drawn"})


def check_order(state: Mapping[str, Any], here: Mapping[str, Any]) -> None:
    """Refuse a state saved by a loader that draws another order than this one
    (``here``, from :func:`~._resume.order_of`), or whose replayed position is past the
    end of its order. A state that records no order (an older one) passes."""
    saved = state.get("order")
    if saved is None:
        return
    if saved["sampler"] != here["sampler"] or saved["length"] != here["length"]:
        raise ValueError(
            f"this state was saved by a loader whose sampler is {_describe(saved)}, but this "
            f"loader's is {_describe(here)}: its positions would name other items here. Build "
            "the loader with the same dataset, batch_size, shuffle, drop_last and sampler as "
            "the one that saved it"
        )
    in_epoch, length = state["in_epoch"], saved["length"]
    replayed = in_epoch is not None and in_epoch["sampler"] is None
    if replayed and length is not None and in_epoch["yielded"] > length:
        raise ValueError(
            f"state['in_epoch']['yielded'] is {in_epoch['yielded']}, but the epoch it was "
            f"saved in has {length} positions: pass what loader.state_dict() returned"
        )


def _describe(order: Mapping[str, Any]) -> str:
    length = order["length"]
    return order["sampler"] + (f" of length {length}" if length is not None else "")


def check_state(state: Mapping[str, Any]) -> None:
    """Refuse a state this version cannot resume, saying why."""
    if not isinstance(state, Mapping):
        raise TypeError(f"load_state_dict() expects the dict from state_dict(), but got {state!r}")
    _check_keys("state", state, _KEYS, _OPTIONAL_KEYS)
    if state["version"] != STATE_VERSION:
        raise ValueError(
            f"this state was saved by another version of poolloader (state version "
            f"{state['version']!r}, this one reads {STATE_VERSION})"
        )
    _check_count("state['epoch']", state["epoch"])
    if not isinstance(state["generators"], list | tuple) or not all(
        isinstance(g, torch.Tensor) for g in state["generators"]
    ):
        raise ValueError("state['generators'] should be a list of generator states (tensors)")
    if state.get("base_seed") is not None:
        _check_count("state['base_seed']", state["base_seed"], signed=True)
    in_epoch = state["in_epoch"]
    if in_epoch is not None:
        _check_keys("state['in_epoch']", in_epoch, _EPOCH_KEYS, _EPOCH_OPTIONAL_KEYS)
        _check_epoch(in_epoch)


def _check_epoch(in_epoch: Mapping[str, Any]) -> None:
    _check_count("state['in_epoch']['base_seed']", in_epoch["base_seed"], signed=True)
    yielded = in_epoch["yielded"]
    _check_count("state['in_epoch']['yielded']", yielded)
    after = in_epoch["yielded_after"]
    if not isinstance(after, list | tuple) or not all(
        isinstance(p, int) and not isinstance(p, bool) and p > yielded for p in after
    ):
        raise ValueError(
            f"state['in_epoch']['yielded_after'] should list the positions past "
            f"yielded={yielded} that were yielded, but it is {after!r}"
        )
    changes = in_epoch.get("limits", [])
    if not isinstance(changes, list | tuple) or not all(
        isinstance(c, list | tuple) and len(c) == 2 and isinstance(c[0], int)
        and not isinstance(c[0], bool) and c[0] >= yielded and isinstance(c[1], Mapping)
        for c in changes
    ):  # fmt: skip
        raise ValueError(
            "state['in_epoch']['limits'] should list the sampler's limit changes as "
            f"[position, limits] pairs from position {yielded} on, but it is {changes!r}"
        )
    drawn = in_epoch.get("drawn", yielded)
    if isinstance(drawn, bool) or not isinstance(drawn, int) or drawn < yielded:
        raise ValueError(
            f"state['in_epoch']['drawn'] should count the batches the epoch had drawn, "
            f"at least yielded={yielded}, but it is {drawn!r}"
        )
    rng = in_epoch["rng"]
    if in_epoch["sampler"] is None and (
        not isinstance(rng, Mapping) or not {"before_iter", "before_draw"} <= set(rng)
    ):
        raise ValueError(
            "state['in_epoch']['rng'] should hold the random states the epoch was drawn "
            f"from ('before_iter', 'before_draw'), but it is {rng!r}"
        )


def _check_count(name: str, value: Any, signed: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not signed):
        kind = "an integer" if signed else "a non-negative integer"
        raise ValueError(f"{name} should be {kind}, but it is {value!r}")


def _check_keys(
    name: str, found: Mapping[str, Any], expected: set[str], optional: frozenset[str] = frozenset()
) -> None:
    unknown, missing = set(found) - expected - optional, expected - set(found)
    if unknown or missing:
        raise ValueError(
            f"{name} is not a poolloader DataLoader state: unknown keys {sorted(unknown)}, "
            f"missing keys {sorted(missing)}. Pass what loader.state_dict() returned."
        )
