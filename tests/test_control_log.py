"""The control log stays bounded, replaced workers catch up from its snapshots,
and a change made while workers start reaches the next batches (issues 12 and 14)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from _knobs import Growing, Knobs, OnlyInMain, keep, wait_for_gate
from _procs import wait_until

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
    """100,000 assignments and 4 MB of changes over 1,000 batches with persistent
    workers: the log keeps what the workers may still need (and what a worker
    started from the base's pickle would), not every change ever made."""
    dataset = Growing(n=500)
    with _loader(dataset, transport=transport) as loader:
        for _ in range(2):
            for row in loader:
                for _ in range(100):
                    loader.dataset.value += 1
                loader.dataset.note = f"{row[0]:04d}" * 1000  # 4 KB: snapshots come due
        channel = loader._channel
        entries, size = channel.log_entries, channel.log_bytes
        rows = list(loader)
        stats = loader.statistics()
    assert dataset.value == 100_000
    assert {row[1] for row in rows} == {100_000}, "the workers caught up through the trimmed log"
    # Changes made between two batch submissions travel as one message.
    assert stats.control_messages <= 1000
    # Unbounded, the log would hold 1,000 entries and over 4 MB.
    assert entries < 700, f"the log kept {entries} generations"
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


@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork"])
def test_workers_started_after_the_template_died_see_every_change(context):
    """The template took a change (the base moved on), then died (the out-of-memory
    killer); then the workers died too. Their replacements start directly from the
    base's pickle, which is older than the change: they must catch up on it, not load
    the dataset as it was before it (NOTE [ Two bases ] in poolloader/_control.py)."""
    with _loader(Growing(n=6), multiprocessing_context=context) as loader:
        list(loader)
        loader.dataset.value = 7
        loader.dataset.history.append(1)
        assert {row[1:] for row in loader} == {(7, 2)}
        list(loader)  # idle afterwards: the template takes the change
        channel = loader._channel
        wait_until(lambda: channel.base_generation == channel.generation)
        os.kill(loader._pool.template_pid, signal.SIGKILL)
        wait_until(lambda: loader._pool.template_pid is None)
        assert {row[1:] for row in loader} == {(7, 2)}  # (the workers it forked)
        pids = loader._pool.worker_pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not set(loader._pool.worker_pids) & set(pids))
        assert {row[1:] for row in loader} == {(7, 2)}, "a replacement lost the change"
        loader.dataset.value = 8
        assert {row[1:] for row in loader} == {(8, 2)}


def _outcomes(loader) -> list:
    """Each batch of an epoch, or the first line of the error it raised."""
    found, iterator = [], iter(loader)
    for _ in range(len(loader)):
        try:
            found.append(next(iterator)[1])
        except RuntimeError as exc:
            found.append(str(exc).splitlines()[0])
    return found


@pytest.mark.parametrize("persistent", [True, False])
def test_a_change_the_workers_cannot_apply_fails_every_later_batch(persistent):
    """A change whose value the workers cannot unpickle leaves their copies of the
    dataset out of step with the main process's: every later batch fails, saying
    why, not only the first (the next ones ran on the stale copy). A whole copy in
    step again (without persistent workers, each epoch's) loads again."""
    dataset = Growing(n=4)
    with _loader(dataset, persistent_workers=persistent) as loader:
        assert _outcomes(loader) == [0] * 4
        loader.dataset.value = 1
        loader.dataset.obj = OnlyInMain(5)  # the main process's dataset takes it
        for _epoch in range(2):
            outcomes = _outcomes(loader)
            assert all(isinstance(o, str) for o in outcomes), outcomes
            assert "unpickles only in process" in " ".join(outcomes)
        loader.dataset.obj = None  # a value the workers can take
        if persistent:  # the workers' copies stay out of step
            assert all(isinstance(o, str) for o in _outcomes(loader))
        else:
            assert _outcomes(loader) == [1] * 4
