"""Batch samplers, piece by piece: sharding and bucketing maths, the batch
constraint, rank resolution and argument checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _sampling import FEW, dynamic, epoch, lognormal
from hypothesis import given
from hypothesis import strategies as st

from poolloader import SharedList, samplers
from poolloader.samplers import BatchConstraint, DynamicBatchSampler, SortedBatchSampler
from poolloader.samplers._bucketing import (
    assign_buckets,
    estimate_bucket_boundaries,
    split_by_bucket,
)
from poolloader.samplers._constraint import FIRST_WINDOW, cut_batch, next_batch_end
from poolloader.samplers._distributed import (
    batches_per_rank,
    rank_positions,
    resolve_rank_world_size,
)

# ---------------------------------------------------------------- public surface


def test_public_names_are_sorted_exported_and_documented() -> None:
    assert samplers.__all__ == sorted(samplers.__all__)
    for name in samplers.__all__:
        obj = getattr(samplers, name)
        assert obj.__doc__, name
        for member, value in vars(obj).items():
            if not member.startswith("_") and (callable(value) or isinstance(value, property)):
                assert value.__doc__, f"{name}.{member}"


def test_samplers_are_torch_batch_samplers() -> None:
    lengths = lognormal(50)
    sampler = dynamic(lengths, max_duration=30.0)
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    assert isinstance(sampler, torch.utils.data.Sampler)
    assert len(loader) == len(sampler)
    assert sorted(int(i) for (batch,) in loader for i in batch) == list(range(50))


# ---------------------------------------------------------------- sharding maths


def test_batches_per_rank_formula() -> None:
    table = [
        (10, 3, False, 4),
        (10, 3, True, 3),
        (9, 3, False, 3),
        (2, 4, False, 1),
        (2, 4, True, 0),
    ]
    for batches, world, drop_last, expected in table:
        assert batches_per_rank(batches, world, drop_last) == expected, (batches, world, drop_last)


@FEW
@given(st.integers(1, 60), st.integers(1, 6), st.booleans())
def test_rank_positions_are_equal_disjoint_and_cover(total: int, world: int, drop: bool) -> None:
    shards = [rank_positions(total, rank, world, drop) for rank in range(world)]
    per_rank = len(shards[0])
    assert all(len(shard) == per_rank for shard in shards)
    round_major = [shard[k] for k in range(per_rank) for shard in shards]
    if drop:
        assert round_major == list(range(total - total % world))
    else:
        assert round_major[:total] == list(range(total))
        assert round_major[total:] == [p % total for p in range(total, per_rank * world)]
        assert len(round_major) - total < world


# ---------------------------------------------------------------- bucketing maths


@FEW
@given(
    st.lists(st.floats(0.1, 100.0), min_size=1, max_size=300, unique=True),
    st.integers(1, 12),
)
def test_boundaries_split_mass_evenly(values: list[float], buckets: int) -> None:
    lengths = np.array(values)
    boundaries = estimate_bucket_boundaries(lengths, buckets)
    assert np.all(np.diff(boundaries) > 0) and np.all(boundaries > lengths.min())
    assert boundaries.size <= buckets - 1
    of = assign_buckets(lengths, boundaries)
    masses = np.bincount(of, weights=lengths, minlength=boundaries.size + 1)
    assert np.all(masses > 0)
    if boundaries.size == buckets - 1:
        assert np.all(np.abs(masses - lengths.sum() / buckets) <= lengths.max() + 1e-9)


def test_boundaries_with_repeated_or_zero_lengths() -> None:
    assert estimate_bucket_boundaries(np.zeros(5), 4).size == 0
    assert estimate_bucket_boundaries(np.full(5, 2.0), 4).size == 0
    assert estimate_bucket_boundaries(np.array([1.0, 1.0, 2.0, 4.0]), 2).tolist() == [4.0]


def test_split_by_bucket_keeps_relative_order() -> None:
    order = np.array([5, 0, 3, 1, 4, 2])
    bucket_of = np.array([0, 1, 0, 1, 0, 1])
    parts = split_by_bucket(order, bucket_of, 3)
    assert [p.tolist() for p in parts] == [[0, 4, 2], [5, 3, 1], []]


# ---------------------------------------------------------------- the constraint


def test_constraint_costs_and_fullness() -> None:
    summed = BatchConstraint(max_duration=10.0)
    padded = BatchConstraint(max_duration=10.0, cost="padded")
    counted = BatchConstraint(max_batch_size=2)
    assert summed.fits([3.0, 4.0, 3.0]) and not summed.fits([3.0, 4.0, 3.5])
    assert padded.fits([1.0, 5.0]) and not padded.fits([1.0, 1.0, 4.0])
    assert counted.fits([9.0, 9.0]) and not counted.fits([1.0, 1.0, 1.0])
    assert summed.is_full([3.0, 4.0]) and not summed.is_full([3.0, 3.0])
    assert counted.is_full([1.0, 1.0]) and not counted.is_full([1.0])


BAD_LIMITS: list[tuple[dict, type[Exception], str]] = [
    (
        {"max_duration": -1},
        ValueError,
        "max_duration should be a positive number, but got max_duration=-1",
    ),
    ({"max_duration": "5"}, TypeError, "max_duration should be a positive number"),
    ({"max_duration": float("inf")}, ValueError, "max_duration should be a positive number"),
    (
        {"max_batch_size": 0},
        ValueError,
        "max_batch_size should be a positive integer, but got max_batch_size=0",
    ),
    ({"max_batch_size": True}, TypeError, "max_batch_size should be a positive integer"),
    (
        {"max_duration": 1.0, "cost": "max"},
        ValueError,
        "cost should be 'sum' or 'padded', but got cost='max'",
    ),
    ({}, ValueError, "needs at least one limit"),
]


def test_constraint_rejects_bad_limits() -> None:
    for kwargs, error, message in BAD_LIMITS:
        with pytest.raises(error, match=re.escape(message)):
            BatchConstraint(**kwargs)


def test_cut_takes_longest_fitting_run_and_oversized_items_alone() -> None:
    constraint = BatchConstraint(max_duration=10.0)
    lengths = np.array([4.0, 4.0, 3.0, 12.0, 1.0])
    assert cut_batch(lengths, 0, constraint) == 2
    assert cut_batch(lengths, 2, constraint) == 3
    assert cut_batch(lengths, 3, constraint) == 4
    assert cut_batch(lengths, 4, constraint) == 5


def test_cut_looks_past_the_first_window() -> None:
    lengths = np.full(FIRST_WINDOW * 5, 0.5)
    assert cut_batch(lengths, 0, BatchConstraint(max_duration=100.0)) == 200
    assert cut_batch(lengths, 0, BatchConstraint(max_duration=1e9)) == lengths.size


def test_drop_last_drops_only_an_incomplete_final_batch() -> None:
    constraint = BatchConstraint(max_batch_size=3)
    lengths = np.ones(5)
    assert next_batch_end(lengths, 0, constraint, True) == (3, True)
    assert next_batch_end(lengths, 3, constraint, True) == (5, False)
    assert next_batch_end(lengths, 3, constraint, False) == (5, True)
    assert next_batch_end(np.ones(6), 3, constraint, True) == (6, True)


# ---------------------------------------------------------------- rank resolution


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return monkeypatch


def test_rank_defaults_without_environment(no_rank_env: pytest.MonkeyPatch) -> None:
    assert resolve_rank_world_size() == (0, 1)


def test_environment_beats_default_and_argument_beats_environment(
    no_rank_env: pytest.MonkeyPatch,
) -> None:
    no_rank_env.setenv("RANK", "2")
    no_rank_env.setenv("WORLD_SIZE", "4")
    assert resolve_rank_world_size() == (2, 4)
    assert resolve_rank_world_size(rank=1) == (1, 4)
    assert resolve_rank_world_size(rank=0, world_size=1) == (0, 1)
    sampler = dynamic(lognormal(20), max_duration=20.0)
    assert (sampler.rank, sampler.world_size) == (2, 4)


@pytest.fixture
def fake_process_group(no_rank_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An initialised torch.distributed group of 3 in which this process is rank 1."""
    no_rank_env.setattr(torch.distributed, "is_available", lambda: True)
    no_rank_env.setattr(torch.distributed, "is_initialized", lambda: True)
    no_rank_env.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    no_rank_env.setattr(torch.distributed, "get_world_size", lambda *args, **kwargs: 3)
    return no_rank_env


