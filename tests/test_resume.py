"""Exact mid-epoch resume and per-batch seeding that does not depend on num_workers."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_same
from _datasets import Random
from torch.utils.data import BatchSampler, RandomSampler

from poolloader import DataLoader
from poolloader.samplers import DynamicBatchSampler

LENGTHS = [float(1 + (i * 7) % 13) for i in range(40)]


class Tagged(torch.utils.data.Dataset):
    """Item i: (i, a random draw): random augmentation must survive resume too."""

    def __len__(self) -> int:
        return len(LENGTHS)

    def __getitem__(self, i: int):
        return torch.tensor([float(i), torch.rand(()).item()])


def _dynamic():
    return {"batch_sampler": DynamicBatchSampler(LENGTHS, max_duration=20.0, seed=3)}


def _random_with_generator():
    generator = torch.Generator().manual_seed(7)
    return {"batch_size": 3, "shuffle": True, "generator": generator}


def _random_global():
    return {"batch_sampler": BatchSampler(RandomSampler(range(40)), 4, drop_last=False)}


SAMPLERS = {
    "dynamic": _dynamic,
    "torch_generator": _random_with_generator,
    "torch_global": _random_global,
}


def _loader(make, num_workers):
    extra = {"multiprocessing_context": "forkserver"} if num_workers else {}
    return DataLoader(Tagged(), num_workers=num_workers, **make(), **extra)


def _epochs(loader, first, last, stop_after=None):
    """Batches of epochs first..last-1; with stop_after=(epoch, k), stop after k batches
    of that epoch and return the loader's state as well."""
    seen = []
    for epoch in range(first, last):
        sampler = loader.batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for k, batch in enumerate(loader):
            seen.append((epoch, batch))
            if stop_after == (epoch, k + 1):
                return seen, loader.state_dict()
    return seen, None


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_resume_continues_exactly(sampler, num_workers):
    make = SAMPLERS[sampler]
    torch.manual_seed(0)
    with _loader(make, num_workers) as loader:
        reference, _ = _epochs(loader, 0, 3)
    for cut in [(0, 1), (1, 4), (2, 2)]:
        torch.manual_seed(0)
        with _loader(make, num_workers) as first:
            before, state = _epochs(first, 0, 3, stop_after=cut)
        assert state is not None
        rng = torch.get_rng_state()
        with _loader(make, num_workers) as second:
            second.load_state_dict(state)
            torch.set_rng_state(rng)  # a checkpoint restores the caller's random state too
            after, _ = _epochs(second, cut[0], 3)
        assert len(before) + len(after) == len(reference), cut
        for i, ((e1, got), (e2, want)) in enumerate(zip(before + after, reference)):
            assert e1 == e2
            assert_same(got, want, f"cut {cut}, batch {i}")


def test_resume_with_a_different_worker_count():
    torch.manual_seed(0)
    with _loader(_dynamic, 2) as loader:
        reference, _ = _epochs(loader, 0, 2)
    torch.manual_seed(0)
    with _loader(_dynamic, 2) as first:
        before, state = _epochs(first, 0, 2, stop_after=(0, 3))
    rng = torch.get_rng_state()
    with _loader(_dynamic, 0) as second:
        second.load_state_dict(state)
        torch.set_rng_state(rng)
        after, _ = _epochs(second, 0, 2)
    for (_, got), (_, want) in zip(before + after, reference):
        assert_same(got, want)


def test_state_between_epochs_starts_the_next_epoch():
    torch.manual_seed(0)
    with _loader(_dynamic, 2) as loader:
        first, _ = _epochs(loader, 0, 1)
        state = loader.state_dict()
    assert state["in_epoch"] is None and state["epoch"] == 1
    rng = torch.get_rng_state()
    with _loader(_dynamic, 2) as again:
        again.load_state_dict(state)
        torch.set_rng_state(rng)
        second, _ = _epochs(again, 1, 2)
    torch.manual_seed(0)
    with _loader(_dynamic, 2) as straight:
        reference, _ = _epochs(straight, 0, 2)
    for (_, got), (_, want) in zip(first + second, reference):
        assert_same(got, want)


