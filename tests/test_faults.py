"""Reliability, driven by the fault catalogue in ``_faults.py``.

What a user sees when things go wrong: a worker that dies mid-epoch is replaced
and the epoch still yields every batch exactly once, in order; a batch that
keeps killing workers, or too many deaths, end in ``WorkerCrashedError`` that
says which batch and why; dataset exceptions are not crashes; interrupting the
main process in any way leaves no process or shared memory behind; bad input
gets a clear error.

Cheap assertions run under forkserver (a new pool costs ~0.05 s there); a
representative subset also runs under spawn (~3 s a pool on this machine): the
tests taking conftest's ``start_method`` fixture, and those parametrised with
``("spawn", ...)``. conftest's autouse ``no_leaks`` checks ``/dev/shm`` and
child processes after every test, and this module's autouse
``no_stray_processes`` checks forkserver workers too (``no_leaks`` skips them).
Grandchildren leave the test process's tree when their parent dies, so the
tests whose faults start them check those pids themselves.

"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from _compare import assert_same
from _faults import (
    DEADLY,
    EXIT_CODE,
    EXIT_CODES,
    GRANDCHILD,
    Carrying,
    CorruptItemError,
    CrashAtPickle,
    ErrorAtUnpickle,
    ExitAtUnpickle,
    Faulty,
    OpaqueItems,
    SegfaultAtUnpickle,
    always,
    collate_bad_result,
    once,
    recorded_pids,
    slow_start,
    started_by,
)

from poolloader import DataLoader
from poolloader.errors import (
    LoaderTimeoutError,
    NotPicklableError,
    ResultTooLargeError,
    WorkerCrashedError,
    WorkerStartError,
)

TESTS = os.path.dirname(os.path.abspath(__file__))
#: Seconds processes get to disappear after the event that should end them.
#: Orphaned workers notice a dead main process at once (end of file on their
#: connection) and give their own children 1 s to exit.
GONE_WITHIN = 10.0
#: close() sends Stop, waits 2 s, then SIGTERM and 1 s, then SIGKILL: a worker
#: stuck in __getitem__ must be gone well within this.
CLOSE_WITHIN = 5.0

# ------------------------------------------------------------------ helpers


def _loader(dataset: Any, start_method: str = "forkserver", **kwargs: Any) -> DataLoader:
    kwargs.setdefault("num_workers", 2)
    return DataLoader(dataset, multiprocessing_context=start_method, **kwargs)


def _torch_batches(dataset: Faulty, **kwargs: Any) -> list[Any]:
    """What torch's own loader, in the main process, yields for the healthy dataset."""
    return list(torch.utils.data.DataLoader(dataset.healthy(), num_workers=0, **kwargs))


def _assert_batches(got: list[Any], want: list[Any]) -> None:
    """Exactly the expected batches, in order: nothing lost, nothing twice."""
    got_ids = [b["i"].tolist() for b in got]
    want_ids = [b["i"].tolist() for b in want]
    assert got_ids == want_ids
    for k, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"batch {k}")


def _helpers() -> set[int]:
    """multiprocessing's long-lived helpers: the forkserver and the resource tracker."""
    found = set()
    for child in psutil.Process().children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver import main" in cmdline or "resource_tracker import main" in cmdline:
            found.add(child.pid)
    return found


def _descendants() -> set[int]:
    """Every process below this one except the helpers: workers (forkserver's
    children included) and the processes they started."""
    return {p.pid for p in psutil.Process().children(recursive=True)} - _helpers()


