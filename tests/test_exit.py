"""A process that ends while its loader is alive ends promptly, and takes its
workers with it: a multiprocessing child (fork or spawn) that returns or raises,
and a ``torch.multiprocessing.spawn`` DDP job whose rank raises or is killed.

At exit, multiprocessing joins every non-daemonic child; poolloader's workers
are not daemonic, so without poolloader's exit hook these processes would wait
for their workers forever (NOTE [ Exit with live loaders ] in ``_exit_hook.py``).
Each case runs under both transports."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import _exits  # noqa: E402

#: Seconds a process gets to end after its last line of code. Closing a pool
#: takes well under this; the bound only turns a hang into a failure.
ENDS_WITHIN = 60.0
#: Seconds a whole DDP job (two ranks starting torch, gloo and a worker each) gets.
JOB_WITHIN = 180.0


def _workers_of(where: Path) -> list[int]:
    pids: list[int] = []
    for found in where.glob("workers-*"):
        pids += [int(p) for p in found.read_text().split()]
    return pids


def _alive(pids: list[int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.Error:
            pass
    return found


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("transport", ["shm", "pickle"])
@pytest.mark.parametrize("ending", ["return", "raise"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_child_process_with_a_live_loader_exits(tmp_path, method, ending, transport):
    context = multiprocessing.get_context(method)
    process = context.Process(target=_exits.child, args=(str(tmp_path), transport, ending))
    process.start()
    process.join(ENDS_WITHIN)
    alive = process.is_alive()
    if alive:
        process.kill()
        process.join()
    assert not alive, f"a {method} child that ended with `{ending}` did not exit"
    assert process.exitcode == (1 if ending == "raise" else 0)
    workers = _workers_of(tmp_path)
    assert len(workers) == 1
    assert not _wait_gone(workers), "the child's worker outlived it"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "ending, transport, expected",
    [
        ("raise", "shm", "ProcessRaisedException"),
        ("raise", "pickle", "ProcessRaisedException"),
        ("sigkill", "shm", "ProcessExitedException"),
    ],
)
def test_a_ddp_job_whose_rank_fails_ends(tmp_path, ending, transport, expected):
    """torch's loader ends this job with ProcessRaisedException within seconds;
    so must poolloader, whose workers are not daemonic."""
    command = [sys.executable, _exits.__file__, str(tmp_path), transport, ending]
    try:
        done = subprocess.run(
            [*command, str(_free_port())], capture_output=True, text=True, timeout=JOB_WITHIN
        )
    except subprocess.TimeoutExpired:
        leftovers = _alive(_workers_of(tmp_path))
        for pid in leftovers:
            psutil.Process(pid).kill()
        pytest.fail(f"the DDP job did not end within {JOB_WITHIN} s")
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith(f"ENDED {expected}"), done.stdout + done.stderr
    workers = _workers_of(tmp_path)
    assert len(workers) == 2, f"each rank records its worker: {workers}"
    assert not _wait_gone(workers), "a rank's worker outlived the job"
