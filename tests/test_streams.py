"""Streams: StreamSampler's schedule, StreamDataset's batches, and both read by the pool.

Every stream's time step ``t`` of stream ``s`` holds the value pair ``(s, t)``, so each
batch can be checked against the step spec it came from: rows continue, chunks arrive
exactly once, padding is masked. Iterator-style readers log every open and close to a file
per process, which shows where each stream was read and how many iterators were open.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import poolloader.datasets
import poolloader.samplers
from poolloader import DataLoader
from poolloader.datasets import StreamBatch, StreamDataset
from poolloader.samplers import StreamChunk, StreamPadding, StreamPart, StreamSampler, StreamStep
from poolloader.samplers._stream import SlotPlan, chunk_counts, shard_streams, slot_loads
from poolloader.samplers._stream_steps import worker_layout

FEW = settings(max_examples=30, deadline=None)
PAD = -1
LENGTHS = [3, 17, 5, 30, 1, 12, 9, 22, 4, 14, 8, 26]  # 12 streams, lengths 1 to 30
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create")


# ---------------------------------------------------------------- readers (module level: they pickle)


def read_pairs(stream: int, start: int, stop: int) -> torch.Tensor:
    """Random access: time steps ``[start, stop)`` of ``stream`` as ``(stream, t)`` rows."""
    t = torch.arange(start, stop)
    return torch.stack([torch.full_like(t, stream), t], dim=1)


def read_wide(stream: int, start: int, stop: int) -> torch.Tensor:
    """Random access to ``[stop - start, 1024]`` float32 rows: a part of 4 rows of 8 time
    steps holds 128 KiB, so it travels through a worker's shared-memory slab."""
    return torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, 1024) + stream


def read_noisy(stream: int, start: int, stop: int) -> torch.Tensor:
    """:func:`read_pairs` with a random augmentation: one draw of each of ``random``,
    NumPy and torch per chunk, added to the time steps."""
    import random

    noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
    return read_pairs(stream, start, stop).double() + torch.tensor([0.0, noise])


def iterate_noisy(stream: int):
    """Iterator-style :func:`read_noisy`: the draws happen as each chunk is taken."""
    for start in range(0, LENGTHS[stream], 4):
        yield read_noisy(stream, start, min(start + 4, LENGTHS[stream]))


class LoggedStreams:
    """``iterate(stream)``: chunks of ``(stream, t)`` rows; logs opens and closes per pid."""

    def __init__(self, directory: Path, lengths: list[int], chunk_size: int) -> None:
        self.directory, self.lengths, self.chunk_size = str(directory), lengths, chunk_size

    def __call__(self, stream: int):
        self._log("open", stream)
        try:
            for start in range(0, self.lengths[stream], self.chunk_size):
                yield read_pairs(stream, start, min(start + self.chunk_size, self.lengths[stream]))
        finally:
            self._log("close", stream)

    def _log(self, event: str, stream: int) -> None:
        with open(os.path.join(self.directory, f"{os.getpid()}.log"), "a") as log:
            log.write(f"{event} {stream}\n")


def events(directory: Path) -> dict[int, list[tuple[str, int]]]:
    """Each process's log: ``pid -> [(event, stream), ...]`` in order."""
    found = {}
    for path in directory.glob("*.log"):
        lines = path.read_text().split()
        found[int(path.stem)] = [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)]
    return found


def opens_per_stream(directory: Path) -> Counter[int]:
    return Counter(s for log in events(directory).values() for e, s in log if e == "open")


# ---------------------------------------------------------------- helpers


def steps(sampler: StreamSampler, epoch: int = 0) -> list[StreamStep]:
    sampler.set_epoch(epoch)
    return list(sampler)


def load(dataset, sampler, num_workers: int, **kwargs) -> list[StreamBatch]:
    context = "forkserver" if num_workers else None
    with DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                    multiprocessing_context=context, **kwargs) as loader:  # fmt: skip
        return list(loader)


def chunks_of(spec_steps: list[StreamStep], *, repeat: bool) -> list[tuple[int, int]]:
    return [
        (slot.stream, slot.start)
        for step in spec_steps
        for slot in step.slots
        if isinstance(slot, StreamChunk) and slot.repeat == repeat
    ]


def all_chunks(lengths: list[int], chunk_size: int) -> list[tuple[int, int]]:
    return sorted((s, a) for s, n in enumerate(lengths) for a in range(0, n, chunk_size))


