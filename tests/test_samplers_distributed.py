"""Samplers under a real two-process ``torch.distributed`` group (gloo backend).

Each rank builds its samplers with ``rank``/``world_size`` left to resolution, so they come
from the process group, loads the batches it would train on through a poolloader
``DataLoader`` with two worker processes, and the ranks exchange them with
``all_gather_object``. The parent process then checks the shards against the
single-rank global order. Rendezvous goes through a file, so no port can be taken.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from poolloader import DataLoader
from poolloader.samplers import DynamicBatchSampler, SortedBatchSampler
from poolloader.samplers._base import SamplerBase
from poolloader.samplers._distributed import rank_positions

WORLD_SIZE = 2
#: Seconds the ranks get in all (start, rendezvous, work); then they are killed and the
#: test fails instead of hanging. Starting two spawned interpreters that import torch takes
#: a few seconds on a loaded two-core machine.
DEADLINE = 120.0
EPOCH = 3

Batches = list[list[int]]
Factory = Callable[[], SamplerBase]


def lengths() -> np.ndarray:
    return np.random.default_rng(7).lognormal(mean=1.5, sigma=0.7, size=501)


#: Batches per rank of the "sorted-clipped" sampler: fewer than a pass holds (32).
CLIPPED = 7

FACTORIES: dict[str, Factory] = {
    "dynamic": lambda: DynamicBatchSampler(lengths(), max_duration=45.0, seed=5),
    "dynamic-drop-last": lambda: DynamicBatchSampler(
        lengths(), max_duration=45.0, max_batch_size=9, drop_last=True
    ),
    "sorted": lambda: SortedBatchSampler(lengths(), batch_size=16, seed=2),
    "sorted-clipped": lambda: SortedBatchSampler(
        lengths(), batch_size=16, seed=2, batches_per_epoch=CLIPPED
    ),
}


def global_order(name: str) -> SamplerBase:
    """The single-rank sampler whose epoch is the global order the ranks shard."""
    if name == "sorted-clipped":  # batches_per_epoch counts per rank: W times as many
        return SortedBatchSampler(
            lengths(), batch_size=16, seed=2, batches_per_epoch=CLIPPED * WORLD_SIZE
        )
    return FACTORIES[name]()


class Items(torch.utils.data.Dataset):
    """Item i is i: a batch's contents show which indices it held."""

    def __getitem__(self, i: int) -> int:
        return i


def collect_rank_batches(sampler: SamplerBase, epoch: int, *, workers: int = 0) -> Batches:
    """The batches this rank sees in ``epoch``, in order; with ``workers``, as a
    poolloader ``DataLoader`` with that many worker processes delivers them."""
    sampler.set_epoch(epoch)
    if not workers:
        return [list(batch) for batch in sampler]
    with DataLoader(Items(), batch_sampler=sampler, num_workers=workers,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        return [batch.tolist() for batch in loader]


def _run_rank(rank: int, init_file: str, results: Any) -> None:
    """Body of one rank process: join the group, collect, gather, report to the parent."""
    os.environ.pop("RANK", None)
    os.environ.pop("WORLD_SIZE", None)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD_SIZE,
            timeout=timedelta(seconds=DEADLINE / 2),
        )
        report = {name: _rank_report(factory()) for name, factory in FACTORIES.items()}
        gathered: list[Any] = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, report)
        results.put(("ok", rank, gathered))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_report(sampler: SamplerBase) -> dict[str, Any]:
    batches = collect_rank_batches(sampler, EPOCH, workers=2)
    return {
        "rank": sampler.rank,
        "world_size": sampler.world_size,
        "len": len(sampler),
        "batches": batches,
    }


