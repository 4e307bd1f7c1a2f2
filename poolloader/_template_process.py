"""What runs inside the template process: it receives the dataset once, then
forks each worker the main process asks for (NOTE [ Templates ] in
``_template.py``, whose :class:`~poolloader._template.Template` is the main
process's side)."""

from __future__ import annotations

import builtins
import gc
import multiprocessing
import os
import pickle
import random
import signal
import sys
import threading
import weakref
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import sendfds
from typing import Any

from . import _proctree, _replay, _worker
from ._messages import (
    Advance,
    Advanced,
    DatasetFollows,
    Exited,
    Forked,
    ForkWorker,
    RemoteError,
    Replace,
    StartFailed,
    Stop,
    TemplateReady,
    TemplateUnsafe,
    Update,
)
from ._packing import descriptor_socket, receive_fd
from ._pickling import DATASET_PART

#: The template's process name (``ps -o comm``, ``top``): a template is told from
#: the workers it forks, which get their name back.
TEMPLATE_NAME = "pl-template"


def template_main(
    setup: _worker.WorkerSetup, conn: Connection, main_ends: tuple[int, ...] = ()
) -> None:
    """The template process's entry point. ``main_ends``: with ``fork``, the
    descriptors of the main process's end of ``conn``, inherited here and closed at
    once: held open, they would hide the main process's death (no end of file on
    ``conn``), and the template would outlive a SIGKILLed main process."""
    for fd in main_ends:
        os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides
    # A fork-started template inherits the main process's Python signal handlers
    # (a preemption handler that saves a checkpoint): they are not its to run.
    for signum in signal.valid_signals():
        try:
            if callable(signal.getsignal(signum)) and signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    own_name = _process_name()
    _set_process_name(TEMPLATE_NAME)
    watch = _OwnStateWatch()
    try:
        with watch:
            setup = replace(
                setup,
                dataset=_receive_dataset(conn, setup.dataset),
                functions=_worker.materialize(setup.functions),
            )
    except _MainGone:
        os._exit(0)  # the main process gave up (its pickling failed) or is gone
    except BaseException as exc:  # every failure is reported home
        _report(conn, StartFailed(-1, os.getpid(), RemoteError.capture(exc)))
        os._exit(1)
    reason = _unsafe_to_fork(watch)
    if reason:
        _report(conn, TemplateUnsafe(reason))
        os._exit(0)
    _report(conn, TemplateReady(os.getpid()))
    _Template(setup, conn, own_name).serve()
    os._exit(0)  # not multiprocessing's exit: it would wait for the workers


def _receive_dataset(conn: Connection, dataset: Any) -> Any:
    """The dataset: unpickled from ``dataset``, or, for :class:`DatasetFollows`,
    from its parts as they arrive on ``conn`` (NOTE [ Templates ])."""
    if not isinstance(dataset, DatasetFollows):
        return _worker.materialize(dataset)
    incoming = _Incoming(conn)
    # The collector is held while a million records unpickle (each full collection
    # would walk all of them again), and they are frozen before it runs again, so
    # that it never walks them (NOTE [ Frozen objects ]).
    enabled = gc.isenabled()
    gc.disable()
    try:
        dataset = pickle.load(incoming)
        incoming.read()  # up to the empty part that ends it
        gc.freeze()
        return dataset
    finally:
        if enabled:
            gc.enable()


class _MainGone(Exception):
    """The main process went away, or gave up, before the dataset arrived."""