def check_coherent(spec_steps: list[StreamStep], lengths: list[int], chunk_size: int) -> None:
    """Row b continues row b of the step before unless flagged first; streams run to the end."""
    previous: list[StreamChunk | StreamPadding] = [StreamPadding()] * len(spec_steps[0].slots)
    for step in spec_steps:
        for b, slot in enumerate(step.slots):
            before = previous[b]
            still_running = isinstance(before, StreamChunk) and not before.last
            if isinstance(slot, StreamChunk):
                assert slot.stop == min(slot.start + chunk_size, lengths[slot.stream])
                assert slot.last == (slot.stop == lengths[slot.stream])
                if slot.first:
                    assert slot.start == 0 and not still_running
                else:
                    assert still_running and isinstance(before, StreamChunk)
                    assert (slot.stream, slot.start) == (before.stream, before.stop)
                    assert slot.repeat == before.repeat
            else:
                assert not still_running, "a stream left its slot before its end"
        previous = list(step.slots)


def check_batches_coherent(batches: list[StreamBatch], lengths: list[int], chunk_size: int) -> None:
    """Read from the batches alone: row b continues row b of the batch before (same stream,
    next chunk, its time steps in the data) unless flagged first; every chunk of every
    stream arrives exactly once (restreamed rows apart); padding rows are masked out."""
    running: list[tuple[int, int] | None] = [None] * batches[0].first.shape[0]
    delivered = []
    for batch in batches:
        for b, (stream, start) in enumerate(zip(batch.streams.tolist(), batch.starts.tolist())):
            steps = int(batch.mask[:, b].sum())
            if stream < 0:
                assert running[b] is None and steps == 0 and not batch.first[b]
                continue
            if batch.first[b]:
                assert start == 0 and running[b] is None
            else:
                assert running[b] == (stream, start), (b, running[b], stream, start)
            assert steps == min(chunk_size, lengths[stream] - start)
            assert batch.data[:steps, b].tolist() == [
                [stream, t] for t in range(start, start + steps)
            ]
            if not batch.repeat[b]:
                delivered.append((stream, start))
            ended = start + steps == lengths[stream]
            running[b] = None if ended else (stream, start + steps)
    assert sorted(delivered) == all_chunks(lengths, chunk_size)


def check_batch(batch: StreamBatch, step: StreamStep) -> None:
    """The batch holds exactly what ``step`` asks for: data, mask, first, ids and padding."""
    for b, slot in enumerate(step.slots):
        rows = batch.data[:, b]
        if isinstance(slot, StreamPadding):
            assert not batch.mask[:, b].any() and (rows == PAD).all()
            assert (batch.streams[b], batch.starts[b], batch.first[b]) == (-1, -1, False)
            continue
        n = slot.stop - slot.start
        assert torch.equal(rows[:n], read_pairs(slot.stream, slot.start, slot.stop))
        assert (rows[n:] == PAD).all()
        assert batch.mask[:, b].tolist() == [True] * n + [False] * (step.chunk_size - n)
        assert (int(batch.streams[b]), int(batch.starts[b])) == (slot.stream, slot.start)
        assert (bool(batch.first[b]), bool(batch.repeat[b])) == (slot.first, slot.repeat)