def _workers() -> set[int]:
    """The worker processes alive now (Python descendants that are not helpers)."""
    found = set()
    for pid in _descendants():
        try:
            if psutil.Process(pid).name().startswith("python"):
                found.add(pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Fail a test that leaves a worker or a worker's child behind.

    conftest's ``no_leaks`` skips every process whose command line mentions
    "forkserver", which includes every forkserver worker; this check does not."""
    before = _descendants()
    yield
    deadline = time.monotonic() + GONE_WITHIN
    while (left := _descendants() - before) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    leftovers = _processes(left)
    described = [_describe(p) for p in leftovers]
    _kill(leftovers)
    assert not left, f"test left processes behind: {described}"


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    """psutil handles for ``pids``, taken while they run: unlike a bare pid, a
    handle never signals a stranger that got the pid after ours died (pid_max is
    32768 here, and pids do come round)."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return found


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes among ``procs`` that still run (zombies count as gone)."""
    found = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _wait_gone(
    procs: Iterable[psutil.Process], timeout: float = GONE_WITHIN
) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to end; the ones still alive."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _kill(procs: Iterable[psutil.Process]) -> None:
    """SIGKILL what is left of ``procs``: cleanup that runs even when a test fails."""
    for proc in _alive(procs):
        try:
            proc.kill()  # psutil checks first that the pid is still this process
        except psutil.Error:
            pass


def _grandchildren(where: Path) -> list[psutil.Process]:
    """The grandchildren faults recorded in ``where`` that still run, as handles.

    A recorded pid counts only if it runs the grandchild's command and was created
    when its record was written: a reused pid is somebody else's process."""
    found = []
    for proc in _processes(recorded_pids(where, "grandchild")):
        try:
            written = (where / f"grandchild-{proc.pid}").stat().st_mtime
            if proc.cmdline() == GRANDCHILD and abs(proc.create_time() - written) < 5.0:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def _wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {condition}")
        time.sleep(0.01)
    return value


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "poolloader" and r.levelno == logging.WARNING
    ]


def _names_batch(message: str, position: int) -> bool:
    """Whether a log message names batch ``position`` ("batch 3", "batches [3, 5]")."""
    return re.search(rf"batch(es)? \[?[\d, ]*\b{position}\b", message) is not None


def _collect(iterator: Iterator[Any]) -> tuple[list[Any], BaseException | None]:
    """Batches until the iterator ends or raises; the exception, if one was raised."""
    got: list[Any] = []
    try:
        for batch in iterator:
            got.append(batch)
    except Exception as exc:
        return got, exc
    return got, None


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """The directory faults leave their notes in; every process recorded there is
    killed after the test, whatever happened."""
    yield tmp_path
    _kill(_grandchildren(tmp_path))


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
    with _loader(dataset, start_method, batch_size=3) as loader:
        got = list(loader)
        assert loader.statistics().restarts == 1
        _assert_batches(got, _torch_batches(dataset, batch_size=3))
        # The replacement serves a second epoch as well as the first.
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=3))
    (victim,) = recorded_pids(where, "victim")
    (message,) = _warnings(caplog)
    assert f"pid {victim}" in message and DEADLY[fault] in message
    assert _names_batch(message, 3), message


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
    with _loader(dataset, batch_size=2, transport="pickle") as loader:
        got = list(loader)
    assert failed == [1]
    _assert_batches(got, _torch_batches(dataset, batch_size=2))


def test_several_workers_killed_at_once_lose_nothing() -> None:
    """Both workers SIGKILLed from outside while each holds batches: all run again."""
    dataset = Faulty(40, delay=0.02)
    with _loader(dataset, batch_size=2) as loader:
        got = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 3:
                victims = _processes(_workers())
                assert len(victims) == 2
                _kill(victims)
        assert loader.statistics().restarts == 2
    _assert_batches(got, _torch_batches(dataset, batch_size=2))