RESOLUTION_ORDER = [
    # (rank argument, world_size argument, RANK, WORLD_SIZE, expected)
    (None, None, None, None, (1, 3)),  # torch.distributed
    (None, None, "2", None, (2, 3)),  # RANK beats torch.distributed; each value on its own
    (None, None, None, "2", (1, 2)),
    (None, None, "0", "4", (0, 4)),  # the environment beats torch.distributed
    (3, None, "0", "4", (3, 4)),  # the argument beats the environment
    (0, 1, "2", "4", (0, 1)),
]


@pytest.mark.parametrize(("rank", "world", "env_rank", "env_world", "expected"), RESOLUTION_ORDER)
def test_resolution_order_is_argument_environment_torch_distributed(
    fake_process_group: pytest.MonkeyPatch,
    rank: int | None,
    world: int | None,
    env_rank: str | None,
    env_world: str | None,
    expected: tuple[int, int],
) -> None:
    for name, value in (("RANK", env_rank), ("WORLD_SIZE", env_world)):
        if value is not None:
            fake_process_group.setenv(name, value)
    assert resolve_rank_world_size(rank, world) == expected
    for sampler in (
        dynamic(lognormal(20), max_duration=20.0, rank=rank, world_size=world),
        SortedBatchSampler(lognormal(20), batch_size=2, rank=rank, world_size=world),
    ):
        assert (sampler.rank, sampler.world_size) == expected


def test_uninitialised_torch_distributed_falls_back_to_the_default(
    no_rank_env: pytest.MonkeyPatch,
) -> None:
    no_rank_env.setattr(torch.distributed, "is_initialized", lambda: False)
    no_rank_env.setattr(torch.distributed, "get_rank", lambda: pytest.fail("asked torch"))
    assert resolve_rank_world_size() == (0, 1)


