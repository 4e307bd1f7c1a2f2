"""What runs in the fresh interpreter of one ``manifest`` probe (see ``_manifest.py``).

Run as ``python -m poolloader.bench._manifest_probe PROBE CONFIG RECORDS_FILE WORKERS``;
prints its figures as one JSON line. ``PROBE`` is ``main`` (the section's rows for
``CONFIG``: first batch and next epoch with 8 workers, then the PSS after an epoch with
4) or ``start`` (the first batch with ``WORKERS`` workers, a point of the series). The
package does not import this module, so that ``-m`` runs it afresh.
"""

from __future__ import annotations

import gc
import json
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.data import RandomSampler

from .._shared import SharedList
from .._template_process import TEMPLATE_NAME
from ..loader import DataLoader
from ._manifest import (
    BATCH_SIZE,
    CONFIGS,
    MEMORY_WORKERS,
    NEXT_EPOCHS,
    START_RECORDS,
    START_WORKERS,
    Config,
    read_records,
)
from ._workloads import Manifest

#: Seconds the memory run waits for all its workers to be alive before it measures
#: (poolloader forks them in the background; a tiny epoch can end first).
ALL_WORKERS_DEADLINE = 30.0


def _dataset(config: Config, path: Path) -> Manifest:
    rows = read_records(path)
    return Manifest(SharedList(rows) if config.shared else list(rows))


def _loader(config: Config, dataset: Manifest, workers: int, **kwargs: Any) -> Any:
    cls = DataLoader if config.kind == "poolloader" else torch.utils.data.DataLoader
    return cls(dataset, batch_size=BATCH_SIZE, num_workers=workers,
               multiprocessing_context=config.method, **kwargs)  # fmt: skip


def _first_batch(loader: Any) -> tuple[Any, float]:
    """The loader's next epoch, after its first batch; and the seconds that took."""
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    return iterator, time.perf_counter() - started


def _drain(iterator: Any) -> None:
    for _ in iterator:
        pass


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def probe_main(config: Config, path: Path) -> dict[str, Any]:
    """The section's rows for ``config``: the first batch with 8 workers and the next
    epoch's; then, the 8 workers gone, the process tree's PSS after an epoch with 4."""
    dataset = _dataset(config, path)
    figures = _start(config, dataset, START_WORKERS, NEXT_EPOCHS)
    gc.collect()
    figures.update(_memory(config, dataset, MEMORY_WORKERS))
    started = time.perf_counter()
    figures["pickled_bytes"] = len(pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL))
    figures["pickle_seconds"] = time.perf_counter() - started
    return figures


def probe_start(config: Config, path: Path, workers: int) -> dict[str, Any]:
    """The first batch with ``workers`` workers: a point of the start-up series."""
    return _start(config, _dataset(config, path), workers, 0)


def _start(config: Config, dataset: Manifest, workers: int, epochs: int) -> dict[str, Any]:
    """Seconds to the first batch of a loader with ``workers`` workers, then to the first
    batch of each of ``epochs`` more epochs (``persistent_workers=False``)."""
    sampler = RandomSampler(dataset, num_samples=min(START_RECORDS, len(dataset)))
    gc.collect()
    loader = _loader(config, dataset, workers, sampler=sampler, persistent_workers=False)
    try:
        iterator, first = _first_batch(loader)
        _drain(iterator)
        gaps = []
        for _ in range(epochs):
            iterator, gap = _first_batch(loader)
            gaps.append(gap)
            _drain(iterator)
    finally:
        _close(loader)
    return {"first_batch": first, "next_epochs": gaps}


def _memory(config: Config, dataset: Manifest, workers: int) -> dict[str, Any]:
    """One shuffled epoch with persistent workers, then the process tree's PSS."""
    started = time.perf_counter()
    loader = _loader(config, dataset, workers, sampler=RandomSampler(dataset),
                     persistent_workers=True)  # fmt: skip
    try:
        _drain(iter(loader))
        epoch = time.perf_counter() - started
        processes = tree_pss(workers)
    finally:
        _close(loader)
    pss = sum(p["pss"] for p in processes)
    return {"epoch_seconds": epoch, "pss": pss, "processes": processes}


def tree_pss(workers: int) -> list[dict[str, Any]]:
    """The PSS of this process and of every descendant, each with its role, once
    ``workers`` workers are alive (or :data:`ALL_WORKERS_DEADLINE` has passed)."""
    deadline = time.monotonic() + ALL_WORKERS_DEADLINE
    me = psutil.Process()
    while True:
        found = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                found.append({"role": _role(proc, me), "pss": proc.memory_full_info().pss})
            except psutil.Error:
                continue
        alive = sum(p["role"] == "worker" for p in found)
        if alive >= workers or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _role(proc: psutil.Process, main: psutil.Process) -> str:
    if proc.pid == main.pid:
        return "main"
    if proc.name() == TEMPLATE_NAME:
        return "template"
    command = " ".join(proc.cmdline())
    if "resource_tracker" in command:
        return "resource tracker"
    if proc.ppid() == main.pid and "forkserver" in command:
        return "forkserver"  # its descendants (template, workers) carry its command line
    return "worker"


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 8 on 2 cores
    probe, key, records_file, workers = sys.argv[1:5]
    if probe == "main":
        figures = probe_main(CONFIGS[key], Path(records_file))
    else:
        figures = probe_start(CONFIGS[key], Path(records_file), int(workers))
    print(json.dumps(figures))
