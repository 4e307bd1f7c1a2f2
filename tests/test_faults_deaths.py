"""Dead workers, driven by the fault catalogue in ``_faults.py``.

A worker that dies mid-epoch (SIGKILL, os._exit, a segfault) is replaced and the
epoch still yields every batch exactly once, in order; a batch that keeps killing
workers, or too many deaths, end in ``WorkerCrashedError`` that says which batch
and why; a death while loading a batch nobody waits for is not held against
anyone. Cheap assertions run under forkserver (a new pool costs ~0.05 s there);
a representative subset also runs under spawn.
"""

from __future__ import annotations

import gc
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from _datasets import Ballast
from _faults import (
    DEADLY,
    EXIT_CODES,
    AnyOf,
    Faulty,
    FaultyStream,
    always,
    once,
    recorded_pids,
    slow_start,
    started_by,
)
from _procs import (
    assert_batches,
    collect_batches,
    descendant_pids,
    fault_loader,
    handles,
    kill_all,
    live_grandchildren,
    logged_warnings,
    names_batch,
    outcomes_going_on,
    torch_batches,
    wait_gone,
    wait_until,
    worker_pids,
)

from poolloader import DataLoader
from poolloader.errors import (
    WorkerCrashedError,
)

#: Seconds after which a wait that should end counts as a hang: far beyond what
#: any step takes on a busy machine.
HANG = 60.0
#: How torch's own error names the signal that killed a worker (strsignal).
TORCH_SIGNAL_WORDS = {"sigkill": "Killed", "segfault": "Segmentation fault"}

# ------------------------------------------------------------------ dead workers


