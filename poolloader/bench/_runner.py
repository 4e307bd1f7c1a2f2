"""Running workloads against the stock loader, alternating, in one process tree."""

from __future__ import annotations

import gc
import pickle
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import psutil
import torch

from .._messages import EpochStart, Task
from ..loader import DataLoader
from . import _control_cost
from ._progress import Progress
from ._workloads import Tiny, Workload

#: Seconds between memory samples while a workload runs. Shorter catches
#: shorter peaks at the cost of CPU taken from the loaders being measured.
MEMORY_SAMPLE_INTERVAL = 0.05


@dataclass
class Measurement:
    """One loader's figures for one workload (medians over the repeats)."""

    seconds: float
    batches: int
    peak_memory: int = 0  # bytes, proportional set size of main process plus workers
    busy: float = 0.0  # poolloader only: share of worker time spent loading
    wait: float = 0.0  # poolloader only: the consumer's mean wait per batch, seconds
    slab_reuse: float | None = None  # poolloader only

    @property
    def throughput(self) -> float:
        return self.batches / self.seconds if self.seconds else 0.0


def make_loader(kind: str, workload: Workload, num_workers: int, **extra: Any) -> Any:
    cls = DataLoader if kind == "poolloader" else torch.utils.data.DataLoader
    return cls(workload.dataset, num_workers=num_workers, **workload.loader_kwargs, **extra)


def throughput_steps(workload: Workload, repeats: int) -> int:
    """How many times :func:`measure_throughput` calls ``progress`` (for the display)."""
    return 2 + 2 * repeats + (2 if workload.measure_memory else 0)


def measure_throughput(
    workload: Workload, num_workers: int, repeats: int, progress: Progress
) -> dict[str, Measurement]:
    """Alternate stock and poolloader ``repeats`` times; an epoch each after a warm-up.

    poolloader's measurements include its own view of each run, from
    ``loader.statistics()``: worker busy share, consumer wait, slab reuse."""
    runs: dict[str, list[Measurement]] = {"stock": [], "poolloader": []}
    loaders = {
        kind: make_loader(kind, workload, num_workers, persistent_workers=True) for kind in runs
    }
    try:
        for kind, loader in loaders.items():
            progress(f"{workload.name}: warming up {kind}")
            _drain(loader)
        for repeat in range(repeats):
            for kind, loader in loaders.items():
                progress(f"{workload.name}: {kind} run {repeat + 1}/{repeats}")
                runs[kind].append(_timed_epoch(loader))
        if workload.measure_memory:
            for kind, loader in loaders.items():
                progress(f"{workload.name}: {kind} memory")
                runs[kind][-1].peak_memory = _peak_memory_of_epoch(loader)
    finally:
        _close(loaders["poolloader"])
        del loaders
        gc.collect()
    return {kind: _median(found) for kind, found in runs.items()}


def _peak_memory_of_epoch(loader: Any) -> int:
    """Peak memory of one more epoch, in a run of its own: reading every process's
    smaps costs milliseconds of CPU, which must not slow the timed runs."""
    with PeakMemory() as memory:
        _drain(loader)
    return memory.peak


def _timed_epoch(loader: Any) -> Measurement:
    before = loader.statistics() if isinstance(loader, DataLoader) else None
    started = time.perf_counter()
    batches = _drain(loader)
    seconds = time.perf_counter() - started
    found = Measurement(seconds, batches)
    if before is not None:
        after = loader.statistics()
        busy = after.worker_busy_seconds - before.worker_busy_seconds
        found.busy = busy / (loader.num_workers * seconds)
        found.wait = (after.wait_seconds - before.wait_seconds) / max(batches, 1)
        new = after.slab_batches - before.slab_batches
        if new:
            reused = after.slab_reuse_rate * after.slab_batches
            reused -= before.slab_reuse_rate * before.slab_batches
            found.slab_reuse = reused / new
    return found


def _drain(loader: Any) -> int:
    count = 0
    for batch in loader:
        count += 1
        del batch
    return count


def _median(found: list[Measurement]) -> Measurement:
    middle = sorted(found, key=lambda m: m.seconds)[len(found) // 2]
    return Measurement(
        middle.seconds,
        middle.batches,
        max(m.peak_memory for m in found),
        middle.busy,
        middle.wait,
        middle.slab_reuse,
    )


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


class PeakMemory:
    """Samples the proportional set size of this process and its descendants."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # a run shorter than one interval is still measured

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_INTERVAL):
            self._take()

    def _take(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                continue
        self.peak = max(self.peak, total)


def measure_startup(kind: str, method: str, num_workers: int, progress: Progress) -> float:
    """Seconds from creating a second loader of that start method to its first
    batch, in a fresh interpreter (see ``_startup.py``)."""
    progress(f"startup_{method}: {kind}")
    command = [sys.executable, "-m", "poolloader.bench._startup", kind, method, str(num_workers)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return float(done.stdout.strip().splitlines()[-1])


def measure_turnaround(kind: str, num_workers: int, epochs: int, progress: Progress) -> float:
    """Mean seconds from the end of one epoch to the first batch of the next, with
    torch's defaults (spawned workers, ``persistent_workers=False``)."""
    workload = Workload("turnaround", "", Tiny(64), {"batch_size": 4})
    loader = make_loader(kind, workload, num_workers, multiprocessing_context="spawn")
    gaps = []
    try:
        _drain(loader)
        for epoch in range(epochs):
            progress(f"epoch_turnaround: {kind} epoch {epoch + 1}/{epochs}")
            started = time.perf_counter()
            iterator = iter(loader)
            next(iterator)
            gaps.append(time.perf_counter() - started)
            for _ in iterator:
                pass
    finally:
        _close(loader)
    return statistics.mean(gaps)


def measure_control(num_workers: int, progress: Progress) -> dict[str, float]:
    """Bytes sent to workers per batch with the control channel idle, and what one
    change costs (messages and bytes, once, not per batch)."""
    progress("control_channel: idle, then one change")
    loader = DataLoader(Tiny(400), batch_size=4, num_workers=num_workers,
                        persistent_workers=True, multiprocessing_context="forkserver")  # fmt: skip
    try:
        _drain(loader)
        before = loader.statistics()
        batches = _drain(loader)
        idle = loader.statistics()
        cast(Any, loader.dataset).n = 400  # one change
        _drain(loader)
        changed = loader.statistics()
    finally:
        loader.close()
    return {
        "bytes_per_batch_idle": (idle.bytes_sent - before.bytes_sent) / batches,
        "bytes_per_batch_without_a_channel": _task_bytes(batches, num_workers) / batches,
        "control_bytes_per_batch_idle": (idle.control_bytes_sent - before.control_bytes_sent)
        / batches,
        "control_messages_after_one_change": changed.control_messages_sent
        - idle.control_messages_sent,
        "control_bytes_after_one_change": changed.control_bytes_sent - idle.control_bytes_sent,
        **{f"large_{k}": v for k, v in _control_cost.measure(num_workers, progress).items()},
    }


def _task_bytes(batches: int, num_workers: int) -> int:
    """What the second epoch of :func:`measure_control` must send with no control
    channel at all: each batch's task (its indices) and each worker's epoch start."""
    tasks = sum(
        len(pickle.dumps(Task(batches + k, 1, k, list(range(4 * k, 4 * k + 4)))))
        for k in range(batches)
    )
    return tasks + num_workers * len(pickle.dumps(EpochStart(1, 2**62)))


@contextmanager
def quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