def test_a_worker_killed_between_epochs_is_replaced() -> None:
    """A death while nothing is in flight costs nothing but a restart."""
    dataset = Faulty(8)
    with _loader(dataset, batch_size=2, num_workers=1) as loader:
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=2))
        workers = _processes(_workers())
        assert len(workers) == 1
        _kill(workers)
        assert not _wait_gone(workers)
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=2))
        assert loader.statistics().restarts == 1


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
    with _loader(dataset, start_method, batch_size=3) as loader:
        got, error = _collect(iter(loader))
    assert isinstance(error, WorkerCrashedError), error
    assert isinstance(error, RuntimeError)  # what torch's loader raises for dead workers
    message = str(error)
    assert "[9, 10, 11]" in message and error.indices == [9, 10, 11]
    assert "killed two workers" in message
    assert error.exitcodes == (EXIT_CODES[fault],) * 2
    assert DEADLY[fault] in message
    if fault == "sigkill":
        assert "out-of-memory" in message
    # Batches before the poison one came through intact and in order.
    want = _torch_batches(dataset, batch_size=3)
    _assert_batches(got, want[: len(got)])
    assert len(got) <= 3


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
    with _loader(dataset, batch_size=3, **options) as loader:
        got, error = _collect(iter(loader))
    seen = [b["i"].tolist() for b in got]
    assert isinstance(error, WorkerCrashedError), (error, seen, dataset.trigger.fired())
    message = str(error)
    context = (message, error.exitcodes, error.indices, seen)
    assert f"died {deaths} times, more than max_worker_restarts={limit}" in message, context
    assert error.exitcodes == (-signal.SIGKILL,) * deaths, context
    last = indices[-1] // 3 * 3
    assert error.indices == [last, last + 1, last + 2], context
    assert str(error.indices) in message, context
    want = _torch_batches(dataset, batch_size=3)
    _assert_batches(got, want[: len(got)])
    assert len(got) <= last // 3, context


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
    with _loader(dataset, batch_size=3, **options) as loader:
        _, error = _collect(iter(loader))
        assert isinstance(error, WorkerCrashedError)
        children = _descendants()
        cpu = psutil.Process().cpu_times()
        time.sleep(0.5)
        spent = sum(psutil.Process().cpu_times()[:2]) - sum(cpu[:2])
        assert len(_warnings(caplog)) == deaths
        assert loader.statistics().restarts == restarts
        assert _descendants() <= children
        assert spent < 0.2, f"the main process used {spent:.2f} s of CPU in 0.5 s while idle"


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "any-order"])
def test_a_fatal_death_raises_at_once(in_order: bool, where: Path) -> None:
    """``max_worker_restarts=0``, one worker, SIGKILL at the first batch: the
    consumer gets WorkerCrashedError within a second or two, in either order mode."""
    dataset = Faulty(12, "sigkill", once(where, 1), where=where)
    loader = _loader(dataset, batch_size=2, num_workers=1, max_worker_restarts=0, in_order=in_order)
    outcome: list[Any] = []
    consumer = threading.Thread(target=lambda: outcome.append(_collect(iter(loader))), daemon=True)
    try:
        started = time.monotonic()
        consumer.start()
        consumer.join(3.0)
        assert outcome, "the consumer is still waiting 3 s after the only worker died"
        assert isinstance(outcome[0][1], WorkerCrashedError), outcome
        assert time.monotonic() - started < 2.0 + 1.0  # a worker's start, plus slack
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
        killed.extend(_processes([_wait_for(lambda: started_by(where, index), timeout=10.0)]))
        _kill(killed[-1:])

    def killer() -> None:
        kill_when_started(0)
        kill_when_started(1)

    with _loader(dataset, batch_size=1, num_workers=1) as loader:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            got, error = _collect(iter(loader))
        finally:
            thread.join(15)
            _kill(killed)
        assert error is None, error
        assert loader.statistics().restarts == 2
    _assert_batches(got, _torch_batches(dataset, batch_size=1))


def test_a_replacement_killed_while_starting_is_replaced_again() -> None:
    """The OOM killer may strike a replacement worker before it is ready (here,
    during a one-second worker_init_fn): that is one more death, not a broken pool."""
    dataset = Faulty(40, delay=0.02)
    with _loader(dataset, batch_size=2, worker_init_fn=slow_start) as loader:
        got = []
        for k, batch in enumerate(loader):
            got.append(batch)
            if k == 2:
                before = _workers()
                _kill(_processes([min(before)]))
                replacement = _wait_for(lambda: _workers() - before, timeout=5.0)
                _kill(_processes(replacement))  # still inside slow_start
        assert loader.statistics().restarts == 2
    _assert_batches(got, _torch_batches(dataset, batch_size=2))


