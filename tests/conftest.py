"""Shared fixtures: every test must leave nothing of its own behind.

The leak check looks only at what belongs to the test process, so other jobs on
the machine cannot trip it: its child processes, its open file descriptors, and
its shared-memory mappings (slabs are memfds, multiprocessing's semaphores are
mapped from ``/dev/shm`` while they live).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from multiprocessing import forkserver, resource_tracker

import psutil
import pytest
from hypothesis import settings

# CI runs the same examples every time (HYPOTHESIS_PROFILE=ci in .ci/run), so a
# red run can be reproduced; development runs explore new ones.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Seconds a test's processes, descriptors and mappings get to disappear after
#: the test before it fails. Closed loaders reap their workers before close()
#: returns; this covers loaders that tests drop and leave to the garbage
#: collector, on a machine that may be busy with other jobs.
LEAK_GRACE = 20.0
#: Mappings that are shared memory: poolloader's slabs and containers (memfds),
#: torch's and multiprocessing's segments and semaphores (/dev/shm).
SHARED_MAPPINGS = ("/memfd:", "/dev/shm/")
#: The descriptors a loader may hold: sockets and pipes (connections), anonymous
#: inodes (pidfds) and shared memory.
LOADER_DESCRIPTORS = ("socket:", "pipe:", "anon_inode:", "/memfd:", "/dev/shm/")
#: What multiprocessing's long-lived helper processes run.
HELPER_MAINS = ("forkserver import main", "resource_tracker import main")


@pytest.fixture(autouse=True, scope="session")
def helpers_started_once():
    """Start multiprocessing's long-lived helpers (the forkserver, with the preload
    poolloader asks for, and the resource tracker) before the first test, so that
    the descriptors they keep open are not counted against whichever test happened
    to need them first."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["__main__", "poolloader._template_process"]
    )
    forkserver.ensure_running()
    resource_tracker.ensure_running()
    # multiprocessing's heap keeps its first arena (where Value and Array live) for good.
    arena = multiprocessing.get_context("spawn").Value("i", 0)
    try:  # tqdm (the benchmark's progress bar) keeps a multiprocessing lock for good
        import tqdm

        tqdm.tqdm.get_lock()
    except ImportError:
        pass
    yield
    del arena


def _children() -> set[int]:
    """Every process below this one (forkserver-started workers included) except
    multiprocessing's long-lived helpers themselves."""
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True)} - _helpers(me)


def _helpers(me: psutil.Process) -> set[int]:
    """The forkserver and the resource tracker: children of this process running
    multiprocessing's helper mains (a forkserver's workers share its command line,
    but are its children, not ours)."""
    found = set()
    for child in me.children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(helper in cmdline for helper in HELPER_MAINS):
            found.add(child.pid)
    return found


def _descriptors() -> dict[int, str]:
    """This process's open descriptors of the kinds loaders hold (connections,
    pipes, pidfds, shared memory) and what each refers to. Files that libraries
    keep open for good (matplotlib's fonts, say) are not counted."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed meanwhile
        if target.startswith(LOADER_DESCRIPTORS) and int(name) not in _lifelong():
            found[int(name)] = target
    return found


def _lifelong() -> set[int]:
    """Descriptors multiprocessing keeps for the rest of the process once it needs
    them: the listener of its resource sharer (which hands descriptors to other
    processes outside a process start)."""
    from multiprocessing import resource_sharer

    listener = getattr(resource_sharer._resource_sharer, "_listener", None)
    if listener is None:
        return set()
    return {listener._listener._socket.fileno()}


def _shared_mappings() -> set[str]:
    """The shared-memory files this process maps (path and inode)."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(SHARED_MAPPINGS):
                found.add(f"{fields[5].strip()} (inode {fields[4]})")
    return found


def _leaks(before: tuple[set[int], dict[int, str], set[str]]) -> dict[str, list]:
    children, descriptors, mappings = before
    now = _descriptors()
    return {
        "processes": sorted(_children() - children),
        "descriptors": sorted(f"{fd} -> {t}" for fd, t in now.items() if descriptors.get(fd) != t),
        "shared-memory mappings": sorted(_shared_mappings() - mappings),
    }


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves child processes, open descriptors or shared-memory
    mappings behind."""
    before = (_children(), _descriptors(), _shared_mappings())
    yield
    deadline = time.monotonic() + LEAK_GRACE
    collect = False  # a full collection costs ~0.1 s: only when something is left over
    while True:
        if collect:
            gc.collect()
        collect = True
        leaks = {kind: found for kind, found in _leaks(before).items() if found}
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if leaks.get("processes"):
        leaks["processes"] = [_kill(pid) for pid in leaks["processes"]]
    assert not leaks, f"test left these behind: {leaks}"


def _kill(pid: int) -> str:
    """SIGKILL a leaked process (cleanup that runs although the test fails); what it was."""
    try:
        process = psutil.Process(pid)
        described = f"{pid} {' '.join(process.cmdline())[:120]}"
        process.kill()
    except psutil.Error:
        return f"{pid} (gone)"
    return described


@pytest.fixture
def where(tmp_path):
    """The directory faults leave their notes in (see ``_faults.py``); every
    grandchild recorded there is killed after the test, whatever happened."""
    yield tmp_path
    from _procs import kill_all, live_grandchildren

    kill_all(live_grandchildren(tmp_path))


@pytest.fixture
def corpora(tmp_path):
    """Two small corpora of WAV files with Kaldi-style manifests (see ``_manifests.py``)."""
    from _manifests import write_corpora

    return write_corpora(tmp_path)


@pytest.fixture(params=["spawn", "forkserver"])
def start_method(request):
    """Run a test under both start methods poolloader supports."""
    return request.param
