"""What one change of a large dataset costs the main process and each worker.

Issue 14 asks that one change of a 1-million-row dataset's attribute (or one
``set_epoch``) cost the main process under 5 ms and each worker under 5 ms.
The main process's part is measured as it happens in training: the change
made through ``loader.dataset``, then the work the next batch's submission
does for it (closing the group of changes, pickling the message for each
worker). A worker's part is what its message loop runs for it: unpickling the
message and applying it to its copy of the dataset, timed here on a copy made
from the same snapshot the workers started from. The periodic snapshot that
bounds the control log is reported too, with how often it comes due.
"""

from __future__ import annotations

import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import _control, _replay
from ..loader import DataLoader

#: Rows of the dataset the figures are measured on.
ROWS = 1_000_000
#: Changes timed; the median is reported.
REPEATS = 25


class MillionRows(torch.utils.data.Dataset):
    """A manifest-like dataset: a path, a duration and a speaker for each row."""

    def __init__(self, rows: int = ROWS) -> None:
        rng = np.random.default_rng(0)
        self.paths = [f"corpus/speaker{i % 1000}/utt{i}.flac" for i in range(rows)]
        self.durations = rng.uniform(1.0, 20.0, rows)
        self.speakers = rng.integers(0, 1000, rows)
        self.epoch = 0
        self.max_duration = 20.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.max_duration = min(20.0, 5.0 + epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, float]:
        return self.epoch, float(self.durations[i])


def measure(
    num_workers: int, progress: Callable[[str], None], rows: int = ROWS
) -> dict[str, float]:
    """Milliseconds one change costs, on a dataset of ``rows`` rows."""
    progress(f"control channel: one change of a {rows:,}-row dataset")
    dataset = MillionRows(rows)
    loader = DataLoader(dataset, batch_size=64, sampler=range(256), num_workers=num_workers,
                        persistent_workers=True, multiprocessing_context="forkserver")  # fmt: skip
    try:
        for _ in loader:
            pass
        channel = loader._channel
        replica = pickle.loads(channel.base[1])
        assign = _time_change(loader, num_workers, replica, _assign)
        method = _time_change(loader, num_workers, replica, _set_epoch)
        seen = {int(batch[0][0]) for batch in loader}
        snapshot, size = _time_snapshot(dataset)
    finally:
        loader.close()
    if seen != {dataset.epoch} or replica.epoch != dataset.epoch:
        raise RuntimeError(f"the workers saw epochs {seen}, the main process {dataset.epoch}")
    return {
        "rows": rows,
        "assign_main_ms": assign[0],
        "assign_worker_ms": assign[1],
        "set_epoch_main_ms": method[0],
        "set_epoch_worker_ms": method[1],
        "change_bytes": assign[2],
        "snapshot_ms": snapshot,
        "snapshot_every_bytes": max(size, _control.SNAPSHOT_FLOOR),
    }


def _assign(view: Any, k: int) -> None:
    view.epoch = k


def _set_epoch(view: Any, k: int) -> None:
    view.set_epoch(k)


def _time_change(
    loader: Any, num_workers: int, replica: Any, change: Callable[[Any, int], None]
) -> tuple[float, float, int]:
    """Median milliseconds in the main process and in a worker, and the message's bytes."""
    channel = loader._channel
    main, worker, size = [], [], 0
    for k in range(REPEATS):
        started = time.perf_counter()
        change(loader.dataset, k + 1)
        generation = channel.stamp()  # what submitting the next batch does for it
        messages = [
            pickle.dumps(update)
            for _ in range(num_workers)
            for update in channel.updates(generation - 1, generation)
        ]
        main.append(time.perf_counter() - started)
        started = time.perf_counter()
        for update in (pickle.loads(m) for m in messages[: len(messages) // num_workers]):
            _replay.apply_update(replica, update)
        worker.append(time.perf_counter() - started)
        size = sum(len(m) for m in messages) // num_workers
    return statistics.median(main) * 1e3, statistics.median(worker) * 1e3, size


def _time_snapshot(dataset: Any) -> tuple[float, int]:
    started = time.perf_counter()
    size = len(pickle.dumps(dataset))
    return (time.perf_counter() - started) * 1e3, size


def lines(extras: dict[str, Any]) -> list[str]:
    """The report's lines for the figures :func:`measure` returned (keys prefixed
    ``large_`` among the control channel's figures)."""
    if "large_rows" not in extras:
        return []
    e = {k.removeprefix("large_"): v for k, v in extras.items()}
    return [
        f"  one change of a {e['rows']:,}-row dataset: loader.dataset.epoch = k costs the main "
        f"process {e['assign_main_ms']:.3f} ms and each worker {e['assign_worker_ms']:.3f} ms "
        f"({e['change_bytes']} bytes); set_epoch(k) {e['set_epoch_main_ms']:.3f} ms and "
        f"{e['set_epoch_worker_ms']:.3f} ms (target: under 5 ms each)",
        f"  the control log's snapshot of that dataset: {e['snapshot_ms']:.0f} ms, once every "
        f"{e['snapshot_every_bytes'] / 2**20:.0f} MB of changes",
    ]