def test_grandchildren_of_a_dead_worker_are_reaped(where: Path) -> None:
    """A worker starts a process, then is SIGKILLed: the epoch completes, and the
    orphaned grandchild is gone by the time the loader is closed."""
    dataset = Faulty(24, "orphan", once(where, 10), where=where, delay=0.005)
    with _loader(dataset, batch_size=3) as loader:
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=3))
    grandchildren = _grandchildren(where)
    assert len(recorded_pids(where, "grandchild")) == 1
    assert not _wait_gone(grandchildren, timeout=3.0), "the dead worker's child outlived close()"


# ------------------------------------------------------------------ dataset exceptions


def test_a_dataset_exception_is_not_a_crash(
    start_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The dataset's own exception type arrives for that batch, with where it
    happened; no worker is replaced; the epoch goes on and the next one is whole."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    dataset = Faulty(12, "raise", always(5))
    want = _torch_batches(dataset, batch_size=2)
    with _loader(dataset, start_method, batch_size=2) as loader:
        iterator = iter(loader)
        got = [next(iterator), next(iterator)]
        workers = _workers()
        with pytest.raises(CorruptItemError) as info:
            next(iterator)
        got += list(iterator)
        assert "item 5 is corrupt" in str(info.value)
        assert "indices [4, 5]" in str(info.value)
        assert loader.statistics().restarts == 0
        _assert_batches(got, want[:2] + want[3:])
        with pytest.raises(CorruptItemError):
            list(loader)
        assert _workers() == workers
    assert _warnings(caplog) == []


def test_hang_with_timeout_raises_and_close_reaps_the_hung_worker(where: Path) -> None:
    """``timeout``: a batch stuck in ``__getitem__`` raises LoaderTimeoutError
    naming it; close() ends the stuck worker within seconds."""
    dataset = Faulty(12, "hang", always(4), where=where)
    loader = _loader(dataset, batch_size=2, timeout=1)
    try:
        iterator = iter(loader)
        assert [next(iterator)["i"].tolist() for _ in range(2)] == [[0, 1], [2, 3]]
        started = time.monotonic()
        with pytest.raises(LoaderTimeoutError, match=r"timed out after 1 seconds") as info:
            next(iterator)
        assert time.monotonic() - started < 1.0 + 2.0
        assert "batch 2 (indices [4, 5])" in str(info.value)
        assert isinstance(info.value, TimeoutError)
        victims = _processes(recorded_pids(where, "victim"))
        assert len(victims) == 1 and _alive(victims)
        started = time.monotonic()
        loader.close()
        assert time.monotonic() - started < CLOSE_WITHIN
        assert not _alive(victims)
    finally:
        loader.close()


# ------------------------------------------------------------------ interruption (in process)


def test_exception_in_the_training_loop_leaves_the_loader_usable() -> None:
    """An exception raised by the loop body, mid-epoch: the next epoch is whole,
    served by the same workers."""
    dataset = Faulty(20)
    with _loader(dataset, batch_size=2) as loader:
        next(iter(loader))
        workers = _workers()
        with pytest.raises(ArithmeticError, match="loss is nan"):
            for k, _ in enumerate(loader):
                if k == 3:
                    raise ArithmeticError("loss is nan")
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=2))
        assert _workers() == workers
        assert loader.statistics().restarts == 0


