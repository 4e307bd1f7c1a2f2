"""A catalogue of faults: small objects that each break a loader in one precise way.

Everything here lives at module level, so spawn and forkserver workers import
it by name (``from _faults import ...``; ``tests/`` is on ``sys.path``).

=========================  =========================  ======================================
fault                      where it strikes           what the user should see
=========================  =========================  ======================================
``CrashAtPickle``          main process, ``iter()``   ``NotPicklableError`` naming the attribute
``ErrorAtUnpickle``        worker, while starting     ``WorkerStartError`` naming the cause
``ExitAtUnpickle``         worker, while starting     ``WorkerStartError`` with the exit code
``SegfaultAtUnpickle``     worker, while starting     ``WorkerStartError`` naming SIGSEGV
``Faulty("raise")``        worker, ``__getitem__``    the dataset's own exception; loader goes on
``Faulty("exit")``         worker, ``__getitem__``    ``os._exit(7)``: replaced, batch run again
``Faulty("sigkill")``      worker, ``__getitem__``    SIGKILL, as the out-of-memory killer sends
``Faulty("segfault")``     worker, ``__getitem__``    SIGSEGV in native code (``string_at(0)``)
``Faulty("hang")``         worker, ``__getitem__``    sleeps forever: only ``timeout`` ends it
``Faulty("grandchild")``   worker, ``__getitem__``    starts a process of its own, then goes on
``Faulty("orphan")``       worker, ``__getitem__``    starts a grandchild, then SIGKILLs itself
``Faulty("before_descriptor")`` worker, after a batch  forks a helper, SIGKILLed between a
                                                     batch in a new slab and its descriptor
``Faulty("huge")``         worker, ``__getitem__``    an item over ``max_batch_bytes``
``Faulty("deaf")``         worker, its next message   its message thread fails: replaced
``FaultyStream``           worker, ``__iter__``       a deadly fault mid-shard: the epoch ends
``OpaqueItems``            worker, collate            torch's ``default_collate`` TypeError
``collate_bad_result``     worker / main, transport   a batch that cannot travel home
``slow_start``             worker_init_fn             a worker alive but not ready for 1 s
=========================  =========================  ======================================

A :class:`Faulty` fault is aimed by a :class:`Trigger`: the indices at which it
strikes, and whether it strikes *once* (a marker file created with ``O_EXCL``
in a directory the test owns, so "once" holds across the worker that died and
the worker that replaced it) or *always* (a poison item, which kills every
worker that loads it).

Workers leave notes for the test in the same directory (``where``), so tests
need no loader internals: ``victim-<pid>`` before a deadly fault strikes,
``grandchild-<pid>`` for each process a fault starts, and, with
``mark_starts``, ``started-<i>`` holding the pid of the worker that began item
``i``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import functools
import os
import pickle
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

#: Floats in each item's tensor: 16 KiB, so a batch of two or more items is
#: over the transport's inline limit (32 KiB) and travels through a slab.
ITEM_FLOATS = 4096
#: Floats in a ``"huge"`` item: 4 MiB.
HUGE_FLOATS = 1 << 20
#: Exit code of the ``"exit"`` fault: distinctive, so messages can be checked.
EXIT_CODE = 7
#: The command of a grandchild: lives far longer than any test if nobody ends it.
GRANDCHILD = ["sleep", "300"]


class CorruptItemError(ValueError):
    """The dataset's own exception type: it must come back as itself, not wrapped."""


class CorruptStateError(RuntimeError):
    """Raised while unpickling an :class:`ErrorAtUnpickle`."""


# ------------------------------------------------------------------ triggers