def assert_same(a: list[StreamBatch], b: list[StreamBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("data", "mask", "first", "streams", "starts", "repeat"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


# ---------------------------------------------------------------- public surface


def test_public_names_are_sorted_and_exported() -> None:
    for module in (poolloader.samplers, poolloader.datasets):
        assert module.__all__ == sorted(module.__all__)
    assert {"StreamChunk", "StreamPadding", "StreamPart", "StreamSampler", "StreamStep"} <= set(
        poolloader.samplers.__all__
    )
    assert {"StreamBatch", "StreamDataset"} <= set(poolloader.datasets.__all__)
    for obj in (StreamSampler, StreamStep, StreamDataset, StreamBatch):
        assert "Example" in (obj.__doc__ or ""), obj


# ---------------------------------------------------------------- schedule maths


def test_chunk_counts_round_up() -> None:
    assert chunk_counts(np.array([1, 4, 5, 8, 9]), 4).tolist() == [1, 1, 2, 2, 3]


def test_shards_are_disjoint_and_balanced_by_chunks() -> None:
    chunks = np.array([9, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    shards = shard_streams(np.arange(10), chunks, 2)
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert [int(chunks[s].sum()) for s in shards] == [9, 9]


def test_slots_take_the_next_stream_just_in_time() -> None:
    plan = SlotPlan(2)
    for stream, chunks in [(0, 5), (1, 1), (2, 1), (3, 2)]:
        plan.assign(stream, chunks)
    # slot 1 frees after 1 step, takes stream 2 at step 1 and stream 3 at step 2
    assert plan.starts == [[0], [0, 1, 2]]
    assert [plan.locate(1, t) for t in range(5)] == [
        (1, 0, False), (2, 0, False), (3, 0, False), (3, 1, False), None,
    ]  # fmt: skip
    assert plan.last_free == 5 and plan.first_free == 4


def test_slot_loads_count_the_chunks_each_slot_reads_before_the_end() -> None:
    plan = SlotPlan(2)
    for stream, chunks in [(0, 5), (1, 1), (2, 6)]:
        plan.assign(stream, chunks)
    assert slot_loads(plan, 7) == (5, 7)
    assert slot_loads(plan, 4) == (4, 4)  # cut by the end of the epoch


def test_worker_layout_evens_out_the_chunks_with_equal_slot_counts() -> None:
    assert worker_layout((9, 8, 1, 1, 1, 1), 6, 2) == ((0, 3, 5), (1, 2, 4))  # 11 and 10
    assert worker_layout((5,) * 7, 7, 3) == ((0, 3, 6), (1, 4), (2, 5))  # b % parts
    assert worker_layout((), 5, 2) == ((0, 2, 4), (1, 3))
    lengths = [3, 17, 5, 30, 1, 12, 9, 22, 4, 14, 8, 26] * 3
    step = next(iter(StreamSampler(lengths, batch_size=8, chunk_size=2, shuffle=True)))
    by_modulo = [sum(step.slot_loads[w::2]) for w in range(2)]
    balanced = [sum(step.slot_loads[b] for b in ids) for ids in step.layout(2)]
    assert sum(balanced) == sum(by_modulo)
    assert max(balanced) - min(balanced) <= 2 < max(by_modulo) - min(by_modulo)


@FEW
@given(st.lists(st.integers(0, 50), min_size=1, max_size=24), st.integers(1, 6))
def test_worker_layout_is_a_partition_within_one_slot_of_even(loads, parts) -> None:
    parts = min(parts, len(loads))
    layout = worker_layout(tuple(loads), len(loads), parts)
    assert sorted(b for ids in layout for b in ids) == list(range(len(loads)))
    assert all(list(ids) == sorted(ids) for ids in layout)
    assert max(map(len, layout)) - min(map(len, layout)) <= 1
    sums = [sum(loads[b] for b in ids) for ids in layout]
    assert max(sums) <= sum(loads) / parts + max(loads)  # greedy's bound


def test_the_seeds_picture_letters_and_timesteps() -> None:
    sampler = StreamSampler([9] * 8, batch_size=8, chunk_size=3)
    rows = [[(s.stream, s.start) for s in step.slots] for step in sampler]
    assert len(rows) == 3
    assert rows[1] == [(stream, 3) for stream in range(8)]


# ---------------------------------------------------------------- sampler properties

lengths_lists = st.lists(st.integers(1, 40), min_size=1, max_size=30)
shapes = st.tuples(st.integers(1, 6), st.integers(1, 8))  # batch_size, chunk_size


@FEW
@given(lengths_lists, shapes, st.booleans(), st.integers(0, 3))
def test_every_chunk_once_rows_coherent_no_idle_slot_while_streams_wait(
    lengths, shape, shuffle, epoch
) -> None:
    batch_size, chunk_size = shape
    sampler = StreamSampler(lengths, batch_size=batch_size, chunk_size=chunk_size,
                            shuffle=shuffle, seed=3)  # fmt: skip
    got = steps(sampler, epoch)
    assert len(got) == len(sampler) and [s.step for s in got] == list(range(len(got)))
    check_coherent(got, lengths, chunk_size)
    assert sorted(chunks_of(got, repeat=False)) == all_chunks(lengths, chunk_size)
    # just in time: once a slot is idle, no stream starts later
    idle = [
        t for t, step in enumerate(got) if any(isinstance(s, StreamPadding) for s in step.slots)
    ]
    starts = [
        t
        for t, step in enumerate(got)
        for s in step.slots
        if isinstance(s, StreamChunk) and s.first
    ]
    assert not idle or max(starts) <= min(idle)


@FEW
@given(lengths_lists, shapes)
def test_restream_fills_every_slot_with_real_streams_read_again(lengths, shape) -> None:
    batch_size, chunk_size = shape
    sampler = StreamSampler(lengths, batch_size=batch_size, chunk_size=chunk_size, pad="restream")
    got = steps(sampler)
    check_coherent(got, lengths, chunk_size)
    assert all(isinstance(s, StreamChunk) for step in got for s in step.slots)
    assert sorted(chunks_of(got, repeat=False)) == all_chunks(lengths, chunk_size)
    dummy = StreamSampler(lengths, batch_size=batch_size, chunk_size=chunk_size)
    assert len(sampler) == len(dummy)


@FEW
@given(lengths_lists, shapes, st.sampled_from(["dummy", "restream"]))
def test_drop_incomplete_yields_only_full_steps_of_real_chunks(lengths, shape, pad) -> None:
    batch_size, chunk_size = shape
    sampler = StreamSampler(lengths, batch_size=batch_size, chunk_size=chunk_size, pad=pad,
                            drop_incomplete=True)  # fmt: skip
    got = steps(sampler)
    assert all(isinstance(s, StreamChunk) and not s.repeat for step in got for s in step.slots)
    delivered = chunks_of(got, repeat=False)
    assert len(delivered) == len(set(delivered)) == len(got) * batch_size
    if got:
        check_coherent(got, lengths, chunk_size)
    if len(lengths) < batch_size:
        assert got == []


@FEW
@given(lengths_lists, shapes, st.integers(2, 4), st.sampled_from(["dummy", "restream"]))
def test_ranks_read_disjoint_shards_and_yield_the_same_number_of_steps(
    lengths, shape, world_size, pad
) -> None:
    batch_size, chunk_size = shape
    ranks = [
        StreamSampler(lengths, batch_size=batch_size, chunk_size=chunk_size, shuffle=True,
                      pad=pad, seed=1, rank=r, world_size=world_size)
        for r in range(world_size)
    ]  # fmt: skip
    per_rank = [steps(s, 2) for s in ranks]
    assert len({len(s) for s in ranks}) == 1 and len({len(p) for p in per_rank}) == 1
    real = [chunks_of(p, repeat=False) for p in per_rank]
    assert sorted(c for r in real for c in r) == all_chunks(lengths, chunk_size)
    shards = [set(s.rank_streams(2)) for s in ranks]
    assert sum(len(s) for s in shards) == len(set().union(*shards)) == len(lengths)
    for got in per_rank:
        check_coherent(got, lengths, chunk_size)


def test_shuffle_follows_seed_plus_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = StreamSampler(LENGTHS, batch_size=3, chunk_size=4, shuffle=True, seed=seed)
        return [s.stream for step in steps(sampler, epoch) for s in step.slots
                if isinstance(s, StreamChunk) and s.first]  # fmt: skip

    assert order(5, 1) == order(5, 1) == order(6, 0)
    assert order(5, 1) != order(5, 2)
    plain = StreamSampler(LENGTHS, batch_size=3, chunk_size=4)
    assert steps(plain, 0) == steps(plain, 7)


# ---------------------------------------------------------------- sampler state


@FEW
@given(lengths_lists, shapes, st.sampled_from(["dummy", "restream"]), st.data())
def test_state_dict_resumes_exactly_mid_epoch(lengths, shape, pad, data) -> None:
    def make() -> StreamSampler:
        return StreamSampler(lengths, batch_size=shape[0], chunk_size=shape[1], pad=pad,
                             shuffle=True, seed=2)  # fmt: skip

    full = steps(make(), 1)
    k = data.draw(st.integers(0, len(full)))
    first = make()
    first.set_epoch(1)
    iterator = iter(first)
    for _ in range(k):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == iterator.state_dict() and state["step"] == k
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert len(resumed) == len(full)
    assert list(resumed) == full[k:]
    assert list(resumed) == full  # the resume applies to one iter()


def test_load_state_dict_rejects_unknown_keys_and_other_arguments() -> None:
    sampler = StreamSampler(LENGTHS, batch_size=3, chunk_size=4)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['extra'\] and missing keys \[\]"):
        sampler.load_state_dict({**state, "extra": 1})
    with pytest.raises(ValueError, match=r"missing keys \['step'\]"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "step"})
    other = StreamSampler(LENGTHS, batch_size=4, chunk_size=4)
    with pytest.raises(
        ValueError, match="saved with batch_size=3, but this StreamSampler has batch_size=4"
    ):
        other.load_state_dict(state)
    longer = StreamSampler([*LENGTHS, 5], batch_size=3, chunk_size=4)
    with pytest.raises(ValueError, match="same stream lengths, shuffle, pad and drop_incomplete"):
        longer.load_state_dict(state)
    with pytest.raises(ValueError, match="state\\['step'\\] should be at most"):
        sampler.load_state_dict({**state, "step": 10_000})
    with pytest.raises(TypeError, match="should be a dict"):
        sampler.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_arguments_are_checked_with_messages_that_say_how_to_fix() -> None:
    with pytest.raises(ValueError, match=r"stream_lengths\[1\]=0.0 .*drop empty streams"):
        StreamSampler([3, 0], batch_size=1, chunk_size=1)
    with pytest.raises(ValueError, match=r"stream_lengths\[0\]=2.5"):
        StreamSampler([2.5], batch_size=1, chunk_size=1)
    with pytest.raises(
        ValueError, match="batch_size should be a positive integer, but got batch_size=0"
    ):
        StreamSampler([3], batch_size=0, chunk_size=1)
    with pytest.raises(TypeError, match="chunk_size should be a positive integer"):
        StreamSampler([3], batch_size=1, chunk_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="pad should be 'dummy' or 'restream', but got pad='zeros'"
    ):
        StreamSampler([3], batch_size=1, chunk_size=1, pad="zeros")
    with pytest.raises(ValueError, match="Invalid rank 2"):
        StreamSampler([3], batch_size=1, chunk_size=1, rank=2, world_size=2)


# ---------------------------------------------------------------- the dataset, in process


def test_dataset_builds_time_major_or_batch_major_batches() -> None:
    sampler = StreamSampler(LENGTHS, batch_size=4, chunk_size=5)
    for step in sampler:
        check_batch(StreamDataset(read_pairs, pad_value=PAD)[step], step)
        batch_major = StreamDataset(read_pairs, pad_value=PAD, batch_first=True)[step]
        time_major = StreamDataset(read_pairs, pad_value=PAD)[step]
        assert torch.equal(batch_major.data, time_major.data.transpose(0, 1))
        assert torch.equal(batch_major.mask, time_major.mask.T)
        assert_same([time_major.to("cpu")], [time_major])


def test_batches_pickle_compactly_and_exactly() -> None:
    sampler = StreamSampler(LENGTHS, batch_size=4, chunk_size=5, shuffle=True)
    for batch_first in (False, True):
        dataset = StreamDataset(read_pairs, pad_value=PAD, batch_first=batch_first)
        for step in sampler:
            batch = dataset[step]
            for again in (pickle.loads(pickle.dumps(batch)), copy.deepcopy(batch)):
                assert_same([again], [batch])
                assert again.batch_first == batch_first
                assert [getattr(again, n).dtype for n in ("mask", "first", "repeat")] == [
                    torch.bool
                ] * 3
    batch = StreamDataset(read_pairs)[next(iter(sampler))]
    unusual = StreamBatch(batch.data, batch.mask, batch.first, batch.streams.int(),
                          batch.starts, batch.repeat)  # fmt: skip
    assert pickle.loads(pickle.dumps(unusual)).streams.dtype == torch.int32  # plain pickling
    small = StreamBatch(torch.zeros(0), batch.mask, batch.first, batch.streams, batch.starts,
                        batch.repeat)  # fmt: skip
    assert len(pickle.dumps(small)) < len(pickle.dumps(unusual)) / 2  # one block, not five


@pytest.mark.parametrize(
    "layout", [((0, 2, 4), (1, 3)), ((1, 2), (0, 4), (3,)), ((0, 1, 2, 3, 4),)]
)
def test_parts_merge_back_in_slot_order_for_any_layout(layout) -> None:
    dataset = StreamDataset(read_pairs, pad_value=PAD)
    for step in StreamSampler(LENGTHS, batch_size=5, chunk_size=4, pad="restream"):
        parts = [
            dataset[StreamPart(step.step, 4, ids, tuple(step.slots[b] for b in ids))]
            for ids in layout
        ]
        assert_same([StreamBatch.merge_slots(parts, layout)], [dataset[step]])


def test_open_iterators_are_capped_by_slots_and_closed_at_stream_end(tmp_path) -> None:
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, LENGTHS, 4), pad_value=PAD)
    for step in StreamSampler(LENGTHS, batch_size=3, chunk_size=4):
        check_batch(dataset[step], step)
        assert len(dataset.open_streams) <= 3
        running = {
            b: s.stream
            for b, s in enumerate(step.slots)
            if isinstance(s, StreamChunk) and not s.last
        }
        assert dataset.open_streams == running
    (log,) = events(tmp_path).values()
    assert Counter(e for e, _ in log) == {"open": 12, "close": 12}


def test_reader_mistakes_are_reported_with_the_stream_and_the_fix(tmp_path) -> None:
    step = StreamStep(0, 4, (StreamChunk(2, 0, 4, first=True, last=False),))
    with pytest.raises(
        ValueError, match=r"read\(stream=2, start=0, stop=4\) should give 4 time steps"
    ):
        StreamDataset(lambda s, a, b: torch.zeros(3))[step]
    short = StreamDataset(iterate=LoggedStreams(tmp_path, [3] * 5, 4))
    with pytest.raises(ValueError, match=r"iterate\(2\) chunk 0 should have 4 time steps"):
        short[step]
    with pytest.raises(TypeError, match="exactly one of read"):
        StreamDataset()
    with pytest.raises(TypeError, match="batch_size=None"):
        StreamDataset(read_pairs)[3]  # type: ignore[index]


def test_a_stream_opened_elsewhere_is_reopened_and_read_up_to_the_chunk(tmp_path) -> None:
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, [12], 4), pad_value=PAD)
    middle = StreamStep(5, 4, (StreamChunk(0, 4, 8, first=False, last=False),))
    check_batch(dataset[middle], middle)
    assert opens_per_stream(tmp_path) == {0: 1}
    with pytest.raises(
        ValueError, match=r"iterate\(0\) ended after 3 chunk\(s\).*fix stream_lengths"
    ):
        dataset[StreamStep(6, 4, (StreamChunk(0, 12, 16, first=False, last=True),))]


