"""Batch samplers as a whole: batch properties, limits while iterating,
determinism and exact resume."""

from __future__ import annotations

import importlib.util
import itertools
import json
import pathlib
import pickle
import re
from collections.abc import Callable

import numpy as np
import pytest
from _sampling import FEW, Batches, dynamic, epoch, lognormal, padded_ratio
from hypothesis import given
from hypothesis import strategies as st

from poolloader.samplers import BatchConstraint, SortedBatchSampler
from poolloader.samplers._base import SamplerBase
from poolloader.samplers._distributed import (
    batches_per_rank,
    rank_positions,
)

# ---------------------------------------------------------------- batch properties


dynamic_args = st.fixed_dictionaries(
    {
        "max_duration": st.floats(5.0, 60.0),
        "max_batch_size": st.none() | st.integers(1, 8),
        "num_buckets": st.integers(1, 6),
        "cost": st.sampled_from(["sum", "padded"]),
        "shuffle": st.booleans(),
        "seed": st.integers(0, 1000),
        "drop_last": st.booleans(),
    }
)
lengths_lists = st.lists(st.floats(0.0, 20.0), min_size=1, max_size=120)


def assert_within_limits(lengths: np.ndarray, batches: Batches, c: BatchConstraint) -> None:
    for batch in batches:
        values = lengths[batch]
        if len(batch) > 1:
            cost = values.sum() if c.cost == "sum" else len(batch) * values.max()
            assert cost <= (c.max_duration or np.inf) * (1 + 1e-12)
        assert len(batch) <= (c.max_batch_size or len(batch))


@FEW
@given(lengths_lists, dynamic_args)
def test_dynamic_epoch_covers_items_once_within_limits(values: list[float], kwargs: dict) -> None:
    lengths = np.array(values)
    sampler = dynamic(lengths, **kwargs)
    batches = epoch(sampler, 2)
    assert len(sampler) == len(batches)
    assert_within_limits(lengths, batches, sampler.constraint)
    items = [i for batch in batches for i in batch]
    assert len(items) == len(set(items))
    if not kwargs["drop_last"]:
        assert sorted(items) == list(range(lengths.size))
    assert epoch(sampler, 2) == batches == epoch(dynamic(lengths, **kwargs), 2)


@FEW
@given(lengths_lists, dynamic_args)
def test_dynamic_batches_keep_to_one_bucket_and_drop_only_final_ones(
    values: list[float], kwargs: dict
) -> None:
    lengths = np.array(values)
    sampler = dynamic(lengths, **kwargs)
    batches = epoch(sampler, 0)
    bucket_of = np.searchsorted(sampler.boundaries, lengths, side="right")
    assert all(len(set(bucket_of[batch].tolist())) == 1 for batch in batches)
    lost = sorted(set(range(lengths.size)) - {i for batch in batches for i in batch})
    if not kwargs["drop_last"]:
        assert lost == []
    for bucket in set(bucket_of[lost].tolist()):
        dropped = lengths[[i for i in lost if bucket_of[i] == bucket]]
        # at most one batch per bucket is dropped, and only one that is not full
        assert sampler.constraint.fits(dropped) and not sampler.constraint.is_full(dropped)


@FEW
@given(lengths_lists, dynamic_args, st.integers(2, 4))
def test_ranks_take_the_formula_positions_of_the_global_order(
    values: list[float], kwargs: dict, world: int
) -> None:
    lengths = np.array(values)
    every = epoch(dynamic(lengths, **kwargs, rank=0, world_size=1), 1)
    drop = kwargs["drop_last"]
    counts = set()
    for rank in range(world):
        sampler = dynamic(lengths, **kwargs, rank=rank, world_size=world)
        mine = epoch(sampler, 1)
        counts.add(len(mine))
        assert len(sampler) == len(mine)
        assert mine == [every[p] for p in rank_positions(len(every), rank, world, drop)]
    assert counts == {batches_per_rank(len(every), world, drop)}


