"""Everything that runs inside a worker process.

Spawn pickles the process target by its qualified name, so the entry point
:func:`run` and all it calls live at module level here. A worker:

1. ignores SIGINT (the main process decides what Ctrl-C means), uses one
   intra-op thread, and installs torch's SIGSEGV/SIGBUS reporters;
2. starts an inbox thread that reads the connection to the main process, so
   the main process never blocks on a busy worker, and that notices the main
   process dying (end of file on the connection, or a new parent pid);
3. unpickles the dataset, ``collate_fn`` and ``worker_init_fn`` it was given
   once, sets :func:`get_worker_info`, runs ``worker_init_fn`` and reports
   :class:`Ready` (or :class:`StartFailed`);
4. serves messages in the order they were sent: control updates change the
   cached dataset, tasks load batches. See NOTE [ Control ordering ] in
   ``_control.py`` for why that order is all the synchronisation needed.

On :class:`Stop`, or when the main process is gone, the worker ends every
process it started (the whole tree, found with psutil) before exiting.
"""

from __future__ import annotations

import collections
import functools
import math
import mmap
import os
import pickle
import queue
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

import numpy as np
import torch

# (torch.utils.data comes with ``import torch``: these cost nothing more, and spare
# each batch's collation two import statements.)
from torch.utils.data._utils import worker as torch_worker
from torch.utils.data._utils.collate import collate, collate_tensor_fn

from . import _pickling, _proctree, _replay, _seeding
from ._deaths import EXIT_INBOX_FAILED, INBOX_FAILED, INBOX_FAILED_AT, STARTED_SLOT_BYTES
from ._messages import (
    Audit,
    Audited,
    BeginEpoch,
    Done,
    Exhausted,
    Failed,
    Forget,
    PickledObject,
    Ready,
    RemoteError,
    Replace,
    StartedSlot,
    StartFailed,
    Stop,
    Sync,
    Synced,
    Task,
    Update,
)
from ._packing import descriptor_socket, receive_fd
from ._threads import helper_thread
from ._wire import decode, encode, recv, send
from .errors import _map_style_stop_iteration

#: Why a batch must pickle, for the error when it does not.
RESULT_PICKLING = "a batch travels from the worker to the main process by pickling"
RESULT_HINT = (
    "Return tensors, arrays, numbers, strings and containers of them from __getitem__ "
    "and collate_fn; leave out locks, open files and other live resources."
)

#: Seconds between the inbox thread's checks that the main process still
#: exists, when no message arrives. End of file on the connection is the fast
#: path; this is the backstop for a main process whose socket was inherited by
#: a process it forked. Short costs a few syscalls per interval; long delays
#: the exit of orphans.
PARENT_CHECK_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker knows about itself; returned by :func:`get_worker_info`.

    Attributes:
        id: The worker's index, ``0 <= id < num_workers``. A worker started to
            replace a dead one takes the dead one's id.
        num_workers: How many workers the loader has.
        seed: The worker's seed under torch's per-worker policy (``base_seed + id``).
        dataset: This worker's copy of the dataset.
    """

    id: int
    num_workers: int
    seed: int
    dataset: Any


_worker_info: WorkerInfo | None = None
_state: _State | None = None  # this worker's state, for the slab-aware collate
#: Where this worker writes the seq of each task it starts (NOTE [ Started tasks ]
#: in _iothread.py), once the inbox has mapped it.
_started_slot: mmap.mmap | None = None


def get_worker_info() -> WorkerInfo | None:
    """The current worker's :class:`WorkerInfo`, or ``None`` in the main process.

    torch's ``torch.utils.data.get_worker_info()`` works in poolloader workers
    too and returns the same id, num_workers, seed and dataset.
    """
    return _worker_info


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What a worker process (and the template process it is forked from) receives
    once, when it starts.

    ``dataset`` and ``functions`` (``(collate_fn, worker_init_fn)``) are each a
    :class:`~poolloader._messages.PickledObject`, or the object itself when it
    travels in the process's arguments (it may only be pickled while a process
    starts) or is inherited through ``fork``."""

    worker_id: int
    num_workers: int
    dataset: Any
    functions: Any
    dataset_kind: int
    auto_collation: bool
    drop_last: bool
    seeding: str
    base_seed: int
    packer_factory: Any
    collate_privately: bool
    main_pid: int  # the process that owns the loader: a worker exits when it is gone
    main_started: float  # its start on psutil's create_time() clock
    #: torch's sharing strategy in the main process when the pool started: a spawn
    #: or forkserver worker uses it as torch's fork workers inherit it.
    sharing_strategy: str = "file_descriptor"


