"""How the dataset reaches the template process workers are forked from: pickled
once in the main process and sent in parts that the template unpickles as they
arrive (NOTE [ Templates ] in ``poolloader/_template.py``)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest
import torch
from _faults import Carrying, ErrorAtUnpickle, ExitAtUnpickle
from _procs import descendant_pids, fault_loader, wait_until
from torch.utils.data import Dataset

from poolloader import DataLoader
from poolloader._template_process import DATASET_PART, _Incoming, _MainGone
from poolloader.errors import WorkerStartError

# ------------------------------------------------------------ the reading end


_reached = threading.Event()


def _mark_reached() -> str:
    _reached.set()
    return "marker"


class Marker:
    """Unpickling it sets ``_reached``: the reader got this far in the stream."""

    def __reduce__(self) -> Any:
        return _mark_reached, ()


def _send_in_parts(conn: Any, data: bytes, sizes: list[int], before_rest: Any = None) -> None:
    """Send ``data`` in parts of ``sizes`` bytes (the last part takes the rest),
    then the empty part; ``before_rest()`` runs after the first part."""
    start = 0
    for i, size in enumerate([*sizes, len(data)]):
        conn.send_bytes(data[start : start + size])
        start += size
        if i == 0 and before_rest is not None:
            before_rest()
        if start >= len(data):
            break
    conn.send_bytes(b"")


def test_unpickling_begins_before_the_last_part_arrives():
    """The sender holds back everything after the first part (the pickle's first
    frame and more) until the reader has unpickled an object in it: a reader that
    waited for the whole pickle would not get there."""
    _reached.clear()
    obj = [Marker(), list(range(300_000)), {"tail": b"x" * 100_000}]
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(data) > 5 * 200_000
    reader, writer = Pipe(duplex=False)
    in_time: list[bool] = []  # whether the marker was reached while the rest was held back
    sender = threading.Thread(
        target=_send_in_parts,
        args=(writer, data, [200_000], lambda: in_time.append(_reached.wait(10))),
    )
    sender.start()
    try:
        got = pickle.load(_Incoming(reader))
    finally:
        sender.join()
        reader.close()
        writer.close()
    assert in_time == [True]
    assert got == ["marker", list(range(300_000)), {"tail": b"x" * 100_000}]


@pytest.mark.parametrize(
    "sizes", [[1], [7, 3, 1], [65_536 + 17]], ids=["bytewise", "ragged", "frame"]
)
def test_reads_across_parts_of_any_size(sizes):
    """read, readinto and readline each continue across part boundaries, and reading
    all that is left stops at the empty part that ends the stream."""
    body = bytes(range(11, 256))  # no newline in it
    data = b"first line\nsecond" + body * 400 + b"\nrest"
    reader, writer = Pipe(duplex=False)
    sender = threading.Thread(target=_send_in_parts, args=(writer, data, sizes * 20))
    sender.start()
    incoming = _Incoming(reader)
    try:
        assert incoming.readline() == b"first line\n"
        assert incoming.read(6) == b"second"
        into = bytearray(len(body) * 200)
        assert incoming.readinto(into) == len(into)
        assert bytes(into) == body * 200
        assert incoming.readline() == body * 200 + b"\n"
        assert incoming.read() == b"rest"
        assert incoming.read() == b""
        assert incoming.read(10) == b""
    finally:
        sender.join()
        reader.close()
        writer.close()


def test_a_sender_that_goes_away_mid_stream_is_told_apart():
    """The main process gone before the last part: the template exits quietly
    instead of reporting a broken pickle to nobody."""
    data = pickle.dumps(list(range(100_000)), protocol=pickle.HIGHEST_PROTOCOL)
    reader, writer = Pipe(duplex=False)
    writer.send_bytes(data[:1000])
    writer.close()
    with pytest.raises(_MainGone):
        pickle.load(_Incoming(reader))
    reader.close()


# ------------------------------------------------------------ through a loader


class ManyParts(Dataset):
    """Records and a blob whose pickle spans several of the template's parts."""

    def __init__(self, n: int = 40_000) -> None:
        self.records = [
            {"id": i, "path": f"/data/{i:07d}.flac", "dur": i % 97 / 8} for i in range(n)
        ]
        self.blob = bytes(range(256)) * (3 * DATASET_PART // 256)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, float, int]:
        record = self.records[i]
        return record["id"], record["dur"], self.blob[(i * 7919) % len(self.blob)]


def _touch(path: str) -> str:
    Path(path).touch()
    return "unpickled"


class TouchWhenUnpickled:
    """Unpickling it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> Any:
        return _touch, (self.path,)


class PickledOnceTouched:
    """Pickling it waits until the file ``path`` exists, and fails if it never does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        deadline = time.monotonic() + 20
        while not self.path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} was never created: nothing unpickled it")
            time.sleep(0.01)
        return str, ("pickled",)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_the_template_unpickles_the_dataset_while_the_main_process_pickles_it(
    start_method, tmp_path
):
    """The pickle goes to the template as it is made: the dataset's last part only
    pickles once the template has unpickled its first (a first part and more: the
    blob fills one). A template that waited for the whole pickle would never
    unpickle the first, and the main process would give up pickling the last."""
    flag = tmp_path / "unpickled"
    parts = [TouchWhenUnpickled(flag), b"\0" * (DATASET_PART + 1), PickledOnceTouched(flag)]
    with fault_loader(Carrying(parts), start_method, batch_size=2) as loader:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert flag.exists()


