"""The control log stays bounded, replaced workers catch up from its snapshots,
and a change made while workers start reaches the next batches (issues 12 and 14)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from _knobs import Growing, Knobs, keep, wait_for_gate

from poolloader import DataLoader
from poolloader._control import SNAPSHOT_FLOOR

#: Seconds a background step may take before the test gives up (bounds a hang only).
DEADLINE = 60.0


def _loader(dataset, **kwargs):
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("multiprocessing_context", "forkserver")
    kwargs.setdefault("persistent_workers", True)
    return DataLoader(dataset, batch_size=None, collate_fn=keep, **kwargs)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_change_every_step_leaves_a_bounded_log(transport):
    """100,000 assignments over 1,000 batches with persistent workers: the log
    keeps what the workers may still need, not every change ever made."""
    dataset = Growing(n=500)
    with _loader(dataset, transport=transport) as loader:
        for _ in range(2):
            for _row in loader:
                for _ in range(100):
                    loader.dataset.value += 1
                loader.dataset.note = "x" * 200  # some bytes, so snapshots come due
        channel = loader._channel
        entries, size = channel.log_entries, channel.log_bytes
        rows = list(loader)
        stats = loader.statistics()
    assert dataset.value == 100_000
    assert {row[1] for row in rows} == {100_000}, "the workers caught up through the trimmed log"
    # Changes made between two batch submissions travel as one message.
    assert stats.control_messages <= 1000
    # Unbounded, the log would hold 1,000 entries and about 8 MB.
    assert entries < 400, f"the log kept {entries} generations"
    assert size < 3 * SNAPSHOT_FLOOR, f"the log holds {size} bytes"


def test_a_worker_killed_after_many_changes_starts_from_a_snapshot():
    dataset = Growing(n=60)
    with _loader(dataset) as loader:
        for row in loader:  # 3 MB of changes: the channel takes snapshots
            loader.dataset.blob = bytes(50_000) + bytes([row[0]])
            loader.dataset.value += 1
            loader.dataset.history.append(row[0])
        assert loader._channel.base[0] > 0, "the base moved to a snapshot"
        iterator = iter(loader)
        seen = [next(iterator) for _ in range(3)]
        cut = iterator.submitted
        loader.dataset.value = 1000
        os.kill(loader._pool.worker_pids[1], signal.SIGKILL)
        seen += list(iterator)
        restarts = loader.statistics().restarts
    assert restarts == 1
    assert [row[0] for row in seen] == list(range(60))
    for position, value, history in seen:
        expected = 60 if position < cut else 1000
        assert (value, history) == (expected, 61), f"batch {position} (change at {cut})"


def test_a_change_while_a_worker_starts_reaches_the_next_batches(tmp_path):
    """Worker 1 starts late: worker 0 must not load the whole epoch ahead meanwhile,
    or a change made after the first batch would reach none of it."""
    gate = tmp_path / "gate"
    dataset = Knobs(n=40, gate=str(gate))
    loader = _loader(dataset, worker_init_fn=wait_for_gate)
    window = loader.prefetch_factor * loader.num_workers
    with loader:
        iterator = iter(loader)
        seen = [next(iterator)]  # batch 0, from worker 0
        cut: list[int] = []
        changer = threading.Thread(
            target=_change_when_worker_0_ran_dry, args=(loader, iterator, cut)
        )
        changer.start()
        try:
            seen += list(iterator)  # waits for batch 1, at worker 1, until the gate opens
        finally:
            gate.touch()
            changer.join(DEADLINE)
    assert len(cut) == 1
    assert cut[0] <= 1 + window, f"{cut[0]} batches were submitted before worker 1 started"
    for position, worker, summary in seen:
        expected = 0 if position < cut[0] else 7
        assert summary[0] == expected, f"batch {position} from worker {worker} (change at {cut})"


def _change_when_worker_0_ran_dry(loader, iterator, cut):
    """Once only worker 1's two tasks are unfinished, change the dataset and open the gate."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        stats = loader.statistics()
        if stats.tasks_done >= 3 and stats.in_flight == 2:
            break
        time.sleep(0.01)
    cut.append(iterator.submitted)
    loader.dataset.set_epoch(7)
    with open(loader.dataset.gate, "w"):
        pass