def materialize(obj: Any) -> Any:
    """The object behind a :class:`PickledObject` (or ``obj`` itself)."""
    return pickle.loads(obj.data) if isinstance(obj, PickledObject) else obj


def run(setup: WorkerSetup, conn: Connection, catch_up: tuple[Update, ...] = ()) -> None:
    """The worker process's entry point: started directly, or forked from the
    template process (which has materialized ``setup``) with the changes it must
    ``catch_up`` on before ``worker_init_fn`` runs."""
    _prepare_process(setup)
    inbox = _Inbox(conn, setup)
    global _state
    try:
        state = _state = _State(setup, conn, catch_up)
    except BaseException as exc:  # every failure is reported home
        _send(conn, StartFailed(setup.worker_id, os.getpid(), RemoteError.capture(exc)))
        _proctree.exit_with_tree(1)
    inbox.packer = state.packer
    _send(conn, Ready(setup.worker_id, os.getpid()))
    _serve(state, inbox, conn)
    _proctree.exit_with_tree(0)


def _prepare_process(setup: WorkerSetup) -> None:
    # Its own process group: the processes dataset code starts join it, so they
    # can be found and ended even after this worker dies and they are orphaned
    # (see NOTE [ Process trees ] in _proctree.py). Ctrl-C at a terminal reaches the
    # main process's group only; the main process decides what it means.
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group or session leader
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    torch.multiprocessing.set_sharing_strategy(setup.sharing_strategy)
    from torch.utils.data._utils import signal_handling

    signal_handling._set_worker_signal_handlers()


def _serve(state: _State, inbox: _Inbox, conn: Connection) -> None:
    while True:
        message = inbox.get()
        if isinstance(message, Task):
            if message.slab_size:
                state.packer.lend(message.slab, message.slab_size, inbox.lent_fd(message.slab))
            reply = state.run(message)
            _send(conn, reply)
            if isinstance(reply, Done):
                state.packer.after_send(reply.payload)
        elif isinstance(message, BeginEpoch):
            state.begin_epoch(message)
        elif isinstance(message, Sync):
            _send(conn, Synced(message.generation))
        elif isinstance(message, Audit):
            _send(conn, Audited(message.token))
        elif isinstance(message, Stop):
            return
        else:
            state.apply(cast(Update, message))


def _send(conn: Connection, message: object) -> None:
    try:
        send(conn, encode(message))
    except (BrokenPipeError, ConnectionResetError, EOFError):
        _proctree.exit_orphaned()


#: Epochs a worker keeps the state of while it serves another (NOTE on begin_epoch).
PAUSED_EPOCHS = 8


@dataclass
class _Paused:
    """An epoch a worker left for another: where its stream and random state were."""

    begun: int  # BeginEpoch.begun: the beginning of the epoch it belongs to
    fetcher: Any
    exhausted: bool
    base_seed: int
    random_states: tuple[Any, Any, torch.Tensor]