def test_break_then_a_new_epoch_is_whole() -> None:
    """``break`` abandons the prefetched batches; none of them leaks into the
    next epoch."""
    dataset = Faulty(20, delay=0.002)
    with _loader(dataset, batch_size=2) as loader:
        for k, _ in enumerate(loader):
            if k == 2:
                break
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=2))


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_death_in_an_abandoned_epoch_is_not_held_against_the_next(
    transport: str, where: Path
) -> None:
    """``break`` (Lightning's ``limit_val_batches``), then the worker dies while
    loading a batch of the epoch left behind: that batch is not loaded again, the
    death counts neither towards ``max_worker_restarts`` nor as poison, and the
    next epoch is whole."""
    dataset = Faulty(10, "hang", once(where, 2), where=where)
    with _loader(dataset, batch_size=1, num_workers=1, max_worker_restarts=0,
                 transport=transport) as loader:  # fmt: skip
        for k, _ in enumerate(loader):
            if k == 1:
                break
        (victim,) = _wait_for(lambda: recorded_pids(where, "victim"))
        _kill(_processes([victim]))
        assert not _wait_gone(_processes([victim]))
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=1))
        assert loader.statistics().restarts == 1
        _assert_batches(list(loader), _torch_batches(dataset, batch_size=1))


def test_a_death_after_break_with_persistent_workers_loses_nothing(where: Path) -> None:
    """With ``persistent_workers=True`` torch keeps the iterator between epochs, so
    the batches left behind by ``break`` are only known to be unwanted when the
    next epoch starts: a death before then is survived like any other."""
    dataset = Faulty(10, "hang", once(where, 2), where=where)
    with _loader(dataset, batch_size=1, num_workers=1, persistent_workers=True) as loader:
        for k, _ in enumerate(loader):
            if k == 1:
                break
        (victim,) = _wait_for(lambda: recorded_pids(where, "victim"))
        _kill(_processes([victim]))
        assert not _wait_gone(_processes([victim]))
        for _ in range(2):
            _assert_batches(list(loader), _torch_batches(dataset, batch_size=1))


def test_keyboard_interrupt_while_waiting_for_a_batch(where: Path) -> None:
    """Ctrl-C while the consumer waits in next(): KeyboardInterrupt reaches the
    user at once; the loader then serves a whole epoch and closes cleanly."""
    dataset = Faulty(12, delay=0.2)
    interrupt = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if interrupt.is_set():  # only inside the guarded block below
            interrupt.clear()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with _loader(dataset, batch_size=2) as loader:
            iterator = iter(loader)
            next(iterator)
            interrupt.set()
            timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                while True:
                    next(iterator)
            assert time.monotonic() - started < 2.0
            timer.join()
            del iterator
            _assert_batches(list(loader), _torch_batches(dataset, batch_size=2))
    finally:
        interrupt.clear()
        signal.signal(signal.SIGINT, previous)


def test_a_storm_of_ctrl_c_inside_next_leaves_the_loader_closable() -> None:
    """Thousands of KeyboardInterrupts, each landing wherever next() happens to be
    (waiting, submitting, unpacking): every one reaches the caller, batches keep
    coming between them, and close() still returns at once (no lock left held by
    an interrupted wait; NOTE [ Waiting and Ctrl-C ] in _iterator.py).

    An interrupt inside the sampler's generator ends that generator, and so the
    epoch, as with torch's loader: the loop then starts the next epoch."""
    armed = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    stop = threading.Event()
    main = threading.get_ident()

    def pester() -> None:
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.0003)

    loader = _loader(Faulty(10**6, delay=0.002), batch_size=1)
    pesterer = threading.Thread(target=pester, daemon=True)
    interrupts = batches = 0
    try:
        iterator = iter(loader)
        next(iterator)
        pesterer.start()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                armed.set()
                next(iterator)
                armed.clear()
                batches += 1
            except KeyboardInterrupt:
                interrupts += 1
            except StopIteration:
                armed.clear()
                iterator = iter(loader)
    finally:
        armed.clear()
        stop.set()
        pesterer.join(5)
        time.sleep(0.05)  # signals still pending run the (disarmed) handler
        signal.signal(signal.SIGINT, previous)
        started = time.monotonic()
        loader.close()
        closing = time.monotonic() - started
    assert interrupts > 100 and batches > 100, (interrupts, batches)
    assert closing < 2.0, f"close() took {closing:.1f} s after the interrupts"