# ---------------------------------------------------------------- read by the pool


@MANY_WORKERS
@pytest.mark.parametrize("style", ["read", "iterate"])
def test_batches_are_identical_for_0_1_2_and_4_workers(style, tmp_path) -> None:
    sampler = StreamSampler(LENGTHS, batch_size=5, chunk_size=4, shuffle=True, pad="restream")
    spec = steps(sampler)
    results = {}
    for n in (0, 1, 2, 4):
        log = tmp_path / f"workers{n}"
        log.mkdir()
        reader = (
            {"read": read_pairs} if style == "read" else {"iterate": LoggedStreams(log, LENGTHS, 4)}
        )
        results[n] = load(StreamDataset(**reader, pad_value=PAD), sampler, n)
    for batch, step in zip(results[0], spec, strict=True):
        check_batch(batch, step)
    for n in (1, 2, 4):
        check_batches_coherent(results[n], LENGTHS, 4)
        assert_same(results[0], results[n])


@MANY_WORKERS
@pytest.mark.parametrize("style", ["read", "iterate"])
def test_random_augmentation_in_reading_is_the_same_for_any_num_workers(style) -> None:
    """A step is split into one part per worker, and each part was seeded as the
    whole step: with 4 workers every row of a step drew the same "random" noise,
    and the noise changed with num_workers. Each chunk is seeded for itself now:
    the same batches for 0, 1, 2 and 4 workers, and noise that differs per chunk."""
    sampler = StreamSampler(LENGTHS, batch_size=4, chunk_size=4, shuffle=True)
    reader = {"read": read_noisy} if style == "read" else {"iterate": iterate_noisy}
    dataset = StreamDataset(**reader, pad_value=PAD)
    seeded = torch.Generator().manual_seed
    results = {n: load(dataset, sampler, n, generator=seeded(0)) for n in (0, 1, 2, 4)}
    for n in (1, 2, 4):
        assert_same(results[0], results[n])
    noise = [
        round(float(b.data[0, row, 1] - b.data[0, row, 1].floor()), 6)
        for b in results[0]
        for row in range(b.data.shape[1])
        if b.mask[0, row]
    ]
    assert len(set(noise)) == len(noise), "two chunks drew the same noise"


