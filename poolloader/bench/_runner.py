"""Running workloads against the stock loader (or, with ``--peers``, against every
loader of ``_peers.py``), alternating, in one process tree."""

from __future__ import annotations

import gc
import hashlib
import pickle
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import psutil
import torch

from .._messages import BeginEpoch, Task
from ..loader import DataLoader
from . import _control_cost, _peers
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
    # CPU seconds of the main process per batch, all its threads (the consumer's
    # loop, the loader's I/O and pinning threads); not the workers'.
    main_cpu: float = 0.0
    # --peers only: bytes the loader holds, shared memory counted once whether or
    # not a process maps it (NOTE [ Held memory ])
    peak_held: int = 0

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
                runs[kind][-1].peak_memory = memory_of_epoch(loader).peak
    finally:
        _close(loaders["poolloader"])
        del loaders
        gc.collect()
    return {kind: _median(found) for kind, found in runs.items()}


def memory_of_epoch(loader: Any, shared_baseline: int | None = None) -> PeakMemory:
    """The memory peaks of one more epoch (held memory too with a
    ``shared_baseline``, NOTE [ Held memory ]), in a run of its own: reading every
    process's smaps costs milliseconds of CPU, which must not slow the timed runs."""
    with PeakMemory(shared_baseline) as memory:
        _drain(loader)
    return memory


def _timed_epoch(loader: Any) -> Measurement:
    before = loader.statistics() if isinstance(loader, DataLoader) else None
    started, cpu = time.perf_counter(), time.process_time()
    batches = _drain(loader)
    seconds = time.perf_counter() - started
    found = Measurement(seconds, batches)
    found.main_cpu = (time.process_time() - cpu) / max(batches, 1)
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
        middle.main_cpu,
    )


