"""Drop-in fidelity: what torch's own DataLoader tests expect of a loader, held
by poolloader's (torch's test file itself is not needed here).

fork as torch has it (inherited datasets, lambdas and locks, no main guard),
multiprocessing objects inside a dataset under spawn and forkserver, seeds as
torch sets them when worker_init_fn runs, fresh process state each epoch without
persistent workers, and the dataset pickled once per loader."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _fidelity import (
    CountsUnpickling,
    InitsSeen,
    Primitives,
    SeedsSeen,
    SeenAtInit,
    Unpicklable,
    count_inits,
    record_seeds,
    seed_12345,
    unpicklings,
)

from poolloader import DataLoader

TESTS = os.path.dirname(os.path.abspath(__file__))


def _wait_for_restarts(loader: DataLoader, expected: int, within: float = 30.0) -> None:
    """The kill may be noticed after the last batch arrived: wait for it (a bound)."""
    deadline = time.monotonic() + within
    while loader.statistics().restarts < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loader.statistics().restarts == expected


# ------------------------------------------------------------------ fork


def _identity(batch):
    return batch


def test_fork_inherits_a_dataset_that_cannot_be_pickled():
    """A lambda and a thread lock in the dataset, a lambda as collate_fn: fork
    workers inherit them, as torch's do; a worker killed mid-epoch is replaced by
    another fork, which inherits them too."""
    with DataLoader(Unpicklable(12), batch_size=2, num_workers=2, multiprocessing_context="fork",
                    collate_fn=lambda b: sum(b)) as loader:  # fmt: skip
        got = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 1:
                os.kill(loader._pool.worker_pids[0], signal.SIGKILL)
        assert got == [10 * (2 * k) + 10 * (2 * k + 1) for k in range(6)]
        _wait_for_restarts(loader, 1)
        assert list(loader) == got


NO_GUARD = textwrap.dedent(
    """
    import torch
    from poolloader import DataLoader

    class Squares(torch.utils.data.Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            return i * i

    loader = DataLoader(Squares(), batch_size=3, num_workers=2, multiprocessing_context="fork",
                        worker_init_fn=lambda worker_id: None)
    print([b.tolist() for b in loader])
    """
)


def test_fork_runs_a_script_without_a_main_guard():
    """torch's default on Linux: `python -c` scripts with classes in __main__ and no
    `if __name__ == "__main__":` run unchanged."""
    done = subprocess.run([sys.executable, "-c", NO_GUARD], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[[0, 1, 4], [9, 16, 25]]"


def test_fork_given_as_a_context_object():
    context = mp.get_context("fork")
    with DataLoader(Unpicklable(4), batch_size=None, num_workers=1,
                    multiprocessing_context=context) as loader:  # fmt: skip
        assert list(loader) == [0, 10, 20, 30]


def test_fork_without_persistent_workers_sees_the_dataset_as_each_epoch_starts():
    """torch forks new workers each epoch: a change made to the dataset object
    itself (not through loader.dataset) between epochs reaches them."""
    dataset = Unpicklable(4)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="fork") as loader:  # fmt: skip
        assert list(loader) == [0, 10, 20, 30]
        dataset.transform = lambda x: -x
        assert list(loader) == [0, -1, -2, -3]


def _slowly(x: int) -> int:
    time.sleep(0.02)  # the epoch left with break still has batches in flight
    return x * 10


@pytest.mark.parametrize("loader_cls", [torch.utils.data.DataLoader, DataLoader])
def test_fork_sees_a_direct_change_after_an_epoch_left_with_break(loader_cls):
    """The batches still loading for an epoch left early are nobody's: the next
    epoch's fresh workers see the dataset as it is then, as torch's do."""
    dataset = Unpicklable(40)
    dataset.transform = _slowly
    loader = loader_cls(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    firsts = []
    try:
        for epoch in range(3):
            dataset.transform = lambda x, k=epoch: _slowly(x) + k
            for batch in loader:
                firsts.append(batch.tolist())
                break
    finally:
        getattr(loader, "close", lambda: None)()
    assert firsts == [[0, 10], [1, 11], [2, 12]]


def test_fork_warns_when_another_iterator_keeps_the_old_template(tmp_path):
    """A new epoch while another iterator still wants batches: the fresh workers
    cannot come from a new copy of the dataset (a replacement for the other
    iterator's batches must start from the old one), so a direct change does not
    reach them, and the loader says so, once. Both iterators yield every batch.
    (The first iterator's later batches wait for a file until the second has
    started: finished early, they would need no replacement, and the new epoch
    could take a new copy.)"""
    gate = tmp_path / "gate"
    dataset = Unpicklable(8, gate)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="fork") as loader:  # fmt: skip
        first = iter(loader)
        assert next(first) == 0
        dataset.transform = lambda x: -x
        with pytest.warns(RuntimeWarning, match="does not reach them"):
            second = iter(loader)
        gate.touch()
        assert len(list(second)) == 8
        assert list(first) == [10, 20, 30, 40, 50, 60, 70]


# ------------------------------------------------------------------ multiprocessing objects


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_objects_in_the_dataset_work_as_with_torch(method):
    """Lock, Value, Queue, Event and a manager's dict travel "through inheritance"
    (in the arguments of the process that starts the workers); every worker,
    replacement workers too, shares them with the main process. (The worker is
    killed between epochs: one killed inside the lock or the queue's feeder would
    wedge them, with torch's loader as with any.)"""
    context = mp.get_context(method)
    with context.Manager() as manager:
        shared = manager.dict(scale=3)
        dataset = Primitives(context, shared, n=8)
        dataset.event.set()
        with DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True,
                        multiprocessing_context=method) as loader:  # fmt: skip
            first = list(loader)
            # What the first epoch put on the queue is taken before the kill: a
            # worker's queue feeds its pipe from a thread, and a kill can come
            # before that thread wrote the worker's last item.
            reported = [dataset.queue.get(timeout=10) for _ in range(8)]
            os.kill(loader._pool.worker_pids[1], signal.SIGKILL)
            _wait_for_restarts(loader, 1)
            second = list(loader)
        assert first == second == [[i, True, 3 * i] for i in range(8)]
        assert dataset.count.value == 16
        reported = sorted(reported + [dataset.queue.get(timeout=10) for _ in range(8)])
        assert reported == sorted(2 * list(range(8)))


# ------------------------------------------------------------------ seeds


def _seen(loader) -> dict[int, tuple]:
    return {row[0]: tuple(row) for row in (tuple(x.tolist() for x in b) for b in loader)}


@pytest.mark.parametrize("seeding", ["batch", "worker"])
def test_worker_init_fn_sees_torchs_seeds(seeding):
    """In worker_init_fn, torch.initial_seed() is get_worker_info().seed, and random,
    NumPy and torch give what they give in torch's worker with the same generator."""

    def seen(cls, **extra):
        loader = cls(SeenAtInit(), batch_size=None, num_workers=2, worker_init_fn=record_seeds,
                     generator=torch.Generator().manual_seed(7), **extra)  # fmt: skip
        try:
            return {tuple(float(x) for x in row) for row in loader}
        finally:
            getattr(loader, "close", lambda: None)()

    theirs = seen(torch.utils.data.DataLoader)
    ours = seen(DataLoader, seeding=seeding, multiprocessing_context="forkserver")
    assert ours == theirs
    for worker_id, seed, initial, *_ in ours:
        assert initial == seed


def test_a_seed_set_in_worker_init_fn_holds_under_per_batch_seeding():
    """torch's test_worker_init_fn: torch.manual_seed(12345) in worker_init_fn, and
    every item sees torch.initial_seed() == 12345; the generators worker_init_fn
    did not touch are still seeded per batch."""
    with DataLoader(SeedsSeen(), batch_size=2, num_workers=2, worker_init_fn=seed_12345,
                    generator=torch.Generator().manual_seed(3),
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = list(loader)
    assert all(batch[0].tolist() == [12345, 12345] for batch in batches)
    with DataLoader(SeedsSeen(), batch_size=2, num_workers=0,
                    generator=torch.Generator().manual_seed(3)) as reference:  # fmt: skip
        expected = list(reference)
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # random, NumPy


# ------------------------------------------------------------------ process state


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_each_epoch_without_persistent_workers_starts_from_a_fresh_process(method):
    """worker_init_fn leaves state in its process; torch's new workers each epoch
    never see the last epoch's: every epoch reads one init per worker."""
    theirs = torch.utils.data.DataLoader(InitsSeen(), batch_size=None, num_workers=2,
                                         worker_init_fn=count_inits)  # fmt: skip
    with DataLoader(InitsSeen(), batch_size=None, num_workers=2, worker_init_fn=count_inits,
                    multiprocessing_context=method) as ours:  # fmt: skip
        assert [list(ours) for _ in range(3)] == [list(theirs) for _ in range(3)]
        assert [list(ours) for _ in range(2)] == [[1, 1, 1, 1]] * 2


def test_persistent_workers_keep_their_process_state():
    with DataLoader(
        InitsSeen(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=count_inits,
        persistent_workers=True,
        multiprocessing_context="forkserver",
    ) as loader:
        assert [list(loader) for _ in range(2)] == [[1, 1, 1, 1]] * 2


# ------------------------------------------------------------------ pickled once


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_the_dataset_is_unpickled_once_per_loader_not_per_worker(tmp_path, method):
    """The template process unpickles the dataset and forks the workers; without
    persistent workers a new epoch unpickles nothing while the dataset is
    unchanged, and once (in the template) after it changed."""
    path = str(tmp_path / "unpickled")
    with DataLoader(CountsUnpickling(path), batch_size=4, num_workers=3,
                    multiprocessing_context=method) as loader:  # fmt: skip
        assert len(list(loader)) == 4
        assert unpicklings(path) == 1
        assert len(list(loader)) == 4
        assert unpicklings(path) == 1
        loader.dataset.n = 8  # through loader.dataset: a change, not a new copy
        assert len(list(loader)) == 2
        assert unpicklings(path) == 2  # the template took the new snapshot