def test_iterator_streams_stay_in_one_worker_and_are_never_reread(tmp_path) -> None:
    lengths, batch_size, workers = LENGTHS * 2, 4, 2
    sampler = StreamSampler(lengths, batch_size=batch_size, chunk_size=3, shuffle=True, seed=4)
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, lengths, 3), pad_value=PAD)
    batches = load(dataset, sampler, workers)
    for batch, step in zip(batches, steps(sampler), strict=True):
        check_batch(batch, step)
    logs = events(tmp_path)
    assert len(logs) == workers
    assert opens_per_stream(tmp_path) == {s: 1 for s in range(len(lengths))}
    for log in logs.values():  # every iterator closed, at most one per slot served
        open_now: set[int] = set()
        for event, stream in log:
            if event == "open":
                open_now.add(stream)
                assert len(open_now) <= batch_size // workers
            else:
                open_now.remove(stream)
        assert not open_now
    worker_of = {s: pid for pid, log in logs.items() for _, s in log}
    slot_of = {int(s): b for batch in batches for b, s in enumerate(batch.streams) if s >= 0}
    layout = steps(sampler)[0].layout(workers)
    part_of = {b: part for part, ids in enumerate(layout) for b in ids}
    for stream, slot in slot_of.items():  # the slots of one part are served by one worker
        same_part = [s for s, b in slot_of.items() if part_of[b] == part_of[slot]]
        assert {worker_of[s] for s in same_part} == {worker_of[stream]}
    assert len({worker_of[s] for s in slot_of}) == workers