class _State:
    """The worker's cached dataset, functions, epoch and fetcher."""

    def __init__(
        self, setup: WorkerSetup, conn: Connection, catch_up: tuple[Update, ...] = ()
    ) -> None:
        self.setup = setup
        self.collate_fn, self.init_fn = materialize(setup.functions)
        self.packer = setup.packer_factory(conn)
        self.epoch = self.begun = -1
        self.base_seed = setup.base_seed
        self.exhausted = False
        self.fetcher: Any = None
        # Epochs this worker served and may serve again (two live iterators of one
        # loader alternate on it): their iterable-dataset stream and random state.
        self.paused: collections.OrderedDict[int, _Paused] = collections.OrderedDict()
        # A change that failed here: this copy of the dataset no longer matches the
        # main process's, and every batch fails until a whole copy replaces it.
        self.diverged: RemoteError | None = None
        self.user_seeded: frozenset[str] = frozenset()  # generators worker_init_fn took over
        self.dataset = materialize(setup.dataset)
        for update in catch_up:  # the changes since the template's copy, before worker_init_fn
            if isinstance(update, Replace):
                self.dataset = pickle.loads(update.dataset)
            else:
                _replay.apply_update(self.dataset, update)
        self.install(self.dataset)

    def install(self, dataset: Any) -> None:
        """Cache ``dataset``, seed the process as torch seeds a new worker, set the
        worker info and run ``worker_init_fn``.

        Under ``seeding="batch"``, a generator that ``worker_init_fn`` seeds (or
        draws from) stays the user's: per-batch seeding leaves it alone, so what
        the function set holds, as it does with torch (NOTE [ Seeding ] in
        ``_seeding.py``)."""
        self.dataset = dataset
        self.fetcher = None
        self._set_info(_seeding.seed_worker(self.base_seed, self.setup.worker_id))
        if self.init_fn is not None:
            before = _seeding.generator_states()
            self.init_fn(self.setup.worker_id)
            self.user_seeded = _seeding.changed_since(before)

    def _set_info(self, seed: int) -> None:
        global _worker_info
        setup = self.setup
        _worker_info = WorkerInfo(setup.worker_id, setup.num_workers, seed, self.dataset)
        torch_worker._worker_info = torch_worker.WorkerInfo(
            id=setup.worker_id, num_workers=setup.num_workers, seed=seed, dataset=self.dataset
        )

    def begin_epoch(self, message: BeginEpoch) -> None:
        """Begin ``message.epoch``, or go back to it: two live iterators of one
        loader alternate on a worker, and each epoch continues where it was, as in
        torch, where each iterator has workers of its own."""
        if self.epoch >= 0 and message.epoch != self.epoch:
            self.paused[self.epoch] = _Paused(
                self.begun,
                self.fetcher,
                self.exhausted,
                self.base_seed,
                _seeding.generator_states(),
            )
            while len(self.paused) > PAUSED_EPOCHS:
                self.paused.popitem(last=False)
        self.epoch, self.begun = message.epoch, message.begun
        paused = self.paused.pop(message.epoch, None)
        if paused is not None and paused.begun == message.begun:
            self.fetcher, self.exhausted = paused.fetcher, paused.exhausted
            self.base_seed = paused.base_seed
            self._set_info(_seeding.worker_seed(self.base_seed, self.setup.worker_id))
            _seeding.set_generator_states(paused.random_states)
            return
        self.exhausted = False
        self.fetcher = None
        if message.shared_seed is not None:
            self._seed_datapipe(message.shared_seed)
        if message.base_seed != self.base_seed:
            # A new base seed means what new workers would mean to torch: reseed.
            self.base_seed = message.base_seed
            self._set_info(_seeding.seed_worker(self.base_seed, self.setup.worker_id))

    def _seed_datapipe(self, shared_seed: int) -> None:
        """Seed an IterDataPipe's random operations as torch's workers do, each epoch."""
        from torch.utils.data import IterDataPipe
        from torch.utils.data.graph_settings import apply_random_seed

        if isinstance(self.dataset, IterDataPipe):
            rng = torch.Generator()
            rng.manual_seed(shared_seed)
            self.dataset = apply_random_seed(self.dataset, rng)

    def apply(self, update: Update) -> None:
        try:
            if isinstance(update, Replace):
                self.install(pickle.loads(update.dataset))
                self.diverged = None  # a whole copy of the main process's dataset
            else:
                _replay.apply_update(self.dataset, update)
        except Exception as exc:
            self.diverged = RemoteError.capture(exc)

    def run(self, task: Task) -> Done | Failed | Exhausted:
        if _started_slot is not None:  # NOTE [ Started tasks ] in _iothread.py
            struct.pack_into("q", _started_slot, 0, task.seq)
        if self.exhausted:
            return Exhausted(task.seq)
        started = time.perf_counter()
        self.packer.begin(task)
        try:
            batch = self._fetch(task)
            payload, size = self._pack(batch)
        except StopIteration:
            self.packer.end()
            if self.setup.dataset_kind != _ITERABLE:
                return Failed(task.seq, _stop_iteration_error(), time.perf_counter() - started)
            self.exhausted = True
            return Exhausted(task.seq)
        except Exception as exc:
            self.packer.end()
            return Failed(task.seq, RemoteError.capture(exc), time.perf_counter() - started)
        return Done(task.seq, payload, size, time.perf_counter() - started)

    def _pack(self, batch: Any) -> tuple[Any, int]:
        try:
            return cast(tuple[Any, int], self.packer.pack(batch))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise _pickling.not_picklable(
                batch, "batch", exc, RESULT_PICKLING, RESULT_HINT
            ) from exc

    def _fetch(self, task: Task) -> Any:
        if self.diverged is not None:
            raise _ControlFailure(self.diverged)
        if self.setup.seeding != "batch":
            return self._fetcher().fetch(task.index)
        # (Seeded first: an iterable dataset's __iter__ runs as the fetcher is made.)
        _seeding.seed_batch(self.base_seed, task.epoch, task.position, self.user_seeded)
        try:
            return self._fetcher().fetch(task.index)
        finally:
            _seeding.end_batch()

    def _fetcher(self) -> Any:
        if self.fetcher is None:
            self.fetcher = _make_fetcher(self.setup, self.dataset, self.collate_fn)
        return self.fetcher