FORKSERVER_FIRST = """
import multiprocessing.forkserver, torch
from poolloader import DataLoader

class Probe(torch.utils.data.Dataset):
    seen = []  # whether the fork server was running, at each pickling of the dataset
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return i
    def __reduce__(self):
        Probe.seen.append(multiprocessing.forkserver._forkserver._forkserver_pid is not None)
        return Probe, ()

if __name__ == "__main__":
    with DataLoader(Probe(), batch_size=2, num_workers=1,
                    multiprocessing_context="forkserver") as loader:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
    print(Probe.seen[0])
"""


def test_the_fork_server_starts_before_the_dataset_is_pickled(tmp_path):
    """The first forkserver loader of a process starts the server before it
    pickles the dataset, not on a thread that waits for the pickler's turns: the
    server imports torch meanwhile. (A fresh interpreter: in this one the server
    may run already.)"""
    script = tmp_path / "first_forkserver.py"
    script.write_text(FORKSERVER_FIRST)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_a_dataset_found_to_need_inheritance_after_parts_went_ahead_still_arrives():
    """A ``multiprocessing`` lock behind more than a part of other data: the parts
    already sent are thrown away with the template that got them, and the dataset
    travels in a new template's arguments instead. Nothing of the first template
    is left."""
    before = descendant_pids()
    lock = multiprocessing.get_context("forkserver").Lock()
    dataset = Carrying([b"\0" * (2 * DATASET_PART), lock])
    with fault_loader(dataset, batch_size=2) as loader:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    wait_until(lambda: descendant_pids() <= before)


def test_a_dataset_of_many_parts_arrives_whole(start_method):
    dataset = ManyParts()
    assert len(pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)) > 2 * DATASET_PART

    def shuffled():
        return torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(3))

    want = list(torch.utils.data.DataLoader(dataset, batch_size=500, sampler=shuffled()))
    with DataLoader(dataset, batch_size=500, sampler=shuffled(), num_workers=2,
                    multiprocessing_context=start_method) as loader:  # fmt: skip
        got = list(loader)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@pytest.mark.parametrize("payload, cause", [(ErrorAtUnpickle(), "the saved state is corrupt"),
                                            (ExitAtUnpickle(), "exited while starting")],
                         ids=["raises", "exits"])  # fmt: skip
def test_a_template_failing_in_the_first_part_does_not_stall_the_rest(payload, cause):
    """The template fails on the first part while the main process still sends the
    others: the start fails with the template's reason, nothing is left running,
    and the loader works once the dataset is fixed."""
    before = descendant_pids()
    dataset = Carrying([payload, b"\0" * (3 * DATASET_PART)])
    loader = fault_loader(dataset, batch_size=2)
    try:
        with pytest.raises(WorkerStartError, match=cause):
            next(iter(loader))
        wait_until(lambda: descendant_pids() <= before)
        dataset.payload = None
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    finally:
        loader.close()


