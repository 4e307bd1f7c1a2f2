"""Processes: nested pools work, and nothing outlives the loader or its main process."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from _datasets import Nested, Plain, SpawnsSleeper, pid_of_worker

from poolloader import DataLoader
from poolloader.errors import LoaderClosedError

TESTS = os.path.dirname(__file__)
#: Seconds processes get to disappear once they should: close() reaps before it
#: returns, orphans notice their parent's death at once; the bound is for a busy
#: machine and only turns a process that never ends into a failure.
GONE_WITHIN = 20.0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _gone(pids, timeout=GONE_WITHIN) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_dataset_may_start_its_own_process_pool(kind):
    with DataLoader(Nested(kind), batch_size=2, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert [b.tolist() for b in loader] == [[0, 1], [4, 9]]


NESTED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from _datasets import WithInnerLoader
    from poolloader import DataLoader

    if __name__ == "__main__":
        with DataLoader(WithInnerLoader(), batch_size=2, num_workers=2,
                        persistent_workers={persistent}) as loader:
            for epoch in range(2):
                print([b.tolist() for b in loader], flush=True)
    """
)


@pytest.mark.parametrize("persistent", [True, False])
def test_nested_loaders_end_without_crash_reports(persistent):
    """A worker that ends closes the loaders its dataset runs before it ends their
    processes: their I/O threads reported each inner worker killed by SIGKILL."""
    code = NESTED.format(tests=TESTS, persistent=persistent)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    epoch = "[[[0, 66], [1, 66]], [[2, 66], [3, 66]]]"
    assert done.stdout.split("\n")[:2] == [epoch, epoch], done.stdout + done.stderr
    assert "died" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_torch_refuses_what_poolloader_allows():
    import torch

    loader = torch.utils.data.DataLoader(Nested("pool"), batch_size=2, num_workers=1)
    with pytest.raises(AssertionError, match="daemonic processes are not allowed to have children"):
        list(loader)


def test_close_ends_the_whole_process_tree(start_method):
    loader = DataLoader(SpawnsSleeper(), batch_size=None, num_workers=2,
                        multiprocessing_context=start_method)  # fmt: skip
    sleepers = list(loader)
    workers = loader._pool.worker_pids
    assert all(psutil.pid_exists(p) for p in sleepers + workers)
    loader.close()
    assert _gone(sleepers + workers, timeout=GONE_WITHIN)
    loader.close()  # idempotent
    with pytest.raises(LoaderClosedError, match="closed"):
        iter(loader)


def test_garbage_collection_closes_the_pool():
    loader = DataLoader(Plain(4), batch_size=2, num_workers=2,
                        multiprocessing_context="forkserver")  # fmt: skip
    next(iter(loader))
    workers = loader._pool.worker_pids
    del loader
    gc.collect()
    assert _gone(workers, timeout=GONE_WITHIN)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_loader_and_iterator_dropped_mid_epoch_go_with_their_last_reference(persistent):
    """Without the cycle collector: a persistent iterator is the loader's, and
    during an epoch it holds the loader."""
    loader = DataLoader(Plain(64), batch_size=4, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context="forkserver")  # fmt: skip
    it = iter(loader)
    next(it)
    workers = loader._pool.worker_pids
    gc.disable()
    try:
        del loader, it
        assert _gone(workers, timeout=GONE_WITHIN)
    finally:
        gc.enable()


def test_a_persistent_loader_keeps_its_workers_and_iterator_across_epochs_and_breaks():
    with DataLoader(Plain(16), batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert len(list(loader)) == 4
        iterator, workers = loader._iterator, loader._pool.worker_pids
        assert [b.tolist() for b in loader] == [[4 * k + j for j in range(4)] for k in range(4)]
        assert loader._iterator is iterator  # torch's: one iterator, reset each epoch
        for _ in loader:
            break  # the loop's iterator is dropped mid-epoch; the workers stay
        gc.collect()
        again = [b.tolist() for b in loader]
        assert again[0] == [0, 1, 2, 3] and len(again) == 4
        assert loader._pool.worker_pids == workers


def test_context_manager_closes():
    with DataLoader(Plain(4), num_workers=1, multiprocessing_context="forkserver") as loader:
        next(iter(loader))
        workers = loader._pool.worker_pids
    assert _gone(workers, timeout=GONE_WITHIN)


@pytest.mark.parametrize("persistent", [False, True])
def test_a_closed_loader_refuses_a_new_epoch(persistent):
    """Also a persistent one, which torch's __iter__ resets rather than replaces:
    it must not start a new pool behind close()."""
    loader = DataLoader(Plain(4), batch_size=2, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context="forkserver")  # fmt: skip
    assert len(list(loader)) == 2
    loader.close()
    with pytest.raises(LoaderClosedError, match="was closed"):
        iter(loader)
    assert loader._pool is None
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.name() == "pl-template"]  # fmt: skip


