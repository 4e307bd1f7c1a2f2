"""What the loader has done: counters kept while it runs, and their snapshot."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace


@dataclass
class PoolCounters:
    """What a pool counts as it runs (its I/O and consumer threads add to it)."""

    tasks_done: int = 0
    deaths: int = 0
    restarts: int = 0
    bytes_moved: int = 0
    busy: float = 0.0
    # NOTE [ Late by the main process's clock ] in _pool.py
    turnaround: float = 0.0
    turnarounds: int = 0
    control_messages: int = 0
    control_bytes: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A pool's counters at one moment, with what it holds now."""

    tasks_done: int
    restarts: int
    bytes_moved: int
    busy_seconds: float
    uptime_seconds: float
    pending: int
    running: int
    control_messages: int
    control_bytes: int
    bytes_sent: int
    slab_batches: int
    slab_reused: int
    slab_bytes: int


@dataclass(frozen=True, slots=True)
class LoaderStatistics:
    """A snapshot of a loader's work, from ``loader.statistics()``.

    Attributes:
        batches: Batches yielded to the consumer since the loader was created.
        wait_seconds: Total time the consumer spent waiting in ``next()``.
        mean_wait_seconds: Mean time the consumer waited in ``next()`` per
            batch; near zero when loading keeps ahead of training.
        worker_busy_fraction: Share of the workers' time spent loading batches
            since the pool started (0 to 1); low means the workers wait for the
            consumer, high means they are the bottleneck.
        worker_busy_seconds: Total time workers spent loading batches (subtract
            two snapshots to get the busy share of an interval).
        in_flight: Batches submitted and not yet finished (pending plus running).
        restarts: Workers replaced after dying.
        bytes_moved: Bytes of batch data moved from workers to the main process.
        control_messages: Messages of changes recorded through ``loader.dataset``
            and ``loader.broadcast`` while workers were running: the changes made
            between two batch submissions form one message. Reading sends none.
        control_messages_sent: Control messages actually sent to workers (each
            change goes once to each worker that runs a batch after it). With
            ``persistent_workers=False`` each epoch's workers are forked from the
            template process, whose copy of the dataset is brought up to date
            once (the changes, or a new pickle of a dataset changed directly):
            that is not counted here. Workers started directly (no template)
            receive the dataset's pickle each epoch, counted here.
        control_bytes_sent: Bytes of those control messages. While nothing
            changes this stays put: the channel costs nothing per batch.
        bytes_sent: Bytes of all messages sent to workers (tasks and control).
        tasks_done: Batches the workers finished, including ones discarded.
        slab_batches: Batches that arrived through shared-memory slabs.
        slab_reuse_rate: Share of those that reused an already-mapped slab
            (near 1 in steady state; low means batches are kept alive and
            the transport keeps allocating).
        slab_bytes: Bytes of shared-memory slabs mapped now. They follow what
            is in flight and what the consumer holds, and go back to the system
            once the loader has been idle for two seconds (batches still held
            keep theirs).
    """

    batches: int
    wait_seconds: float
    mean_wait_seconds: float
    worker_busy_fraction: float
    worker_busy_seconds: float
    in_flight: int
    restarts: int
    bytes_moved: int
    control_messages: int
    control_messages_sent: int
    control_bytes_sent: int
    bytes_sent: int
    tasks_done: int
    slab_batches: int
    slab_reuse_rate: float
    slab_bytes: int = 0

    def __str__(self) -> str:
        """A short table for ``print(loader.statistics())``; ``repr`` keeps every field."""
        slabs = "no batch through slabs"
        if self.slab_batches:
            slabs = (
                f"{self.slab_batches:,} batches through slabs, {self.slab_reuse_rate:.0%} reused"
            )
        rows = [
            ("batches yielded", f"{self.batches:,}"),
            ("consumer wait", f"{_seconds(self.mean_wait_seconds)} per batch "
                              f"({_seconds(self.wait_seconds)} in all)"),
            ("workers busy", f"{self.worker_busy_fraction:.0%} "
                             f"({_seconds(self.worker_busy_seconds)} loading)"),
            ("in flight", f"{self.in_flight:,} batches"),
            ("worker restarts", f"{self.restarts:,}"),
            ("batch data moved", f"{_size(self.bytes_moved)} ({slabs})"),
            ("slab memory", f"{_size(self.slab_bytes)} mapped now"),
            ("sent to workers", f"{_size(self.bytes_sent)} ({self.tasks_done:,} batches done)"),
            ("control changes", f"{self.control_messages:,} ({self.control_messages_sent:,} "
                                f"messages, {_size(self.control_bytes_sent)} sent)"),
        ]  # fmt: skip
        width = max(len(name) for name, _ in rows)
        return "\n".join(["LoaderStatistics", *(f"  {n:<{width}}  {v}" for n, v in rows)])