def test_part_batches_are_freed_once_merged_so_their_slabs_are_reused() -> None:
    # A part's batch is a view of its worker's shared-memory slab until it dies. Held past
    # the merge (a reference cycle waits for the garbage collector, disabled here), the
    # workers run out of slabs and send the parts through fresh shared memory instead.
    sampler = StreamSampler([320] * 8, batch_size=8, chunk_size=8)  # 40 steps
    gc.disable()
    try:
        with DataLoader(StreamDataset(read_wide), sampler=sampler, batch_size=None,
                        num_workers=2, multiprocessing_context="forkserver") as loader:  # fmt: skip
            for batch in loader:
                assert batch.data.shape == (8, 8, 1024)
            stats = loader.statistics()
    finally:
        gc.enable()
    assert stats.slab_batches == 2 * len(sampler) == 80, stats
    assert stats.slab_reuse_rate > 0.8, stats


@MANY_WORKERS
def test_torchs_own_loader_gives_the_same_batches_but_rereads_streams(tmp_path) -> None:
    sampler = StreamSampler(LENGTHS, batch_size=3, chunk_size=4)
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, LENGTHS, 4), pad_value=PAD)
    stock = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None,
                                        num_workers=2, multiprocessing_context="forkserver")  # fmt: skip
    batches = list(stock)
    check_batches_coherent(batches, LENGTHS, 4)
    assert sum(opens_per_stream(tmp_path).values()) > len(LENGTHS)  # NOTE [ Stream affinity ]


