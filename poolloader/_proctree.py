"""Process trees: finding and ending the processes a worker started.

NOTE [ Process trees ]: a worker ends the processes it started when it stops
(:func:`kill_descendants`); one that finds the main process gone then SIGKILLs
its whole group, itself included, for what dataset code forked meanwhile. Those
it cannot end (it was killed) are found by the
main process: through the process tree while their parent lives, and through
the worker's process group (each worker leads one) once they are orphaned,
bounded by when the group was known to be the worker's (:func:`group_members`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import NoReturn

import psutil

#: Seconds the processes a worker started get to exit on SIGTERM before SIGKILL.
DESCENDANT_GRACE = 1.0
#: Exit code of a worker that found its main process gone.
EXIT_ORPHANED = 3


def kill_descendants(process: psutil.Process, grace: float = DESCENDANT_GRACE) -> None:
    """Terminate every descendant of ``process`` and every other member of its
    process group (descendants orphaned by a dead child); kill those still alive
    after ``grace``."""
    try:
        children = process.children(recursive=True)
    except psutil.Error:
        children = []
    own_group = os.getpgrp() == process.pid
    members = group_members({process.pid}, since=created(process.pid)) if own_group else []
    terminate_all(unique([*children, *members]), grace)


def group_members(
    pgids: set[int], since: float = 0.0, until: float = float("inf")
) -> list[psutil.Process]:
    """The processes (other than this one) in any of the process groups ``pgids``,
    created between ``since`` and ``until`` (psutil's ``create_time()`` clock).

    A group id is a pid: once the group's leader and all its members are gone it
    may be taken again by an unrelated process that starts a group of its own.
    Bounding the creation time by when the group was known to be ours (from the
    leader's start to the moment it was found dead) keeps such strangers out."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or os.getpgid(proc.pid) not in pgids:
                continue
            if since <= proc.create_time() <= until:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


def process_clock() -> float:
    """Now, on the clock of psutil's ``create_time()`` (boot time plus time since boot),
    which may differ from ``time.time()`` by a second or more."""
    return psutil.boot_time() + time.clock_gettime(time.CLOCK_BOOTTIME)


def created(pid: int) -> float:
    """When process ``pid`` started, on psutil's ``create_time()`` clock (0 if gone)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def unique(processes: list[psutil.Process]) -> list[psutil.Process]:
    """``processes`` without repeats (by pid)."""
    return list({p.pid: p for p in processes}.values())


#: Processes of torch's own that a worker may start but that serve the main
#: process too, and exit by themselves once no process uses them: torch's
#: shared-memory manager (the ``file_system`` sharing strategy), started by the
#: first process to share memory that way, often a worker. It runs in a session
#: of its own, but is the worker's child: ended with the worker's tree, it would
#: take the main process down the next time that frees a batch it shared (libshm
#: aborts on the broken connection).
SPARED = frozenset({"torch_shm_manager"})


def _spared(proc: psutil.Process) -> bool:
    try:
        return proc.name() in SPARED
    except psutil.Error:
        return False


def terminate_all(processes: list[psutil.Process], grace: float = DESCENDANT_GRACE) -> None:
    """SIGTERM ``processes``, wait up to ``grace`` seconds, SIGKILL the rest and
    reap (all but those :data:`SPARED`)."""
    processes = [proc for proc in processes if not _spared(proc)]
    for proc in processes:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace)


def still_running(pid: int, started: float) -> bool:
    """Whether process ``pid``, started at ``started`` (psutil's clock), still runs.

    The main process, not the parent: a worker forked from the template process
    is the template's child."""
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def exit_orphaned() -> NoReturn:
    """The main process is gone: end this worker's process tree, then exit.

    The descendants get :data:`DESCENDANT_GRACE` to exit on
    SIGTERM; meanwhile dataset code may fork more (a ``multiprocessing.Pool``
    replaces the workers it lost from a thread of its own), after the snapshot
    those were found in. All of them are in this worker's process group, so one
    SIGKILL to the group, this worker included, ends the rest: the kernel lets
    no fork in progress escape a signal to its group."""
    kill_descendants(psutil.Process())
    sys.stdout.flush()
    sys.stderr.flush()
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(EXIT_ORPHANED)


def exit_with_tree(code: int) -> NoReturn:
    """End this worker's process tree, then exit with ``code``."""
    # Loaders the dataset code runs here (nested loaders) are closed first: their
    # I/O threads would take the processes ended below for crashes.
    exit_hook = sys.modules.get("poolloader._exit_hook")
    if exit_hook is not None:
        try:
            exit_hook.close_all()
        except Exception:
            pass
    kill_descendants(psutil.Process())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