_ITERABLE = 1  # torch.utils.data.dataloader._DatasetKind.Iterable


def _make_fetcher(setup: WorkerSetup, dataset: Any, collate_fn: Any) -> Any:
    from torch.utils.data._utils.collate import default_collate
    from torch.utils.data.dataloader import _DatasetKind

    if collate_fn is default_collate and setup.collate_privately:
        collate_fn = _collate_privately
    return _DatasetKind.create_fetcher(
        setup.dataset_kind, dataset, setup.auto_collation, collate_fn, setup.drop_last
    )


def _collate_privately(batch: Any) -> Any:
    """torch's default_collate, writing each stacked tensor straight into a slab.

    Inside a worker, torch's default_collate allocates every batch in a new
    shared-memory segment, whose page faults cost more than the data they
    hold. With the slab transport, stacked tensors go into a slab that is
    already mapped, where the main process reads them in place: the batch is
    written once. What does not fit is stacked into private memory and copied.
    """
    global _hidden_worker_info
    saved, torch_worker._worker_info = torch_worker._worker_info, None
    _hidden_worker_info = saved
    try:
        return collate(batch, collate_fn_map=_slab_collate_map())
    finally:
        torch_worker._worker_info, _hidden_worker_info = saved, None


#: torch's worker info while :func:`_collate_privately` hides it from torch's collate.
_hidden_worker_info: Any = None


@functools.cache
def _slab_collate_map() -> dict[Any, Any]:
    from torch.utils.data._utils.collate import default_collate_fn_map

    return {**default_collate_fn_map, torch.Tensor: _stack_into_slab}