def test_restream_padding_reads_streams_again_and_flags_them(tmp_path) -> None:
    sampler = StreamSampler(LENGTHS, batch_size=4, chunk_size=4, pad="restream")
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, LENGTHS, 4), pad_value=PAD)
    batches = load(dataset, sampler, 2)
    assert all(batch.streams.min() >= 0 for batch in batches)  # no dummy slot
    repeats = Counter(
        int(b.streams[i]) for b in batches for i in range(4) if b.repeat[i] and b.first[i]
    )
    assert repeats and all(b.mask[:, b.repeat].any(0).all() for b in batches if b.repeat.any())
    opens = opens_per_stream(tmp_path)
    assert opens == {s: 1 + repeats[s] for s in range(len(LENGTHS))}
    for batch, step in zip(batches, steps(sampler), strict=True):
        check_batch(batch, step)


def test_two_ranks_read_disjoint_streams_for_the_same_number_of_steps() -> None:
    lengths = [80, 4, 4, 4, 4, 3, 2, 1]  # rank 0 reads stream 0 alone, rank 1 the rest
    ranks = [
        StreamSampler(lengths, batch_size=2, chunk_size=4, rank=r, world_size=2) for r in range(2)
    ]
    per_rank = [load(StreamDataset(read_pairs, pad_value=PAD), s, 2) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 20
    seen = [{int(s) for b in batches for s in b.streams if s >= 0} for batches in per_rank]
    assert seen == [{0}, set(range(1, 8))]
    real = sorted((int(b.streams[i]), int(b.starts[i])) for batches in per_rank for b in batches
                  for i in range(2) if b.streams[i] >= 0)  # fmt: skip
    assert real == all_chunks(lengths, 4)
    assert sum(not b.mask.any() for b in per_rank[1]) == 16  # padding alone, shaped as data
    fresh = [StreamDataset(read_pairs, pad_value=PAD)[step] for step in steps(ranks[1])]
    assert_same(per_rank[1], fresh)


def test_loader_state_dict_resumes_mid_epoch_and_mid_stream(tmp_path) -> None:
    def loader(log: Path) -> DataLoader:
        sampler = StreamSampler(LENGTHS, batch_size=3, chunk_size=4, shuffle=True, seed=9)
        dataset = StreamDataset(iterate=LoggedStreams(log, LENGTHS, 4), pad_value=PAD)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2,
                          multiprocessing_context="forkserver")  # fmt: skip

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    with loader(tmp_path / "a") as first:
        full = list(first)
    with loader(tmp_path / "b") as second:
        batches = iter(second)
        head = [next(batches) for _ in range(4)]
        state = second.state_dict()
    with loader(tmp_path / "c") as third:
        third.load_state_dict(state)
        tail = list(third)
    assert_same(full, head + tail)
    in_progress = {s.stream for s in steps(second.sampler)[3].slots
                   if isinstance(s, StreamChunk) and not s.last}  # fmt: skip
    read_after = {int(s) for batch in tail for s in batch.streams if s >= 0}
    assert in_progress and in_progress <= read_after
    # each stream of the tail is opened once; those in progress are read up to their chunk
    assert opens_per_stream(tmp_path / "c") == {s: 1 for s in read_after}


