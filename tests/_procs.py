"""What the fault tests share: loaders, torch's reference batches, and the
processes a test started (workers, their children), found and ended by psutil
handle rather than bare pid.

Grandchildren leave the test process's tree when their parent dies, so
conftest's leak check cannot see them: the tests whose faults start them check
those pids themselves, and the ``where`` fixture (conftest) kills what they
recorded.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from _compare import assert_same
from _faults import (
    GRANDCHILD,
    Faulty,
    recorded_pids,
)

from poolloader import DataLoader
from poolloader._template_process import TEMPLATE_NAME
from poolloader.errors import WorkerCrashedError

TESTS = os.path.dirname(os.path.abspath(__file__))
#: Seconds processes get to disappear after the event that should end them.
#: Orphaned workers notice a dead main process at once (end of file on their
#: connection) and give their own children 1 s to exit.
GONE_WITHIN = 10.0
#: close() sends Stop, waits 2 s, then SIGTERM and 1 s, then SIGKILL: a worker
#: stuck in __getitem__ must be gone well within this.
CLOSE_WITHIN = 5.0

# ------------------------------------------------------------------ helpers


def fault_loader(dataset: Any, start_method: str = "forkserver", **kwargs: Any) -> DataLoader:
    kwargs.setdefault("num_workers", 2)
    return DataLoader(dataset, multiprocessing_context=start_method, **kwargs)


def torch_batches(dataset: Faulty, **kwargs: Any) -> list[Any]:
    """What torch's own loader, in the main process, yields for the healthy dataset."""
    return list(torch.utils.data.DataLoader(dataset.healthy(), num_workers=0, **kwargs))


def assert_batches(got: list[Any], want: list[Any]) -> None:
    """Exactly the expected batches, in order: nothing lost, nothing twice."""
    got_ids = [b["i"].tolist() for b in got]
    want_ids = [b["i"].tolist() for b in want]
    assert got_ids == want_ids
    for k, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"batch {k}")


def helper_pids() -> set[int]:
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


def descendant_pids() -> set[int]:
    """Every process below this one except the helpers and the processes that have
    exited (a forkserver's child is reaped by the server, a moment later): workers
    (forkserver's children included) and the processes they started."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                found.add(process.pid)
        except psutil.Error:
            pass
    return found - helper_pids()


def worker_pids() -> set[int]:
    """The worker processes alive now: Python descendants that are neither helpers
    nor the template processes workers are forked from."""
    found = set()
    for pid in descendant_pids():
        try:
            if psutil.Process(pid).name().startswith("python"):
                found.add(pid)
        except psutil.Error:
            pass
    return found - template_pids()


def template_pids() -> set[int]:
    """The template processes alive now (see NOTE [ Templates ])."""
    found = set()
    for pid in descendant_pids():
        try:
            if psutil.Process(pid).name() == TEMPLATE_NAME:
                found.add(pid)
        except psutil.Error:
            pass
    return found


def handles(pids: Iterable[int]) -> list[psutil.Process]:
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


def still_alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes among ``procs`` that still run (zombies count as gone)."""
    found = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def wait_gone(
    procs: Iterable[psutil.Process], timeout: float = GONE_WITHIN
) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to end; the ones still alive."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while (alive := still_alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def kill_all(procs: Iterable[psutil.Process]) -> None:
    """SIGKILL what is left of ``procs``: cleanup that runs even when a test fails."""
    for proc in still_alive(procs):
        try:
            proc.kill()  # psutil checks first that the pid is still this process
        except psutil.Error:
            pass


def live_grandchildren(where: Path) -> list[psutil.Process]:
    """The grandchildren faults recorded in ``where`` that still run, as handles.

    A recorded pid counts only if it runs the grandchild's command and was created
    when its record was written: a reused pid is somebody else's process."""
    found = []
    for proc in handles(recorded_pids(where, "grandchild")):
        try:
            written = (where / f"grandchild-{proc.pid}").stat().st_mtime
            if proc.cmdline() == GRANDCHILD and abs(proc.create_time() - written) < 30.0:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


def slab_maps(pid: int | None = None) -> int:
    """Lines of ``/proc/<pid>/maps`` (this process's by default) that map a
    poolloader memfd slab."""
    with open(f"/proc/{pid or 'self'}/maps") as maps:
        return sum("poolloader-slab" in line for line in maps)


def slab_mappings(pid: int | None = None) -> set[tuple[str, str]]:
    """The slab mappings of ``/proc/<pid>/maps`` (this process's by default), each
    as its address range and memfd name: the same pair means the same slab, still
    mapped where it was."""
    with open(f"/proc/{pid or 'self'}/maps") as maps:
        return {
            (fields[0], fields[5]) for fields in map(str.split, maps)
            if len(fields) > 5 and "poolloader-slab" in fields[5]
        }  # fmt: skip


def child_slab_maps() -> int:
    """Slab mappings in every process below this one (workers and templates)."""
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += slab_maps(child.pid)
        except OSError:
            continue  # it exited meanwhile
    return total


def child_slabs() -> set[str]:
    """The slabs mapped in any process below this one, by memfd name: a slab lent
    to several workers counts once."""
    found: set[str] = set()
    for child in psutil.Process().children(recursive=True):
        try:
            found |= {name for _, name in slab_mappings(child.pid)}
        except OSError:
            continue  # it exited meanwhile
    return found


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """The garbage collector held for the block: an interrupt that a test's profile
    hook raises at the n-th place inside poolloader's code lands in the code under
    test, not in the finalizer of a loader an earlier test left in a reference
    cycle (Python reports an exception leaving ``__del__`` and drops it, and pytest
    fails the test for it)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {condition}")
        time.sleep(0.01)
    return value


def logged_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "poolloader" and r.levelno == logging.WARNING
    ]


def names_batch(message: str, position: int) -> bool:
    """Whether a log message names batch ``position`` ("batch 3", "batches [3, 5]")."""
    return re.search(rf"batch(es)? \[?[\d, ]*\b{position}\b", message) is not None


def collect_batches(iterator: Iterator[Any]) -> tuple[list[Any], BaseException | None]:
    """Batches until the iterator ends or raises; the exception, if one was raised."""
    got: list[Any] = []
    try:
        for batch in iterator:
            got.append(batch)
    except Exception as exc:
        return got, exc
    return got, None


def outcomes_going_on(iterator: Iterator[Any], most: int = 100) -> list[Any]:
    """What a consumer that catches WorkerCrashedError and calls next() again gets:
    each batch or error, until the epoch ends; ``most`` at most, so that an
    iterator raising for ever fails the test instead of hanging it."""
    outcomes: list[Any] = []
    while len(outcomes) < most:
        try:
            outcomes.append(next(iterator))
        except StopIteration:
            break
        except WorkerCrashedError as exc:
            outcomes.append(exc)
    return outcomes


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())}"
    except psutil.Error:
        return str(proc.pid)