def test_del_loader_ends_workers_and_their_children(where: Path) -> None:
    """Dropping the loader (and its iterator) mid-epoch, without close(), ends the
    workers and every process they started."""
    dataset = Faulty(12, "grandchild", always(0, 1, 2, 3), where=where)
    loader = _loader(dataset, batch_size=2)
    iterator = iter(loader)
    next(iterator), next(iterator)
    workers = _processes(_workers())
    grandchildren = _grandchildren(where)
    assert len(workers) == 2 and len(grandchildren) == 4
    del iterator, loader
    gc.collect()
    assert not _wait_gone(workers + grandchildren, timeout=GONE_WITHIN)


# ------------------------------------------------------------------ interruption (whole process)

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from _faults import Faulty, always
    from poolloader import DataLoader

    if __name__ == "__main__":
        dataset = Faulty(400, "grandchild", always(0, 1, 2, 3), where={where!r}, delay=0.01)
        loader = DataLoader(dataset, batch_size=2, num_workers=2,
                            multiprocessing_context={start_method!r})
        for k, batch in enumerate(loader):
            if k == 4:
                print("READY", flush=True)
                {ending}
            time.sleep(0.02)
        for k, batch in enumerate(loader):
            if k == 2:
                raise RuntimeError("boom in the training loop")
    """
)

ENDINGS = {
    # Ctrl-C: the terminal sends SIGINT to the whole process group.
    "ctrl-c": "time.sleep(60)",
    # break, then a new epoch whose loop body raises: the interpreter exits with
    # the loader neither closed nor collected (the atexit path).
    "break-exception": "break",
    "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize(
    "start_method, ending",
    [("forkserver", e) for e in ENDINGS] + [("spawn", "sigkill")],
)
def test_the_main_process_ending_leaves_nothing_behind(
    start_method: str, ending: str, where: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """However the main process ends (Ctrl-C, an exception, falling off the end
    without close(), SIGKILL), its workers, their children and the multiprocessing
    helpers all go, and stderr has no resource-tracker "leaked" warning and no
    ignored exception."""
    code = SCRIPT.format(
        tests=TESTS, where=str(where), start_method=start_method, ending=ENDINGS[ending]
    )
    stderr_path = tmp_path_factory.mktemp("stderr") / "stderr.txt"
    family: list[int] = []
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"script failed: {stderr_path.read_text()}"
        family = psutil.Process(proc.pid).children(recursive=True) + _grandchildren(where)
        assert len(_grandchildren(where)) == 4
        if ending == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        returncode = proc.wait(timeout=60)
        left = _wait_gone(family)
        assert not left, f"left behind: {[_describe(p) for p in left]}"
    finally:
        _kill([*_processes([proc.pid]), *family])
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    text = stderr_path.read_text()
    expected_rc = {"ctrl-c": (1, -signal.SIGINT), "break-exception": (1,)}
    assert returncode in expected_rc.get(ending, (-signal.SIGKILL,)), text
    if ending == "break-exception":
        assert "RuntimeError: boom in the training loop" in text
    if ending == "ctrl-c":
        assert "KeyboardInterrupt" in text
    assert "leaked" not in text, text
    assert "Exception ignored" not in text, text
    assert "poolloader I/O thread failed" not in text, text


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return str(proc.pid)


# ------------------------------------------------------------------ start failures


def test_an_unpicklable_dataset_fails_at_the_first_iteration() -> None:
    """The dataset is pickled for the workers at iter(): NotPicklableError names
    the attribute; no process starts; without the culprit the loader works."""
    dataset = Carrying(CrashAtPickle())
    loader = _loader(dataset, batch_size=2)
    try:
        before = _descendants()
        with pytest.raises(NotPicklableError) as info:
            iter(loader)
        message = str(info.value)
        assert message.startswith("dataset.payload (part of dataset) cannot be pickled")
        assert "CrashAtPickle refuses to be pickled" in message
        assert _descendants() <= before
        dataset.payload = None
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    finally:
        loader.close()


def test_a_dataset_that_fails_to_unpickle_in_the_worker(start_method: str) -> None:
    """Unpickling raises in the worker: WorkerStartError says which worker, that
    it failed to start, and the original error and traceback."""
    with _loader(Carrying(ErrorAtUnpickle()), start_method, batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    message = str(info.value)
    assert re.match(r"DataLoader worker \d \(pid \d+\) failed to start", message), message
    assert "_faults.CorruptStateError: the saved state is corrupt" in message
    assert "_raise_at_unpickle" in message  # the worker's traceback


@pytest.mark.parametrize(
    "payload, cause",
    [(ExitAtUnpickle(), f"exit code {EXIT_CODE}"), (SegfaultAtUnpickle(), "SIGSEGV")],
    ids=["exit", "segfault"],
)
def test_a_worker_that_dies_while_starting(payload: Any, cause: str) -> None:
    """A worker that vanishes while unpickling its dataset cannot report why;
    WorkerStartError still says it died while starting, and how."""
    with _loader(Carrying(payload), batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    message = str(info.value)
    assert "exited while starting" in message and cause in message, message


@pytest.mark.parametrize("payload", [ExitAtUnpickle(), SegfaultAtUnpickle()], ids=["exit", "segv"])
def test_a_worker_dying_while_starting_is_not_blamed_on_the_main_guard(payload: Any) -> None:
    with _loader(Carrying(payload), batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    assert "__main__" not in str(info.value), str(info.value)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "options",
    [
        {"num_workers": -1},
        {"batch_size": 0},
        {"timeout": -1},
        {"prefetch_factor": 2},
        {"num_workers": 2, "multiprocessing_context": "no-such-method"},
        {"shuffle": True, "sampler": [0, 1]},
        {"batch_sampler": [[0]], "batch_size": 2},
        {"persistent_workers": True},
    ],
    ids=lambda options: ",".join(options),
)
def test_invalid_arguments_fail_as_torch_fails(options: dict[str, Any]) -> None:
    """Where torch refuses an argument, poolloader refuses it with torch's words."""
    with pytest.raises(Exception) as theirs:
        torch.utils.data.DataLoader(Faulty(4), **options)
    with pytest.raises(type(theirs.value)) as ours:
        DataLoader(Faulty(4), **options)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"max_worker_restarts": -1}, ValueError, "max_worker_restarts=-1"),
        ({"max_worker_restarts": 1.5}, TypeError, "max_worker_restarts=1.5"),
        ({"max_batch_bytes": -5}, ValueError, "max_batch_bytes=-5"),
        ({"reorder_buffer": "big"}, TypeError, "reorder_buffer='big'"),
        ({"transport": "zmq"}, ValueError, "transport='zmq'"),
        ({"seeding": "random"}, ValueError, "seeding='random'"),
        ({"num_workers": 2, "multiprocessing_context": "fork"}, ValueError, "'fork'"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_invalid_poolloader_options_say_what_was_given(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """poolloader's own options: the right built-in, the value given, what is allowed."""
    with pytest.raises(error) as info:
        DataLoader(Faulty(4), **options)
    text = str(info.value)
    assert message in text and "but got" in text, text


def test_a_sampler_index_out_of_range_fails_in_torchs_words() -> None:
    """A sampler yields index 9 of a 4-item TensorDataset: torch's IndexError, naming
    the batch; the loader goes on."""
    dataset = torch.utils.data.TensorDataset(torch.arange(4))
    sampler = [0, 1, 9, 2]
    with pytest.raises(IndexError) as theirs:
        list(torch.utils.data.DataLoader(dataset, sampler=sampler))
    with _loader(dataset, sampler=sampler) as loader:
        got, error = [], None
        for_each = iter(loader)
        got += [next(for_each), next(for_each)]
        with pytest.raises(IndexError) as ours:
            next(for_each)
        got += list(for_each)
    first_line = str(ours.value).splitlines()[0]
    assert first_line == str(theirs.value)
    assert "indices [9]" in str(ours.value)
    assert [t.tolist() for (t,) in got] == [[0], [1], [2]]
    assert error is None


def test_items_default_collate_cannot_handle_fail_in_torchs_words() -> None:
    """Items of an unknown type: default_collate's TypeError, as torch words it."""
    with pytest.raises(TypeError) as theirs:
        list(torch.utils.data.DataLoader(OpaqueItems(), batch_size=2))
    with _loader(OpaqueItems(), batch_size=2) as loader:
        with pytest.raises(TypeError) as ours:
            list(loader)
    assert str(ours.value).splitlines()[0] == str(theirs.value)
    assert "default_collate: batch must contain tensors" in str(ours.value)
    assert "indices [0, 1]" in str(ours.value)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_batch_that_cannot_be_pickled_in_the_worker(transport: str) -> None:
    """collate_fn returns a batch holding a lock: a TypeError for that batch that
    names what failed to pickle and the batch; the loader goes on."""
    dataset = Faulty(8)
    collate = collate_bad_result("lock", bad=2)
    with _loader(dataset, batch_size=2, collate_fn=collate, transport=transport) as loader:
        iterator = iter(loader)
        assert next(iterator)["i"].tolist() == [0, 1]
        with pytest.raises(TypeError) as info:
            next(iterator)
        assert [b["i"].tolist() for b in iterator] == [[4, 5], [6, 7]]
    message = str(info.value)
    assert "cannot pickle '_thread.lock' object" in message
    assert "indices [2, 3]" in message


def test_an_unpicklable_batch_names_the_culprit() -> None:
    dataset = Faulty(4)
    with _loader(dataset, batch_size=2, collate_fn=collate_bad_result("lock", bad=0)) as loader:
        with pytest.raises(NotPicklableError, match=r"\['lock'\]"):
            next(iter(loader))


def test_a_batch_that_fails_to_unpickle_in_the_main_process() -> None:
    """The batch pickles in the worker but its unpickling raises in the main
    process: that batch's error names the cause and the batch; the loader goes on."""
    dataset = Faulty(8)
    collate = collate_bad_result("unpickle", bad=2)
    with _loader(dataset, batch_size=2, collate_fn=collate) as loader:
        iterator = iter(loader)
        assert next(iterator)["i"].tolist() == [0, 1]
        with pytest.raises(Exception) as info:
            next(iterator)
        assert "the batch cannot be rebuilt" in str(info.value)
        assert "[2, 3]" in str(info.value)
        assert [b["i"].tolist() for b in iterator] == [[4, 5], [6, 7]]


def test_a_batch_over_max_batch_bytes() -> None:
    """One item is 4 MiB with max_batch_bytes=1 MiB: ResultTooLargeError (a
    ValueError) for that batch, naming the sizes and the fix; the loader goes on."""
    dataset = Faulty(8, "huge", always(5))
    with _loader(dataset, batch_size=1, max_batch_bytes=1 << 20) as loader:
        iterator = iter(loader)
        got = [next(iterator) for _ in range(5)]
        with pytest.raises(ResultTooLargeError) as info:
            next(iterator)
        got += list(iterator)
    assert [b["i"].tolist() for b in got] == [[0], [1], [2], [3], [4], [6], [7]]
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    # 4 MiB of "x" and the 8 bytes of the collated "i" tensor.
    assert "4194312 bytes" in message and "max_batch_bytes=1048576" in message
    assert "indices [5]" in message


@pytest.mark.parametrize(
    "options",
    [{"transport": "pickle"}, {"collate_fn": list}],
    ids=["pickle-transport", "many-small-tensors"],
)
def test_max_batch_bytes_holds_for_every_batch(options: dict[str, Any]) -> None:
    """Batches of 64 KiB with max_batch_bytes=32 KiB are refused whatever their
    layout: stacked and pickled, or four separate 16 KiB tensors (collate_fn=list)."""
    with _loader(Faulty(8), batch_size=4, max_batch_bytes=32 * 1024, **options) as loader:
        with pytest.raises(ResultTooLargeError):
            next(iter(loader))