def test_ranks_are_disjoint_and_cover_all_items() -> None:
    lengths = lognormal(301)
    shards = [epoch(dynamic(lengths, max_duration=40.0, rank=r, world_size=3), 0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    full_rounds = list(zip(*shards))[:-1]
    flat = [i for batches in full_rounds for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    assert {i for s in shards for b in s for i in b} == set(range(301))


def test_drop_last_keeps_only_full_batches_and_whole_rounds() -> None:
    lengths = np.ones(103)
    sampler = dynamic(lengths, max_duration=1e6, max_batch_size=4, num_buckets=1, drop_last=True)
    batches = epoch(sampler, 0)
    assert {len(b) for b in batches} == {4} and len(batches) == 25
    shards = [
        epoch(dynamic(np.ones(108), max_duration=5.5, drop_last=True, rank=r, world_size=4), 0)
        for r in range(4)
    ]
    assert [len(s) for s in shards] == [5, 5, 5, 5]
    assert all(len(b) == 5 for s in shards for b in s)


def test_orders_differ_across_epochs_and_seeds() -> None:
    sampler = dynamic(lognormal(400), max_duration=50.0)
    first, second = epoch(sampler, 0), epoch(sampler, 1)
    assert first != second
    assert sorted(map(sorted, first)) != sorted(map(sorted, second))
    assert epoch(dynamic(lognormal(400), max_duration=50.0, seed=1), 0) != first


def test_bucketing_reduces_padding() -> None:
    lengths = lognormal(4000, seed=3)
    bucketed = epoch(dynamic(lengths, max_duration=200.0, num_buckets=10), 0)
    unbucketed = epoch(dynamic(lengths, max_duration=200.0, num_buckets=1), 0)
    size = round(lengths.size / len(bucketed))
    order = np.random.default_rng(0).permutation(lengths.size)
    fixed = [order[i : i + size].tolist() for i in range(0, lengths.size, size)]
    assert padded_ratio(lengths, bucketed) < 1.3
    assert padded_ratio(lengths, bucketed) < padded_ratio(lengths, unbucketed) / 2
    assert padded_ratio(lengths, bucketed) < padded_ratio(lengths, fixed) / 2


limits = st.one_of(
    st.fixed_dictionaries({"batch_size": st.integers(1, 9)}),
    st.fixed_dictionaries({"max_duration": st.floats(5.0, 60.0)}),
)
sorted_args = st.builds(
    lambda limit, rest: {**limit, **rest},
    limits,
    st.fixed_dictionaries(
        {
            "descending": st.sampled_from([True, False, None]),
            "shuffle": st.booleans(),
            "seed": st.integers(0, 1000),
        }
    ),
)


def speechain_view(lengths: np.ndarray, kwargs: dict) -> Batches:
    """The batches SpeeChain makes: sort by length (stable), cut greedily, in that order."""
    descending = kwargs["descending"]
    order = list(range(lengths.size))
    if descending is not None:
        order.sort(key=lambda i: -lengths[i] if descending else lengths[i])
    batches: Batches = [[]]
    for i in order:
        batch = batches[-1]
        if "batch_size" in kwargs:
            full = len(batch) == kwargs["batch_size"]
        else:
            full = bool(batch) and lengths[batch].sum() + lengths[i] > kwargs["max_duration"]
        batches.append([i]) if full else batch.append(i)
    return batches


@FEW
@given(lengths_lists, sorted_args)
def test_sorted_epoch_is_speechains_view_reordered(values: list[float], kwargs: dict) -> None:
    lengths = np.array(values)
    sampler = SortedBatchSampler(lengths, **kwargs)
    batches = epoch(sampler, 3)
    view = speechain_view(lengths, kwargs)
    assert len(sampler) == len(batches) == len(view)
    assert sorted(batches) == sorted(view)  # same batches: every item once, limits kept
    if not kwargs["shuffle"]:
        assert batches == view
    assert batches == epoch(SortedBatchSampler(lengths, **kwargs), 3)


def formula_shard(every: Batches, rank: int, world: int) -> Batches:
    """Rank ``rank``'s batches by the documented formula, written out independently."""
    count = -(-len(every) // world)
    return [every[(k * world + rank) % len(every)] for k in range(count)]


@FEW
@given(lengths_lists, sorted_args, st.integers(2, 4))
def test_sorted_ranks_take_equal_formula_shards(
    values: list[float], kwargs: dict, world: int
) -> None:
    lengths = np.array(values)
    every = epoch(SortedBatchSampler(lengths, **kwargs, rank=0, world_size=1), 2)
    for rank in range(world):
        sampler = SortedBatchSampler(lengths, **kwargs, rank=rank, world_size=world)
        mine = epoch(sampler, 2)
        assert mine == formula_shard(every, rank, world)
        assert len(sampler) == len(mine) == -(-len(every) // world)


def stream_of_passes(lengths: np.ndarray, kwargs: dict, count: int) -> Batches:
    """At least ``count`` batches: the one-pass epochs 0, 1, 2, ... one after another."""
    plain = SortedBatchSampler(lengths, **kwargs)
    stream: Batches = []
    for number in itertools.count():
        if len(stream) >= count:
            return stream
        stream += epoch(plain, number)
    raise AssertionError("unreachable")


@FEW
@given(
    lengths_lists,
    sorted_args,
    st.integers(1, 40),
    st.integers(1, 3),
    st.permutations(range(5)),
)
def test_batches_per_epoch_clips_or_repeats_deterministically_by_epoch(
    values: list[float], kwargs: dict, per_epoch: int, world: int, visit: list[int]
) -> None:
    lengths = np.array(values)
    stream = stream_of_passes(lengths, kwargs, 5 * per_epoch * world)
    per_pass = len(speechain_view(lengths, kwargs))
    for rank in range(world):
        sampler = SortedBatchSampler(
            lengths, **kwargs, batches_per_epoch=per_epoch, rank=rank, world_size=world
        )
        for number in visit:  # any order of epochs: an epoch depends on (seed, epoch) only
            mine = epoch(sampler, number)
            start = number * per_epoch * world
            assert mine == stream[start + rank : start + per_epoch * world : world]
            assert len(sampler) == per_epoch
            # An epoch spans the end of one pass and the start of the next: it holds every
            # batch when it is at least a pass long and the passes are alike (no shuffle),
            # or when it is two passes long (one whole pass lies inside it).
            whole = per_pass if not kwargs["shuffle"] else 2 * per_pass
            if per_epoch * world >= whole and rank == 0:
                ranks = [
                    stream[start + r : start + per_epoch * world : world] for r in range(world)
                ]
                every = {tuple(batch) for shard in ranks for batch in shard}
                assert every == {tuple(batch) for batch in speechain_view(lengths, kwargs)}


@FEW
@given(
    st.sampled_from(["dynamic", "dynamic-padded-drop", "sorted", "sorted-duration"]),
    st.permutations(range(4)),
    st.integers(1, 3),
)
def test_an_epoch_depends_on_seed_and_epoch_not_history(
    name: str, visit: list[int], world: int
) -> None:
    sampler = FACTORIES[name](rank=world - 1, world_size=world)
    for number in visit:
        fresh = FACTORIES[name](rank=world - 1, world_size=world)
        assert epoch(sampler, number) == epoch(fresh, number)


def waste_by_sampler(table: str) -> dict[str, float]:
    """The "padding waste" column of the benchmark's markdown table, by sampler name."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): float(cells[3]) for cells in rows[1:]}  # rows[0]: the header


def test_padding_waste_benchmark_runs_and_shows_the_gain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "padding_waste.py"
    spec = importlib.util.spec_from_file_location("padding_waste", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.REPEATS = 1
    benchmark.main(["--items", "3000"])
    waste = waste_by_sampler(capsys.readouterr().out)
    fixed = next(value for name, value in waste.items() if name.startswith("shuffled fixed"))
    assert fixed > 2.0, "the benchmark's lengths should be skewed"
    assert waste["DynamicBatchSampler num_buckets=10"] < fixed / 2
    assert waste["DynamicBatchSampler cost=padded"] < fixed / 2
    assert len(waste) == 6


# ---------------------------------------------------------------- limits while iterating


def test_limit_change_applies_from_the_next_batch() -> None:
    lengths = lognormal(200)
    sampler = dynamic(lengths, max_duration=20.0, num_buckets=1)
    iterator = iter(sampler)
    first = next(iterator)
    sampler.max_duration = float(lengths.sum())
    rest = list(iterator)
    assert len(rest) == 1 and sorted(first + rest[0]) == list(range(200))


def test_len_counts_yielded_plus_remaining_under_new_limits() -> None:
    sampler = dynamic(lognormal(500), max_duration=30.0)
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(5)]
    sampler.max_duration = 90.0
    expected = len(sampler)
    assert expected == len(drawn) + len(list(iterator))
    assert expected < len(epoch(dynamic(lognormal(500), max_duration=30.0), 0))


def within(lengths: np.ndarray, batch: list[int], limit: BatchConstraint) -> bool:
    """Whether ``batch`` keeps to ``limit`` (an oversized item may come alone)."""
    values = lengths[batch]
    cost = values.sum() if limit.cost == "sum" else len(batch) * values.max()
    fits_duration = limit.max_duration is None or cost <= limit.max_duration * (1 + 1e-12)
    fits_size = limit.max_batch_size is None or len(batch) <= limit.max_batch_size
    return fits_size and (fits_duration or len(batch) == 1)


def run_with_changes(
    sampler: SamplerBase, changes: dict[int, float]
) -> tuple[Batches, list[BatchConstraint], int | None]:
    """One epoch, scaling the limit by ``changes[k]`` after batch k: the batches, the limit
    each was cut under, and ``len()`` right after the last change."""
    batches: Batches = []
    cut_under = []
    length_after = None
    for batch in sampler:
        cut_under.append(sampler.constraint)  # type: ignore[attr-defined]
        batches.append(batch)
        if len(batches) in changes:
            set_limit(sampler, changes[len(batches)])
            length_after = len(sampler)
    return batches, cut_under, length_after


@FEW
@given(
    st.sampled_from(["dynamic", "dynamic-padded-drop", "sorted", "sorted-duration"]),
    st.dictionaries(st.integers(1, 40), st.sampled_from([0.4, 0.7, 1.5, 3.0]), max_size=3),
    st.integers(1, 3),
    st.integers(0, 3),
)
def test_limit_changes_keep_every_property(
    name: str, changes: dict[int, float], world: int, number: int
) -> None:
    drop_last = name.endswith("-drop")
    shards = []
    for rank in range(world):
        sampler = FACTORIES[name](rank=rank, world_size=world)
        sampler.set_epoch(number)
        batches, cut_under, length_after = run_with_changes(sampler, changes)
        lengths = sampler._lengths  # type: ignore[attr-defined]
        assert all(within(lengths, b, c) for b, c in zip(batches, cut_under, strict=True))
        if length_after is not None:  # len() after the last change is exact
            assert length_after == len(batches)
        shards.append(batches)
    assert len({len(shard) for shard in shards}) == 1, "ranks must yield equally many"
    rounds = list(zip(*shards, strict=True))
    items = [i for batches in rounds[:-1] for batch in batches for i in batch]
    assert len(items) == len(set(items)), "an item repeated before the last round"
    if not drop_last:
        covered = {i for shard in shards for batch in shard for i in batch}
        assert covered == set(range(sampler.num_items))  # type: ignore[attr-defined]


# ---------------------------------------------------------------- exact resume

FACTORIES: dict[str, Callable[..., SamplerBase]] = {
    "dynamic": lambda **kw: dynamic(lognormal(300), max_duration=40.0, **kw),
    "dynamic-padded-drop": lambda **kw: dynamic(
        lognormal(300), max_duration=40.0, cost="padded", max_batch_size=6, drop_last=True, **kw
    ),
    "sorted": lambda **kw: SortedBatchSampler(lognormal(300), batch_size=7, **kw),
    "sorted-duration": lambda **kw: SortedBatchSampler(lognormal(300), max_duration=40.0, **kw),
    "sorted-clipped": lambda **kw: SortedBatchSampler(
        lognormal(300), batch_size=7, batches_per_epoch=9, **kw
    ),
    "sorted-extended": lambda **kw: SortedBatchSampler(
        lognormal(300), batch_size=7, batches_per_epoch=70, **kw
    ),
}


def set_limit(sampler: SamplerBase, scale: float) -> None:
    if isinstance(sampler, SortedBatchSampler) and sampler.batch_size is not None:
        sampler.batch_size = max(1, round(sampler.batch_size * scale))
    else:
        sampler.max_duration = sampler.max_duration * scale  # type: ignore[attr-defined]


def run_and_snapshot(
    sampler: SamplerBase, cut: int, change_at: int | None
) -> tuple[dict, Batches, int]:
    """Run epoch 4, snapshot after ``cut`` batches: (state, batches left, batches drawn)."""
    sampler.set_epoch(4)
    iterator = iter(sampler)
    drawn = 0
    while drawn < cut and next(iterator, None) is not None:
        drawn += 1
        if drawn == change_at:
            set_limit(sampler, 1.7)
    return sampler.state_dict(), list(iterator), drawn


def check_resume(name: str, cut: int, change_at: int | None, world: int = 1, rank: int = 0) -> None:
    original = FACTORIES[name](rank=rank, world_size=world)
    state, rest, drawn = run_and_snapshot(original, cut, change_at)
    resumed = FACTORIES[name](rank=rank, world_size=world)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(4)
    assert len(resumed) == drawn + len(rest)
    assert list(resumed) == rest
    restarted = FACTORIES[name](rank=rank, world_size=world)
    if change_at is not None and change_at <= drawn:
        set_limit(restarted, 1.7)
    assert list(resumed) == epoch(restarted, 4)
    assert epoch(resumed, 5) == epoch(original, 5)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_yields_exactly_the_remaining_batches(name: str) -> None:
    for cut in (0, 1, 5, 30, 10_000):
        check_resume(name, cut, change_at=None)
    for cut, change_at in ((6, 3), (4, 4), (9, 1)):
        check_resume(name, cut, change_at)
    for rank in range(3):
        check_resume(name, cut=3, change_at=2, world=3, rank=rank)


@FEW
@given(
    st.sampled_from(sorted(FACTORIES)),
    st.integers(0, 60),
    st.none() | st.integers(1, 60),
    st.integers(1, 3),
)
def test_resume_at_random_cut_points(name: str, cut: int, change: int | None, world: int) -> None:
    check_resume(name, cut, change, world=world, rank=world - 1)


def test_state_of_a_finished_epoch_resumes_to_nothing() -> None:
    sampler = FACTORIES["dynamic"]()
    full = epoch(sampler, 4)
    resumed = FACTORIES["dynamic"]()
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == []
    assert list(resumed) == full


def test_state_is_small_and_does_not_grow_with_the_data() -> None:
    sizes = []
    for count in (100, 100_000):
        sampler = dynamic(lognormal(count), max_duration=50.0)
        iterator = iter(sampler)
        next(iterator)
        state = sampler.state_dict()
        assert all(isinstance(v, (int, float, str, list, type(None))) for v in state.values())
        sizes.append(len(json.dumps(state)))
    assert max(sizes) < 400 and sizes[1] - sizes[0] < 60


def test_state_round_trips_before_iterating() -> None:
    sampler = FACTORIES["sorted-clipped"]()
    sampler.set_epoch(3)
    state = sampler.state_dict()
    again = FACTORIES["sorted-clipped"]()
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert list(again) == epoch(sampler, 3)


def test_set_epoch_keeps_a_loaded_state_only_for_its_epoch() -> None:
    state, rest, _ = run_and_snapshot(FACTORIES["dynamic"](), cut=3, change_at=None)
    resumed = FACTORIES["dynamic"]()
    resumed.load_state_dict(state)
    resumed.set_epoch(5)
    assert list(resumed) == epoch(FACTORIES["dynamic"](), 5)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)
    assert list(resumed) == rest


BAD_STATES: list[tuple[dict, str]] = [
    ({"extra": 1}, "unknown keys ['extra']"),
    ({"cursors": None}, "state['cursors'] should be a list of"),
    ({"cursors": [10**6] * 10}, "state['cursors'][0] should be at most"),
    ({"seed": 9}, "saved with seed=9"),
    ({"world_size": 2}, "saved with world_size=2"),
    ({"sampler": "SortedBatchSampler"}, "saved by a 'SortedBatchSampler'"),
    ({"max_duration": -1.0}, "state['max_duration'] should be a positive number"),
    ({"pass": 7}, "state['pass'] should equal state['epoch']"),
    ({"yielded": -1}, "state['yielded'] should be a non-negative integer"),
]


def test_bad_states_are_rejected_and_change_nothing() -> None:
    good, _, _ = run_and_snapshot(FACTORIES["dynamic"](), cut=3, change_at=None)
    for change, message in BAD_STATES:
        fresh = FACTORIES["dynamic"]()
        before = fresh.state_dict()
        with pytest.raises(ValueError, match=re.escape(message)):
            fresh.load_state_dict({**good, **change})
        assert fresh.state_dict() == before


def test_missing_keys_are_named() -> None:
    state = FACTORIES["sorted"]().state_dict()
    del state["draws"]
    with pytest.raises(ValueError, match=re.escape("got a state with missing keys ['draws']; ")):
        FACTORIES["sorted"]().load_state_dict(state)
    state[("not", "a", "string")] = 1
    with pytest.raises(
        ValueError,
        match=re.escape("unknown keys [('not', 'a', 'string')] and missing keys ['draws']; it "),
    ):
        FACTORIES["sorted"]().load_state_dict(state)


def test_a_state_from_another_library_is_refused_by_name() -> None:
    lhotse_like = {"epoch": 0, "world_size": 1, "rank": 0, "seed": 0, "shuffle": True}
    with pytest.raises(ValueError, match=re.escape("unknown keys ['rank', 'shuffle'] and")):
        FACTORIES["dynamic"]().load_state_dict(lhotse_like)
    with pytest.raises(
        TypeError, match=re.escape("should be a dict returned by state_dict(), but got list")
    ):
        FACTORIES["dynamic"]().load_state_dict([("epoch", 0)])  # type: ignore[arg-type]


def test_samplers_pickle_with_their_position() -> None:
    sampler = FACTORIES["dynamic"]()
    state, rest, _ = run_and_snapshot(sampler, cut=2, change_at=None)
    copy = pickle.loads(pickle.dumps(FACTORIES["dynamic"]()))
    copy.load_state_dict(state)
    assert list(copy) == rest


# ---------------------------------------------------------------- the sorted view


def test_sorted_view_without_shuffle_is_speechains() -> None:
    lengths = lognormal(53)
    view = list(SortedBatchSampler(lengths, batch_size=8, shuffle=False))
    order = np.argsort(-lengths, kind="stable").tolist()
    assert view == [order[i : i + 8] for i in range(0, 53, 8)]
    ascending = list(SortedBatchSampler(lengths, batch_size=8, shuffle=False, descending=False))
    assert ascending[0] == np.argsort(lengths, kind="stable")[:8].tolist()
    unsorted = list(SortedBatchSampler(lengths, batch_size=8, shuffle=False, descending=None))
    assert unsorted[1] == list(range(8, 16))


@pytest.mark.parametrize("limit", [{"batch_size": 5}, {"max_duration": 30.0}])
def test_shuffling_reorders_the_same_batches(limit: dict) -> None:
    lengths = lognormal(700)
    view = list(SortedBatchSampler(lengths, shuffle=False, **limit))
    sampler = SortedBatchSampler(lengths, seed=4, **limit)
    first, second = epoch(sampler, 0), epoch(sampler, 1)
    assert first != second != view
    assert sorted(first) == sorted(second) == sorted(view)
    assert len(sampler) == len(view)


def test_batches_per_epoch_rotates_like_speechain() -> None:
    lengths = lognormal(49)
    view = list(SortedBatchSampler(lengths, batch_size=7, shuffle=False))
    for per_epoch in (3, 10):
        sampler = SortedBatchSampler(
            lengths, batch_size=7, shuffle=False, batches_per_epoch=per_epoch
        )
        for number in range(4):
            expected = [view[(number * per_epoch + i) % 7] for i in range(per_epoch)]
            assert epoch(sampler, number) == expected
            assert len(sampler) == per_epoch


def test_batches_per_epoch_is_per_rank_and_shards_the_stream() -> None:
    lengths = lognormal(60)
    stream = epoch(SortedBatchSampler(lengths, batch_size=6, batches_per_epoch=8, seed=2), 0)
    shards = [
        epoch(
            SortedBatchSampler(
                lengths, batch_size=6, batches_per_epoch=4, seed=2, rank=r, world_size=2
            ),
            0,
        )
        for r in range(2)
    ]
    assert shards == [stream[0::2], stream[1::2]]