def test_closing_the_loader_mid_epoch_stops_the_loop_with_an_error():
    """As from a signal handler or another thread: the loop must not end as if the
    epoch were done, and the state still says where it stopped."""
    loader = DataLoader(Plain(20), batch_size=2, num_workers=2,
                        multiprocessing_context="forkserver")  # fmt: skip
    seen = []
    with pytest.raises(LoaderClosedError, match="closed during epoch 0, after 3 of its batches"):
        for batch in loader:
            seen.append(batch)
            if len(seen) == 3:
                loader.close()
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["in_epoch"]["yielded"] == 3
    with DataLoader(Plain(20), batch_size=2) as again:
        again.load_state_dict(state)
        rest = list(again)
    assert [int(x) for b in seen + rest for x in b] == list(range(20))


def test_an_iterator_closed_mid_epoch_leaves_the_epoch_unfinished():
    with DataLoader(Plain(20), batch_size=2, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        next(iterator)
        iterator.close()
        assert list(iterator) == []
        assert loader.state_dict()["in_epoch"]["yielded"] == 1


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    # As started from a terminal: a shell that runs the tests in the background
    # ignores SIGINT, and every process it starts would inherit that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from _datasets import SpawnsSleeper, Plain
    from poolloader import DataLoader

    if __name__ == "__main__":
        loader = DataLoader({dataset}, batch_size=None, num_workers=2,
                            multiprocessing_context={context!r})
        it = iter(loader)
        first = next(it)
        template = [loader._pool.template_pid] if loader._pool.template_pid else []
        print("WORKERS", *loader._pool.worker_pids, *template, flush=True)
        print("FIRST", first, flush=True)
        {ending}
    """
)


def _run_script(
    dataset: str, ending: str, context: str = "spawn"
) -> tuple[subprocess.Popen, list[int], int]:
    """The script's process, its workers' and template's pids, and its first item."""
    code = SCRIPT.format(tests=TESTS, dataset=dataset, ending=ending, context=context)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()[1:]]
    first = int(proc.stdout.readline().split()[1])
    return proc, workers, first


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_workers_exit_when_the_main_process_is_killed(context):
    """The template too: a fork-started one inherits the main process's end of its
    connection, and must close it to see the main process die."""
    proc, workers, sleeper = _run_script("SpawnsSleeper()", "os.kill(os.getpid(), 9)", context)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert _gone([*workers, sleeper], timeout=GONE_WITHIN), (
        "workers or their children outlived main"
    )


KILLED_WHILE_STARTING = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from _datasets import SlowToUnpickle
    from poolloader import DataLoader

    if __name__ == "__main__":
        loader = DataLoader(SlowToUnpickle(8, seconds=3.0), batch_size=4, num_workers=2,
                            multiprocessing_context="spawn")
        iter(loader)  # the template starts; the dataset's pickle is on its way to it
        time.sleep(1.0)
        os.kill(os.getpid(), 9)  # before the template has the dataset unpickled
    """
)


def test_a_main_process_killed_while_the_template_starts_leaves_it_quiet():
    """The template finds the main process gone when it reports its start: it
    exits without a traceback on the terminal it shares with the main process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_STARTING.format(tests=TESTS)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The streams end once every process holding them has: the template too.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "Traceback" not in err, err