class _Incoming:
    """A file to unpickle the dataset from, reading its parts off ``conn`` as they
    arrive, into one buffer used again for each part; an empty part ends it."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._buffer = bytearray(DATASET_PART)
        self._part = memoryview(self._buffer)[:0]
        self._ended = False

    def _next_part(self) -> bool:
        """Read the next part; False once the empty part that ends them was read."""
        if self._ended:
            return False
        try:
            size = self._conn.recv_bytes_into(self._buffer)
        except (EOFError, OSError):
            raise _MainGone from None
        self._ended = size == 0
        self._part = memoryview(self._buffer)[:size]
        return not self._ended

    def _take(self, size: int) -> memoryview:
        taken, self._part = self._part[:size], self._part[size:]
        return taken

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and (self._part or self._next_part()):
            taken = self._take(len(target) - filled)
            target[filled : filled + len(taken)] = taken
            filled += len(taken)
        return filled

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= len(self._part):  # the common case: a pickle frame within a part
            return bytes(self._take(size))
        if size >= 0:  # a big bytes object, across parts: one copy besides the buffer
            buffer = bytearray(size)
            return bytes(memoryview(buffer)[: self.readinto(buffer)])
        rest = bytearray()
        while self._part or self._next_part():
            rest += self._take(len(self._part))
        return bytes(rest)

    def readline(self) -> bytes:
        line = bytearray()
        while self._part or self._next_part():
            end = bytes(self._part).find(b"\n")
            line += self._take(len(self._part) if end < 0 else end + 1)
            if end >= 0:
                break
        return bytes(line)


def _unsafe_to_fork(watch: _OwnStateWatch) -> str:
    """Why forking this process would not be safe now ("" if it would be); ``watch``
    watched the dataset's latest unpickling (or the changes it took)."""
    if threading.active_count() > 1:
        names = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        return f"unpickling the dataset started threads ({', '.join(names)})"
    if multiprocessing.get_start_method(allow_none=True) == "fork":
        return ""  # forked from the main process, as torch's fork workers are: its state
    try:
        import torch

        if torch.cuda.is_initialized():
            return "unpickling the dataset initialised CUDA, which forked processes cannot use"
    except Exception:
        pass
    return watch.reason()


# NOTE [ State of a process's own ]: torch's spawn workers each unpickle the dataset,
# so what its ``__setstate__`` (or a reduce function) makes is each worker's own: a
# file it opens, with its own offset; a generator seeded from the operating system's
# randomness. Workers forked from the template would share one: two workers seeking
# and reading one file read each other's records, and every worker (and every epoch
# with ``persistent_workers=False``) draws the same random numbers. The template
# watches its unpickling for both: descriptors left open (other than shared memory,
# whose mapping forked workers may share) and randomness drawn through ``os.urandom``
# (NumPy's ``default_rng()``, ``SeedSequence()``, ``secrets``, ``uuid4``), or a
# ``random.Random`` seeded from it (``random.Random()``, whose C code reads the
# system's randomness directly: watched as its ``seed(None)``, unless its state is
# then set, as unpickling a pickled one does). Either makes it unsafe to fork:
# each worker unpickles the dataset itself, as in torch.
# What importing a module does meanwhile (the modules the pickle names, imported
# to unpickle it) does not count: a library's import-time state is shared by
# torch's fork workers too, and counted it would cost most datasets the template
# (importing Lightning draws randomness); so does seeding the ``random`` module's
# own generator (``random.seed()``), which each worker seeds afresh. Not seen: a
# torch generator seeded from the system (``torch.Generator().seed()``), in C.

