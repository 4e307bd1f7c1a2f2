"""poolloader.DataLoader yields what torch's DataLoader yields, for the same inputs."""

from __future__ import annotations

import os
import pickle
import time
import typing
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from _compare import assert_same_epochs
from _datasets import (
    Counted,
    Plain,
    Sleepy,
    Squares,
    Uneven,
    WaitsForOthers,
    collate_sum,
    record_pid,
)
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

import poolloader
from poolloader import DataLoader


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


#: name → (dataset factory, loader keyword arguments built fresh per loader)
MAP_CASES = {
    "batch_size": (Squares, lambda: {"batch_size": 4}),
    "drop_last": (Squares, lambda: {"batch_size": 4, "drop_last": True}),
    "shuffle": (Squares, lambda: {"batch_size": 5, "shuffle": True, "generator": _gen()}),
    "batch_sampler": (
        Squares,
        lambda: {"batch_sampler": BatchSampler(SequentialSampler(range(23)), 3, False)},
    ),
    "no_batching": (Squares, lambda: {"batch_size": None}),
    "no_batching_shuffled": (
        Squares,
        lambda: {"batch_size": None, "sampler": RandomSampler(range(23), generator=_gen())},
    ),
    "collate_fn": (Plain, lambda: {"batch_size": 3, "collate_fn": collate_sum}),
}
ITERABLE_CASES = {
    "iterable_batch": (Counted, lambda: {"batch_size": 4}),
    "iterable_drop_last": (Counted, lambda: {"batch_size": 4, "drop_last": True}),
    "iterable_no_batching": (Counted, lambda: {"batch_size": None}),
    "iterable_uneven": (Uneven, lambda: {"batch_size": 2}),
}


def _pair(factory, kwargs, num_workers, start_method):
    extra = {}
    if num_workers:
        extra = {"multiprocessing_context": start_method}
    ours = DataLoader(factory(), num_workers=num_workers, **kwargs(), **extra)
    theirs = torch.utils.data.DataLoader(factory(), num_workers=0, **kwargs())
    return ours, theirs


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(MAP_CASES))
def test_map_style_matches_torch(case, num_workers):
    ours, theirs = _pair(*MAP_CASES[case], num_workers, "forkserver")
    with ours:
        assert_same_epochs(ours, theirs)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(ITERABLE_CASES))
def test_iterable_matches_torch(case, num_workers):
    factory, kwargs = ITERABLE_CASES[case]
    extra = {"multiprocessing_context": "forkserver"} if num_workers else {}
    ours = DataLoader(factory(), num_workers=num_workers, **kwargs(), **extra)
    theirs = torch.utils.data.DataLoader(factory(), num_workers=num_workers, **kwargs())
    with ours:
        assert_same_epochs(ours, theirs)


@pytest.mark.parametrize("case", ["shuffle", "batch_sampler", "iterable_uneven"])
def test_spawn_matches_torch(case):
    factory, kwargs = {**MAP_CASES, **ITERABLE_CASES}[case]
    iterable = case.startswith("iterable")
    ours = DataLoader(factory(), num_workers=2, **kwargs())
    theirs = torch.utils.data.DataLoader(factory(), num_workers=2 if iterable else 0, **kwargs())
    with ours:
        assert ours.multiprocessing_context is None  # torch's attribute keeps its value
        assert_same_epochs(ours, theirs)


