"""The control channel: changes made in the main process reach every worker, in order."""

from __future__ import annotations

import os
import signal

import pytest
from _datasets import Plain, Scale, WhoLoaded, add_value

from poolloader import DataLoader, unwrap


def _loader(dataset, **kwargs):
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("multiprocessing_context", "forkserver")
    return DataLoader(dataset, batch_size=None, **kwargs)


@pytest.mark.parametrize("persistent", [False, True])
def test_doubling_at_an_epoch_boundary_reaches_every_worker(persistent):
    with _loader(WhoLoaded(n=40, delay=0.005), persistent_workers=persistent) as loader:
        first = list(loader)
        loader.dataset.value = 2 * loader.dataset.value
        second = list(loader)
    assert {row[2] for row in first} == {1.0}
    assert {row[2] for row in second} == {2.0}
    assert {row[1] for row in second} == {0, 1}, "both workers loaded batches"
    assert [row[0] for row in second] == list(range(40))


def test_mid_epoch_change_splits_batches_by_submission():
    with _loader(WhoLoaded(n=60, delay=0.002)) as loader:
        iterator = iter(loader)
        seen = [next(iterator) for _ in range(7)]
        cut = iterator.submitted
        loader.dataset.value = 5.0
        seen += list(iterator)
    assert 7 < cut < 60
    for position, row in enumerate(seen):
        expected = 1.0 if position < cut else 5.0
        assert row[2] == expected, f"batch {position} saw {row[2]} (change at {cut})"
    late_workers = {row[1] for row in seen[cut:]}
    assert late_workers == {0, 1}


def test_reload_prefetched_applies_a_change_at_once():
    with _loader(WhoLoaded(n=30)) as loader:
        iterator = iter(loader)
        before = [next(iterator) for _ in range(3)]
        loader.dataset.value = 7.0
        reloaded = loader.reload_prefetched()
        after = list(iterator)
    assert reloaded > 0
    assert all(row[2] == 1.0 for row in before)
    assert [row[0] for row in after] == list(range(3, 30))
    assert all(row[2] == 7.0 for row in after)


def test_nested_changes_new_and_deleted_attributes():
    dataset = WhoLoaded(n=8)
    with _loader(dataset) as loader:
        list(loader)
        loader.dataset.transform.p = 0.3
        loader.dataset.cfg["crop"] = 2.0
        rows = list(loader)
        assert {(row[3], row[4]) for row in rows} == {(0.3, 2.0)}

        loader.dataset.transform = Scale(0.9)
        del loader.dataset.cfg["crop"]
        rows = list(loader)
        assert {(row[3], row[4]) for row in rows} == {(0.9, None)}

        loader.dataset.extra = "new"
        assert loader.broadcast(_read_extra) == "new"
        del loader.dataset.extra
        assert not hasattr(dataset, "extra")
    # The main process's dataset changed too, so num_workers=0 would behave the same.
    assert dataset.transform.p == 0.9 and "crop" not in dataset.cfg


def _read_extra(dataset):
    return dataset.extra


def test_broadcast_runs_here_and_in_every_worker():
    dataset = WhoLoaded(n=20, delay=0.002)
    with _loader(dataset, persistent_workers=True) as loader:
        list(loader)
        loader.broadcast(add_value, 10)
        assert dataset.value == 11.0
        rows = list(loader)
    assert {row[2] for row in rows} == {11.0}
    assert {row[1] for row in rows} == {0, 1}


def test_a_replaced_worker_starts_with_every_change():
    with _loader(WhoLoaded(n=40, delay=0.01), persistent_workers=True) as loader:
        list(loader)
        loader.dataset.value = 3.0
        loader.dataset.transform.p = 0.5
        iterator = iter(loader)
        rows = [next(iterator)]
        os.kill(loader._pool.worker_pids[1], signal.SIGKILL)
        rows += list(iterator)
        assert loader.statistics().restarts == 1
    assert [row[0] for row in rows] == list(range(40))
    assert {(row[2], row[3]) for row in rows} == {(3.0, 0.5)}


def test_the_view_is_the_dataset_and_reads_cost_nothing():
    dataset = WhoLoaded(n=6)
    with _loader(dataset, persistent_workers=True) as loader:
        list(loader)
        assert isinstance(loader.dataset, WhoLoaded)
        assert unwrap(loader.dataset) is dataset
        assert loader.dataset.value == 1.0 and loader.dataset.transform.p == 1.0
        assert len(loader.dataset) == 6 and loader.dataset[2][0] == 2
        list(loader)
        stats = loader.statistics()
    assert stats.control_messages == 0 and stats.control_messages_sent == 0


def test_one_change_costs_one_message_per_worker():
    with _loader(WhoLoaded(n=40, delay=0.002), persistent_workers=True) as loader:
        list(loader)
        loader.dataset.value = 2.0
        list(loader)
        list(loader)
        stats = loader.statistics()
    assert stats.control_messages == 1
    assert stats.control_messages_sent == 2


def test_changes_before_the_pool_starts_travel_with_the_dataset():
    dataset = Plain(4)
    loader = _loader(dataset)
    loader.dataset.scale = 3
    with loader:
        assert list(loader) == [0, 3, 6, 9]
        assert loader.statistics().control_messages == 0


class GrowingBatches:
    """A batch sampler whose batch size may change while it is iterated."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size, self.drawn = n, size, 0

    def __iter__(self):
        start = 0
        while start < self.n:
            batch = list(range(start, min(start + self.size, self.n)))
            start += len(batch)
            self.drawn += 1
            yield batch

    def __len__(self) -> int:
        return -(-self.n // self.size)


def test_sampler_changes_apply_from_the_next_batch_drawn():
    sampler = GrowingBatches(100, 2)
    with DataLoader(Plain(100), batch_sampler=sampler, num_workers=2, reorder_buffer=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        sizes = [len(next(iterator)) for _ in range(3)]
        drawn = sampler.drawn
        window = loader.prefetch_factor * loader.num_workers
        assert drawn <= 3 + window + 2
        loader.batch_sampler.size = 10
        sizes += [len(b) for b in iterator]
    assert sizes[:drawn] == [2] * drawn
    assert set(sizes[drawn:-1]) == {10}
