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
import json
import multiprocessing as mp
import os
import pickle
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil

from poolloader import SharedList
from poolloader.samplers import DynamicBatchSampler

WORDS = ["the", "a", "of", "speech", "model", "audio", "frame", "noise", "clean", "test"]
#: Seconds a worker may take to report; only bounds a hang.
DEADLINE = 600.0
MB = 1e6


def iter_records(count: int) -> Iterator[dict[str, Any]]:
    """Manifest rows like a speech corpus's: an id, a path, a duration, a transcript."""
    rng = random.Random(0)
    for i in range(count):
        yield {
            "id": f"utt{i:07d}",
            "path": f"spk{i % 2000:04d}/utt{i:07d}.flac",
            "dur": round(rng.uniform(1.0, 20.0), 2),
            "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
        }


def make_records(count: int) -> list[dict[str, Any]]:
    return list(iter_records(count))


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
    main_pss = memory(os.getpid())[0]
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


def one_run(container: str, method: str, count: int, workers: int) -> dict[str, float]:
    """One configuration, in a fresh interpreter: the main process holds only ``container``.

    A SharedList is built from a generator, as from a manifest file read line by line, so
    that the main process never holds the records as Python objects.
    """
    if container == "none":  # the baseline: a worker that imports poolloader (and torch)
        held: Any = []
    elif container == "list":
        held = make_records(count)
    else:
        held = SharedList(iter_records(count), columns=["dur"])
    gc.collect()
    return run_workers(held, method, workers)


def statics(count: int) -> dict[str, float]:
    """Build, pickle, access and sampler figures, the list and the SharedList side by side."""
    records = make_records(count)
    started = time.perf_counter()
    shared = SharedList(records, columns=["dur"])
    figures = {"build_s": time.perf_counter() - started}
    started = time.perf_counter()
    figures["list_pickle_mb"] = len(pickle.dumps(records)) / MB
    figures["list_pickle_s"] = time.perf_counter() - started
    figures["handle_bytes"] = len(pickle.dumps(shared))
    figures["segment_mb"] = shared._records.segment.size / MB
    figures["list_random_us"], figures["list_iter_us"] = access_times(records, count)
    figures["shared_random_us"], figures["shared_iter_us"] = access_times(shared, count)
    durations = np.array([r["dur"] for r in records])
    figures["list_sampler_build_s"], figures["list_sampler_epoch_s"] = sampler_epoch(durations)
    shared_sampler = sampler_epoch(shared.column("dur"))
    figures["shared_sampler_build_s"], figures["shared_sampler_epoch_s"] = shared_sampler
    return figures


def in_subprocess(*args: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--json", *args]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def report(count: int, workers: int) -> None:
    size = ["--records", str(count), "--workers", str(workers)]
    f = in_subprocess("--statics", *size)
    print(
        f"# {count:,} records, {workers} workers; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}\n"
    )
    print("| | plain list | SharedList |\n|---|---:|---:|")
    print(f"| build | (given) | {f['build_s']:.2f} s |")
    print(
        f"| pickled | {f['list_pickle_mb']:.1f} MB in {f['list_pickle_s']:.2f} s | "
        f"{f['handle_bytes']:.0f} B (segment {f['segment_mb']:.1f} MB) |"
    )
    print(
        f"| random access, per record | {f['list_random_us']:.2f} µs | "
        f"{f['shared_random_us']:.2f} µs |"
    )
    print(f"| iteration, per record | {f['list_iter_us']:.3f} µs | {f['shared_iter_us']:.2f} µs |")
    print(
        f"| DynamicBatchSampler on the durations: build, epoch | "
        f"{f['list_sampler_build_s']:.2f} s, {f['list_sampler_epoch_s']:.2f} s | "
        f"{f['shared_sampler_build_s']:.2f} s, {f['shared_sampler_epoch_s']:.2f} s |"
    )
    print(
        f"\n{workers} workers each touch every record once; PSS and USS are read while all "
        "live. The main process holds only the container.\n"
    )
    print(
        "| container | start | PSS per worker | USS per worker | PSS main + workers | "
        "main PSS | all workers ready |\n|---|---|---:|---:|---:|---:|---:|"
    )
    names = {"none": "nothing (baseline)", "list": "plain list", "shared": "SharedList"}
    for method in ("spawn", "forkserver", "fork"):
        for container, name in names.items():
            r = in_subprocess("--one", container, method, *size)
            print(
                f"| {name} | {method} | {r['worker_pss']:.0f} MB | {r['worker_uss']:.0f} MB | "
                f"{r['total_pss']:.0f} MB | {r['main_pss']:.0f} MB | {r['all_ready_s']:.1f} s |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("CONTAINER", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--statics", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.records, args.workers)))
    elif args.statics:
        print(json.dumps(statics(args.records)))
    else:
        report(args.records, args.workers)


if __name__ == "__main__":
    main()