def test_a_short_iterator_fails_the_batch_with_the_stream_named(tmp_path) -> None:
    sampler = StreamSampler([5, 9], batch_size=2, chunk_size=2)
    dataset = StreamDataset(iterate=LoggedStreams(tmp_path, [5, 6], 2))
    with pytest.raises(ValueError, match=r"iterate\(1\) ended after 3 chunk\(s\)"):
        load(dataset, sampler, 2)


# ------------------------------------------------------- changes, dtypes and misuse


class Features(StreamDataset):
    """``dim`` features per time step, each ``stream + t``; ``dim`` may change mid-run."""

    def __init__(self) -> None:
        super().__init__(read=self.read_features, pad_value=PAD)
        self.dim = 4

    def read_features(self, stream: int, start: int, stop: int) -> torch.Tensor:
        t = torch.arange(start, stop, dtype=torch.float32)[:, None]
        return (t + stream).expand(-1, self.dim).contiguous()


def read_mixed_dtypes(stream: int, start: int, stop: int) -> torch.Tensor:
    """Stream 0 gives int64 counts, the others float32 halves."""
    t = torch.arange(start, stop) + 0.5 * stream
    return t.long() if stream == 0 else t.float()


def _two_epochs_with_a_change(workers: int, change: str) -> list[StreamBatch]:
    # One stream in two slots: with 2 workers, one worker's part of every step is
    # padding alone, built from what that worker knew before the change.
    sampler = StreamSampler([6], batch_size=2, chunk_size=3)
    context = "forkserver" if workers else None
    with DataLoader(Features(), sampler=sampler, batch_size=None, num_workers=workers,
                    persistent_workers=workers > 0, multiprocessing_context=context) as loader:  # fmt: skip
        batches = list(loader)
        setattr(loader.dataset, change, 8 if change == "dim" else -7.0)
        return batches + list(loader)


@pytest.mark.parametrize("change", ["dim", "pad_value"])
def test_a_change_through_loader_dataset_reaches_padding(change: str) -> None:
    """Padding follows the dataset: its pad_value and the shape of its chunks, as
    changed through loader.dataset between epochs, the same with workers (whose part
    of a step may be padding alone) as in the main process."""
    alone = _two_epochs_with_a_change(0, change)
    pooled = _two_epochs_with_a_change(2, change)
    last = alone[-1]
    if change == "pad_value":
        assert set(last.data[~last.mask].flatten().tolist()) == {-7.0}
    else:
        assert last.data.shape == (3, 2, 8)
    assert len(pooled) == len(alone) == 4
    for a, b in zip(alone, pooled, strict=True):
        assert a.data.dtype == b.data.dtype and torch.equal(a.data, b.data)
        assert torch.equal(a.mask, b.mask)


def test_chunks_of_mixed_dtypes_give_the_same_batches_with_workers() -> None:
    """Chunks of several dtypes become the dtype of the step's first chunk (by slot),
    as one process assembling the whole step makes them, whatever the workers."""
    found = []
    for workers in (0, 2):
        sampler = StreamSampler([4, 4], batch_size=2, chunk_size=2)
        context = "forkserver" if workers else None
        with DataLoader(StreamDataset(read_mixed_dtypes), sampler=sampler, batch_size=None,
                        num_workers=workers, multiprocessing_context=context) as loader:  # fmt: skip
            found.append(list(loader))
    for a, b in zip(*found, strict=True):
        assert a.data.dtype == b.data.dtype == torch.int64 and torch.equal(a.data, b.data)


def test_a_stream_sampler_given_as_batch_sampler_is_explained() -> None:
    """torch's loader (and poolloader's) collate items when given a batch_sampler;
    the error says how to build the loader instead of failing on len()."""
    sampler = StreamSampler([5, 3, 2], batch_size=2, chunk_size=2)
    loader = torch.utils.data.DataLoader(StreamDataset(read_pairs), batch_sampler=sampler)
    with pytest.raises(TypeError, match=r"sampler=StreamSampler\(\.\.\.\), batch_size=None"):
        next(iter(loader))