def test_state_survives_torch_save_with_weights_only(tmp_path):
    with _loader(_random_with_generator, 2) as loader:
        _, state = _epochs(loader, 0, 1, stop_after=(0, 2))
    torch.save(state, tmp_path / "loader.pt")
    loaded = torch.load(tmp_path / "loader.pt", weights_only=True)
    with _loader(_random_with_generator, 0) as again:
        again.load_state_dict(loaded)
        assert len(list(again)) == len(range(0, 40, 3)) - 2


def test_bad_states_are_refused():
    loader = DataLoader(Tagged())
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        loader.load_state_dict(
            {"version": 1, "epoch": 0, "in_epoch": None, "generator": None, "bogus": 1}
        )
    with pytest.raises(ValueError, match="another version of poolloader"):
        loader.load_state_dict({"version": 99, "epoch": 0, "in_epoch": None, "generator": None})
    with pytest.raises(TypeError, match="expects the dict from state_dict"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_out_of_order_resume_skips_what_was_yielded():
    with DataLoader(Tagged(), batch_size=2, num_workers=2, in_order=False,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        seen = {int(next(iterator)[0, 0]) for _ in range(7)}
        state = loader.state_dict()
    with DataLoader(Tagged(), batch_size=2) as again:
        again.load_state_dict(state)
        rest = [int(b[0, 0]) for b in again]
    assert sorted(seen | set(rest)) == list(range(0, 40, 2))
    assert not seen & set(rest)


@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_random_batches_do_not_depend_on_num_workers(num_workers):
    def batches(workers, method="forkserver"):
        extra = {"multiprocessing_context": method} if workers else {}
        generator = torch.Generator().manual_seed(11)
        with DataLoader(Random(), batch_size=4, shuffle=True, generator=generator,
                        num_workers=workers, **extra) as loader:  # fmt: skip
            return [b for _ in range(2) for b in loader]

    reference = batches(0)
    for got, want in zip(batches(num_workers), reference):
        assert torch.equal(got, want)
    assert not torch.equal(reference[0], reference[1])


def test_random_batches_match_under_spawn():
    generator = torch.Generator().manual_seed(11)
    with DataLoader(Random(), batch_size=4, num_workers=2, generator=generator) as loader:
        spawned = list(loader)
    generator = torch.Generator().manual_seed(11)
    with DataLoader(Random(), batch_size=4, generator=generator) as loader:
        in_process = list(loader)
    for got, want in zip(spawned, in_process):
        assert torch.equal(got, want)


def test_batch_seeding_leaves_the_callers_random_state_alone():
    # torch's loader draws one base seed per epoch from the global generator; the
    # dataset's own draws must not move it any further.
    from _datasets import Plain

    torch.manual_seed(5)
    for _ in torch.utils.data.DataLoader(Plain(16), batch_size=4):
        pass
    expected = torch.rand(3)
    torch.manual_seed(5)
    with DataLoader(Random(), batch_size=4) as loader:
        for _ in loader:
            pass
    assert torch.equal(torch.rand(3), expected)


def test_worker_seeding_is_torchs():
    generator = torch.Generator().manual_seed(21)
    with DataLoader(Random(), batch_size=None, num_workers=2, seeding="worker",
                    collate_fn=_worker_seed, generator=generator,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        ours = set(loader)
    generator = torch.Generator().manual_seed(21)
    theirs = set(torch.utils.data.DataLoader(
        Random(), batch_size=None, num_workers=2, collate_fn=_worker_seed, generator=generator
    ))  # fmt: skip
    assert ours == theirs and len(ours) == 2


def _worker_seed(item):
    info = torch.utils.data.get_worker_info()
    return (info.id, info.seed)