def test_bad_ranks_are_rejected_with_their_source(no_rank_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=r"Invalid rank 2, rank should be in the interval \[0, 1\]"
    ):
        resolve_rank_world_size(rank=2, world_size=2)
    no_rank_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="rank from the argument, world_size from the environ"):
        resolve_rank_world_size(rank=3)
    no_rank_env.setenv("RANK", "one")
    with pytest.raises(ValueError, match="environment variable RANK, which should hold an int"):
        resolve_rank_world_size()
    with pytest.raises(ValueError, match="world_size should be a positive integer"):
        resolve_rank_world_size(rank=0, world_size=0)
    no_rank_env.setenv("WORLD_SIZE", "0")
    with pytest.raises(
        ValueError,
        match="but got world_size=0; it came from the environment variable WORLD_SIZE; pass "
        "world_size= explicitly",
    ):
        resolve_rank_world_size(rank=0)


# ---------------------------------------------------------------- argument checks


BAD_LENGTHS: list[tuple[object, type[Exception], str]] = [
    ([], ValueError, "non-empty, one-dimensional"),
    ([[1.0], [2.0]], ValueError, "but got shape (2, 1)"),
    ([1.0, -2.0, 3.0], ValueError, "but got lengths[1]=-2.0 (1 such item(s) in all)"),
    ([1.0, float("nan")], ValueError, "lengths[1]=nan"),
    (["a", "b"], TypeError, "lengths should hold numbers"),
    ([True, False], TypeError, "lengths should hold numbers"),
]


def test_lengths_are_validated() -> None:
    for lengths, error, message in BAD_LENGTHS:
        with pytest.raises(error, match=re.escape(message)):
            DynamicBatchSampler(lengths, max_duration=5.0)  # type: ignore[arg-type]


def test_lengths_from_numpy_and_torch_match_a_list() -> None:
    values = lognormal(40)
    reference = epoch(dynamic(values.tolist(), max_duration=25.0), 3)
    assert epoch(dynamic(values, max_duration=25.0), 3) == reference
    assert epoch(dynamic(torch.from_numpy(values), max_duration=25.0), 3) == reference


def test_shared_lengths_are_used_in_place_and_give_the_same_batches() -> None:
    values = lognormal(500)
    shared = SharedList(values.tolist())
    rows = SharedList([{"dur": v} for v in values.tolist()], columns=["dur"])
    for make in (
        lambda lengths: dynamic(lengths, max_duration=25.0),
        lambda lengths: SortedBatchSampler(lengths, max_duration=25.0),
    ):
        reference = epoch(make(values), 3)
        for table, memory in ((shared, shared.numpy()), (rows.column("dur"), rows.column("dur"))):
            sampler = make(table)
            assert np.shares_memory(sampler._lengths, memory)  # type: ignore[attr-defined]
            assert epoch(sampler, 3) == reference
        assert np.shares_memory(make(shared.numpy())._lengths, shared.numpy())  # type: ignore[attr-defined]
    # Other dtypes and writable arrays are copied, so a later edit cannot reach the sampler.
    as_ints = SharedList([int(v) for v in values])
    assert not np.shares_memory(dynamic(as_ints, max_duration=25.0)._lengths, as_ints.numpy())  # type: ignore[attr-defined]
    private = values.copy()
    assert not np.shares_memory(dynamic(private, max_duration=25.0)._lengths, private)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=re.escape("lengths[2]=-1.0")):
        dynamic(SharedList([1.0, 2.0, -1.0]), max_duration=5.0)


def test_sampler_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match=r"^max_duration should be a positive number, but got "):
        DynamicBatchSampler([1.0], max_duration=-1)
    with pytest.raises(ValueError, match="num_buckets should be a positive integer"):
        DynamicBatchSampler([1.0], max_duration=1.0, num_buckets=0)
    with pytest.raises(ValueError, match="seed should be a non-negative integer"):
        DynamicBatchSampler([1.0], max_duration=1.0, seed=-3)
    with pytest.raises(ValueError, match="exactly one of batch_size and max_duration"):
        SortedBatchSampler([1.0], batch_size=2, max_duration=3.0)
    with pytest.raises(ValueError, match="exactly one of batch_size and max_duration"):
        SortedBatchSampler([1.0])
    with pytest.raises(ValueError, match="descending should be True, False or None"):
        SortedBatchSampler([1.0], batch_size=1, descending="yes")  # type: ignore[arg-type]
    sampler = SortedBatchSampler([1.0, 2.0], batch_size=1)
    with pytest.raises(ValueError, match="needs batch_size or max_duration"):
        sampler.batch_size = None
    with pytest.raises(ValueError, match="batch_size should be a positive integer"):
        sampler.batch_size = 0


def test_oversized_items_warn_and_come_alone() -> None:
    lengths = [1.0, 2.0, 50.0, 1.0]
    with pytest.warns(UserWarning, match="1 of 4 items are longer than max_duration=10.0"):
        sampler = DynamicBatchSampler(lengths, max_duration=10.0, num_buckets=1)
    assert [2] in list(sampler)
