"""Shared fixtures: every test must leave no process and no shared memory behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from hypothesis import settings

# CI runs the same examples every time (HYPOTHESIS_PROFILE=ci in .ci/run), so a
# red run can be reproduced; development runs explore new ones.
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Seconds a test's processes get to disappear after the test before it fails.
#: Closed loaders reap their workers before close() returns; this only covers
#: loaders that tests drop and leave to the garbage collector.
LEAK_GRACE = 10.0

SHM = "/dev/shm"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _shm() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves child processes or /dev/shm segments behind."""
    before_children, before_shm = _children(), _shm()
    yield
    import gc

    deadline = time.monotonic() + LEAK_GRACE
    collect = False  # a full collection costs ~0.1 s: only when something is left over
    while True:
        if collect:
            gc.collect()
        collect = True
        extra = _children() - before_children
        extra = {pid for pid in extra if _is_ours(pid)}
        leaked_shm = _shm() - before_shm
        if (not extra and not leaked_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in extra:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not extra, f"test left processes behind: {sorted(extra)}"
    assert not leaked_shm, f"test left shared memory behind: {sorted(leaked_shm)}"


def _is_ours(pid: int) -> bool:
    """Ignore multiprocessing's long-lived helpers (forkserver, resource tracker)."""
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    helpers = ("forkserver", "resource_tracker", "semaphore_tracker")
    return not any(h in cmdline for h in helpers)


@pytest.fixture
def corpora(tmp_path):
    """Two small corpora of WAV files with Kaldi-style manifests (see ``_manifests.py``)."""
    from _manifests import write_corpora

    return write_corpora(tmp_path)


@pytest.fixture(params=["spawn", "forkserver"])
def start_method(request):
    """Run a test under both start methods poolloader supports."""
    return request.param
