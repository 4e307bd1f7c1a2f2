"""A 1,000,000-record manifest in a plain list and in a ``SharedList``: cost per worker.

Records are ``{"id", "path", "dur", "text"}`` dicts. For each container and start
method, ``--workers`` worker processes receive it (spawn: pickled as process arguments,
as a DataLoader does; fork: inherited, as torch's fork workers do), touch every record
once, and wait; while they all live, the proportional set size (PSS) and unique set size
(USS) of each, and of the main process, are read with psutil. Also measured: build time,
pickled size, random access and iteration per record, and a ``DynamicBatchSampler``
epoch over the 1M durations read as ``column("dur")``.

Run:  PYTHONPATH=. python benchmarks/shared_manifest.py [--records N] [--workers W]
A recorded run is in ``benchmarks/shared_manifest.md``.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import pickle
import platform
import random
import time
from typing import Any

import numpy as np
import psutil

from poolloader import SharedList
from poolloader.samplers import DynamicBatchSampler

WORDS = "the a of speech model audio frame noise clean test train voice word level".split()
#: Seconds a worker may take to report; only bounds a hang.
DEADLINE = 600.0
MB = 1e6


def make_records(count: int) -> list[dict[str, Any]]:
    """Manifest rows like a speech corpus's: an id, a path, a duration, a transcript."""
    rng = random.Random(0)
    return [
        {
            "id": f"utt{i:07d}",
            "path": f"spk{i % 2000:04d}/utt{i:07d}.flac",
            "dur": round(rng.uniform(1.0, 20.0), 2),
            "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
        }
        for i in range(count)
    ]


def touch(records: Any) -> int:
    """Read every record once, as an epoch of ``__getitem__`` calls would."""
    total = 0
    for index in range(len(records)):
        total += len(records[index]["text"])
    return total


def worker(records: Any, conn: Any, release: Any) -> None:
    """Touch every record, report, and stay alive until the main process has measured."""
    started = time.perf_counter()
    total = touch(records)
    conn.send((total, time.perf_counter() - started))
    release.wait(DEADLINE)


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.pss / MB, info.uss / MB


def run_workers(container: Any, method: str, workers: int) -> dict[str, float]:
    """Start workers holding ``container``; measure them all while they live."""
    context = mp.get_context(method)
    release = context.Event()
    pipes, processes = [], []
    started = time.perf_counter()
    for _ in range(workers):
        ours, theirs = context.Pipe()
        process = context.Process(target=worker, args=(container, theirs, release))
        process.start()
        pipes.append(ours)
        processes.append(process)
    reports = [pipe.recv() if pipe.poll(DEADLINE) else (0, float("nan")) for pipe in pipes]
    ready = time.perf_counter() - started
    measured = [memory(p.pid) for p in processes]
    main_pss, main_uss = memory(os.getpid())
    release.set()
    for process in processes:
        process.join(DEADLINE)
    return {
        "worker_pss": float(np.mean([m[0] for m in measured])),
        "worker_uss": float(np.mean([m[1] for m in measured])),
        "total_pss": main_pss + sum(m[0] for m in measured),
        "main_pss": main_pss,
        "all_ready_s": ready,
        "touch_s": float(np.mean([r[1] for r in reports])),
    }


def access_times(container: Any, count: int) -> tuple[float, float]:
    """Microseconds per record: random indexing, and iteration."""
    rng = np.random.default_rng(0)
    positions = rng.integers(0, len(container), size=min(count, 200_000)).tolist()
    started = time.perf_counter()
    for position in positions:
        container[position]
    random_us = (time.perf_counter() - started) / len(positions) * 1e6
    started = time.perf_counter()
    for _ in container:
        pass
    return random_us, (time.perf_counter() - started) / len(container) * 1e6


def sampler_epoch(durations: Any) -> tuple[float, float]:
    """Seconds to build a DynamicBatchSampler and to run one epoch of it."""
    started = time.perf_counter()
    sampler = DynamicBatchSampler(durations, max_duration=600.0, seed=0)
    built = time.perf_counter() - started
    started = time.perf_counter()
    for _ in sampler:
        pass
    return built, time.perf_counter() - started


def measure(count: int, workers: int) -> None:
    records = make_records(count)
    started = time.perf_counter()
    shared = SharedList(records, columns=["dur"])
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    list_pickle = len(pickle.dumps(records))
    list_pickle_s = time.perf_counter() - started
    print(f"# {count:,} records, {workers} workers; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n")  # fmt: skip
    print("| | plain list | SharedList |\n|---|---:|---:|")
    print(f"| build | (given) | {build_s:.2f} s |")
    print(f"| pickled size | {list_pickle / MB:.1f} MB ({list_pickle_s:.2f} s) | "
          f"{len(pickle.dumps(shared))} B (segment {shared._records.segment.size / MB:.1f} MB) |")  # fmt: skip
    list_random, list_iter = access_times(records, count)
    shared_random, shared_iter = access_times(shared, count)
    print(f"| random access per record | {list_random:.2f} µs | {shared_random:.2f} µs |")
    print(f"| iteration per record | {list_iter:.3f} µs | {shared_iter:.2f} µs |")
    durations = np.array([r["dur"] for r in records])
    plain_sampler, shared_sampler = sampler_epoch(durations), sampler_epoch(shared.column("dur"))
    print(f"| DynamicBatchSampler build / epoch | {plain_sampler[0]:.2f} / {plain_sampler[1]:.2f} s"
          f" | {shared_sampler[0]:.2f} / {shared_sampler[1]:.2f} s |")  # fmt: skip
    print("\nEach worker touches every record once; PSS/USS read while all workers live.\n")
    print("| container | start | worker PSS | worker USS | main + workers PSS | main PSS | "
          "all ready | touch |\n|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for method in ("spawn", "fork"):
        for name in ("plain list", "SharedList"):
            container = records if name == "plain list" else shared
            gc.collect()
            row = run_workers(container, method, workers)
            print(f"| {name} | {method} | {row['worker_pss']:.0f} MB | {row['worker_uss']:.0f} MB"
                  f" | {row['total_pss']:.0f} MB | {row['main_pss']:.0f} MB | "
                  f"{row['all_ready_s']:.1f} s | {row['touch_s']:.2f} s |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    measure(args.records, args.workers)


if __name__ == "__main__":
    main()