@dataclass(frozen=True)
class Trigger:
    """Which items a fault strikes, and whether once or every time.

    Attributes:
        indices: Dataset indices at which the fault strikes.
        marker_dir: ``None``: strike every time (a poison item). A directory:
            strike once per index, in whichever process gets there first; the
            marker file ``fired-<index>`` records that it has.
    """

    indices: tuple[int, ...]
    marker_dir: str | None = None

    def fires(self, index: int) -> bool:
        """Whether the fault strikes now, at ``index`` (claiming the marker if once)."""
        if index not in self.indices:
            return False
        if self.marker_dir is None:
            return True
        try:
            fd = os.open(self._marker(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def fired(self) -> list[int]:
        """The indices at which a once-trigger has struck so far."""
        return sorted(i for i in self.indices if os.path.exists(self._marker(i)))

    def _marker(self, index: int) -> str:
        if self.marker_dir is None:
            raise ValueError("an always-trigger keeps no markers")
        return os.path.join(self.marker_dir, f"fired-{index}")


def once(marker_dir: str | Path, *indices: int) -> Trigger:
    """A trigger that strikes at each of ``indices`` exactly once, across processes."""
    return Trigger(tuple(indices), str(marker_dir))


def always(*indices: int) -> Trigger:
    """A trigger that strikes at each of ``indices`` every time (poison items)."""
    return Trigger(tuple(indices), None)


NEVER = Trigger(())


@dataclass(frozen=True)
class AnyOf:
    """Strikes where any of its triggers does (a one-off fault beside a poison item)."""

    triggers: tuple[Trigger, ...]

    def fires(self, index: int) -> bool:
        return any(trigger.fires(index) for trigger in self.triggers)


# ------------------------------------------------------------------ notes for the test


def record_pid(where: str | Path, kind: str, pid: int) -> None:
    """Leave ``<kind>-<pid>`` in directory ``where`` for the test to find."""
    Path(where, f"{kind}-{pid}").touch()


def recorded_pids(where: str | Path, kind: str) -> list[int]:
    """The pids :func:`record_pid` left in ``where`` under ``kind``."""
    return sorted(int(p.name.split("-", 1)[1]) for p in Path(where).glob(f"{kind}-*"))


def started_by(where: str | Path, index: int) -> int | None:
    """The pid of the worker that began item ``index`` (``mark_starts``), or ``None`` yet."""
    try:
        text = Path(where, f"started-{index}").read_text()
    except FileNotFoundError:
        return None
    return int(text) if text else None


# ------------------------------------------------------------------ faults in __getitem__


def raise_error(index: int, where: str) -> None:
    """The dataset raises its own exception type: not a crash, nothing to restart."""
    raise CorruptItemError(f"item {index} is corrupt")


def exit_now(index: int, where: str) -> None:
    """The worker leaves at once with :data:`EXIT_CODE`, skipping every cleanup."""
    os._exit(EXIT_CODE)


def exit_as_deafened(index: int, where: str) -> None:
    """The worker leaves with the exit code poolloader's own worker uses when its
    message thread fails (4), for reasons of the dataset's own."""
    os._exit(4)


def kill_self(index: int, where: str) -> None:
    """SIGKILL to itself: what the kernel's out-of-memory killer sends."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: the signal is delivered before kill() returns


def segfault(index: int, where: str) -> None:
    """A crash in native code: read address 0."""
    faulthandler.disable()  # no Python traceback dump: the exit code says enough
    ctypes.string_at(0)


def hang(index: int, where: str) -> None:
    """Never return, like a decoder deadlocked or a network read without a timeout."""
    while True:
        time.sleep(3600)


def start_grandchild(index: int, where: str) -> None:
    """Start a long-lived grandchild process, record its pid, and load the item normally."""
    child = subprocess.Popen(GRANDCHILD)
    record_pid(where, "grandchild", child.pid)


def orphan_then_die(index: int, where: str) -> None:
    """Start a grandchild, then die by SIGKILL: the grandchild is orphaned unless
    the loader reaps the whole tree of the worker that died."""
    start_grandchild(index, where)
    kill_self(index, where)


def die_before_descriptor(index: int, where: str) -> None:
    """Fork a helper process (it keeps every descriptor of the worker, its
    connection to the main process among them, as a ``multiprocessing`` pool's
    fork workers do), then die by SIGKILL once the worker has sent the ``Done`` of
    a batch in a new slab and not yet the slab's descriptor, which follows it."""
    from poolloader import _packing

    helper = os.fork()
    if helper == 0:
        try:
            time.sleep(300)
        finally:
            os._exit(0)
    record_pid(where, "helper", helper)
    send = _packing.SlabPacker.after_send

    def after_send(packer: Any, payload: Any) -> None:
        if isinstance(payload, _packing.InSlab) and payload.new_size:
            os.kill(os.getpid(), signal.SIGKILL)
        send(packer, payload)

    _packing.SlabPacker.after_send = after_send  # type: ignore[method-assign]


def huge(index: int, where: str) -> None:
    """Marks the item as huge; :meth:`Faulty.__getitem__` makes it :data:`HUGE_FLOATS` long."""


def deafen(index: int, where: str) -> None:
    """The worker's thread that reads the main process's messages fails at the next
    one (a stand-in for any failure there); the item itself loads normally."""
    from poolloader import _worker

    def failing_decode(data: bytes) -> Any:
        raise RuntimeError("the worker's message thread failed (injected)")

    _worker.decode = failing_decode  # type: ignore[assignment]
    record_pid(where, "victim", os.getpid())


def _no_fault(index: int, where: str) -> None:
    pass


FAULTS: dict[str, Callable[[int, str], None]] = {
    "none": _no_fault,
    "raise": raise_error,
    "exit": exit_now,
    "sigkill": kill_self,
    "segfault": segfault,
    "hang": hang,
    "grandchild": start_grandchild,
    "orphan": orphan_then_die,
    "huge": huge,
    "before_descriptor": die_before_descriptor,
    "deaf": deafen,
    "exit4": exit_as_deafened,
}

#: Faults that end the worker process, and how each reads in an exit description.
DEADLY = {"exit": f"exit code {EXIT_CODE}", "sigkill": "SIGKILL", "segfault": "SIGSEGV"}
#: Exit codes the deadly faults leave (negative: killed by that signal).
EXIT_CODES = {"exit": EXIT_CODE, "sigkill": -signal.SIGKILL, "segfault": -signal.SIGSEGV}


class Faulty(Dataset):
    """Item ``i`` is ``{"i": i, "x": a 16 KiB float tensor full of i}``, unless the
    fault strikes at ``i``.

    Args:
        n: Number of items; ``__getitem__`` raises ``IndexError`` outside ``range(n)``.
        fault: A key of :data:`FAULTS`.
        trigger: Where and how often the fault strikes.
        where: The directory for notes to the test (see the module docstring).
        delay: Seconds each item takes, so that deaths happen with batches in flight.
        mark_starts: Leave ``started-<i>`` (holding the worker's pid) when item ``i`` begins.
    """

    def __init__(
        self,
        n: int = 24,
        fault: str = "none",
        trigger: Trigger = NEVER,
        *,
        where: str | Path = "",
        delay: float = 0.0,
        mark_starts: bool = False,
    ) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; pick one of {sorted(FAULTS)}")
        self.n, self.fault, self.trigger = n, fault, trigger
        self.where, self.delay, self.mark_starts = str(where), delay, mark_starts

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is out of range for a dataset of {self.n} items")
        if self.mark_starts:
            Path(self.where, f"started-{i}").write_text(str(os.getpid()))
        if self.delay:
            time.sleep(self.delay)
        floats = ITEM_FLOATS
        if self.trigger.fires(i):
            if self.where and (
                self.fault in DEADLY or self.fault in ("hang", "orphan", "before_descriptor")
            ):
                record_pid(self.where, "victim", os.getpid())
            FAULTS[self.fault](i, self.where)
            floats = HUGE_FLOATS if self.fault == "huge" else floats
        return {"i": i, "x": torch.full((floats,), float(i))}

    def healthy(self) -> Faulty:
        """The same items, no fault, no delay: what torch's num_workers=0 loader reads."""
        return Faulty(self.n)


class FaultyStream(IterableDataset):
    """An IterableDataset: each worker yields its share of ``range(n)`` (every
    ``num_workers``-th item), and the fault strikes at the items ``trigger``
    names, in whichever worker yields them. A worker's position in its stream
    dies with it, so a deadly fault ends the epoch with ``WorkerCrashedError``."""

    def __init__(self, n: int, fault: str, trigger: Trigger, *, where: str | Path) -> None:
        self.n, self.fault, self.trigger, self.where = n, fault, trigger, str(where)

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self.n, workers):
            if self.trigger.fires(i):
                record_pid(self.where, "victim", os.getpid())
                FAULTS[self.fault](i, self.where)
            yield {"i": i}


# ------------------------------------------------------------------ faults at (un)pickling


class CrashAtPickle:
    """Refuses to be pickled: a dataset holding it cannot be sent to workers."""

    def __reduce__(self) -> Any:
        raise pickle.PicklingError("CrashAtPickle refuses to be pickled")


def _raise_at_unpickle(message: str) -> None:
    raise CorruptStateError(message)


def _exit_at_unpickle(code: int) -> None:
    os._exit(code)


def _segfault_at_unpickle() -> None:
    segfault(-1, "")


class ErrorAtUnpickle:
    """Pickles; unpickling it raises :class:`CorruptStateError` (in the worker)."""

    def __init__(self, message: str = "the saved state is corrupt") -> None:
        self.message = message

    def __reduce__(self) -> Any:
        return _raise_at_unpickle, (self.message,)


class ExitAtUnpickle:
    """Pickles; unpickling it calls ``os._exit(code)``: a worker that vanishes while
    starting without a word."""

    def __init__(self, code: int = EXIT_CODE) -> None:
        self.code = code

    def __reduce__(self) -> Any:
        return _exit_at_unpickle, (self.code,)


class SegfaultAtUnpickle:
    """Pickles; unpickling it crashes the process with SIGSEGV."""

    def __reduce__(self) -> Any:
        return _segfault_at_unpickle, ()


class Carrying(Dataset):
    """Items ``0..n-1`` with ``payload`` along for the ride (pickled with the dataset)."""

    def __init__(self, payload: Any, n: int = 8) -> None:
        self.payload, self.n = payload, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


# ------------------------------------------------------------------ bad results


class Opaque:
    """An item type that default_collate knows nothing about."""

    def __init__(self, i: int) -> None:
        self.i = i


class OpaqueItems(Dataset):
    """Item ``i`` is ``Opaque(i)``: default_collate refuses it, in torch's words."""

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Opaque:
        return Opaque(i)


def collate_bad_result(kind: str, bad: int) -> Callable[[list[Any]], Any]:
    """A collate_fn (a picklable partial) whose batch cannot travel home when it
    contains item ``bad``; other batches are ``default_collate``'s.

    ``kind``: ``"lock"``, the batch holds a lock and cannot be pickled in the
    worker; ``"unpickle"``, it pickles there but raises
    :class:`CorruptStateError` when the main process unpickles it.
    """
    if kind not in ("lock", "unpickle"):
        raise ValueError(f"kind should be 'lock' or 'unpickle', but got kind={kind!r}")
    return functools.partial(_collate_bad_result, kind, bad)


def _collate_bad_result(kind: str, bad: int, batch: list[Any]) -> Any:
    collated = default_collate(batch)
    if not any(_index_of(item) == bad for item in batch):
        return collated
    if kind == "lock":
        return {"data": collated, "lock": threading.Lock()}
    return {"data": collated, "state": ErrorAtUnpickle("the batch cannot be rebuilt")}


def _index_of(item: Any) -> Any:
    return item["i"] if isinstance(item, dict) else item


# ------------------------------------------------------------------ slow starts


def slow_start(worker_id: int) -> None:
    """A ``worker_init_fn`` that takes a second: a window in which a worker is alive
    but not yet ready."""
    time.sleep(1.0)
