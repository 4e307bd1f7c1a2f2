"""Soak: many epochs while workers are SIGKILLed at random. Nothing lost, nothing
twice, nothing grows.

Run (not part of the default test run)::

    python benchmarks/soak.py                              # 20 epochs x 2,000 batches
    python benchmarks/soak.py --epochs 3 --batches 300     # a quick run
    python benchmarks/soak.py --epochs 10 --batches 1000 --kill-every 100 --workers 2
    python benchmarks/soak.py --abandon-every 0            # no abandoned epochs

Every ``--kill-every`` batches (halfway through each stretch, so no kill lands
after the last batch) the consumer SIGKILLs one live worker, picked at random: one that
is loading or waiting, or a replacement still starting (kills are far enough
apart that no batch is hit twice, which would rightly end the run as a poison
batch). ``max_worker_restarts`` is set above the number of kills. Each item is
``{"i", "x", "pid"}`` with ``x`` a float tensor full of ``i``, so a batch of 4 is
64 KiB and travels through the memfd slabs.

Every ``--abandon-every``-th epoch is left with ``break`` halfway (as Lightning's
``limit_val_batches`` does), and right away one worker is SIGKILLed while it
loads a batch of that abandoned epoch: the batches loaded ahead are made slow
first (``loader.dataset.delay``, through the control channel), so the workers
are busy with them when the kill lands. Such a death must cost nothing: the
batch is not loaded again, and the death does not count towards
``max_worker_restarts``, which is set to the regular kills plus
:data:`SPARE_RESTARTS` only, fewer than the abandoned epochs' kills.

Printed: batches expected, delivered, duplicated, lost, out of order and
corrupt; worker restarts; and the growth of the main process's RSS, open fds,
threads and ``poolloader-slab`` mappings (lines of ``/proc/self/maps``) from
the end of the first epoch to the end of the last. The exit status is 1 if
any batch was lost, duplicated, out of order or corrupt.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch.utils.data import Dataset

from poolloader import DataLoader

#: Floats per item: 16 KiB, so that a batch of 4 (64 KiB) is over the transport's
#: inline limit and goes through a shared-memory slab.
ITEM_FLOATS = 4096
#: Deaths allowed beyond the regular kills. Fewer than the kills in abandoned
#: epochs of a default run: were those counted, the run would end in
#: WorkerCrashedError.
SPARE_RESTARTS = 2
#: Seconds each item of an abandoned epoch's last batches takes, so that the
#: workers are still loading them when the kill lands.
ABANDON_DELAY = 0.05


class SoakItems(Dataset):
    """Item ``i``: ``{"i": i, "x": float tensor of i, "pid": the worker's pid}``,
    after ``delay`` seconds."""

    def __init__(self, n: int, floats: int = ITEM_FLOATS) -> None:
        self.n, self.floats, self.delay = n, floats, 0.0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.delay:
            time.sleep(self.delay)
        return {"i": i, "x": torch.full((self.floats,), float(i)), "pid": os.getpid()}


@dataclass(frozen=True)
class Resources:
    """What the main process holds at one moment."""

    rss: int
    fds: int
    threads: int
    slab_maps: int

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        me = psutil.Process()
        return cls(me.memory_info().rss, me.num_fds(), me.num_threads(), slab_mappings())


def slab_mappings() -> int:
    """Lines of /proc/self/maps that map a poolloader memfd slab."""
    with open("/proc/self/maps") as maps:
        return sum("poolloader-slab" in line for line in maps)


@dataclass
class SoakReport:
    epochs: int
    batches_per_epoch: int
    delivered: int = 0
    duplicated: int = 0
    lost: int = 0
    out_of_order: int = 0
    corrupt: int = 0
    kills: int = 0
    abandoned: int = 0  # epochs left with break halfway
    abandoned_kills: int = 0  # workers killed while loading an abandoned epoch's batches
    restarts: int = 0
    seconds: float = 0.0
    first: Resources | None = None
    last: Resources | None = None
    epoch_seconds: list[float] = field(default_factory=list)

    @property
    def expected(self) -> int:
        half = self.batches_per_epoch // 2
        return (self.epochs - self.abandoned) * self.batches_per_epoch + self.abandoned * half

    @property
    def ok(self) -> bool:
        return not (self.duplicated or self.lost or self.out_of_order or self.corrupt)

    def growth(self) -> Resources:
        """Last epoch's resources minus the first's."""
        assert self.first is not None and self.last is not None
        a, b = self.first, self.last
        return Resources(b.rss - a.rss, b.fds - a.fds, b.threads - a.threads,
                         b.slab_maps - a.slab_maps)  # fmt: skip

    def lines(self) -> list[str]:
        g, first, last = self.growth(), self.first, self.last
        assert first is not None and last is not None
        return [
            f"batches expected   {self.expected}",
            f"batches delivered  {self.delivered}",
            f"duplicated         {self.duplicated}",
            f"lost               {self.lost}",
            f"out of order       {self.out_of_order}",
            f"corrupt            {self.corrupt}",
            f"abandoned epochs   {self.abandoned} (break halfway)",
            f"workers killed     {self.kills} (+ {self.abandoned_kills} in abandoned epochs)",
            f"restarts           {self.restarts}",
            f"wall time          {self.seconds:.1f} s "
            f"({self.delivered / self.seconds:.0f} batches/s)",
            "growth, end of first epoch -> end of last:",
            f"  RSS              {g.rss / 2**20:+.1f} MiB "
            f"({first.rss / 2**20:.1f} -> {last.rss / 2**20:.1f})",
            f"  open fds         {g.fds:+d} ({first.fds} -> {last.fds})",
            f"  threads          {g.threads:+d} ({first.threads} -> {last.threads})",
            f"  slab mappings    {g.slab_maps:+d} ({first.slab_maps} -> {last.slab_maps})",
            f"verdict            {'OK' if self.ok else 'FAILED'}",
        ]


def _alive(pid: int) -> bool:
    """Whether worker ``pid`` still runs (a zombie is dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Killer:
    """SIGKILLs a random live worker every ``every`` batches."""

    def __init__(self, every: int, rng: random.Random, workers: Callable[[], list[int]]) -> None:
        self.every, self.rng, self.workers = every, rng, workers
        self.count = 0
        self.seen = 0  # batches of whole epochs seen
        self.victims: list[psutil.Process] = []

    def saw(self) -> None:
        """One more batch of a whole epoch. Kills land halfway through each stretch
        of whole epochs' batches, so that none lands after an epoch's last batch
        (a worker killed there is idle, and replaced unnoticed by the next epoch's
        fresh start)."""
        self.seen += 1
        if self.every and self.seen % self.every == self.every // 2:
            self.kill_one()

    def kill_one(self, within: float = 10.0) -> int:
        """SIGKILL one live worker, picked at random; how many were killed (0 or 1).
        A worker that is being replaced has no pid yet: wait up to ``within``
        seconds for one to run."""
        deadline = time.monotonic() + within
        while True:
            # A worker killed a moment ago may still look alive (its exit is still
            # tearing down its memory): killing it again would count one death twice.
            killed = {v.pid for v in self.victims}
            candidates = sorted(p for p in self.workers() if p and p not in killed and _alive(p))
            if candidates:
                try:
                    victim = psutil.Process(self.rng.choice(candidates))
                    victim.kill()
                except psutil.Error:
                    pass  # it ended meanwhile: pick again
                else:
                    self.victims.append(victim)
                    self.count += 1
                    return 1
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.01)


def _check_epoch(report: SoakReport, positions: list[int], length: int) -> None:
    """Count what went wrong in an epoch that should have yielded ``length`` batches."""
    seen = Counter(positions)
    report.duplicated += sum(c - 1 for c in seen.values() if c > 1)
    report.lost += sum(1 for b in range(length) if b not in seen)
    report.out_of_order += sum(1 for k, b in enumerate(positions) if b != k)


def _position(batch: dict[str, Any], batch_size: int) -> tuple[int, bool]:
    """The batch's position in the epoch, and whether its contents are intact."""
    indices = batch["i"].tolist()
    first = indices[0]
    intact = indices == list(range(first, first + batch_size)) and bool(
        (batch["x"] == batch["i"].to(batch["x"].dtype)[:, None]).all()
    )
    return first // batch_size, intact


def run(
    epochs: int = 20,
    batches: int = 2000,
    *,
    kill_every: int = 250,
    abandon_every: int = 2,
    workers: int = 2,
    batch_size: int = 4,
    start_method: str = "forkserver",
    seed: int = 0,
    quiet: bool = True,
) -> SoakReport:
    """Run the soak and return what it saw."""
    rng = random.Random(seed)
    report = SoakReport(epochs, batches)
    kills_planned = epochs * batches // kill_every if kill_every else 0
    dataset = SoakItems(batches * batch_size)
    started = time.perf_counter()
    with DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        multiprocessing_context=start_method,
        max_worker_restarts=kills_planned + SPARE_RESTARTS,
    ) as loader:
        killer = Killer(kill_every, rng, lambda: loader._pool.worker_pids if loader._pool else [])
        for epoch in range(epochs):
            epoch_started = time.perf_counter()
            abandon = bool(abandon_every) and epoch % abandon_every == abandon_every - 1
            positions = _soak_epoch(loader, report, killer, batch_size, abandon)
            _check_epoch(report, positions, batches // 2 if abandon else batches)
            report.epoch_seconds.append(time.perf_counter() - epoch_started)
            if epoch == 0:
                report.first = Resources.now()
            if not quiet:
                stats = loader.statistics()
                print(f"epoch {epoch}: {len(positions)} batches in "
                      f"{report.epoch_seconds[-1]:.1f} s{' (abandoned)' if abandon else ''}, "
                      f"kills so far {killer.count}, restarts {stats.restarts}",
                      flush=True)  # fmt: skip
        report.restarts = _settled(loader, killer)
        report.last = Resources.now()
    report.kills = killer.count - report.abandoned_kills
    report.seconds = time.perf_counter() - started
    return report


def _settled(loader: DataLoader, killer: Killer, within: float = 30.0) -> int:
    """The loader's restart count once every kill has been handled, or after
    ``within`` seconds. A kill right after the last batch is noticed a moment
    later, and the dead worker's process group is reaped on a short-lived thread
    (``poolloader-reap-<pid>``): wait for both, so that the growth measured after
    the last epoch is not a death still being handled."""
    deadline = time.monotonic() + within
    psutil.wait_procs(killer.victims, timeout=within)
    victims = {v.pid for v in killer.victims}
    while victims & set(killer.workers()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the pool still lists a dead worker: its death is not handled yet
    for thread in threading.enumerate():
        if thread.name.startswith("poolloader-reap"):
            thread.join(max(0.0, deadline - time.monotonic()))
    return loader.statistics().restarts


def _soak_epoch(
    loader: DataLoader, report: SoakReport, killer: Killer, batch_size: int, abandon: bool
) -> list[int]:
    """One epoch; an abandoned one ends with ``break`` halfway and a kill right after."""
    half = report.batches_per_epoch // 2
    slow_from = half - loader.num_workers * (loader.prefetch_factor or 2)
    positions: list[int] = []
    for batch in loader:
        position, intact = _position(batch, batch_size)
        positions.append(position)
        report.corrupt += not intact
        report.delivered += 1
        del batch
        if not abandon:
            killer.saw()
        elif len(positions) == slow_from:
            loader.dataset.delay = ABANDON_DELAY  # the batches loaded from here on are slow
        elif len(positions) == half:
            break
    if abandon:
        report.abandoned += 1
        report.abandoned_kills += killer.kill_one()
        loader.dataset.delay = 0.0
    return positions


def machine() -> str:
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batches", type=int, default=2000, help="batches per epoch")
    parser.add_argument("--kill-every", type=int, default=250, help="batches per kill; 0: none")
    parser.add_argument("--abandon-every", type=int, default=2,
                        help="epochs per epoch left halfway with a kill; 0: none")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--start-method", default="forkserver", choices=["forkserver", "spawn", "fork"]
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"soak: {args.epochs} epochs x {args.batches} batches of {args.batch_size}, "
          f"{args.workers} {args.start_method} workers, SIGKILL every {args.kill_every} "
          f"batches, every {args.abandon_every}th epoch left halfway with a SIGKILL",
          flush=True)  # fmt: skip
    report = run(
        args.epochs, args.batches, kill_every=args.kill_every,
        abandon_every=args.abandon_every, workers=args.workers,
        batch_size=args.batch_size, start_method=args.start_method, seed=args.seed,
        quiet=False,
    )  # fmt: skip
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