def _slow_to_unpickle(seconds: float) -> None:
    time.sleep(seconds)


class SlowToUnpickle:
    """Unpickling it takes ``seconds``: the main process is still sending what
    follows it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> Any:
        return _slow_to_unpickle, (self.seconds,)


class InterruptedWhileSent(Dataset):
    """Items ``0..7``; pickled the second time (the main process's fingerprint, taken
    while the first pickle travels) it raises KeyboardInterrupt, as a Ctrl-C then
    would."""

    pickled = 0

    def __init__(self) -> None:
        self.parts = [SlowToUnpickle(60.0), b"\0" * (3 * DATASET_PART)]

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return i

    def __reduce_ex__(self, protocol: Any) -> Any:
        InterruptedWhileSent.pickled += 1
        if InterruptedWhileSent.pickled == 2:
            raise KeyboardInterrupt
        return super().__reduce_ex__(protocol)


def test_an_interrupt_while_the_dataset_travels_leaves_nothing_behind():
    """Ctrl-C in the main process while the template still receives the dataset:
    the interrupt reaches the caller at once, the template is ended (here it would
    not read the rest of the dataset for a minute), and the next epoch starts
    afresh."""
    before = descendant_pids()
    InterruptedWhileSent.pickled = 0
    loader = fault_loader(InterruptedWhileSent(), batch_size=2)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            next(iter(loader))
        assert time.monotonic() - started < 20
        wait_until(lambda: descendant_pids() <= before)
        loader.dataset.parts = []
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    finally:
        loader.close()


# ------------------------------------------------------------ the fork server's main module

COUNTS_ITS_RUNS = """
import os
import sys

with open(os.environ["MAIN_RUNS"], "a") as runs:
    runs.write(f"{{os.getpid()}} {{sys.argv[1:]}} {{os.getcwd()}}\\n")
sys.path.insert(0, {tests!r})
from _datasets import Plain
from poolloader import DataLoader

if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    for _ in range(3):
        with DataLoader(Plain(8), batch_size=2, num_workers=2,
                        multiprocessing_context="forkserver") as loader:
            assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    print("ok")
"""


def test_forkserver_loaders_run_the_main_script_once_not_once_per_loader(tmp_path):
    """NOTE [ The fork server's __main__ ]: the fork server imports the script once,
    with its arguments and working directory; each loader's template, forked from
    it, finds it there. Python 3.11's server never did, so every new loader's
    template ran the script again and paid for all it imports."""
    script = tmp_path / "counts_its_runs.py"
    runs = tmp_path / "runs"
    script.write_text(COUNTS_ITS_RUNS.format(tests=str(Path(__file__).resolve().parent)))
    done = subprocess.run(
        [sys.executable, str(script), "--flag"],
        env={**os.environ, "MAIN_RUNS": str(runs)},
        capture_output=True, text=True, timeout=180, cwd="/",
    )  # fmt: skip
    assert done.stdout.strip() == "ok", done.stdout + done.stderr
    lines = runs.read_text().splitlines()
    assert len(lines) == 2, lines  # the script itself, then the fork server
    main, server = (line.split(" ", 1)[1] for line in lines)
    assert main == "['--flag'] /", lines
    assert server == f"['--flag'] {tmp_path}", lines  # its directory once the server starts


STARTS_A_THREAD = """
import sys
import threading

threading.Thread(target=threading.Event().wait, name="top-level-waiter", daemon=True).start()
sys.path.insert(0, {tests!r})
from _datasets import Plain
from poolloader import DataLoader

if __name__ == "__main__":
    with DataLoader(Plain(4), batch_size=2, num_workers=2,
                    multiprocessing_context="forkserver") as loader:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
    print("ok")
"""


def test_a_script_whose_top_level_starts_a_thread_is_told_to_guard_it(tmp_path):
    """The fork server runs the script's top level once; a thread it starts does
    not exist in the processes forked from it (the template's own check cannot
    see it there), so the server says so and names the fix."""
    script = tmp_path / "starts_a_thread.py"
    script.write_text(STARTS_A_THREAD.format(tests=str(Path(__file__).resolve().parent)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "in the fork server started threads (top-level-waiter)" in done.stderr, done.stderr
    assert "under `if __name__ == '__main__':`" in done.stderr