def _stack_into_slab(batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> torch.Tensor:
    elem = batch[0]
    plain = elem.layout == torch.strided and not elem.is_nested and elem.device.type == "cpu"
    if _state is None or not plain:  # (a slab holds CPU memory)
        return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
    if type(elem) is not torch.Tensor:
        # A subclass travels by torch's reducers (a skeleton describes only plain
        # tensors), which must not meet a slab (NOTE [ Slab fallback ] in
        # _packing.py): stacked as torch's workers stack it, into fresh shared memory.
        torch_worker._worker_info = _hidden_worker_info
        try:
            return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        finally:
            torch_worker._worker_info = None
    out = _state.packer.allocate(elem.dtype, (len(batch), *elem.shape))
    if out is None:  # no slab (yet): stacked as torch's workers stack, not as its main
        # process does (their out= fixes the first item's dtype and a contiguous layout)
        out = torch.empty((len(batch), *elem.shape), dtype=elem.dtype)
    return torch.stack(batch, 0, out=out)


def batch_buffer(shape: Sequence[int], dtype: Any) -> Any:
    """An uninitialised array or tensor to collate a batch into, placed where the
    batch travels to the main process without a copy.

    In a worker of a poolloader DataLoader with the default ``transport="shm"``
    the memory is in the shared-memory slab the batch will be read from in
    place: a ``collate_fn`` that writes its result there (``np.stack(items,
    out=batch_buffer(...))``) saves copying the batch once. Anywhere else (the
    main process, ``num_workers=0``, another loader, a batch too big for the
    slab, the first batch of a worker) it is ordinary memory, so the same
    ``collate_fn`` works everywhere::

        def stack(items):
            out = poolloader.batch_buffer((len(items), *items[0].shape), items[0].dtype)
            return np.stack(items, out=out)

    Args:
        shape: The result's shape.
        dtype: A ``torch.dtype`` for a tensor; a NumPy dtype (or anything
            ``numpy.dtype`` accepts) for an ``np.ndarray``.
    """
    shape = tuple(int(n) for n in shape)
    if isinstance(dtype, torch.dtype):
        found = _state.packer.allocate(dtype, shape) if _state is not None else None
        return found if found is not None else torch.empty(shape, dtype=dtype)
    np_dtype = np.dtype(dtype)
    if _state is not None and not np_dtype.hasobject:
        raw = _state.packer.allocate(torch.uint8, (np_dtype.itemsize * math.prod(shape),))
        if raw is not None:
            return raw.numpy().view(np_dtype).reshape(shape)
    return np.empty(shape, dtype=np_dtype)


class _ControlFailure(RuntimeError):
    """A change made in the main process failed to apply in this worker, whose copy
    of the dataset no longer matches the main process's."""

    def __init__(self, error: RemoteError) -> None:
        super().__init__(
            "applying a change made through loader.dataset or loader.broadcast() failed in "
            f"this worker with {error.type_name}: {error.message}\n"
            "This worker's copy of the dataset no longer matches the main process's, so "
            "every batch it loads fails with this error until a whole copy replaces it "
            "(each epoch with persistent_workers=False; with persistent workers, a new "
            "DataLoader). Make the change in a form the workers can apply: a value they "
            "can unpickle (a class defined at module level of an importable module, not "
            "under `if __name__ == '__main__':`), or a function sent with "
            f"loader.broadcast().\n{error.traceback}"
        )


def _stop_iteration_error() -> RemoteError:
    return RemoteError.capture(_map_style_stop_iteration())


class _Inbox:
    """Reads the main process's messages on a thread, so sends never block long."""

    def __init__(self, conn: Connection, setup: WorkerSetup) -> None:
        self._conn = conn
        self._main = (setup.main_pid, setup.main_started)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.packer: Any = None  # takes Forget once the worker has started
        # Descriptors of slabs lent with tasks, by slab id, until their task runs.
        self._lent: dict[int, int] = {}
        self._lent_lock = threading.Lock()
        self._fd_socket: socket.socket | None = None
        # NOTE [ Signals go to the main thread ]: a signal sent to the worker (an
        # alarm its dataset set, SIGTERM) interrupts the dataset's code.
        thread = helper_thread(self._read, "poolloader-inbox")
        thread.start()

    def get(self) -> object:
        return self._queue.get()

    def _read(self) -> None:
        try:
            self._read_messages()
        except BaseException:
            # A worker that no longer reads its messages would wait for tasks
            # for ever: it exits, and the pool runs its batches elsewhere.
            print("poolloader: a DataLoader worker's message thread failed:", file=sys.stderr)
            traceback.print_exc()
            if _started_slot is not None:  # so the main process knows the exit is ours
                struct.pack_into("q", _started_slot, INBOX_FAILED_AT, INBOX_FAILED)
            _proctree.exit_with_tree(EXIT_INBOX_FAILED)

    def _read_messages(self) -> None:
        # One poll object for the worker's life: Connection.poll builds and drops
        # a selector on every call, a sizeable share of a tiny batch's cost.
        watch = select.poll()
        watch.register(self._conn.fileno(), select.POLLIN | select.POLLPRI | select.POLLHUP)
        timeout = int(PARENT_CHECK_INTERVAL * 1000)
        last_task = -1
        while True:
            try:
                if not watch.poll(timeout):
                    if not _proctree.still_running(*self._main):
                        _proctree.exit_orphaned()
                    continue
                message = decode(recv(self._conn))
            except (EOFError, OSError):
                _proctree.exit_orphaned()
            if type(message) is Task:
                if message.slab_size:  # its slab's descriptor follows, even if it repeats
                    self._receive_lent(message.slab)
                # A task sent again because a Ctrl-C landed between its write and
                # its removal from the queue (NOTE [ Writes and Ctrl-C ] in _outbox.py).
                if message.seq == last_task:
                    continue
                last_task = message.seq
            if isinstance(message, Forget):
                if self.packer is not None:  # (it has no slabs before it is ready)
                    self.packer.forget(message.slabs)
                continue
            if isinstance(message, StartedSlot):
                self._take_started_slot()
                continue
            # Also after Stop: a worker that finishes a long item first still ends
            # (its processes too) if the main process dies meanwhile.
            self._queue.put(message)

    def _take_started_slot(self) -> None:
        """Map the shared memory that follows :class:`StartedSlot` (first of all
        messages, so before any task is queued)."""
        global _started_slot
        fd = self._receive_fd()
        try:
            _started_slot = mmap.mmap(fd, STARTED_SLOT_BYTES)
        finally:
            os.close(fd)

    def _receive_lent(self, slab: int) -> None:
        """Take the descriptor of a slab lent with a task (it follows the task)."""
        fd = self._receive_fd()
        with self._lent_lock:
            old = self._lent.pop(slab, None)
            self._lent[slab] = fd
        if old is not None:
            os.close(old)

    def _receive_fd(self) -> int:
        fd = receive_fd(self._descriptors(), self._main, PARENT_CHECK_INTERVAL)
        if fd is None:
            _proctree.exit_orphaned()
        return fd

    def _descriptors(self) -> socket.socket:
        """The socket the inbox receives descriptors on (a second handle on the
        connection, made once)."""
        if self._fd_socket is None:
            self._fd_socket = descriptor_socket(self._conn)
        return self._fd_socket

    def lent_fd(self, slab: int) -> int:
        """The descriptor lent with the task naming ``slab`` (the worker's thread)."""
        with self._lent_lock:
            return self._lent.pop(slab)
