"""Exact mid-epoch resume and per-batch seeding that does not depend on num_workers."""

from __future__ import annotations

import gc
import random
import re
import threading
import warnings

import numpy as np
import pytest
import torch
from _compare import assert_same
from _datasets import Random
from _knobs import Knobs, keep
from torch.utils.data import BatchSampler, RandomSampler

from poolloader import DataLoader
from poolloader.samplers import DynamicBatchSampler, SortedBatchSampler

LENGTHS = [float(1 + (i * 7) % 13) for i in range(40)]
#: Stands for "the last batch of that epoch" in a cut point: a state taken after an epoch's
#: final batch, before the loop has seen the epoch end.
LAST = -1
#: (epoch, batches of it yielded before the state is taken); the resumed loop starts at
#: that epoch and runs on to EPOCHS, so every cut also crosses epoch boundaries.
CUTS = [(0, 1), (1, 4), (2, 2)]
EPOCHS = 3


def _row(i: int) -> torch.Tensor:
    """Item i and one draw from each generator dataset code uses: all must survive resume."""
    draws = [random.random(), float(np.random.rand()), torch.rand(()).item()]
    return torch.tensor([float(i), *draws], dtype=torch.float64)


class Tagged(torch.utils.data.Dataset):
    """Item i: (i, python, numpy and torch random draws)."""

    def __init__(self, n: int = len(LENGTHS)) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return _row(i)


class CutTagged(torch.utils.data.Dataset):
    """A lhotse CutSet batch, built in the worker: one row per cut, as ``Tagged`` does."""

    def __getitem__(self, cuts):
        return torch.stack([_row(int(cut.id.rsplit("-", 1)[1])) for cut in cuts])


def _dynamic():
    return {"batch_sampler": DynamicBatchSampler(LENGTHS, max_duration=20.0, seed=3)}


def _sorted_extended():
    # 10 batches a pass, 13 an epoch: epochs straddle passes and repeat batches
    sampler = SortedBatchSampler(LENGTHS, batch_size=4, batches_per_epoch=13, seed=3)
    return {"batch_sampler": sampler}


def _random_with_generator():
    generator = torch.Generator().manual_seed(7)
    return {"batch_size": 3, "shuffle": True, "generator": generator}


def _random_sampler_with_its_generator():
    generator = torch.Generator().manual_seed(7)
    return {"sampler": RandomSampler(range(40), generator=generator), "batch_size": 3}


def _random_global():
    return {"batch_sampler": BatchSampler(RandomSampler(range(40)), 4, drop_last=False)}


