"""The slab transport's memory: slabs follow what is in flight and what the
consumer holds, and go back to the system when the loader is idle
(NOTE [ Idle slabs ] in ``poolloader/_transport.py``)."""

from __future__ import annotations

import time

import psutil
import torch
from _datasets import Mixed

from poolloader import DataLoader

#: Bytes of one Mixed(side=256) batch of 4: its images (4 x 256 x 256 float32), at least.
BATCH_BYTES = 4 * 256 * 256 * 4


def _slab_maps(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/maps") as fh:
        return sum("poolloader-slab" in line for line in fh)


def _worker_slab_maps() -> int:
    """Slab mappings in every process below this one (workers and template)."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += _slab_maps(child.pid)
        except OSError:
            continue
    return total


def _wait_for(predicate, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _images(loader) -> list[float]:
    return [float(b["image"].sum()) for b in loader]


def test_an_idle_loader_gives_its_slabs_back_and_keeps_what_a_batch_holds():
    dataset = Mixed(n=48, side=256)
    expected = [float(b["image"].sum()) for b in torch.utils.data.DataLoader(dataset, batch_size=4)]
    with DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        for batch in loader:
            pass
        kept, kept_sum = batch, float(batch["image"].sum())
        del batch
        busy = loader.statistics().slab_bytes
        assert busy >= BATCH_BYTES
        assert _worker_slab_maps() >= 2 and _slab_maps() >= 2
        # Idle: every slab but the kept batch's goes, here and in the workers.
        assert _wait_for(lambda: _worker_slab_maps() == 1), _worker_slab_maps()
        assert _wait_for(lambda: _slab_maps() == 1), _slab_maps()
        assert 0 < loader.statistics().slab_bytes < busy
        assert float(kept["image"].sum()) == kept_sum  # the kept batch is untouched
        del kept
        # Its slab goes too once it dies.
        assert _wait_for(lambda: _worker_slab_maps() == 0 and _slab_maps() == 0)
        assert loader.statistics().slab_bytes == 0
        # The next epoch makes new slabs and loads the same batches.
        assert _images(loader) == expected
        assert loader.statistics().slab_bytes >= BATCH_BYTES


def test_back_to_back_epochs_keep_their_slabs():
    with DataLoader(Mixed(n=48, side=256), batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        _images(loader)
        first = loader.statistics()
        _images(loader)
        second = loader.statistics()
    created = round(second.slab_batches * (1 - second.slab_reuse_rate))
    created_first = round(first.slab_batches * (1 - first.slab_reuse_rate))
    assert created - created_first <= 2, (first, second)


def test_slabs_follow_the_window_when_batches_take_the_same_time():
    """Uniform batches and a consumer that keeps up: no batch runs late, so the
    window stays at prefetch_factor * num_workers and the slabs with it (plus
    the batch being consumed and one a release is on its way for), whatever
    the reorder allowance would allow behind a slow batch."""
    with DataLoader(Mixed(n=160, side=256), batch_size=4, num_workers=2, persistent_workers=True,
                    prefetch_factor=2, multiprocessing_context="forkserver") as loader:  # fmt: skip
        for _ in range(2):
            for batch in loader:
                assert batch["image"].shape == (4, 256, 256)
            del batch
        slabs = _slab_maps()
    window = 2 * 2
    assert slabs <= window + 2 * 2, slabs
