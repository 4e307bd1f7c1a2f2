"""``num_workers=0`` with per-batch seeding: each batch loads under its own seeds,
and the caller's random state is put back exactly, whatever the caller draws
between batches (NOTE [ Saving NumPy's global state ] and NOTE [ Saving random's
state ] in ``_seeding.py``)."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from poolloader import DataLoader


class Draws(Dataset):
    """Each item draws from all three global generators, normals included (NumPy
    and ``random.gauss`` cache every second normal deviate: state outside the
    generators' words)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.tensor(
            [random.random(), random.gauss(0.0, 1.0), float(np.random.standard_normal()),
             float(np.random.rand()), float(torch.rand(()))]
        )  # fmt: skip


def _nothing() -> list[float]:
    return []


def _one_normal() -> list[float]:
    return [float(np.random.standard_normal())]  # leaves a deviate cached, or takes it


def _uniforms() -> list[float]:
    return [float(x) for x in np.random.rand(3)] + [random.random(), float(torch.rand(()))]


def _python_normal() -> list[float]:
    return [random.gauss(0.0, 1.0)]  # leaves random's own deviate cached, or takes it


def _reseed_same() -> list[float]:
    np.random.seed(7)  # the same state every time: the bytes repeat, the deviate is gone
    return [float(np.random.rand())]


def _set_state_with_deviate() -> list[float]:
    state = list(np.random.get_state())
    state[3], state[4] = 1, 0.5  # a cached deviate set by hand
    np.random.set_state(tuple(state))
    return [float(np.random.standard_normal())]


CALLERS: dict[str, Callable[[], list[float]]] = {
    "nothing": _nothing,
    "one_normal": _one_normal,
    "uniforms": _uniforms,
    "python_normal": _python_normal,
    "reseed_same": _reseed_same,
    "set_state_with_deviate": _set_state_with_deviate,
}


def _seed_caller() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)


def _states() -> tuple:
    r, n, t = random.getstate(), np.random.get_state(), torch.get_rng_state()
    return r, (n[0], n[1].tolist(), n[2], n[3], n[4]), t.tolist()


@pytest.mark.parametrize("caller", list(CALLERS), ids=list(CALLERS))
def test_the_callers_random_state_is_put_back_exactly(caller):
    step = CALLERS[caller]
    _seed_caller()
    want = [step() for _ in range(5)]  # what the caller draws with no loader at all
    want_states = _states()

    # Batches of 3: each leaves a normal deviate of its own cached.
    loader = DataLoader(Draws(), batch_size=3, num_workers=0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    _seed_caller()
    got, batches = [], []
    got.append(step())
    for batch in loader:  # 4 batches, the caller drawing between them
        batches.append(batch)
        got.append(step())
    assert got == want
    assert _states() == want_states

    _seed_caller()
    again = DataLoader(Draws(), batch_size=3, num_workers=0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    quiet = list(again)  # the same epoch with a caller that draws nothing
    for a, b in zip(batches, quiet, strict=True):
        assert torch.equal(a, b)


def test_batches_are_the_workers_batches():
    """The same seeds as a worker's: the batches equal those of worker processes."""
    kwargs = {"batch_size": 2, "generator": torch.Generator().manual_seed(0)}
    _seed_caller()
    in_process = []
    for batch in DataLoader(Draws(), num_workers=0, **kwargs):
        in_process.append(batch)
        _one_normal()
    kwargs["generator"] = torch.Generator().manual_seed(0)
    with DataLoader(Draws(), num_workers=2, multiprocessing_context="forkserver",
                    **kwargs) as loader:  # fmt: skip
        for a, b in zip(in_process, loader, strict=True):
            assert torch.equal(a, b)


def _rewinding_trace(use_loader: bool) -> list[float]:
    """The caller rewinds NumPy with ``set_state`` to a state holding a cached normal
    deviate, at the very words the loader last put back (without one)."""
    np.random.seed(7)
    np.random.standard_normal()  # the words, and one deviate cached
    saved = np.random.get_state()
    loader = DataLoader(Draws(), batch_size=2, num_workers=0,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = []
    for j, _ in enumerate(loader if use_loader else range(6)):
        if j == 0:
            out.append(float(np.random.standard_normal()))  # takes it: the words stay
        elif j == 1:
            np.random.set_state(saved)  # the same words, the deviate back
        elif j == 2:
            out.append(float(np.random.standard_normal()))  # that deviate again
    return out


def test_a_deviate_set_state_put_back_at_the_same_words_is_kept():
    """NOTE [ Saving NumPy's global state ]: the words alone said the state was the
    one last put back, and the batch's end put that back, losing the deviate."""
    want = _rewinding_trace(use_loader=False)
    assert want[0] == want[1]
    assert _rewinding_trace(use_loader=True) == want