#: Descriptors forked workers may share: shared memory (SharedList's sealed memfds,
#: torch's shared storages) and devices without an offset.
_SHAREABLE = ("/memfd:", "/dev/shm/", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


class _OwnStateWatch:
    """Watches unpickling for state that must be each process's own (NOTE [ State of
    a process's own ]): the descriptors it leaves open, and whether it drew the
    system's randomness."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.drew_randomness = False
        # random.Random objects seeded from the system and given no state since
        self._system_seeded: weakref.WeakSet[random.Random] = weakref.WeakSet()
        self._importing = 0  # depth of imports under way
        self._by_imports: set[tuple[int, str]] = set()  # descriptors imports opened

    def __enter__(self) -> _OwnStateWatch:
        self._before = _descriptors()
        self._saved = os.urandom, random._urandom, builtins.__import__  # type: ignore[attr-defined]
        self._saved_random = random.Random.seed, random.Random.setstate
        real_urandom, real_import = self._saved[0], self._saved[2]
        real_seed, real_setstate = self._saved_random
        own_global = getattr(random, "_inst", None)

        def seed(rng: random.Random, a: Any = None, *args: Any, **kwargs: Any) -> None:
            if a is None and not self._importing and rng is not own_global:
                self._system_seeded.add(rng)
            else:
                self._system_seeded.discard(rng)
            real_seed(rng, a, *args, **kwargs)

        def setstate(rng: random.Random, state: Any) -> None:
            self._system_seeded.discard(rng)  # (a pickled one: made, then given its state)
            real_setstate(rng, state)

        def urandom(size: int) -> bytes:
            if not self._importing:
                self.drew_randomness = True
            return real_urandom(size)

        def import_(name: str, *args: Any, **kwargs: Any) -> Any:
            level = args[3] if len(args) > 3 else kwargs.get("level", 0)
            fromlist = args[2] if len(args) > 2 else kwargs.get("fromlist")
            if self._importing or (
                not level and name in sys.modules and not _loads_submodules(name, fromlist)
            ):
                return real_import(name, *args, **kwargs)  # (inside one; or nothing runs)
            before = _descriptors()
            self._importing += 1
            try:
                return real_import(name, *args, **kwargs)
            finally:
                self._importing -= 1
                self._by_imports |= set(_descriptors().items()) - set(before.items())

        # random._urandom: what SystemRandom (secrets, NumPy's SeedSequence) calls.
        os.urandom = random._urandom = urandom  # type: ignore[attr-defined]
        builtins.__import__ = import_
        random.Random.seed, random.Random.setstate = seed, setstate  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.urandom, random._urandom, builtins.__import__ = self._saved  # type: ignore[attr-defined]
        random.Random.seed, random.Random.setstate = self._saved_random  # type: ignore[method-assign]
        if len(self._system_seeded):
            self.drew_randomness = True
        before = self._before
        for fd, target in sorted(_descriptors().items()):
            if before.get(fd) == target or (fd, target) in self._by_imports:
                continue
            if not target.startswith(_SHAREABLE):
                self.opened.append(f"{target} (descriptor {fd})")

    def reason(self) -> str:
        if self.opened:
            return (
                f"unpickling the dataset opened {', '.join(self.opened)}, which workers "
                "forked from one process would share, with one file offset; opened on "
                "first use in each worker (in __getitem__) instead, it keeps the faster start"
            )
        if self.drew_randomness:
            return (
                "unpickling the dataset drew the system's randomness (np.random."
                "default_rng(), random.Random(), os.urandom), so every worker forked "
                "from one process "
                "would draw the same numbers; a generator made on first use in each "
                "worker, or seeded from torch.initial_seed(), keeps the faster start"
            )
        return ""


def _loads_submodules(name: str, fromlist: Any) -> bool:
    """Whether ``from name import ...`` (``name`` imported already) may import a
    submodule of the package ``name``: an import, whose own doings do not count."""
    if not fromlist or not hasattr(sys.modules[name], "__path__"):
        return False
    return any(item != "*" and f"{name}.{item}" not in sys.modules for item in fromlist)


def _descriptors() -> dict[int, str]:
    """This process's open descriptors and what each is open on (none where /proc is
    missing: not watched). Not the listing's own: it is closed by the time it is
    asked about."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    found = {}
    for name in names:
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


def _send(conn: Connection, message: object) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _report(conn: Connection, message: object) -> None:
    """Send how the start went; a main process gone meanwhile (killed while this
    template started) ends the template quietly, not with a traceback."""
    try:
        _send(conn, message)
    except OSError:
        os._exit(0)


