"""A short soak: workers SIGKILLed mid-epoch, epoch after epoch; every batch arrives
exactly once, in order, intact, and the main process holds no more threads or
file descriptors at the end than after the first epoch.

The full soak is ``benchmarks/soak.py`` (results in ``benchmarks/soak.md``).
"""

from __future__ import annotations

import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import soak  # noqa: E402 - benchmarks/ is not a package; its path goes in first

#: Slab mappings the main process may hold: each worker keeps at most
#: window + 2 slabs, the window being prefetch_factor (2) * num_workers + the
#: largest reorder buffer (16 * num_workers): 38 per worker with the soak's 2
#: workers (see _pool_start._make_transport). Slabs are made only when a batch
#: finds none free, so mappings stay far below this (about 20 per worker); more
#: than the cap would be a leak.
SLAB_CAP = 2 * 38


@pytest.mark.parametrize("start_method", ["forkserver"])
def test_quick_soak_loses_nothing_and_holds_steady(start_method: str) -> None:
    """4 epochs x 200 batches, a worker SIGKILLed every 200 batches of the whole
    epochs (2 kills); the other 2 epochs are left halfway with ``break`` and a worker
    killed while it loads a batch left behind (2 more kills, not counted towards
    max_worker_restarts, which the soak sets to the whole epochs' kills plus 2)."""
    report = soak.run(4, 200, kill_every=200, abandon_every=2, start_method=start_method,
                      seed=1)  # fmt: skip
    assert report.delivered == report.expected == 2 * 200 + 2 * 100
    assert (report.duplicated, report.lost, report.out_of_order, report.corrupt) == (0, 0, 0, 0)
    assert (report.kills, report.abandoned, report.abandoned_kills) == (2, 2, 2)
    # A worker killed in an abandoned epoch may be one that was about to start afresh
    # for the next epoch anyway (persistent_workers=False): then nothing is replaced.
    assert report.kills <= report.restarts <= report.kills + report.abandoned_kills
    assert report.first is not None and report.last is not None
    growth = report.growth()
    assert growth.threads == 0, report.lines()
    # The pool holds one descriptor per slab, to lend it (NOTE [ One pool of slabs ]
    # in _slab_transport.py), and slabs follow what is in flight and held; beyond
    # them the main process's descriptors stay flat.
    assert growth.fds <= 2 + max(0, growth.slab_maps), report.lines()
    assert report.last.slab_maps <= SLAB_CAP, report.lines()
    assert growth.rss < 64 * 2**20, report.lines()