def _close(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


class PeakMemory:
    """Samples the proportional set size of this process and its descendants
    (``peak``) and, with a ``shared_baseline``, the memory they hold (``peak_held``,
    NOTE [ Held memory ])."""

    def __init__(self, shared_baseline: int | None = None) -> None:
        self.peak = 0
        self.peak_held = 0
        self._baseline = shared_baseline
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
        total = private = 0
        for proc in [me, *me.children(recursive=True)]:
            found = _rollup(proc.pid)
            if found is None:
                continue
            total += found.get("Pss", 0)
            private += found.get("Pss_Anon", 0) + found.get("Pss_File", 0)
        self.peak = max(self.peak, total)
        if self._baseline is not None:
            held = private + max(0, shared_memory_in_use() - self._baseline)
            self.peak_held = max(self.peak_held, held)


# NOTE [ Held memory ]: PSS counts shared memory only while a process maps it.
# torch's workers unmap a batch's shared memory once they have sent its
# descriptor, so the batches waiting in its queue are in no process's PSS; a
# loader that keeps its shared memory mapped (poolloader's slabs, SPDL's
# segment pool) has all of it counted. "Held" memory counts each kind once:
# every process's PSS of private and file-backed pages, plus the growth of the
# system's shared memory (``Shmem`` of ``/proc/meminfo``) since before the
# loader was built, mapped or not. Another program creating shared memory
# meanwhile would be counted too: a quiet machine is assumed.


def _rollup(pid: int) -> dict[str, int] | None:
    """``/proc/PID/smaps_rollup`` in bytes, or ``None`` once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            lines = rollup.read().splitlines()
    except OSError:
        return None
    found = {}
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        value = rest.split()
        if len(value) == 2 and value[1] == "kB":
            found[name] = int(value[0]) * 1024
    return found


def shared_memory_in_use() -> int:
    """Bytes of shared memory (tmpfs, memfd, System V) in use on the machine."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


#: Seconds one loader's memory probe may take (a warm-up epoch and a measured one),
#: and one start-up probe; they only bound a hang.
PEER_MEMORY_DEADLINE = 600
STARTUP_DEADLINE = 600


def measure_startup(kind: str, method: str, num_workers: int, progress: Progress) -> float:
    """Seconds from creating a second loader of that start method to its first
    batch, in a fresh interpreter (see ``_startup.py``)."""
    progress(f"startup_{method}: {kind}")
    found = run_probe("_startup", [kind, method, str(num_workers)],
                      f"timing {kind}'s {method} start-up", STARTUP_DEADLINE)  # fmt: skip
    return float(found)


def run_probe(
    module: str, args: list[str], what: str, deadline: float, stdin: bytes | None = None
) -> str:
    """The last line ``python -m poolloader.bench.<module> ARGS`` printed, run in a
    fresh interpreter (``stdin`` on its standard input); a probe that fails raises
    :class:`RuntimeError` saying ``what`` failed, with the end of its errors."""
    command = [sys.executable, "-m", f"poolloader.bench.{module}", *args]
    done = subprocess.run(command, input=stdin, capture_output=True, timeout=deadline)
    if done.returncode != 0:
        raise RuntimeError(
            f"{what} failed: python -m poolloader.bench.{module} {' '.join(args)} exited "
            f"with {done.returncode}:\n{done.stderr.decode(errors='replace')[-4000:]}"
        )
    return done.stdout.decode().strip().splitlines()[-1]


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
    return tasks + num_workers * len(pickle.dumps(BeginEpoch(1, 1, 2**62)))


@contextmanager
def quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------- peers


class DifferentBatches(RuntimeError):
    """A loader delivered other batches than torch's DataLoader from the same
    dataset and index batches: its figures would not compare like with like."""


@dataclass(frozen=True)
class Checksum:
    """What one epoch of a loader delivered: its batches, and a digest of all of
    them in order (types, dtypes, shapes and bytes)."""

    batches: int
    digest: str


@dataclass
class PeerResult:
    """One workload measured with every loader of ``_peers.py`` that is installed."""

    workload: str
    num_workers: int
    measure_memory: bool
    measurements: dict[str, Measurement]
    checksums: dict[str, Checksum]
    #: batches/s of each loader's timed epochs, one per round of the alternating
    #: runs (round ``i`` of every loader ran one after the other)
    rounds: dict[str, list[float]] = field(default_factory=dict)
    #: the peers that failed on this workload, left out of it: their errors, one
    #: line each (:func:`_peers.failure`)
    failed: dict[str, str] = field(default_factory=dict)


def peers_steps(workload: Workload, columns: list[str], repeats: int) -> int:
    """How many times :func:`measure_peers` calls ``progress`` (for the display)."""
    return len(columns) * (1 + repeats + (1 if workload.measure_memory else 0))


def measure_peers(
    workload: Workload, columns: list[str], num_workers: int, repeats: int, progress: Progress
) -> PeerResult:
    """Every loader in ``columns``: an epoch each that must deliver torch's batches,
    then ``repeats`` timed epochs each, alternating; then, for workloads that
    measure memory, each loader alone: peak PSS of an epoch after a warm-up.

    A peer that raises at any of these steps is left out of the workload, its
    error kept for the table (``failed``): a peer's defect on this Python or
    platform (SPDL 0.8's subprocess mode fails on Python 3.13.0, CPython
    gh-125631) leaves the comparison with the loaders that work.

    Loaders that use threads in this process may change torch's intra-op thread
    count (torchdata's thread workers set it to 1); it is put back after each of
    their epochs so that the next loader runs as it would alone."""
    threads = torch.get_num_threads()
    failed: dict[str, str] = {}
    loaders: dict[str, Any] = {}
    for column in _peers.build_order(columns):
        try:
            loaders[column] = _peers.build(column, workload, num_workers)
        except Exception as exc:
            _left_out(column, exc, failed, loaders)
    runs: dict[str, list[Measurement]] = {column: [] for column in columns}
    checksums: dict[str, Checksum] = {}

    def running() -> list[str]:
        return [column for column in columns if column not in failed]

    try:
        for column in columns:
            progress(f"{workload.name}: warming up {column}, checking its batches")
            if column in failed:
                continue
            try:
                checksums[column] = checksum_epoch(loaders[column])
            except Exception as exc:
                _left_out(column, exc, failed, loaders)
            torch.set_num_threads(threads)
        check_same_batches(workload.name, checksums)
        for repeat in range(repeats):
            for column in columns:
                progress(f"{workload.name}: {column} run {repeat + 1}/{repeats}")
                if column in failed:
                    continue
                try:
                    runs[column].append(_timed_epoch(loaders[column]))
                except Exception as exc:
                    _left_out(column, exc, failed, loaders)
                torch.set_num_threads(threads)
    finally:
        for loader in loaders.values():
            _peers.close(loader)
        del loaders
        gc.collect()
    found = {column: _median(runs[column]) for column in running()}
    rounds = {column: [m.throughput for m in runs[column]] for column in running()}
    if workload.measure_memory:
        for column in columns:
            progress(f"{workload.name}: {column} memory, alone")
            if column in failed:
                continue
            try:
                found[column].peak_memory, found[column].peak_held = _peak_memory_alone(
                    column, workload, num_workers
                )
            except Exception as exc:
                _left_out(column, exc, failed, {})
                del found[column], rounds[column]
            torch.set_num_threads(threads)
    checksums = {column: checksums[column] for column in running()}
    return PeerResult(workload.name, num_workers, workload.measure_memory, found, checksums,
                      rounds, failed)  # fmt: skip


def _left_out(column: str, exc: Exception, failed: dict[str, str], loaders: dict[str, Any]) -> None:
    """Leave a peer that failed out of the workload (its loader closed), with its
    error for the table; torch's or poolloader's failure is raised: the comparison
    has no reference, or found a defect of poolloader's."""
    if not _peers.is_peer(column):
        raise exc
    failed[column] = _peers.failure(exc)
    loader = loaders.pop(column, None)
    if loader is not None:
        try:
            _peers.close(loader)
        except Exception:
            pass  # it failed already; its error is the one to report


def _peak_memory_alone(column: str, workload: Workload, num_workers: int) -> tuple[int, int]:
    """Peak PSS and peak held memory (NOTE [ Held memory ]) of main process and
    children over one epoch of this loader, after a warm-up epoch, in a fresh
    interpreter of its own (``_peer_memory.py`` says why)."""
    found = run_probe("_peer_memory", [column, str(num_workers)],
                      f"measuring {column}'s memory on {workload.name}",
                      PEER_MEMORY_DEADLINE, stdin=pickle.dumps(workload))  # fmt: skip
    pss, held = found.split()
    return int(pss), int(held)


def check_same_batches(workload: str, checksums: dict[str, Checksum]) -> None:
    """Raise :class:`DifferentBatches` unless every loader delivered torch's batches."""
    reference = checksums["torch"]
    for column, found in checksums.items():
        if found != reference:
            raise DifferentBatches(
                f"{column} delivered other batches than torch's DataLoader on {workload}: "
                f"{found.batches} batches with digest {found.digest}, but torch's are "
                f"{reference.batches} with digest {reference.digest}; a loader that "
                f"delivers other batches cannot be compared"
            )


def checksum_epoch(loader: Any) -> Checksum:
    """Drain one epoch, digesting every batch in order."""
    digest = hashlib.blake2b(digest_size=16)
    count = 0
    for batch in loader:
        _digest(digest, batch)
        count += 1
        del batch
    return Checksum(count, digest.hexdigest())


def _digest(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        digest.update(f"tensor {obj.dtype} {tuple(obj.shape)};".encode())
        digest.update(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray):
        digest.update(f"ndarray {obj.dtype} {obj.shape};".encode())
        digest.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for item in obj:
            _digest(digest, item)
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)};".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}:".encode())
            _digest(digest, obj[key])
    else:
        digest.update(f"{type(obj).__name__} {obj!r};".encode())