def _seconds(value: float) -> str:
    if value < 1.0:
        return f"{value * 1000:.3g} ms"
    return f"{value:.1f} s"


_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _size(count: int) -> str:
    value, unit = float(count), 0
    while value >= 1024 and unit < len(_SIZE_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{count} B" if unit == 0 else f"{value:.1f} {_SIZE_UNITS[unit]}"


class LoaderStats:
    """Counters the consumer's thread updates; cheap enough for every batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.wait_seconds = 0.0
        self.waits = 0
        # The pools stopped so far (closed, or replaced when broken), added up.
        self.ended_pools: PoolStatistics | None = None

    def pool_ended(self, pool: PoolStatistics) -> None:
        """Keep what a stopped pool did: statistics() adds it to the next pool's."""
        self.ended_pools = combined(self.ended_pools, pool)

    def record_wait(self, seconds: float) -> None:
        with self._lock:
            self.wait_seconds += seconds
            self.waits += 1

    def snapshot(
        self, pool: PoolStatistics | None, num_workers: int, control_messages: int
    ) -> LoaderStatistics:
        busy = 0.0
        if pool is not None and num_workers and pool.uptime_seconds > 0:
            busy = min(1.0, pool.busy_seconds / (num_workers * pool.uptime_seconds))
        return LoaderStatistics(
            batches=self.batches,
            wait_seconds=self.wait_seconds,
            worker_busy_seconds=pool.busy_seconds if pool else 0.0,
            mean_wait_seconds=self.wait_seconds / self.waits if self.waits else 0.0,
            worker_busy_fraction=busy,
            in_flight=(pool.pending + pool.running) if pool else 0,
            restarts=pool.restarts if pool else 0,
            bytes_moved=pool.bytes_moved if pool else 0,
            control_messages=control_messages,
            control_messages_sent=pool.control_messages if pool else 0,
            control_bytes_sent=pool.control_bytes if pool else 0,
            bytes_sent=pool.bytes_sent if pool else 0,
            tasks_done=pool.tasks_done if pool else 0,
            slab_batches=pool.slab_batches if pool else 0,
            slab_reuse_rate=pool.slab_reused / pool.slab_batches
            if pool and pool.slab_batches
            else 0.0,
            slab_bytes=pool.slab_bytes if pool else 0,
        )


#: What a pool holds at one moment, rather than counts up: not added across pools.
_HELD_NOW = frozenset({"pending", "running", "slab_bytes"})


def combined(earlier: PoolStatistics | None, now: PoolStatistics | None) -> PoolStatistics | None:
    """The counters of pools that ended (``earlier``) and of the one running
    (``now``) added up; what is held at this moment is the running pool's."""
    if earlier is None:
        return now
    if now is None:
        return replace(earlier, **dict.fromkeys(_HELD_NOW, 0))
    return PoolStatistics(
        **{
            f.name: getattr(now, f.name)
            if f.name in _HELD_NOW
            else getattr(earlier, f.name) + getattr(now, f.name)
            for f in fields(PoolStatistics)
        }
    )