@pytest.mark.parametrize(
    "start_method, fault",
    [("forkserver", f) for f in DEADLY] + [("spawn", "sigkill")],
)
def test_a_dead_worker_is_replaced_and_every_batch_arrives_once_in_order(
    start_method: str, fault: str, where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL, os._exit or a segfault in the middle of an epoch: the epoch is
    torch's, batch for batch; the death is counted and logged with pid, cause, batch."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    dataset = Faulty(30, fault, once(where, 10), where=where, delay=0.005)
    with fault_loader(dataset, start_method, batch_size=3) as loader:
        got = list(loader)
        assert loader.statistics().restarts == 1
        assert_batches(got, torch_batches(dataset, batch_size=3))
        # The replacement serves a second epoch as well as the first.
        assert_batches(list(loader), torch_batches(dataset, batch_size=3))
    (victim,) = recorded_pids(where, "victim")
    (message,) = logged_warnings(caplog)
    assert f"pid {victim}" in message and DEADLY[fault] in message
    assert names_batch(message, 3), message


def test_a_worker_whose_message_thread_fails_is_replaced(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose thread reading tasks and releases fails would wait for tasks
    for ever, and the epoch with it. It exits instead (its traceback on stderr):
    it is replaced like any dead worker, and the epoch is torch's."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    dataset = Faulty(30, "deaf", once(where, 10), where=where, delay=0.005)
    with fault_loader(dataset, batch_size=3, timeout=HANG) as loader:
        got = list(loader)
        assert loader.statistics().restarts == 1
    assert_batches(got, torch_batches(dataset, batch_size=3))
    (victim,) = recorded_pids(where, "victim")
    (message,) = logged_warnings(caplog)
    assert f"pid {victim}" in message and "thread reading messages failed" in message, message


def test_dataset_code_exiting_with_the_message_threads_code_is_not_taken_for_it(
    where: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Exit code 4 is what a worker whose message thread failed exits with; dataset
    code that calls os._exit(4) is a plain exit code 4, not that failure (the worker
    marks its started slot before it exits so)."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    dataset = Faulty(30, "exit4", once(where, 10), where=where, delay=0.005)
    with fault_loader(dataset, batch_size=3, timeout=HANG) as loader:
        got = list(loader)
    assert_batches(got, torch_batches(dataset, batch_size=3))
    (message,) = logged_warnings(caplog)
    assert "exit code 4" in message and "thread reading messages" not in message, message


def test_a_batch_lost_with_its_worker_after_loading_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch in fresh shared memory (transport="pickle", or the slab transport's
    fallback) is fetched from its worker while it is unpickled (torch's fd
    passing): a worker SIGKILLed right after sending it takes it along, and
    unpickling fails with ConnectionResetError. That batch runs again; the epoch
    is torch's, batch for batch. (The kill's timing cannot be arranged from
    outside, so the failed fetch is injected, once.)"""
    from poolloader import _transport

    real = _transport._unpack_plain
    failed: list[int] = []

    def flaky(payload: Any) -> Any:
        if not failed:
            failed.append(1)
            raise ConnectionResetError(104, "Connection reset by peer")
        return real(payload)

    monkeypatch.setattr(_transport, "_unpack_plain", flaky)
    dataset = Faulty(12)
    with fault_loader(dataset, batch_size=2, transport="pickle") as loader:
        got = list(loader)
    assert failed == [1]
    assert_batches(got, torch_batches(dataset, batch_size=2))


def test_several_workers_killed_at_once_lose_nothing() -> None:
    """Both workers SIGKILLed from outside while each holds batches: all run again."""
    dataset = Faulty(40, delay=0.02)
    with fault_loader(dataset, batch_size=2) as loader:
        got = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 3:
                victims = handles(worker_pids())
                assert len(victims) == 2
                kill_all(victims)
        assert loader.statistics().restarts == 2
    assert_batches(got, torch_batches(dataset, batch_size=2))


def test_a_worker_killed_between_epochs_is_replaced() -> None:
    """A death while nothing is in flight costs nothing but a restart. (Without
    persistent workers it may cost not even that: the next epoch's workers are
    fresh ones anyway.)"""
    dataset = Faulty(8)
    with fault_loader(dataset, batch_size=2, num_workers=1, persistent_workers=True) as loader:
        assert_batches(list(loader), torch_batches(dataset, batch_size=2))
        workers = handles(worker_pids())
        assert len(workers) == 1
        kill_all(workers)
        assert not wait_gone(workers)
        assert_batches(list(loader), torch_batches(dataset, batch_size=2))
        assert loader.statistics().restarts == 1


def test_a_loader_let_go_after_worker_crashed_error_ends_without_the_cycle_collector(
    where: Path,
) -> None:
    """Code that catches WorkerCrashedError and lets the loader go sees its processes
    end with the last reference, as after a dataset's own exception: the error's
    traceback (the consumer's frames) must not keep the loader through the future
    that held the error, nor through the iterator."""
    dataset = Faulty(24, "sigkill", always(10), where=where, delay=0.005)

    def run() -> tuple[list[psutil.Process], BaseException | None]:
        loader = fault_loader(dataset, batch_size=3)
        try:
            for _ in loader:
                pass
        except WorkerCrashedError as error:
            pool = loader._pool
            return handles([*pool.worker_pids, pool.template_pid]), error
        return [], None

    gc.disable()
    procs: list[psutil.Process] = []
    try:
        procs, error = run()
        assert isinstance(error, WorkerCrashedError) and procs
        del error
        assert not wait_gone(procs, timeout=10.0), "the processes waited for gc.collect()"
    finally:
        gc.enable()
        kill_all(procs)


@pytest.mark.parametrize(
    "start_method, fault",
    [("forkserver", "sigkill"), ("forkserver", "segfault")],
)
def test_a_poison_batch_raises_worker_crashed_error(
    start_method: str, fault: str, where: Path
) -> None:
    """A batch that kills every worker that loads it is tried twice, then
    WorkerCrashedError names its indices, the exit codes and the likely cause."""
    dataset = Faulty(24, fault, always(10), where=where, delay=0.005)
    with fault_loader(dataset, start_method, batch_size=3) as loader:
        got, error = collect_batches(iter(loader))
    assert isinstance(error, WorkerCrashedError), error
    assert isinstance(error, RuntimeError)  # what torch's loader raises for dead workers
    message = str(error)
    # torch's own sentence first (as its test_segfault looks for it), then which batch
    opening = re.match(rf"DataLoader worker \(pid (\d+)\) is killed by signal: "
                       rf"{TORCH_SIGNAL_WORDS[fault]}\. Batch 3 \(indices \[9, 10, 11\]\)",
                       message)  # fmt: skip
    assert opening and int(opening[1]) in recorded_pids(where, "victim"), message
    assert "[9, 10, 11]" in message and error.indices == [9, 10, 11]
    assert "killed two workers" in message
    assert error.exitcodes == (EXIT_CODES[fault],) * 2
    assert DEADLY[fault] in message
    if fault == "sigkill":
        assert "out-of-memory" in message
    # Batches before the poison one came through intact and in order.
    want = torch_batches(dataset, batch_size=3)
    assert_batches(got, want[: len(got)])
    assert len(got) <= 3


def test_a_poison_batch_names_only_its_own_deaths(where: Path) -> None:
    """An earlier death on another batch is not one of the two the poison batch
    caused: the message and ``exitcodes`` list the batch's own."""
    trigger = AnyOf((once(where, 1), always(10)))
    dataset = Faulty(24, "segfault", trigger, where=where, delay=0.005)
    with fault_loader(dataset, "forkserver", batch_size=3) as loader:
        got, error = collect_batches(iter(loader))
        restarts = loader.statistics().restarts
    assert isinstance(error, WorkerCrashedError), error
    assert restarts == 2  # batch 0's death and the poison batch's first
    assert error.exitcodes == (EXIT_CODES["segfault"],) * 2
    message = str(error)
    assert "killed two workers" in message and message.count(DEADLY["segfault"]) == 2, message
    assert_batches(got, torch_batches(dataset, batch_size=3)[: len(got)])


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fresh"])
def test_a_consumer_that_goes_on_after_the_pool_broke_gets_one_outcome_per_batch(
    persistent: bool, where: Path
) -> None:
    """The consumer catches WorkerCrashedError and calls next() again: each batch
    of the epoch gives its data (those loaded before the break, as torch's) or
    the error, in order, and then the epoch ends. Loaded batches were dropped when
    the break came while the window refilled, and the epoch ended after the
    window's failed batches, as if whole. Each error is the batch's own: the
    poison batch's says it killed two workers, every other says which batch was
    not loaded (all of them read as the poison batch's before)."""
    dataset = Faulty(40, "sigkill", always(5), where=where)
    want = torch_batches(dataset, batch_size=4)
    with fault_loader(dataset, batch_size=4, persistent_workers=persistent) as loader:
        for _ in range(2):  # the next epoch starts a new pool and breaks it again
            outcomes = outcomes_going_on(iter(loader))
            assert len(outcomes) == len(want) == 10, outcomes
            assert isinstance(outcomes[1], WorkerCrashedError)  # the poison batch
            errors = [o for o in outcomes if isinstance(o, WorkerCrashedError)]
            assert len({id(e) for e in errors}) == len(errors), "one error object, raised again"
            for k, (got, expected) in enumerate(zip(outcomes, want)):
                if not isinstance(got, WorkerCrashedError):
                    assert_batches([got], [expected])
                    continue
                message = str(got)
                assert "Batch 1 (indices [4, 5, 6, 7]) killed two workers" in message, message
                assert got.indices == [4, 5, 6, 7], (k, got.indices)
                indices = list(range(4 * k, 4 * k + 4))
                if k == 1:
                    assert "was not loaded" not in message, message
                else:
                    assert f"Batch {k} (indices {indices}) was not loaded" in message, message


@pytest.mark.parametrize("limit", [None, 0], ids=["default", "zero"])
def test_deaths_beyond_max_worker_restarts_raise(limit: int | None, where: Path) -> None:
    """By default 3 deaths (at different batches) are survived and the 4th raises;
    with ``max_worker_restarts=0`` the first does. The error names the count, the
    limit, every exit code and the batch of the last death."""
    options = {} if limit is None else {"max_worker_restarts": limit}
    limit = 3 if limit is None else limit
    deaths = limit + 1
    # One death in each of batches 1, 6, 11, 16: far enough apart that no batch
    # waiting behind one death is the next to kill (see test_a_batch_only_queued_at_a_dead_worker_is_not_poison).
    indices = [4 + 15 * k for k in range(deaths)]
    dataset = Faulty(54, "sigkill", once(where, *indices), where=where, delay=0.005)
    with fault_loader(dataset, batch_size=3, **options) as loader:
        got, error = collect_batches(iter(loader))
    seen = [b["i"].tolist() for b in got]
    assert isinstance(error, WorkerCrashedError), (error, seen, dataset.trigger.fired())
    message = str(error)
    context = (message, error.exitcodes, error.indices, seen)
    assert f"died {deaths} times, more than max_worker_restarts={limit}" in message, context
    opening = re.match(r"DataLoader worker \(pid (\d+)\) is killed by signal: Killed\. ", message)
    assert opening and int(opening[1]) in recorded_pids(where, "victim"), context
    assert error.exitcodes == (-signal.SIGKILL,) * deaths, context
    last = indices[-1] // 3 * 3
    assert error.indices == [last, last + 1, last + 2], context
    assert str(error.indices) in message, context
    want = torch_batches(dataset, batch_size=3)
    assert_batches(got, want[: len(got)])
    assert len(got) <= last // 3, context


@pytest.mark.parametrize("fault", ["sigkill", "exit"])
def test_a_death_inside_an_iterable_datasets_stream_ends_the_epoch(fault: str, where: Path) -> None:
    """An IterableDataset's worker cannot be replaced mid-stream (its position dies
    with it): the epoch ends in WorkerCrashedError that opens with torch's words
    for the death, after every batch that arrived before it, none twice."""
    dataset = FaultyStream(40, fault, always(13), where=where)
    with fault_loader(dataset, batch_size=2) as loader:
        got, error = collect_batches(iter(loader))
    assert isinstance(error, WorkerCrashedError), error
    (victim,) = recorded_pids(where, "victim")
    opening = {
        "sigkill": f"DataLoader worker (pid {victim}) is killed by signal: Killed. ",
        "exit": f"DataLoader worker (pid {victim}) exited unexpectedly with exit code 7. ",
    }[fault]
    message = str(error)
    assert message.startswith(opening), message
    assert "died while iterating an IterableDataset" in message
    assert DEADLY[fault] in message and error.exitcodes[-1] == EXIT_CODES[fault]
    seen = [i for batch in got for i in batch["i"].tolist()]
    assert len(seen) == len(set(seen)) and 13 not in seen, seen
    assert set(seen) <= set(range(40))


def test_a_consumer_that_goes_on_after_a_stream_broke_reaches_the_end(where: Path) -> None:
    """An IterableDataset has no count of the batches left: after the pool broke,
    a consumer that catches the error and goes on gets the window's errors, then
    the end of the epoch, not the error again for ever."""
    dataset = FaultyStream(40, "sigkill", always(13), where=where)
    with fault_loader(dataset, batch_size=2) as loader:
        outcomes = outcomes_going_on(iter(loader))
    errors = [o for o in outcomes if isinstance(o, WorkerCrashedError)]
    assert errors and len(outcomes) <= 20, outcomes  # 20 batches in the stream
    seen = [i for o in outcomes if not isinstance(o, Exception) for i in o["i"].tolist()]
    assert len(seen) == len(set(seen)) and 13 not in seen, seen


@pytest.mark.parametrize("how", ["poison", "max_worker_restarts"])
def test_a_broken_pool_goes_quiet(how: str, where: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After WorkerCrashedError the pool counts and logs each death once, starts
    no replacement and burns no CPU."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    if how == "poison":
        dataset, options, deaths, restarts = Faulty(24, "sigkill", always(10)), {}, 2, 1
    else:
        dataset = Faulty(24, "sigkill", once(where, 10))
        options, deaths, restarts = {"max_worker_restarts": 0}, 1, 0
    with fault_loader(dataset, batch_size=3, **options) as loader:
        _, error = collect_batches(iter(loader))
        assert isinstance(error, WorkerCrashedError)
        children = descendant_pids()
        cpu = psutil.Process().cpu_times()
        time.sleep(1.0)  # a window to measure the process's CPU time in, not a wait
        spent = sum(psutil.Process().cpu_times()[:2]) - sum(cpu[:2])
        logged = logged_warnings(caplog)
        assert len(logged) == deaths
        # The death that ended the pool is not said to be followed by a rerun.
        assert logged[-1].endswith("; not replaced: the loader raises WorkerCrashedError")
        assert loader.statistics().restarts == restarts
        assert descendant_pids() <= children
        # A thread spinning on the dead worker would use the whole second.
        assert spent < 0.25, f"the main process used {spent:.2f} s of CPU in 1 s while idle"


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "any-order"])
def test_a_fatal_death_raises_at_once(in_order: bool, where: Path) -> None:
    """``max_worker_restarts=0``, one worker, SIGKILL at the first batch: the
    consumer gets WorkerCrashedError instead of waiting for ever, in either order
    mode (the bound only turns a hang into a failure)."""
    dataset = Faulty(12, "sigkill", once(where, 1), where=where)
    loader = fault_loader(
        dataset, batch_size=2, num_workers=1, max_worker_restarts=0, in_order=in_order
    )
    outcome: list[Any] = []
    consumer = threading.Thread(
        target=lambda: outcome.append(collect_batches(iter(loader))), daemon=True
    )
    try:
        consumer.start()
        consumer.join(HANG)
        assert outcome, f"the consumer is still waiting {HANG} s after the only worker died"
        assert isinstance(outcome[0][1], WorkerCrashedError), outcome
    finally:
        loader.close()
        consumer.join(2.0)


def test_a_batch_only_queued_at_a_dead_worker_is_not_poison(where: Path) -> None:
    """Two unrelated deaths (SIGKILL from outside, as the OOM killer does): one
    while batch 0 runs with batch 1 queued behind it, one while batch 1 runs.
    Batch 1 killed one worker, not two; the epoch completes."""
    dataset = Faulty(6, where=where, delay=0.3, mark_starts=True)
    killed: list[psutil.Process] = []

    def kill_when_started(index: int) -> None:
        killed.extend(handles([wait_until(lambda: started_by(where, index), timeout=10.0)]))
        kill_all(killed[-1:])

    def killer() -> None:
        kill_when_started(0)
        kill_when_started(1)

    with fault_loader(dataset, batch_size=1, num_workers=1) as loader:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            got, error = collect_batches(iter(loader))
        finally:
            thread.join(15)
            kill_all(killed)
        assert error is None, error
        assert loader.statistics().restarts == 2
    assert_batches(got, torch_batches(dataset, batch_size=1))


def test_a_replacement_killed_while_starting_is_replaced_again() -> None:
    """The OOM killer may strike a replacement worker before it is ready (here,
    during a one-second worker_init_fn): that is one more death, not a broken pool."""
    dataset = Faulty(40, delay=0.02)
    with fault_loader(dataset, batch_size=2, worker_init_fn=slow_start) as loader:
        got = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 2:
                before = worker_pids()
                kill_all(handles([min(before)]))
                replacement = wait_until(lambda: worker_pids() - before, timeout=5.0)
                kill_all(handles(replacement))  # still inside slow_start
        assert loader.statistics().restarts == 2
    assert_batches(got, torch_batches(dataset, batch_size=2))


def test_a_fresh_epochs_worker_killed_while_starting_is_replaced() -> None:
    """With persistent_workers=False every epoch's workers start afresh, and the OOM
    killer may strike one before it is ready (here, during a one-second
    worker_init_fn; memory peaks as epochs turn over). That is one more death,
    replaced, not a WorkerStartError that ends the run."""
    dataset = Faulty(24, delay=0.01)
    with fault_loader(dataset, batch_size=2, worker_init_fn=slow_start) as loader:
        assert_batches(list(loader), torch_batches(dataset, batch_size=2))
        before = worker_pids()
        epoch = iter(loader)  # its first tasks start the fresh workers
        fresh = wait_until(lambda: worker_pids() - before, timeout=5.0)
        kill_all(handles([min(fresh)]))  # still inside slow_start
        got, error = collect_batches(epoch)
        assert error is None, error
        assert loader.statistics().restarts == 1
    assert_batches(got, torch_batches(dataset, batch_size=2))


def test_workers_killed_as_the_next_epoch_starts_them_afresh() -> None:
    """With persistent_workers=False the next epoch retires each idle worker for a
    fresh start; one that has just died may be retired before the I/O thread has
    handled its death, which then finds its slot taken. Every worker is killed
    right after each epoch and the next one starts at once, ten times: each epoch
    is complete, and the pool never breaks."""
    dataset = Faulty(16)
    want = torch_batches(dataset, batch_size=2)
    with fault_loader(dataset, batch_size=2, num_workers=8, max_worker_restarts=1000) as loader:
        for _ in range(10):
            got, error = collect_batches(iter(loader))
            assert error is None, error
            assert_batches(got, want)
            kill_all(handles(worker_pids()))


def test_grandchildren_of_a_dead_worker_are_reaped(where: Path) -> None:
    """A worker starts a process, then is SIGKILLed: the epoch completes, and the
    orphaned grandchild is gone by the time the loader is closed."""
    dataset = Faulty(24, "orphan", once(where, 10), where=where, delay=0.005)
    with fault_loader(dataset, batch_size=3) as loader:
        assert_batches(list(loader), torch_batches(dataset, batch_size=3))
    grandchildren = live_grandchildren(where)
    assert len(recorded_pids(where, "grandchild")) == 1
    assert not wait_gone(grandchildren, timeout=3.0), "the dead worker's child outlived close()"


def test_a_worker_killed_before_its_new_slabs_descriptor_is_replaced_not_waited_for(
    where: Path,
) -> None:
    """A worker's batch in a slab it just made announces the slab in its ``Done``;
    the slab's descriptor follows in a write of its own. Killed between the two,
    with a process it forked still holding its connection open (no end of file
    ever comes), the worker was waited for without end: no batch, no death seen.
    Its death is seen, the batch runs again, the epoch is torch's and the helper
    process is gone after close()."""
    dataset = Faulty(24, "before_descriptor", once(where, 0), where=where)
    with fault_loader(dataset, batch_size=4, timeout=HANG) as loader:
        assert_batches(list(loader), torch_batches(dataset, batch_size=4))
        assert loader.statistics().restarts == 1
    assert len(recorded_pids(where, "victim")) == 1
    assert len(recorded_pids(where, "helper")) == 1
    helpers = handles(recorded_pids(where, "helper"))
    assert not wait_gone(helpers, timeout=3.0), "the helper outlived close()"


MAIN_DIES_BEFORE_DESCRIPTOR = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from _datasets import Filled
from poolloader import DataLoader, _outbox

WHERE = {where!r}


def note(kind, pid):
    with open(os.path.join(WHERE, kind + "-" + str(pid)), "w"):
        pass


def die_before_descriptor(descriptor):
    helper = os.fork()  # keeps the main process's end of the workers' connections
    if helper == 0:
        time.sleep(300)
        os._exit(0)
    note("helper", helper)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    loader = DataLoader(Filled(), batch_size=4, num_workers=1, multiprocessing_context="fork",
                        worker_init_fn=lambda worker_id: note("worker", os.getpid()))
    for batch in loader:  # the worker makes the slabs
        pass
    _outbox.Descriptor.send = die_before_descriptor
    for batch in loader:  # a fresh worker is lent them, each with its descriptor
        pass
"""


def test_a_worker_whose_main_process_died_before_a_slabs_descriptor_exits(where: Path) -> None:
    """The other way round: a slab lent with a task has its descriptor follow the
    task in a write of its own. A main process killed between the two, with a
    process it forked holding the connections open, left the worker waiting for
    the descriptor for ever, and the template processes waiting for messages:
    they look in on the main process now, and exit."""
    import subprocess
    import sys

    script = MAIN_DIES_BEFORE_DESCRIPTOR.format(tests=str(Path(__file__).parent), where=str(where))
    with open(where / "stderr", "w+") as stderr:  # (a pipe: the helper would keep it open)
        done = subprocess.run([sys.executable, "-c", script], stderr=stderr, timeout=120)
        stderr.seek(0)
        assert done.returncode == -signal.SIGKILL, stderr.read()
    helpers = handles(recorded_pids(where, "helper"))
    # The workers and the templates they were forked from (the script's forks)
    left = [p for p in _running_script(str(where)) if p.pid not in {h.pid for h in helpers}]
    try:
        assert len(recorded_pids(where, "worker")) == 2 and len(helpers) == 1
        assert not wait_gone(left, timeout=15.0), "outlived their main process"
    finally:
        kill_all(left + helpers)


def _running_script(text: str) -> list[psutil.Process]:
    """The processes whose command line holds ``text``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if any(text in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_workers_killed_together_do_not_make_a_batch_look_poisonous() -> None:
    """Every worker killed at once, mid-epoch, each epoch: a batch runs during one
    kill only, so it must never count two deaths, although the first death found
    sends its batch to another worker killed in the same moment that has not
    finished exiting (NOTE [ Started tasks ]): no WorkerCrashedError, every batch
    once, in order."""
    dataset = Ballast(64, megabytes=256, delay=0.002)
    with DataLoader(dataset, batch_size=2, num_workers=4, persistent_workers=True,
                    multiprocessing_context="forkserver", timeout=HANG,
                    max_worker_restarts=100) as loader:  # fmt: skip
        for _ in range(10):
            got = []
            for i, batch in enumerate(loader):
                got += batch.tolist()
                if i == 4:
                    wait_until(lambda: all(loader._pool.worker_pids), timeout=HANG)
                    kill_all(handles(loader._pool.worker_pids))
            assert got == list(range(64))


def test_fresh_workers_of_each_epoch_are_watched_and_replaced_when_killed(where: Path) -> None:
    """``persistent_workers=False``: each epoch's workers are forked anew while the
    last epoch's exit. A worker whose start was reported while another's exit was
    being read must still be watched: the pool knows its process within moments,
    and killed mid-epoch, it is replaced and the epoch completes (a death nobody
    notices would leave its batches for ever)."""
    dataset = Faulty(48, where=where, delay=0.002)
    want = torch_batches(dataset, batch_size=2)
    with fault_loader(dataset, "forkserver", batch_size=2, num_workers=4, timeout=30,
                      max_worker_restarts=40) as loader:  # fmt: skip
        for epoch in range(12):
            got = []
            for i, batch in enumerate(loader):
                got.append(batch)
                if i == 8:
                    # Every worker of this epoch has a known process (pid) ...
                    wait_until(lambda: all(loader._pool.worker_pids), timeout=10)
                    if epoch % 3 == 2:  # ... and a death of each is noticed.
                        kill_all(handles(loader._pool.worker_pids))
            assert_batches(got, want)


def _slow_identity(batch: Any) -> Any:
    time.sleep(0.01)
    return batch


@pytest.mark.parametrize("context", ["spawn", "fork", "forkserver"])
@pytest.mark.parametrize("persistent", [True, False])
def test_the_template_killed_then_a_worker_the_epochs_go_on(context, persistent, caplog):
    """The process workers are forked from killed (the OOM killer), then a worker:
    its replacement starts on its own, where it was asked of the dead template for
    ever (spawn, fork: the template's pipe sentinel also waited for its workers),
    and the next epoch's workers too."""
    import os

    from _datasets import Plain

    caplog.set_level(logging.WARNING, logger="poolloader")
    with DataLoader(Plain(120), batch_size=4, num_workers=2, collate_fn=_slow_identity,
                    persistent_workers=persistent, timeout=60,
                    multiprocessing_context=context) as loader:  # fmt: skip
        iterator = iter(loader)
        got = [next(iterator)]
        template = loader._pool.template_pid
        os.kill(template, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while loader._pool.template_pid is not None and time.monotonic() < deadline:
            got.append(next(iterator))
        assert loader._pool.template_pid is None
        os.kill(loader._pool.worker_pids[0], signal.SIGKILL)
        got += list(iterator)
        assert [int(x) for b in got for x in b] == list(range(120))
        assert [int(x) for b in loader for x in b] == list(range(120))
    assert "workers are started on their own from now on" in caplog.text