def test_processes_a_dataset_pool_forks_after_the_main_process_dies_end_too():
    """A worker's own fork-context Pool forks replacements for the processes the
    worker ends on its way out, after it looked for them: all must go. Every
    process of the script carries a mark in its environment to be found by."""
    mark = f"poolloader-test-{os.getpid()}-{time.monotonic_ns()}"
    code = SCRIPT.format(tests=TESTS, dataset="KeepsForkPool()",
                         ending="os.kill(os.getpid(), 9)", context="spawn")  # fmt: skip
    code = code.replace("import SpawnsSleeper, Plain", "import KeepsForkPool")
    env = {**os.environ, "POOLLOADER_TEST_MARK": mark}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "FIRST 0" in out
    deadline = time.monotonic() + GONE_WITHIN
    while (left := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in left:
        p.kill()
    assert not left, f"processes outlived the main process: {left}"


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("POOLLOADER_TEST_MARK") == mark and p.status() != "zombie":
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_interpreter_exit_without_close_does_not_hang():
    proc, workers, sleeper = _run_script("SpawnsSleeper()", "print('bye')")
    proc.wait(timeout=30)
    assert proc.returncode == 0 and "bye" in proc.stdout.read()
    assert _gone([*workers, sleeper], timeout=GONE_WITHIN)


def test_keyboard_interrupt_in_the_main_process_ends_everything():
    proc, workers, _ = _run_script("Plain(10**6)", "[next(it) for _ in range(10**9)]")
    proc.send_signal(signal.SIGINT)  # while iterating, or just before: the same ending
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode != 0
    assert _gone(workers, timeout=GONE_WITHIN)


INTERRUPTED_CLOSE = textwrap.dedent(
    """
    import os, signal, sys, threading
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from _datasets import Sleepy
    from poolloader import DataLoader

    if __name__ == "__main__":
        with DataLoader(Sleepy(8, slow=2, seconds=300), batch_size=None, num_workers=1,
                        multiprocessing_context="spawn") as loader:
            it = iter(loader)
            next(it)
            print("WORKERS", *loader._pool.worker_pids, flush=True)
            # Ctrl-C pressed again while leaving the block waits for the worker,
            # which is inside a 300 s item.
            threading.Timer(1.0, os.kill, (os.getpid(), {second})).start()
            raise KeyboardInterrupt
    """
)


@pytest.mark.parametrize("second", ["SIGINT", "SIGKILL"])
def test_a_second_ctrl_c_while_the_loader_closes_ends_everything_at_once(second):
    """Or the main process killed then: the worker, told to stop, still watches it."""
    code = INTERRUPTED_CLOSE.format(tests=TESTS, second=f"signal.{second}")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers = [int(p) for p in proc.stdout.readline().split()[1:]]
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert workers and proc.returncode != 0
    if second == "SIGINT":
        assert err.count("KeyboardInterrupt") >= 2
    assert _gone(workers, timeout=GONE_WITHIN)


FORKED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from _datasets import Scaled
    from poolloader import DataLoader

    if __name__ == "__main__":
        loader = DataLoader(Scaled(), batch_size=4, num_workers=2,
                            persistent_workers={persistent}, multiprocessing_context={method!r})
        print("PARENT", sum(int(b.sum()) for b in loader), flush=True)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            loader.dataset.scale = 1000  # the child's copy of the dataset
            print("CHILD", sum(int(b.sum()) for b in loader), flush=True)
            loader.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("STATUS", status, flush=True)
        print("PARENT", sum(int(b.sum()) for b in loader), loader.statistics().restarts,
              flush=True)
        loader.close()
    """
)


@pytest.mark.parametrize(
    "persistent, method", [(True, "spawn"), (False, "spawn"), (False, "forkserver")]
)
def test_a_loader_iterated_in_a_forked_child_starts_its_own_pool(persistent, method):
    """The child's copy of the pool is the parent's: an epoch begun on it sent the
    child's changes to the parent's workers and waited for ever. The parent's
    batches and workers are untouched. With forkserver, the child starts a fork
    server of its own: the parent's is not its child, and multiprocessing's check
    of it failed there (NOTE [ A forked child's fork server ] in _forkserver.py)."""
    code = FORKED_CHILD.format(tests=TESTS, persistent=persistent, method=method)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = done.stdout.split("\n")
    assert lines[:4] == ["PARENT 780", "CHILD 780000", "STATUS 0", "PARENT 780 0"], (
        done.stdout + done.stderr
    )
    assert "died" not in done.stderr


OUTLIVES_ITS_PARENT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from _datasets import Scaled
    from poolloader import DataLoader

    if __name__ == "__main__":
        with DataLoader(Scaled(), batch_size=4, num_workers=2,
                        multiprocessing_context="forkserver") as loader:
            print("PARENT", sum(int(b.sum()) for b in loader), flush=True)
        parent = os.getpid()
        if os.fork() == 0:
            deadline = time.monotonic() + 30
            while os.getppid() == parent and time.monotonic() < deadline:
                time.sleep(0.05)  # until the parent has exited (and cleaned up)
            try:
                with DataLoader(Scaled(), batch_size=4, num_workers=2,
                                multiprocessing_context="forkserver") as loader:
                    print("CHILD", sum(int(b.sum()) for b in loader), flush=True)
            except BaseException as exc:
                print("CHILD FAILED", repr(exc), flush=True)
            os._exit(0)
    """
)


def test_a_forked_child_that_outlives_its_parent_starts_a_fork_server():
    """NOTE [ A forked child's fork server ] in _forkserver.py: the child's server
    socket went in the parent's temporary directory, which the parent removes when
    it exits: the child's loader failed with FileNotFoundError."""
    code = OUTLIVES_ITS_PARENT.format(tests=TESTS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.split("\n")[:2] == ["PARENT 780", "CHILD 780"], done.stdout + done.stderr


ASKS_FOR_A_PRELOAD = textwrap.dedent(
    """
    import multiprocessing, sys
    sys.path.insert(0, {tests!r})
    from _datasets import Scaled
    from poolloader import DataLoader

    def preloaded(_):
        return "colorsys" in sys.modules

    if __name__ == "__main__":
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["colorsys"])
        with DataLoader(Scaled(), batch_size=4, num_workers=1,
                        multiprocessing_context=context) as loader:
            print("LOADER", sum(int(b.sum()) for b in loader), flush=True)
        with context.Pool(1) as pool:
            print("PRELOADED", pool.map(preloaded, [0]), flush=True)
    """
)


def test_a_scripts_own_fork_server_preload_is_kept(tmp_path):
    """poolloader adds what its fork server must preload to the script's own list
    (``set_forkserver_preload``); it replaced it, and the server started without
    what the script asked for."""
    script = tmp_path / "asks_for_a_preload.py"  # (the pool's function is found there)
    script.write_text(ASKS_FOR_A_PRELOAD.format(tests=TESTS))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.split("\n")[:2] == ["LOADER 780", "PRELOADED [True]"], (
        done.stdout + done.stderr
    )


COLLECTOR_STATE = textwrap.dedent(
    """
    import gc, multiprocessing, sys
    sys.path.insert(0, {tests!r})
    import torch
    import poolloader
    from torch.utils.data import Dataset

    class State(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor([int(gc.isenabled()), gc.get_freeze_count()])

    def report(queue):
        queue.put([int(gc.isenabled()), gc.get_freeze_count()])

    if __name__ == "__main__":
        print("main", int(gc.isenabled()), gc.get_freeze_count(), flush=True)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=report, args=(queue,))
        child.start()
        print("child", *queue.get(timeout=60), flush=True)
        child.join()
        for method in ("spawn", "forkserver", "fork"):
            with poolloader.DataLoader(State(), batch_size=None, num_workers=1,
                                       multiprocessing_context=method) as loader:
                print(method, *next(iter(loader)).tolist(), flush=True)
    """
)


def test_the_collector_is_held_only_while_a_started_process_imports(tmp_path):
    """A fork server and a spawned process import poolloader (and torch) with the
    garbage collector held, and the fork server freezes what it imported (NOTE
    [ Imports without the collector ] in _startup.py); every process ends up with
    the collector running, the user's own process and the processes it starts
    for itself with nothing frozen."""
    script = tmp_path / "collector_state.py"  # (spawn's children import it)
    script.write_text(COLLECTOR_STATE.format(tests=TESTS))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    found = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in done.stdout.split("\n")
             if line}  # fmt: skip
    assert set(found) == {"main", "child", "spawn", "forkserver", "fork"}, done.stdout + done.stderr
    assert all(enabled == 1 for enabled, _ in found.values()), found
    assert found["main"][1] == 0 and found["child"][1] == 0, found
    # A worker's template freezes its objects before it forks the worker; a
    # forkserver worker's also has what the server froze: its garbage included.
    assert found["forkserver"][1] > found["spawn"][1] > 0, found


def test_close_from_another_thread_while_the_pool_starts_ends_the_epoch():
    """close() (a signal handler's, another thread's) that lands while the first
    epoch starts its pool found no pool yet: the epoch ran on, workers and all."""
    from _datasets import SlowToPickle

    loader = DataLoader(SlowToPickle(40, seconds=1.5), batch_size=4, num_workers=2,
                        multiprocessing_context="forkserver")  # fmt: skip
    outcome = []

    def consume():
        try:
            outcome.append(len(list(loader)))
        except LoaderClosedError as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.5)  # the main process is pickling the dataset for the template
    loader.close()
    consumer.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], LoaderClosedError), outcome
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.name() in ("pl-template", "python") and p.status() != "zombie"
                and "resource_tracker" not in " ".join(p.cmdline())
                and "forkserver" not in " ".join(p.cmdline())]  # fmt: skip