def test_out_of_order_delivers_every_batch_once():
    with DataLoader(Plain(40), batch_size=3, num_workers=2, in_order=False,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        got = sorted(tuple(b.tolist()) for b in loader)
    want = sorted(tuple(b.tolist()) for b in torch.utils.data.DataLoader(Plain(40), batch_size=3))
    assert got == want


def test_is_a_torch_dataloader_and_generic():
    loader = DataLoader(Plain(4))
    assert isinstance(loader, torch.utils.data.DataLoader)
    alias = DataLoader[torch.Tensor]
    assert typing.get_origin(alias) is DataLoader
    assert len(loader) == 4
    assert loader.batch_size == 1 and loader.sampler is not None


def test_same_signature_and_defaults_as_torch():
    import inspect

    ours = inspect.signature(DataLoader.__init__).parameters
    theirs = inspect.signature(torch.utils.data.DataLoader.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    extras = [p for n, p in ours.items() if n not in theirs]
    assert extras and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_workers": -1},
        {"timeout": -1},
        {"prefetch_factor": 2},
        {"persistent_workers": True},
        {"batch_size": None, "drop_last": True},
        {"sampler": SequentialSampler(range(4)), "shuffle": True},
        {"batch_sampler": BatchSampler(SequentialSampler(range(4)), 2, False), "batch_size": 2},
        {"multiprocessing_context": "spawn"},
    ],
)
def test_invalid_arguments_raise_like_torch(kwargs):
    with pytest.raises(Exception) as theirs:
        torch.utils.data.DataLoader(Plain(4), **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        DataLoader(Plain(4), **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_workers": "2"}, TypeError, "num_workers should be a non-negative integer, but got num_workers='2'"),
        ({"seeding": "epoch"}, ValueError, "seeding should be 'batch' or 'worker', but got seeding='epoch'"),
        ({"reorder_buffer": -1}, ValueError, "reorder_buffer should be a non-negative integer, but got reorder_buffer=-1"),
        ({"max_worker_restarts": 1.5}, TypeError, "max_worker_restarts should be a non-negative integer, but got max_worker_restarts=1.5"),
    ],
)  # fmt: skip
def test_invalid_extra_options(kwargs, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataLoader(Plain(4), **kwargs)


def test_guarded_attributes_stay_guarded():
    loader = DataLoader(Plain(4))
    for name in ("batch_size", "sampler", "dataset", "drop_last"):
        with pytest.raises(ValueError, match=f"{name} attribute should not be set"):
            setattr(loader, name, None)


def test_get_worker_info_in_workers():
    dataset = Plain(6)
    with DataLoader(dataset, batch_size=None, num_workers=2, worker_init_fn=record_pid,
                    collate_fn=_info, multiprocessing_context="forkserver") as loader:  # fmt: skip
        infos = list(loader)
    assert {i["id"] for i in infos} <= {0, 1}
    for info in infos:
        assert info["num_workers"] == 2
        assert info["torch"] == (info["id"], 2, info["seed"], "Plain")
        assert info["init"] == str(info["id"])
    assert poolloader.get_worker_info() is None


def _info(item):
    import os

    ours = poolloader.get_worker_info()
    theirs = torch.utils.data.get_worker_info()
    return {
        "id": ours.id,
        "num_workers": ours.num_workers,
        "seed": ours.seed,
        "torch": (theirs.id, theirs.num_workers, theirs.seed, type(theirs.dataset).__name__),
        "init": os.environ.get("POOLLOADER_TEST_INIT"),
    }


def test_epochs_start_no_new_interpreter():
    """Persistent workers serve every epoch; without them each epoch's workers are
    fresh processes (torch's meaning) forked from the same template, which stays."""
    for persistent in (True, False):
        with DataLoader(Plain(8), batch_size=2, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context="forkserver") as loader:  # fmt: skip
            list(loader)
            first, template = set(loader._pool.worker_pids), loader._pool.template_pid
            list(loader)
            assert (set(loader._pool.worker_pids) == first) is persistent
            assert loader._pool.template_pid == template


def test_non_persistent_epochs_see_the_dataset_as_it_is():
    dataset = Plain(4)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert list(loader) == [0, 1, 2, 3]
        dataset.scale = 10  # changed behind the loader's back, as torch users do
        assert list(loader) == [0, 10, 20, 30]


def test_persistent_workers_keep_their_copy():
    dataset = Plain(4)
    with DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert list(loader) == [0, 1, 2, 3]
        dataset.scale = 10  # torch's persistent workers never see this either
        assert list(loader) == [0, 1, 2, 3]
        loader.dataset.scale = 10  # the control channel does
        assert list(loader) == [0, 10, 20, 30]


def test_break_and_start_again():
    with DataLoader(Plain(30), batch_size=2, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        for i, _ in enumerate(loader):
            if i == 3:
                break
        assert [b.tolist() for b in loader] == [[i, i + 1] for i in range(0, 30, 2)]
        stats = loader.statistics()
    assert stats.in_flight == 0


def test_two_iterators_at_once():
    with DataLoader(Plain(10), batch_size=5, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        pairs = [(a.tolist(), b.tolist()) for a, b in zip(loader, loader)]
    assert pairs == [([0, 1, 2, 3, 4],) * 2, ([5, 6, 7, 8, 9],) * 2]


def test_loader_does_not_pickle_its_pool_into_the_dataset():
    loader = DataLoader(Plain(3), num_workers=1, multiprocessing_context="forkserver")
    with loader:
        list(loader)
        restored = pickle.loads(pickle.dumps(loader.dataset))
    assert type(restored) is Plain and restored.n == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_profiler_sees_each_step_as_torchs_does(num_workers):
    """torch records each ``next()`` as a profiler range; poolloader skips the range
    when no profiler runs (it costs microseconds per batch), so under a profiler
    it must still record one per batch, as torch's loader does."""
    from torch.profiler import ProfilerActivity, profile

    def steps(loader_class: type) -> list[str]:
        loader = loader_class(Plain(12), batch_size=2, num_workers=num_workers)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            batches = [b.tolist() for b in loader]
        assert batches == [[i, i + 1] for i in range(0, 12, 2)]
        names = [e.name for e in prof.events() if e.name.startswith("enumerate(DataLoader)#")]
        return [name.split("#")[0] for name in names]

    assert steps(DataLoader) == steps(torch.utils.data.DataLoader) != []


def test_pin_memory_without_accelerator_warns_like_torch():
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    with pytest.warns(UserWarning, match="no accelerator is found"):
        with DataLoader(Plain(4), batch_size=2, num_workers=1, pin_memory=True,
                        multiprocessing_context="forkserver") as loader:  # fmt: skip
            batches = [b.tolist() for b in loader]
    assert batches == [[0, 1], [2, 3]]


def test_lengths_match_torch():
    for kwargs in ({"batch_size": 3}, {"batch_size": 3, "drop_last": True}, {"batch_size": None}):
        assert len(DataLoader(Plain(10), **kwargs)) == len(
            torch.utils.data.DataLoader(Plain(10), **kwargs)
        )


def _fake_pin(data, device):
    """Stands in for torch's pin_memory, which needs CUDA: records where it ran."""
    import threading

    return {"data": data, "device": device, "thread": threading.current_thread().name}


def test_pin_memory_pins_in_a_background_thread(monkeypatch):
    # CUDA cannot run here: pretend an accelerator exists and record the pinning.
    import poolloader._pin_memory as pin_memory_module

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda index: None)
    monkeypatch.setattr(pin_memory_module, "pin_memory", _fake_pin)
    with DataLoader(Plain(6), batch_size=2, num_workers=2, pin_memory=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = list(loader)
    assert [b["data"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert {b["device"] for b in batches} == {"cuda"}
    assert all(b["thread"].startswith("poolloader-pin") for b in batches)


def test_a_batch_index_may_split_across_workers():
    from _datasets import SlotReader, Slots

    sampler = [Slots(list(range(k, k + 6))) for k in range(0, 30, 6)]
    with DataLoader(SlotReader(), sampler=sampler, batch_size=None, num_workers=2,
                    collate_fn=_identity, multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = list(loader)
    assert [[i for i, _ in b] for b in batches] == [list(range(k, k + 6)) for k in range(0, 30, 6)]
    for batch in batches:
        assert [w for _, w in batch] == [0, 1, 0, 1, 0, 1]


def _identity(batch):
    return batch


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_reload_prefetched_with_an_iterable_dataset_loses_no_item(transport):
    """A worker's iterator cannot go back, so only the batches no worker started are
    brought up to date: every item still arrives exactly once, and the batches
    loaded after the call see the change."""
    from _datasets import CountedWithValue

    with DataLoader(CountedWithValue(40), batch_size=2, num_workers=2, transport=transport,
                    prefetch_factor=4, reorder_buffer=0,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        first = [next(iterator) for _ in range(3)]
        loader.dataset.value = 7.0
        reloaded = loader.reload_prefetched()
        rest = list(iterator)
    items = sorted(x for items, _ in first + rest for x in items.tolist())
    assert items == list(range(40))
    values = [v.tolist()[0] for _, v in rest]
    # 8 batches were ahead (prefetch_factor * num_workers): those a worker had taken
    # keep what they read, the others were brought up to date; every later one sees it.
    assert values[:8].count(1.0) == 8 - reloaded, (reloaded, values)
    assert values[8:] == [7.0] * (len(values) - 8), values


def test_copies_and_pickles_are_independent_loaders():
    """copy.copy, copy.deepcopy and pickle work as for torch's loader; a copy starts
    workers of its own and dropping it leaves the original's running mid-epoch."""
    import copy
    import gc

    loader = DataLoader(Plain(12), batch_size=2, num_workers=2, persistent_workers=True,
                        multiprocessing_context="forkserver")  # fmt: skip
    with loader:
        iterator = iter(loader)
        first = next(iterator)
        shallow = copy.copy(loader)
        assert shallow.dataset.n == 12 and shallow.num_workers == 2
        del shallow
        gc.collect()
        assert [b.tolist() for b in [first, *iterator]] == [[2 * k, 2 * k + 1] for k in range(6)]
        for make in (copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
            with make(loader) as other:
                other.dataset.scale = 3
                assert [b.tolist() for b in other] == [[6 * k, 6 * k + 3] for k in range(6)]
                assert other._pool is not loader._pool
        assert [b.tolist() for b in loader] == [[2 * k, 2 * k + 1] for k in range(6)]


@pytest.mark.parametrize("stall, before", [(0, 0.0), (6, 0.2)])
def test_workers_load_ahead_of_a_stalled_batch(tmp_path, stall, before):
    """While one worker is stuck on a batch, the other loads the batches after it,
    and the stalled batch still comes first in its place. With slow batches before
    it (0.2 s), the stalled one is late only after 0.3 s: by then the other worker
    has long finished what the window held, and no other batch finishes to say
    that the reorder allowance may open; the consumer's wait must end then."""
    dataset = WaitsForOthers(str(tmp_path), stall=stall, before=before)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        got = list(loader)
    assert got[stall] >= dataset.ahead, got
    assert got[:stall] + got[stall + 1 :] == [0] * (dataset.n - 1)


def test_big_batches_wait_behind_a_stalled_batch_only_within_the_window(tmp_path):
    """Finished batches waiting behind a slow one each hold their memory. Batches
    of 16 MiB or more get no reorder allowance by default: behind a stalled
    batch, the workers load only what the prefetch window holds, as torch's
    loader does (3 batches after it here: a window of 4 holds the stalled one
    too), where 32 MiB batches would otherwise pile up behind it (``reorder_buffer``
    still asks for that)."""

    def ahead_of_stall(make, where, **options):
        dataset = WaitsForOthers(str(where), n=14, stall=5, ahead=8, patience=1.0,
                                 megabytes=32)  # fmt: skip
        os.makedirs(where)
        loader = make(dataset, batch_size=None, num_workers=2, prefetch_factor=2, **options)
        try:
            got = [int(item[0]) for item in loader]
        finally:
            if isinstance(loader, DataLoader):
                loader.close()
        assert got[:5] + got[6:] == [0] * 13
        return got[5]

    torchs = ahead_of_stall(torch.utils.data.DataLoader, tmp_path / "torch")
    assert torchs <= 3
    forkserver = {"multiprocessing_context": "forkserver"}
    assert ahead_of_stall(DataLoader, tmp_path / "default", **forkserver) <= 3
    # The allowance asked for: the other worker loads on behind the stall.
    assert ahead_of_stall(DataLoader, tmp_path / "asked", reorder_buffer=6, **forkserver) >= 6


def test_a_tiny_batch_is_not_late_before_batches_arrive():
    """A batch runs late only once it has taken longer than batches take from start
    to arrival in the main process (NOTE [ Late by the main process's clock ] in
    _pool.py). Against the workers' own time per tiny batch alone, a fraction of
    the trip back, the oldest batch looked late at a third of the checks, and the
    reorder allowance opened with no slow batch at all."""
    with DataLoader(Plain(8000), batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert sum(len(batch) for batch in loader) == 8000  # (the workers start)
        started = time.perf_counter()
        assert sum(len(batch) for batch in loader) == 8000
        between = (time.perf_counter() - started) / 2000
        pool = loader._pool
        arrival = pool._counters.turnaround / pool._counters.turnarounds
        # Each worker runs one batch at a time: a batch takes about num_workers
        # times the time between batches to arrive.
        assert arrival > between
        running = SimpleNamespace(worker=0, seq=-1, future=Future(),
                                  started=time.monotonic() - 0.9 * arrival)  # fmt: skip
        left = pool.late_in(running)
        assert left is not None and left > 0, (left, arrival, pool._counters)


def _first_then_next_epoch(loader: typing.Any) -> tuple[list[int], list[int]]:
    for batch in loader:  # one batch of the epoch, then leave it
        first = batch.tolist()
        break
    return first, next(iter(loader)).tolist()


def test_an_epoch_left_while_a_batch_ran_late_leaves_the_order_as_torchs():
    """The first batch of a shuffled epoch runs late and the other worker loads past
    the window (the reorder allowance), up to the end of the epoch; the loop takes
    one batch and breaks. Asking the sampler past its end would make torch's
    RandomSampler draw one more permutation from the generator, which torch's loader
    (its window short of the end) does not: the next epoch's order is torch's."""
    seed = torch.Generator().manual_seed(3)
    torch.empty((), dtype=torch.int64).random_(generator=seed)  # the loader's base seed
    slow = int(torch.randperm(32, generator=seed)[0])  # in the epoch's first batch

    def make(cls: typing.Any, **options: typing.Any) -> typing.Any:
        return cls(Sleepy(32, slow, seconds=0.6), batch_size=4, shuffle=True,
                   generator=torch.Generator().manual_seed(3), **options)  # fmt: skip

    want = _first_then_next_epoch(make(torch.utils.data.DataLoader))
    with make(DataLoader, num_workers=2, multiprocessing_context="forkserver") as loader:
        got = _first_then_next_epoch(loader)
    assert got == want


def _future_story(make):
    """What a future says and does through each way it can go, as plain values."""
    import threading
    from concurrent.futures import CancelledError, InvalidStateError

    story = []

    def outcome(call):
        try:
            return ("returns", call())
        except (CancelledError, InvalidStateError, TimeoutError, ValueError) as exc:
            return ("raises", type(exc).__name__)

    pending = make()
    story.append(
        ("pending", pending.done(), pending.cancelled(), outcome(lambda: pending.result(0)))
    )
    for how in ("result", "exception", "cancel"):
        f, calls = make(), []
        f.add_done_callback(lambda g: calls.append(("before", g is f)))
        if how == "result":
            f.set_result(7)
        elif how == "exception":
            f.set_exception(ValueError("no"))
        else:
            story.append(("cancel", f.cancel(), f.cancel()))
        f.add_done_callback(lambda g: calls.append(("after", g is f)))
        story.append((
            how, f.done(), f.cancelled(), outcome(f.result),
            outcome(lambda: repr(f.exception())), outcome(lambda: f.set_result(1)),
            outcome(lambda: f.set_exception(ValueError())), f.cancel(), calls,
        ))  # fmt: skip
    waited, got = make(), []
    waiter = threading.Thread(target=lambda: got.append(waited.result(timeout=30)))
    waiter.start()
    waited.set_result("woken")
    waiter.join(30)
    story.append(("waited", got))
    failing = make()
    failing.add_done_callback(lambda g: 1 / 0)  # logged, not raised
    failing.set_result(None)
    story.append(("failing callback", failing.result()))
    return story


def test_task_futures_behave_as_futures_do():
    """The pool's lightweight futures (NOTE [ Task futures ]) say and do what
    ``concurrent.futures.Future`` does: done, cancelled, result, exception,
    cancel, callbacks before and after the outcome, a second outcome refused,
    a waiting thread woken, a failing callback logged."""
    from concurrent.futures import Future

    from poolloader._tasks import TaskFuture

    want = _future_story(Future)
    assert _future_story(TaskFuture) == want
    assert want[0] == ("pending", False, False, ("raises", "TimeoutError"))