class _Template:
    """The template's state: the materialized setup, the dataset's generation, and
    the workers it forked (by their sentinels)."""

    def __init__(self, setup: _worker.WorkerSetup, conn: Connection, worker_name: str) -> None:
        self.setup = setup
        self.conn = conn
        self.worker_name = worker_name
        self.sock = descriptor_socket(conn)
        self.children: dict[int, Any] = {}
        self.fork = multiprocessing.get_context("fork")
        self.main = (setup.main_pid, setup.main_started)  # the process that owns the loader

    def serve(self) -> None:
        """Fork workers and follow the dataset's changes as the main process asks,
        until it says stop or is gone."""
        try:
            self._serve()
        finally:
            # The process exits next (os._exit): closed here, not by the collector,
            # which under ``python -X dev`` reported it as an unclosed socket.
            self.sock.close()

    def _serve(self) -> None:
        while True:
            # Not only end of file says the main process is gone: a process it
            # forked may hold the connection open after it died.
            ready = wait([self.conn, *self.children], _worker.PARENT_CHECK_INTERVAL)
            if not ready and not _proctree.still_running(*self.main):
                return
            for sentinel in ready:
                if sentinel in self.children:
                    self._reap(self.children.pop(sentinel))
            if self.conn not in ready:
                continue
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the main process is gone; the workers notice it themselves
            if isinstance(message, ForkWorker):
                if not self._fork(message):
                    return
            elif isinstance(message, Advance):
                watch = _OwnStateWatch()
                with watch:
                    self._advance(message.updates)
                reason = _unsafe_to_fork(watch)
                if reason:  # (a new dataset, or a change, made state of a process's own)
                    _report(self.conn, TemplateUnsafe(reason))
                    return
                _send(self.conn, Advanced(message.generation))
            elif isinstance(message, Stop):
                return

    def _fork(self, message: ForkWorker) -> bool:
        """Fork the worker ``message`` asks for; ``False`` if the main process died
        before it sent the worker's connection."""
        fd = receive_fd(self.sock, self.main, _worker.PARENT_CHECK_INTERVAL)
        if fd is None:
            return False
        worker_conn = Connection(fd)
        setup = replace(self.setup, worker_id=message.worker_id, base_seed=message.base_seed)
        process = self.fork.Process(
            target=_forked_worker,
            args=(setup, worker_conn, message.catch_up, self._fds(), self.worker_name),
            name=f"poolloader-worker-{message.worker_id}",
            daemon=False,
        )
        gc.freeze()  # NOTE [ Frozen objects ]
        process.start()
        worker_conn.close()
        pid = int(process.pid or 0)
        # Opened before the child can be reaped (only this loop reaps it), so the
        # pidfd is the child's even if its pid is later recycled.
        pidfd = os.pidfd_open(pid)
        _send(self.conn, Forked(message.worker_id, message.started, pid))
        sendfds(self.sock, [pidfd])
        os.close(pidfd)
        self.children[process.sentinel] = process
        return True

    def _fds(self) -> tuple[int, ...]:
        """The template's own descriptors, which a forked worker closes."""
        return self.conn.fileno(), self.sock.fileno()

    def _advance(self, updates: tuple[Update, ...]) -> None:
        dataset = self.setup.dataset
        for update in updates:
            if isinstance(update, Replace):
                dataset = pickle.loads(update.dataset)
            else:
                _replay.apply_update(dataset, update)
        self.setup = replace(self.setup, dataset=dataset)
        if any(isinstance(update, Replace) for update in updates):
            gc.unfreeze()  # the old copy's cycles, frozen with it, can go now
            gc.collect()

    def _reap(self, process: Any) -> None:
        process.join()
        _send(self.conn, Exited(process.pid, process.exitcode))
        process.close()


def _forked_worker(
    setup: _worker.WorkerSetup,
    conn: Connection,
    catch_up: tuple[Update, ...],
    template_fds: tuple[int, ...],
    name: str,
) -> None:
    # The template's connection to the main process must end with the template:
    # a worker holding a copy would hide each one's death from the other.
    for fd in template_fds:
        os.close(fd)
    _set_process_name(name)
    _worker.run(setup, conn, catch_up)


def _process_name() -> str:
    try:
        with open("/proc/self/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _set_process_name(name: str) -> None:
    """Set this process's name as ``ps -o comm`` shows it (Linux; best effort)."""
    if not name:
        return
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass
