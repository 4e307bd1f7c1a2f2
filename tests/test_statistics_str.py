"""``print(loader.statistics())`` is a short table; ``repr`` keeps the dataclass's fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from poolloader import DataLoader, LoaderStatistics


class Vectors(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((65536,), float(i))  # 1 MiB batches: through slabs


def test_a_real_loaders_statistics_print_as_a_short_table():
    with DataLoader(Vectors(), batch_size=4, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = sum(1 for _ in loader)
        loader.dataset.n = 1  # one change through the control channel
        batches += sum(1 for _ in loader)
        stats = loader.statistics()
    text = str(stats)
    lines = text.splitlines()
    assert lines[0] == "LoaderStatistics"
    assert len(lines) == 10 and all(len(line) <= 80 for line in lines)
    rows = {line[2:20].strip(): line[20:] for line in lines[1:]}
    assert rows["batches yielded"] == f"{batches:,}" == "12"
    assert rows["worker restarts"] == "0"
    assert rows["control changes"].startswith(f"{stats.control_messages} (")
    assert f"{stats.slab_batches:,} batches through slabs" in rows["batch data moved"]
    assert rows["workers busy"].startswith(f"{stats.worker_busy_fraction:.0%} (")
    assert repr(stats).startswith("LoaderStatistics(batches=12, wait_seconds=")
    assert dataclasses.is_dataclass(stats) and dataclasses.replace(stats) == stats


def test_sizes_and_times_are_in_units_a_person_reads():
    stats = LoaderStatistics(
        batches=1234, wait_seconds=3.5, mean_wait_seconds=0.00042, worker_busy_fraction=0.875,
        worker_busy_seconds=1085.2, in_flight=4, restarts=1, bytes_moved=23 * 2**30,
        control_messages=2, control_messages_sent=4, control_bytes_sent=312, bytes_sent=88000,
        tasks_done=1240, slab_batches=0, slab_reuse_rate=0.0,
    )  # fmt: skip
    assert str(stats).splitlines()[1:] == [
        "  batches yielded   1,234",
        "  consumer wait     0.42 ms per batch (3.5 s in all)",
        "  workers busy      88% (1085.2 s loading)",
        "  in flight         4 batches",
        "  worker restarts   1",
        "  batch data moved  23.0 GiB (no batch through slabs)",
        "  slab memory       0 B mapped now",
        "  sent to workers   85.9 KiB (1,240 batches done)",
        "  control changes   2 (4 messages, 312 B sent)",
    ]


def test_statistics_count_in_process_batches_and_outlive_the_pool():
    """num_workers=0 counted no batch; after close() the workers' numbers read 0
    beside the consumer's."""
    in_process = DataLoader(Vectors(), batch_size=4)
    assert len(list(in_process)) == 6
    stats = in_process.statistics()
    assert stats.batches == 6 and stats.wait_seconds > 0
    with DataLoader(Vectors(), batch_size=4, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        list(loader)
        running = loader.statistics()
    closed = loader.statistics()
    assert closed.batches == running.batches == 6
    assert closed.tasks_done == running.tasks_done == 6
    assert closed.bytes_moved == running.bytes_moved > 0


@pytest.mark.parametrize("how", ["torch's shutdown", "Lightning's teardown"])
def test_statistics_add_up_the_pools_a_loader_went_through(how):
    """A persistent loader's workers ended (torch's `_shutdown_workers`, Lightning
    setting `_iterator = None`) start again in a new pool: the counts go on."""
    with DataLoader(Vectors(), batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert len(list(loader)) == 6
        first = loader.statistics()
        if how == "torch's shutdown":
            loader._iterator._shutdown_workers()
        else:
            loader._iterator = None
        assert loader.statistics().tasks_done == first.tasks_done == 6
        assert len(list(loader)) == 6
        both = loader.statistics()
    assert both.batches == both.tasks_done == 12
    assert both.bytes_moved == 2 * first.bytes_moved
    assert both.worker_busy_seconds > first.worker_busy_seconds