def _run_ranks(init_file: Path) -> list[Any]:
    """Start the ranks, return what each gathered; kill them if they overrun the deadline."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [
        context.Process(target=_run_rank, args=(rank, str(init_file), results))
        for rank in range(WORLD_SIZE)
    ]
    for process in ranks:
        process.start()
    try:
        outcomes = [results.get(timeout=DEADLINE) for _ in ranks]
        for process in ranks:
            process.join(timeout=DEADLINE)
    except queue.Empty:
        raise AssertionError(f"the ranks did not report within {DEADLINE} s") from None
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    errors = [detail for status, _, detail in outcomes if status == "error"]
    assert not errors, "\n".join(errors)
    return [gathered for _, _, gathered in sorted(outcomes, key=lambda o: o[1])]


def test_ranks_from_torch_distributed_get_disjoint_equal_covering_shards(tmp_path: Path) -> None:
    gathered = _run_ranks(tmp_path / "rendezvous")
    assert gathered[0] == gathered[1], "all_gather_object gave the ranks different views"
    for name in FACTORIES:
        reports = [per_rank[name] for per_rank in gathered[0]]
        assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)], name
        shards = [r["batches"] for r in reports]
        assert len(shards[0]) == len(shards[1]) == reports[0]["len"] == reports[1]["len"], name
        _check_shards(name, global_order(name), shards)
    clipped = [per_rank["sorted-clipped"]["batches"] for per_rank in gathered[0]]
    assert [len(shard) for shard in clipped] == [CLIPPED, CLIPPED]


def _check_shards(name: str, single: SamplerBase, shards: list[Batches]) -> None:
    """Disjoint within every round but a padded last one, covering, per the formula."""
    everything = collect_rank_batches(single, EPOCH)
    drop_last = getattr(single, "drop_last", False)
    for rank, shard in enumerate(shards):
        positions = rank_positions(len(everything), rank, WORLD_SIZE, drop_last)
        assert shard == [everything[p] for p in positions], (name, rank)
    real_rounds = len(everything) // WORLD_SIZE
    items = [i for shard in shards for batch in shard[:real_rounds] for i in batch]
    assert len(items) == len(set(items)), name
    covered = {i for shard in shards for batch in shard for i in batch}
    assert covered == {i for batch in everything for i in batch}, name
    if not drop_last and getattr(single, "batches_per_epoch", None) is None:
        assert covered == set(range(single.num_items)), name  # type: ignore[attr-defined]


# --------------------------------------------- a limit changed mid-epoch, with workers

#: Item lengths for the mid-epoch tests: 1 to 5 seconds.
MIDCHANGE_LENGTHS = [1.0 + (i % 5) for i in range(120)]


class _SlowAt(torch.utils.data.Dataset):
    """Reads item ``slow`` slowly: its batch runs late, and the loader may load
    the batches after it meanwhile."""

    def __init__(self, slow: int | None) -> None:
        self.slow = slow

    def __len__(self) -> int:
        return len(MIDCHANGE_LENGTHS)

    def __getitem__(self, i: int) -> int:
        time.sleep(1.5 if i == self.slow else 0.002)
        return i


def _ids(items: list[int]) -> list[int]:
    return list(items)


def _rank_batches(rank: int, slow: int | None) -> Batches:
    """One rank's epoch, its curriculum halving max_duration after the third batch."""
    sampler = DynamicBatchSampler(MIDCHANGE_LENGTHS, max_duration=20.0, num_buckets=1,
                                  seed=0, rank=rank, world_size=WORLD_SIZE)  # fmt: skip
    batches: Batches = []
    with DataLoader(_SlowAt(slow), batch_sampler=sampler, num_workers=2, collate_fn=_ids,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        for step, batch in enumerate(loader):
            batches.append(batch)
            if step == 2:
                sampler.max_duration = 6.0  # at the same step on every rank
    return batches


def test_a_limit_changed_mid_epoch_lands_in_the_same_round_on_every_rank() -> None:
    """One rank's batch runs late; a loader that read the sampler further ahead
    there cut more batches under the old limit than the other rank did: the ranks
    disagreed on the global order and on the number of batches (a DDP job hangs
    in its next collective). Read a fixed window ahead, as torch reads it, every
    rank agrees, and the shards cover every item once."""
    slow = list(DynamicBatchSampler(MIDCHANGE_LENGTHS, max_duration=20.0, num_buckets=1,
                                    seed=0, rank=0, world_size=WORLD_SIZE))[1][0]  # fmt: skip
    late, on_time = _rank_batches(0, slow), _rank_batches(1, None)
    assert len(late) == len(on_time), "the ranks yielded different numbers of batches"
    items = sorted(i for batch in late + on_time for i in batch)
    assert items == list(range(len(MIDCHANGE_LENGTHS))), "an item was lost or duplicated"
    after = [b for b in late[3 + 2 * 2 :]]  # past the window drawn before the change
    assert all(sum(MIDCHANGE_LENGTHS[i] for i in b) <= 6.0 for b in after)


def _sizes_with_a_curriculum_step(loader: Any) -> list:
    sizes = []
    for step, batch in enumerate(loader):
        sizes.append(len(batch))
        if step == 6:  # the slow item's batch
            loader.batch_sampler.max_duration = 4.0
    return sizes


def test_on_one_rank_too_a_limit_change_lands_where_torchs_loader_lands_it() -> None:
    """With one rank as with several: behind a slow batch the loader drew further
    ahead of the loop, cutting batches under the old limit, so a curriculum step
    landed at a batch that depended on timing (or not at all that epoch), and the
    epoch's batches changed from run to run. It lands where torch's loader lands
    it, ``prefetch_factor * num_workers`` batches after the step."""

    from _datasets import SlowAt

    def options() -> dict[str, Any]:
        sampler = DynamicBatchSampler([1.0] * 60, max_duration=2.0, num_buckets=1, shuffle=False)
        return {"batch_sampler": sampler, "num_workers": 2, "prefetch_factor": 2,
                "multiprocessing_context": "forkserver"}  # fmt: skip

    want = _sizes_with_a_curriculum_step(torch.utils.data.DataLoader(SlowAt(60, 12), **options()))
    assert want == [2] * 11 + [4] * 9 + [2]
    with DataLoader(SlowAt(60, 12), **options()) as loader:
        assert _sizes_with_a_curriculum_step(loader) == want