class ProtocolSampler:
    """A third-party batch sampler that only follows the protocol: batches of a
    ``seed + epoch`` permutation, ``set_epoch``, and a sampler-level ``state_dict`` /
    ``load_state_dict`` (its ``__iter__`` is a plain generator, as lhotse-style code has)."""

    def __init__(self, count: int, batch_size: int, seed: int = 0) -> None:
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.epoch, self.yielded, self._resume_at = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self):
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.count).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.count, self.batch_size)]
        self.yielded, self._resume_at = self._resume_at, 0
        while self.yielded < len(batches):
            self.yielded += 1
            yield batches[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = state["epoch"], state["yielded"]


def _protocol():
    return {"batch_sampler": ProtocolSampler(len(LENGTHS), 3, seed=5)}


def _lhotse():
    import lhotse
    from lhotse.dataset import DynamicBucketingSampler
    from lhotse.testing.dummies import DummyManifest

    cuts = DummyManifest(lhotse.CutSet, begin_id=0, end_id=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = DynamicBucketingSampler(cuts, max_duration=5, num_buckets=2, shuffle=True, seed=3)
    return {"dataset": CutTagged(), "sampler": sampler, "batch_size": None}


SAMPLERS = {
    "dynamic": _dynamic,
    "lhotse": _lhotse,
    "protocol_only": _protocol,
    "sorted_extended": _sorted_extended,
    "torch_generator": _random_with_generator,
    "torch_global": _random_global,
    "torch_sampler_generator": _random_sampler_with_its_generator,
}


def _loader(make, num_workers):
    options = make()
    dataset = options.pop("dataset") if "dataset" in options else Tagged()
    extra = {"multiprocessing_context": "forkserver"} if num_workers else {}
    return DataLoader(dataset, num_workers=num_workers, **options, **extra)


def _set_epoch(loader, epoch):
    sampler = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _epochs(loader, first, last, stop_after=None, after_break=False):
    """Batches of epochs first..last-1; with stop_after=(epoch, k), stop after k batches
    of that epoch and return the loader's state as well: taken inside the loop, or
    with ``after_break`` once the loop was left with ``break`` and its iterator is gone."""
    seen = []
    for epoch in range(first, last):
        _set_epoch(loader, epoch)
        for k, batch in enumerate(loader):
            seen.append((epoch, batch))
            if stop_after == (epoch, k + 1):
                if not after_break:
                    return seen, loader.state_dict()
                break
        else:
            continue
        gc.collect()
        return seen, loader.state_dict()
    return seen, None


def _absolute(cut, reference):
    """``cut`` with ``LAST`` replaced by the length of that epoch in ``reference``."""
    epoch, k = cut
    return (epoch, sum(e == epoch for e, _ in reference) if k == LAST else k)


def _check_resume(make, num_workers, reference, cut, after_break=False):
    torch.manual_seed(0)
    with _loader(make, num_workers) as first:
        before, state = _epochs(first, 0, EPOCHS, stop_after=cut, after_break=after_break)
    assert state is not None
    rng = torch.get_rng_state()
    with _loader(make, num_workers) as second:
        second.load_state_dict(state)
        torch.set_rng_state(rng)  # a checkpoint restores the caller's random state too
        after, _ = _epochs(second, cut[0], EPOCHS)
    assert len(before) + len(after) == len(reference), cut
    for i, ((e1, got), (e2, want)) in enumerate(zip(before + after, reference)):
        assert e1 == e2
        assert_same(got, want, f"cut {cut}, batch {i}")


@pytest.mark.parametrize(
    ("sampler", "num_workers"),
    [(name, workers) for name in sorted(SAMPLERS) for workers in (0, 2)],
)
def test_resume_continues_exactly(sampler, num_workers):
    make = SAMPLERS[sampler]
    torch.manual_seed(0)
    with _loader(make, num_workers) as loader:
        reference, _ = _epochs(loader, 0, EPOCHS)
    assert len({e for e, _ in reference}) == EPOCHS
    for cut in CUTS:
        _check_resume(make, num_workers, reference, _absolute(cut, reference))


# After an epoch's last batch, before the loop sees the epoch end, the state is inside
# that epoch with nothing left to yield, whatever num_workers: the resumed loop finishes
# that epoch (yielding nothing) and goes on with the next, instead of running it twice.
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampler", ["dynamic", "torch_global"])
def test_state_after_an_epochs_last_batch_resumes_to_the_next_epoch(sampler, num_workers):
    make = SAMPLERS[sampler]
    torch.manual_seed(0)
    with _loader(make, num_workers) as loader:
        reference, _ = _epochs(loader, 0, EPOCHS)
    _check_resume(make, num_workers, reference, _absolute((1, LAST), reference))


def _global_shuffle():
    return {"batch_size": 3, "shuffle": True}  # torch's RandomSampler, no generator


# A state saved before the epoch's first batch reached the consumer: RandomSampler
# without a generator draws its seed from the global generator on its first next(),
# which the resumed epoch must make under the saved state, not the caller's.
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("make", [_global_shuffle, _random_global])
def test_a_state_saved_before_the_first_batch_resumes_that_epoch(make, num_workers):
    torch.manual_seed(0)
    with _loader(make, num_workers) as loader:
        reference, _ = _epochs(loader, 0, 2)
    torch.manual_seed(0)
    with _loader(make, num_workers) as first:
        before, _ = _epochs(first, 0, 1)
        iterator = iter(first)
        state = first.state_dict()
        assert state["in_epoch"]["yielded"] == 0
        del iterator
    torch.manual_seed(12345)  # a fresh process: the caller's generator is elsewhere
    with _loader(make, num_workers) as second:
        second.load_state_dict(state)
        after = [(1, batch) for batch in second]
    assert len(before) + len(after) == len(reference)
    for i, ((e1, got), (e2, want)) in enumerate(zip(before + after, reference)):
        assert e1 == e2
        assert_same(got, want, f"batch {i}")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampler", ["dynamic", "torch_global"])
def test_state_taken_after_break_is_where_the_loop_stopped(sampler, num_workers):
    """``break``, then ``state_dict()``: the state describes the position where the
    loop stopped (not the start of the next epoch), and a fresh loader continues
    from there."""
    make = SAMPLERS[sampler]
    torch.manual_seed(0)
    with _loader(make, num_workers) as loader:
        reference, _ = _epochs(loader, 0, EPOCHS)
    for cut in [(0, 2), (1, 1)]:
        _check_resume(make, num_workers, reference, cut, after_break=True)


class _WatchedBatchSampler(BatchSampler):
    """torch's shuffled batches of 3 of 12 items; says when it has been drawn to the end
    (torch's RandomSampler draws once more from its generator as it finishes)."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__(RandomSampler(range(12), generator=generator), 3, drop_last=False)
        self.drawn_all = threading.Event()

    def __iter__(self):
        yield from super().__iter__()
        self.drawn_all.set()


# The generator's state when state_dict() runs includes draws made for batches the
# workers loaded ahead; a resumed epoch that replays the sampler makes those draws
# again, so it must not also restore that state.
def test_state_does_not_depend_on_how_far_workers_prefetched():
    def loader():
        generator = torch.Generator().manual_seed(7)
        return DataLoader(Tagged(), batch_sampler=_WatchedBatchSampler(generator),
                          generator=generator, num_workers=2,
                          multiprocessing_context="forkserver")  # fmt: skip

    torch.manual_seed(0)
    with loader() as straight:
        reference = [[b[:, 0].tolist() for b in straight] for _ in range(2)]
    with loader() as first:
        iterator = iter(first)
        before = [next(iterator)[:, 0].tolist()]
        assert first.batch_sampler.drawn_all.wait(timeout=30)  # the prefetch ran ahead
        state = first.state_dict()
    with loader() as second:
        second.load_state_dict(state)
        resumed = [before + [b[:, 0].tolist() for b in second]]
        resumed.append([b[:, 0].tolist() for b in second])
    assert resumed == reference


def _two_ranks():
    # Two ranks: the loader draws a fixed window ahead (SamplerBase.paced), so where a
    # limit set in the loop takes effect does not depend on the workers' speed.
    sampler = DynamicBatchSampler(LENGTHS * 4, max_duration=20.0, seed=3, rank=0, world_size=2)
    return {"batch_sampler": sampler, "dataset": Tagged(len(LENGTHS) * 4)}


def _with_a_curriculum_step(iterator, loader, done=0, stop=None, step_after=2):
    """The batches of ``iterator`` (``done`` of the epoch's yielded before it), up to
    batch ``stop``; the limit halves once ``step_after`` batches were yielded."""
    found = []
    for k, batch in enumerate(iterator, start=done):
        found.append(batch[:, 0].long().tolist())
        if k + 1 == step_after:
            loader.batch_sampler.max_duration = 10.0
        if k + 1 == stop:
            break
    return found


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 3, 4, 6])
def test_a_limit_changed_mid_epoch_resumes_as_the_epoch_went_on(num_workers, cut):
    """A curriculum step (a smaller max_duration) made in the loop takes effect at the
    next draw, a prefetch window ahead of the loop: the batches drawn before it keep
    the old limit. A state taken anywhere around the step resumes into the very
    batches the uninterrupted epoch yielded, those cut with the old limit included,
    and the sampler ends with the new limit."""
    with _loader(_two_ranks, num_workers) as loader:
        reference = _with_a_curriculum_step(iter(loader), loader)
    with _loader(_two_ranks, num_workers) as loader:
        got = _with_a_curriculum_step(iter(loader), loader, stop=cut)
        state = loader.state_dict()
    with _loader(_two_ranks, num_workers) as resumed:
        resumed.load_state_dict(state)
        got += _with_a_curriculum_step(iter(resumed), resumed, done=cut)
        assert resumed.batch_sampler.max_duration == 10.0
    assert got == reference
    assert any(sum(LENGTHS[i % len(LENGTHS)] for i in b) > 10.0 for b in reference[2:])


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 3, 6])
def test_a_limit_set_after_load_state_dict_takes_effect_where_the_state_was_taken(num_workers, cut):
    """A limit set between load_state_dict and iterating acts as the same limit set in
    the loop of the uninterrupted epoch right when the state was taken: the batches
    drawn by then (a prefetch window) keep their limits, the later ones take the new
    one, and it stays (the saved limits do not put the old one back)."""

    def run(iterator, loader, done=0, stop=None):
        found = []
        for k, batch in enumerate(iterator, start=done):
            found.append(batch[:, 0].long().tolist())
            if k + 1 == 2:
                loader.batch_sampler.max_duration = 10.0  # the curriculum's own step
            if k + 1 == cut and stop is None and done == 0:
                loader.batch_sampler.max_duration = 5.0  # the change, in the loop
            if k + 1 == stop:
                break
        return found

    with _loader(_two_ranks, num_workers) as loader:
        reference = run(iter(loader), loader)
        assert loader.batch_sampler.max_duration == (10.0 if cut < 2 else 5.0)
    with _loader(_two_ranks, num_workers) as loader:
        got = run(iter(loader), loader, stop=cut)
        state = loader.state_dict()
    with _loader(_two_ranks, num_workers) as resumed:
        resumed.load_state_dict(state)
        resumed.batch_sampler.max_duration = 5.0  # the change, after loading
        got += run(iter(resumed), resumed, done=cut)
        assert resumed.batch_sampler.max_duration == (10.0 if cut < 2 else 5.0)
    assert got == reference
    assert any(sum(LENGTHS[i % len(LENGTHS)] for i in b) > 5.0 for b in reference[cut:])


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


@pytest.mark.parametrize("make", [_random_with_generator, _global_shuffle])
def test_a_persistent_loaders_state_between_epochs_resumes_the_next_epochs(make):
    """torch's persistent iterator draws its base seed once and keeps it (its reset
    draws none): a fresh loader resuming between epochs must not draw another, which
    would change every batch's random draws and, through loader.generator, the order."""

    def persistent():
        options = make()
        return DataLoader(Tagged(), num_workers=2, persistent_workers=True,
                          multiprocessing_context="forkserver", **options)  # fmt: skip

    torch.manual_seed(0)
    with persistent() as loader:
        reference, _ = _epochs(loader, 0, 3)
    torch.manual_seed(0)
    with persistent() as first:
        before, _ = _epochs(first, 0, 1)
        state, rng = first.state_dict(), torch.get_rng_state()
    assert state["in_epoch"] is None and "base_seed" in state
    torch.manual_seed(99)
    with persistent() as second:
        torch.set_rng_state(rng)
        second.load_state_dict(state)
        assert second.state_dict()["base_seed"] == state["base_seed"]  # pending, kept
        after, _ = _epochs(second, 1, 3)
    assert len(before) + len(after) == len(reference)
    for i, ((e1, got), (e2, want)) in enumerate(zip(before + after, reference)):
        assert e1 == e2
        assert_same(got, want, f"batch {i}")


class _GlobalPermutation(torch.utils.data.Sampler):
    """Batches of two of a permutation drawn from torch's global generator in
    ``__iter__``, as many hand-written batch samplers draw it."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n // 2

    def __iter__(self):
        order = torch.randperm(self.n).tolist()
        return iter([order[i : i + 2] for i in range(0, self.n, 2)])


def test_a_persistent_iterator_made_again_keeps_the_samplers_own_draws():
    """A persistent loader's iterator dropped mid-epoch is made again by the next
    iter(), which keeps the first one's base seed: the new iterator's own draw of
    one was undone by putting back the random state from before iter(), and that
    undid the sampler's draws in iter() too, so the next two epochs had the same
    order. They are the epochs the iterator kept alive gives."""

    def epochs(drop: bool) -> list[list[list[int]]]:
        torch.manual_seed(1)
        with DataLoader(Tagged(12), batch_sampler=_GlobalPermutation(12), num_workers=2,
                        persistent_workers=True, multiprocessing_context="forkserver") as loader:  # fmt: skip
            for _ in loader:
                pass
            iterator = iter(loader)
            next(iterator)
            if drop:
                del iterator
            return [[b[:, 0].long().tolist() for b in loader] for _ in range(2)]

    kept, made_again = epochs(drop=False), epochs(drop=True)
    assert made_again[0] != made_again[1]
    assert made_again == kept


@pytest.mark.parametrize("load_workers", [0, 2])
def test_a_state_saved_before_any_draw_leaves_the_next_epochs_order_as_it_was(load_workers):
    """num_workers=0 draws nothing at iter(): the saved epoch's first draw (torch's
    RandomSampler takes its seed from the global generator) came after the state,
    so a caller who restores its random state with the loader's must find that
    draw made, or every later epoch's order shifts."""
    torch.manual_seed(0)
    with _loader(_global_shuffle, 0) as loader:
        reference, _ = _epochs(loader, 0, 3)
    torch.manual_seed(0)
    with _loader(_global_shuffle, 0) as first:
        before, _ = _epochs(first, 0, 1)
        iterator = iter(first)
        state, rng = first.state_dict(), torch.get_rng_state()
        del iterator
    torch.manual_seed(123)
    with _loader(_global_shuffle, load_workers) as second:
        torch.set_rng_state(rng)
        second.load_state_dict(state)
        after, _ = _epochs(second, 1, 3)
    assert len(before) + len(after) == len(reference)
    for i, ((e1, got), (e2, want)) in enumerate(zip(before + after, reference)):
        assert e1 == e2
        assert_same(got, want, f"batch {i}")


@pytest.mark.parametrize("dataset", ["sharded", "uneven"])
@pytest.mark.parametrize(("num_workers", "cut"), [(0, 3), (2, 3), (3, 4)])
def test_an_iterable_datasets_epoch_resumes_after_the_batches_it_yielded(dataset, num_workers, cut):
    """A stream cannot be told where to start: the resumed epoch loads again the
    batches the saved one yielded and drops them (with a warning that says so),
    instead of yielding them a second time. Also with shards that end unevenly."""
    from _datasets import Counted, Uneven

    def make():
        extra = {"multiprocessing_context": "forkserver"} if num_workers else {}
        stream = Counted(13) if dataset == "sharded" else Uneven()
        return DataLoader(stream, batch_size=2, num_workers=num_workers, **extra)

    with make() as loader:
        reference = [b.tolist() for b in loader]
        cut = min(cut, len(reference) - 1)  # (one worker's uneven shard: two batches)
        iterator = iter(loader)
        seen = [next(iterator).tolist() for _ in range(cut)]
        state = loader.state_dict()
        del iterator
    with make() as again:
        again.load_state_dict(state)
        with pytest.warns(UserWarning, match=rf"loads again the {cut} batch\(es\) it had"):
            rest = [b.tolist() for b in again]
    assert seen + rest == reference


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
            {"version": 1, "epoch": 0, "in_epoch": None, "generators": [], "bogus": 1}
        )
    with pytest.raises(ValueError, match="another version of poolloader"):
        loader.load_state_dict({"version": 99, "epoch": 0, "in_epoch": None, "generators": []})
    with pytest.raises(TypeError, match="expects the dict from state_dict"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_a_state_from_a_loader_with_another_order_is_refused():
    """Positions name other items under another batch size, dataset length or
    shuffle: refused when loaded, not resumed into lost or repeated items."""
    saving = DataLoader(Tagged(), batch_size=4)
    iterator = iter(saving)
    next(iterator), next(iterator)
    state = saving.state_dict()
    assert state["order"] == {"sampler": "BatchSampler(SequentialSampler)", "length": 10}
    others = {
        "BatchSampler(SequentialSampler) of length 8": DataLoader(Tagged(), batch_size=5),
        "BatchSampler(SequentialSampler) of length 3": DataLoader(
            torch.utils.data.TensorDataset(torch.arange(10)), batch_size=4
        ),
        "BatchSampler(RandomSampler) of length 10": DataLoader(
            Tagged(), batch_size=4, shuffle=True
        ),
    }
    for says, loader in others.items():
        with pytest.raises(ValueError, match=f"but this loader's is {re.escape(says)}: its"):
            loader.load_state_dict(state)
    same = DataLoader(Tagged(), batch_size=4)
    same.load_state_dict(state)
    assert [b[0, 0].item() for b in same][:1] == [8.0]


@pytest.mark.parametrize(
    ("change", "says"),
    [({"epoch": -3}, r"state\['epoch'\] should be a non-negative integer"),
     ({"yielded": -1}, r"\['yielded'\] should be a non-negative integer"),
     ({"yielded": 2.7}, r"\['yielded'\] should be a non-negative integer"),
     ({"yielded": 100}, r"\['yielded'\] is 100, but the epoch it was saved in has 10"),
     ({"yielded_after": None}, r"\['yielded_after'\] should list the positions"),
     ({"base_seed": None}, r"\['base_seed'\] should be an integer"),
     ({"rng": None}, r"\['rng'\] should hold the random states"),
     ({"rng": {}}, r"\['rng'\] should hold the random states"),
     ({"limits": [[0, {}], ["x", {}]]}, r"\['limits'\] should list the sampler's limit changes"),
     ({"drawn": 0}, r"\['drawn'\] should count the batches the epoch had drawn"),
     ({"drawn": "5"}, r"\['drawn'\] should count the batches the epoch had drawn")],
)  # fmt: skip
def test_a_damaged_state_is_refused_when_loaded(change, says):
    saving = DataLoader(Tagged(), batch_size=4)
    iterator = iter(saving)
    next(iterator)
    state = saving.state_dict()
    if "epoch" in change:
        state = {**state, **change}
    else:
        state = {**state, "in_epoch": {**state["in_epoch"], **change}}
    loader = DataLoader(Tagged(), batch_size=4)
    with pytest.raises(ValueError, match=says):
        loader.load_state_dict(state)
    assert [b[0, 0].item() for b in loader][:1] == [0.0]  # nothing half-loaded


@pytest.mark.parametrize("change", [{"seed": 2}, {"world_size": 2}])
def test_a_sampler_state_the_sampler_cannot_load_is_refused_when_loaded(change):
    """A poolloader sampler's state saved with another seed or world size: the
    loader's load_state_dict() says so, as it says the order differs, rather than
    taking it and failing at every later iter() until another state is loaded."""

    def loader(seed=1, world_size=1):
        sampler = DynamicBatchSampler([1.0] * 24, max_duration=3.0, seed=seed, rank=0,
                                      world_size=world_size)  # fmt: skip
        return DataLoader(Tagged(24), batch_sampler=sampler)

    saving = loader()
    iterator = iter(saving)
    next(iterator)
    state = saving.state_dict()
    other = loader(**change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"saved with {key}=1, but this DynamicBatchSampler"):
        other.load_state_dict(state)
    got = [batch[:, 0].tolist() for batch in other]  # nothing half-loaded
    assert got == [batch[:, 0].tolist() for batch in loader(**change)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loop_over_an_epoch_that_load_state_dict_left_says_so(num_workers):
    """load_state_dict() in the middle of a loop over the loader: with workers the
    loop ended as if its epoch were done, its other batches silently missing;
    without, it went on with the epoch the state replaced. Either way it now
    raises at its next batch, saying what happened, and iterating again
    continues from the state loaded."""
    with _loader(lambda: {"batch_size": 4}, num_workers) as loader:
        reference = [b[:, 0].tolist() for b in loader]
        got = []
        with pytest.raises(RuntimeError, match=r"load_state_dict\(\) was called during epoch 1"):
            for k, batch in enumerate(loader):
                got.append(batch[:, 0].tolist())
                if k == 1:
                    state = loader.state_dict()
                if k == 4:
                    loader.load_state_dict(state)
        assert len(got) == 5
        assert [b[:, 0].tolist() for b in loader] == reference[2:]


def test_a_state_saved_with_other_generators_is_refused():
    """A state from a loader with a generator, loaded where there is none: said, not
    silently ignored (the resumed epochs would be drawn differently)."""
    with _loader(_random_with_generator, 0) as loader:
        list(loader)
        state = loader.state_dict()
    assert len(state["generators"]) == 1
    with pytest.raises(
        ValueError, match=r"holds 1 random generator state\(s\), but this loader draws from 0"
    ):
        DataLoader(Tagged(), batch_size=3, shuffle=True).load_state_dict(state)


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


def _random_batches(workers, method=None, seeding="batch"):
    """Two epochs of shuffled batches of items drawn from python, numpy and torch."""
    extra = {"multiprocessing_context": method} if workers and method else {}
    generator = torch.Generator().manual_seed(11)
    with DataLoader(Random(), batch_size=4, shuffle=True, generator=generator,
                    num_workers=workers, seeding=seeding, **extra) as loader:  # fmt: skip
        return [b for _ in range(2) for b in loader]


@pytest.mark.parametrize(
    ("method", "num_workers"),
    [("forkserver", 1), ("forkserver", 2), ("forkserver", 4), (None, 2), ("spawn", 4)],
)
def test_random_batches_do_not_depend_on_num_workers(method, num_workers):
    # None: the default start method, spawn
    reference = _random_batches(0)
    got = _random_batches(num_workers, method)
    assert len(got) == len(reference) == 8
    for mine, want in zip(got, reference):
        assert torch.equal(mine, want)
    assert not torch.equal(reference[0], reference[1])
    assert not torch.equal(reference[0], reference[4]), "epochs should draw differently"


def test_worker_seeding_depends_on_num_workers():
    # What seeding="batch" fixes: under torch's per-worker seeding a batch's random
    # draws depend on which worker loaded it, so the worker count changes them.
    one, two = (_random_batches(n, "forkserver", seeding="worker") for n in (1, 2))
    assert [b.shape for b in one] == [b.shape for b in two]
    assert not all(torch.equal(a, b) for a, b in zip(one, two))


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


def _epochs_of_knobs(loader, stop: int | None = None, change_at: int = 2) -> list[int]:
    """The dataset's ``epoch`` each batch saw; ``set_epoch(5)`` (landing at once)
    after batch ``change_at``; ``stop``: leave after that many batches."""
    seen = []
    for k, (_, _, summary) in enumerate(loader):
        seen.append(summary[0])
        if k == change_at:
            loader.dataset.set_epoch(5)
            loader.reload_prefetched()
        if stop is not None and k + 1 == stop:
            break
    return seen


def test_a_change_that_lands_at_once_resumes_as_the_run_not_interrupted():
    """README: the state holds the sampler's place, not the dataset; a change made
    to land at once (reload_prefetched) lands on the next batch in the run that is
    interrupted and resumed as in the one that is not."""

    def loader_of(dataset):
        return DataLoader(dataset, batch_size=None, collate_fn=keep, num_workers=2,
                          reorder_buffer=0, multiprocessing_context="forkserver")  # fmt: skip

    with loader_of(Knobs(n=12)) as loader:
        whole = _epochs_of_knobs(loader)
    assert whole == [0] * 3 + [5] * 9
    dataset = Knobs(n=12)
    with loader_of(dataset) as loader:
        first = _epochs_of_knobs(loader, stop=4)
        state = loader.state_dict()
    with loader_of(dataset) as loader:
        loader.load_state_dict(state)
        rest = [summary[0] for _, _, summary in loader]
    assert first + rest == whole