SIGTERM_HANDLER = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from _datasets import Sleepy
    from poolloader import DataLoader

    if __name__ == "__main__":
        loader = DataLoader(Sleepy(400, slow=-1), batch_size=4, num_workers=2,
                            multiprocessing_context="fork")

        def on_sigterm(signum, frame):  # preemption: save, then leave
            print("HANDLER", os.getpid(), flush=True)
            os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        print("MAIN", os.getpid(), flush=True)
        for k, batch in enumerate(loader):
            if k == 5:
                os.killpg(os.getpgrp(), signal.SIGTERM)  # as a job scheduler does
                time.sleep(2)
    """
)


def test_a_fork_template_does_not_run_the_users_signal_handlers():
    """A fork-started template inherited the main process's SIGTERM handler and ran
    it on a signal to the process group (writing a second, stale checkpoint)."""
    code = SIGTERM_HANDLER.format(tests=TESTS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, start_new_session=True)  # fmt: skip
    lines = done.stdout.split()
    main = lines[lines.index("MAIN") + 1]
    handlers = [lines[i + 1] for i, word in enumerate(lines) if word == "HANDLER"]
    assert handlers == [main], done.stdout + done.stderr


def test_a_killed_worker_is_replaced_and_nothing_is_lost():
    with DataLoader(Plain(40), batch_size=2, num_workers=2, collate_fn=_slow_sum,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        got = []
        for i, batch in enumerate(loader):
            got.append(batch)
            if i == 3:
                os.kill(loader._pool.worker_pids[0], signal.SIGKILL)
        assert got == [4 * k + 1 for k in range(20)]
        assert loader.statistics().restarts == 1


def _slow_sum(batch):
    time.sleep(0.02)
    return sum(batch)


def test_worker_pids_are_real_children():
    with DataLoader(Plain(4), batch_size=None, num_workers=2, collate_fn=pid_of_worker,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        seen = set(loader)
        assert seen <= set(loader._pool.worker_pids)


WAITS_AT_TOP_LEVEL = textwrap.dedent(
    """
    import logging, os, sys, time
    import poolloader._template
    from poolloader import DataLoader

    if __name__ == "__mp_main__":  # spawn's import of this script, in the template
        print("TEMPLATE", os.getpid(), flush=True)
        time.sleep(600)  # as init_process_group waits for ranks that never come

    if __name__ == "__main__":
        logging.basicConfig(format="%(message)s")
        poolloader._template.TEMPLATE_SLOW_START = 1.0
        loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, timeout=6)
        try:
            list(loader)
        except Exception as exc:
            print("RAISED", type(exc).__name__, flush=True)
        loader.close()
        print("CLOSED", flush=True)
    """
)


def test_a_template_stuck_in_the_scripts_top_level_is_named_and_closed(tmp_path):
    """A script whose top level waits for ever outside the main guard (torchrun's
    init_process_group): spawn's template runs it and never starts. The loader says
    so, naming the fix, rather than wait in silence; close() ends the template."""
    script = tmp_path / "waits_at_top_level.py"
    script.write_text(WAITS_AT_TOP_LEVEL)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["RAISED LoaderTimeoutError", "CLOSED"], done.stdout + done.stderr
    assert "has not started after 1 s" in done.stderr
    assert "outside `if __name__ == '__main__':`" in done.stderr
    (template,) = [int(line.split()[1]) for line in lines if line.startswith("TEMPLATE")]
    assert _gone([template]), "the stuck template outlived close()"
