"""``poolloader.DataLoader``: the drop-in front."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.utils.data
from torch.utils.data import Dataset, Sampler

from . import _pickling
from ._control import Channel
from ._fresh_epochs import start_afresh_each_epoch
from ._inprocess import InProcessIterator
from ._iterator import PoolIterator
from ._loader_resume import Place, Resumable
from ._messages import Broadcast
from ._options import (
    DEFAULT_MAX_WORKER_RESTARTS,
    check_count,
    check_options,
    reorder_allowance,
    start_method,
)
from ._pool import Pool
from ._pool_start import start_pool
from ._resume import EpochPosition
from ._stats import LoaderStatistics, LoaderStats, combined
from ._tracking import root_view, unwrap
from .errors import LoaderClosedError

T_co = TypeVar("T_co", covariant=True)
logger = logging.getLogger("poolloader")

#: Bytes a dataset's fingerprint may pass twice its pickle by (NOTE [ Fingerprints ]
#: in ``_pickling.py``) before the check falls back to pickling it.
FINGERPRINT_SLACK = 2**20
#: Attributes that belong to one loader object and are not copied or pickled
#: (see DataLoader.__getstate__).
_PER_OBJECT = frozenset(
    {"_channel", "_stats", "_lock", "_pool", "_pool_key", "_iterators", "_closed",
     "dataset", "_dataset_target", "_snapshot", "_fingerprint", "_warned_stale_template",
     "_held_iterator"}
)  # fmt: skip


class DataLoader(Resumable, torch.utils.data.DataLoader[T_co]):
    """torch's ``DataLoader``, with the same arguments and the same batches, on a
    process pool.

    ``poolloader.DataLoader`` is a subclass of ``torch.utils.data.DataLoader``:
    change the import and everything else stays. Only these differ:

    * Workers (``num_workers > 0``) start with ``"spawn"`` unless
      ``multiprocessing_context`` says ``"forkserver"`` or ``"fork"``. One
      *template* process receives the dataset, ``collate_fn`` and
      ``worker_init_fn`` once and forks every worker, so the dataset is pickled
      once per loader and workers start in milliseconds; with ``"fork"`` it is
      inherited, never pickled. Workers are **not daemonic**, so dataset code may
      start processes of its own. ``persistent_workers=False`` gives each epoch
      fresh workers that see the dataset as it is, as torch does, forked from
      the template instead of started from scratch. (One case cannot: a dataset
      only ``fork`` can carry, changed directly while another iterator of the
      loader still wants batches; the loader warns.)
    * A free worker takes the next batch; one slow batch does not hold up the
      others. Batches still arrive in sampler order unless ``in_order=False``.
    * ``loader.dataset`` is a live view: whatever changes the dataset through
      it (``loader.dataset.duration = 2.0`` at any depth, ``set_epoch(5)``,
      ``items.append(x)``, ``w[0] = 7``) and ``loader.broadcast(fn, ...)``
      reach every worker, and are seen by every batch submitted afterwards and
      by none submitted before.
      Batches already loaded ahead (at most the prefetch window) keep what they
      saw; ``loader.reload_prefetched()`` loads them again.
    * Random state is seeded per batch from ``(base seed, epoch, batch
      position)``, so augmentations do not depend on ``num_workers``
      (``seeding="worker"`` restores torch's per-worker seeding).
    * A worker that dies is replaced and its batches run again.
    * ``close()``, ``with DataLoader(...) as loader:`` and ``statistics()``.

    Keyword-only options beyond torch's:

    Args:
        seeding: ``"batch"`` (default) or ``"worker"``; see above.
        reorder_buffer: How many finished batches may wait behind one slow
            batch (one running longer than 1.5 times the workers' mean time per
            batch so far, and longer than batches take on average from start to
            arrival in the main process),
            beyond the ``prefetch_factor * num_workers`` in flight. By
            default it adapts: as many as fit 16 MiB at the mean batch size
            so far, at most ``16 * num_workers`` (``2 * num_workers`` before
            the first batch arrives). Batches of 16 MiB or more get none: what
            they hold stays torch's bound, the prefetch window.
        max_worker_restarts: How many worker deaths to survive before raising
            :class:`~poolloader.errors.WorkerCrashedError`. Default 3.
        transport: ``"shm"`` (default): workers collate into shared-memory
            slabs that are mapped once and reused, read in place here;
            ``"pickle"``: torch's path, fresh shared memory for every batch.
        max_batch_bytes: Refuse a batch holding more tensor and array bytes
            than this with :class:`~poolloader.errors.ResultTooLargeError` (for
            that batch; the loader goes on). ``None`` (default): no limit.

    Example::

        from poolloader import DataLoader

        if __name__ == "__main__":   # spawn workers import the main module
            with DataLoader(dataset, batch_size=32, shuffle=True, num_workers=4) as loader:
                for epoch in range(10):
                    if epoch == 5:
                        loader.dataset.duration = 2 * loader.dataset.duration
                    for batch in loader:
                        ...
    """

    _closed = False
    _dataset_target: Any  # the dataset itself; ``dataset`` holds its live view

    def __init__(
        self,
        dataset: Dataset[T_co],
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Sampler[Any] | Iterable[Any] | None = None,
        batch_sampler: Sampler[list[Any]] | Iterable[list[Any]] | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: Any = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seeding: str = "batch",
        reorder_buffer: int | None = None,
        max_worker_restarts: int = DEFAULT_MAX_WORKER_RESTARTS,
        transport: str = "shm",
        max_batch_bytes: int | None = None,
    ) -> None:
        check_count("num_workers", num_workers, allow_negative=True)
        check_options(seeding, reorder_buffer, max_worker_restarts, transport, max_batch_bytes)
        self._start_afresh()
        self._epoch_index = 0  # the number the next epoch gets; part of each batch's seed
        self._resume: dict[str, Any] | None = None
        self._resume_limits: dict[str, Any] | None = None
        self._resume_generators: list[torch.Tensor] | None = None
        self._resume_base_seed: int | None = None  # see _kept_base_seed
        self._position: EpochPosition | None = None
        self._state_at_iter: Place | None = None  # NOTE [ A state taken in iter() ]
        self.seeding = seeding
        self.max_worker_restarts = max_worker_restarts
        self.reorder_buffer = reorder_buffer
        self.transport = transport
        self.max_batch_bytes = max_batch_bytes
        super().__init__(
            unwrap(dataset), batch_size, shuffle, sampler, batch_sampler, num_workers,
            collate_fn, pin_memory, drop_last, timeout, worker_init_fn,
            multiprocessing_context, generator, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory_device=pin_memory_device,
            in_order=in_order,
        )  # fmt: skip
        if num_workers > 0 and prefetch_factor is not None and prefetch_factor < 1:
            # torch accepts 0 here and fails when iterated (an assert in its iterator)
            raise ValueError(
                f"prefetch_factor should be a positive integer (the batches each worker "
                f"loads ahead), but got prefetch_factor={prefetch_factor!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator should be a torch.Generator or None, but got {generator!r}")
        if num_workers > 0:
            inherited = start_method(self.multiprocessing_context) == "fork"
            _pickling.ship(self.collate_fn, "collate_fn", inherited=inherited)
            _pickling.ship(self.worker_init_fn, "worker_init_fn", inherited=inherited)

    def _start_afresh(self) -> None:
        """The parts of a loader that belong to this object alone: its control
        channel, pool, iterators and counters (a copy gets its own)."""
        self._channel = Channel()
        self._stats = LoaderStats()
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._pool_key: tuple[Any, ...] | None = None
        self._snapshot: bytes | None = None  # the dataset as the pool's template holds it
        self._fingerprint: tuple[bytes | None, int] = (None, 0)  # of the template's copy
        self._iterators: weakref.WeakSet[PoolIterator] = weakref.WeakSet()
        self._held_iterator: Any = None  # see _iterator
        self._persistent_seed: int | None = None  # see _kept_base_seed
        self._warned_stale_template = False

    @property
    def _iterator(self) -> Any:
        """torch's persistent iterator (``persistent_workers=True``), reset by each
        ``iter(loader)``.

        Held weakly while it runs an epoch (:meth:`hold_iterator`): it holds
        the loader then (NOTE on PoolIterator._begin_epoch), and a loader and
        iterator dropped mid-epoch must go, with the workers, when the last
        reference does, not when the cycle collector runs. Dropped mid-epoch
        itself (a ``break`` in a ``for`` loop), it is gone; the next
        ``iter(loader)`` makes another for the same workers."""
        held = self.__dict__.get("_held_iterator")
        return held() if isinstance(held, weakref.ref) else held

    @_iterator.setter
    def _iterator(self, iterator: Any) -> None:
        # torch's __iter__ sets it after the first epoch began (in the iterator's __init__).
        running = getattr(iterator, "_loader", None) is self
        self.__dict__["_held_iterator"] = weakref.ref(iterator) if running else iterator

    def hold_iterator(self, iterator: Any, *, weakly: bool) -> None:
        """Hold the persistent ``iterator`` weakly (it runs an epoch) or strongly
        (between epochs); any other iterator is not the loader's to hold."""
        if self._iterator is iterator:
            self.__dict__["_held_iterator"] = weakref.ref(iterator) if weakly else iterator

    # --------------------------------------------------------- copy, pickle

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.copy``, ``copy.deepcopy`` and ``pickle`` take: the loader's
        arguments and position, as for torch's loader. The copy starts workers of
        its own when it is iterated; the original's keep running."""
        state = {k: v for k, v in self.__dict__.items() if k not in _PER_OBJECT}
        state["dataset"] = self._dataset_target  # (torch's persistent iterator is not taken)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        dataset = state.pop("dataset")
        self.__dict__.update(state)
        self._start_afresh()
        self.__dict__["dataset"] = root_view(dataset, self._channel)
        self.__dict__["_dataset_target"] = dataset

    # ------------------------------------------------------------- dataset

    def __setattr__(self, name: str, value: Any) -> None:
        # ``loader.dataset`` holds a live view of the dataset (see _control.py); it is
        # an instance attribute, as torch's is, so code that rebuilds loaders from
        # their attributes (Lightning) finds it.
        if name == "dataset":
            target = unwrap(value)
            super().__setattr__(name, root_view(target, self._channel))
            object.__setattr__(self, "_dataset_target", target)
            return
        if name == "_iterator" and value is None and self.__dict__.get("_pool") is not None:
            # Dropping torch's persistent iterator ends torch's workers; code written
            # for torch does it to free them (Lightning's teardown after fit,
            # validate, test). This loader's workers are its pool's: end it. The
            # loader stays usable: iterating it again starts a new pool (and, as
            # torch's new iterator, draws a new base seed).
            self._stop_pool()
            self._persistent_seed = None
        super().__setattr__(name, value)

    def broadcast(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(dataset, *args, **kwargs)`` here and in every worker.

        For changes ``loader.dataset`` cannot follow (a method implemented in C
        on your own class, a reference to the dataset you kept)::

            loader.broadcast(MyDataset.load_vocabulary, "vocab.txt")
            loader.broadcast(operator.methodcaller("reseed", 5))

        Ordered like assignments: every batch submitted afterwards sees it.
        ``fn`` and its arguments must pickle (module-level functions do);
        otherwise :class:`~poolloader.errors.NotPicklableError` is raised here,
        before anything runs.

        Returns:
            What ``fn`` returned in the main process.
        """
        if not callable(fn):
            raise TypeError(f"broadcast() needs a callable, but got {fn!r}")
        payload = None
        if self.num_workers > 0:
            with self._channel.pinning():
                payload = _pickling.broadcast_payload(fn, args, kwargs)
        result = fn(self._dataset_target, *args, **kwargs)
        if payload is not None:
            self._channel.record(Broadcast(payload))
        return result

    def reload_prefetched(self) -> int:
        """Load again the batches loaded ahead but not yet yielded, so that every
        change made so far applies at once. Returns how many were reloaded.

        With an ``IterableDataset`` only the batches no worker has started yet
        are reloaded (a worker's iterator cannot go back): no item is lost or
        read twice."""
        return sum(it.refresh() for it in list(self._iterators))

    # ----------------------------------------------------------- iteration

    def __iter__(self) -> Any:
        # NOTE [ A state taken in iter() ] in _loader_resume.py
        self._leave_inherited_pool()
        place = self._place()
        # Stored into __dict__, not through __setattr__ (a Python call, where an
        # interrupt could land and leave the place in force for good).
        self.__dict__["_state_at_iter"] = place
        try:
            return self._new_epoch()
        except BaseException:
            self._go_back(place)
            raise
        finally:
            self.__dict__["_state_at_iter"] = None

    def _new_epoch(self) -> Any:
        # torch's, holding the new persistent iterator while the loader holds it weakly.
        if not (self.persistent_workers and self.num_workers > 0):
            return self._get_iterator()
        iterator = self._iterator
        if iterator is None:
            if self._resume is None and self._resume_base_seed is None:
                self._resume_base_seed = self._persistent_seed  # (None before the first)
            iterator = self._iterator = self._get_iterator()
        else:
            iterator._reset(self)
        return iterator

    def _get_iterator(self) -> Any:
        self._check_open()
        if self.num_workers == 0:
            iterator: Any = InProcessIterator(self)
        else:
            self.check_worker_number_rationality()
            iterator = PoolIterator(self)
            self._iterators.add(iterator)
        return iterator

    def _leave_inherited_pool(self) -> None:
        """In a process forked from the one that ran this loader (``os.fork()``, a
        fork-started child), forget the pool and iterators it inherited: they are
        copies of the parent's, whose workers and template serve the parent. An
        epoch begun on them would send the child's changes and tasks to the
        parent's workers (changing the parent's batches) and wait for ever for
        answers that go to the parent. The child starts a pool of its own."""
        pool = self._pool
        if pool is None or not pool.foreign:
            return
        self._pool, self._pool_key = None, None
        self._iterators = weakref.WeakSet()
        self.__dict__["_held_iterator"] = None  # the parent's persistent iterator (a copy)
        self._snapshot, self._fingerprint = None, (None, 0)

    def _check_open(self) -> None:
        if self._closed:
            raise LoaderClosedError("this DataLoader was closed; create a new one to load more")

    def _begin_epoch(self, iterator: Any, base_seed: int) -> tuple[EpochPosition, Pool]:
        """Called by each new (or reset) pool iterator: the epoch's position and the pool."""
        # torch's __iter__ resets a persistent iterator without _get_iterator: a
        # closed loader must not start a new pool there either.
        self._check_open()
        if self.persistent_workers:
            self._persistent_seed = base_seed
        pool: Pool | None = None
        try:
            with self._lock:
                pool = self._ensure_pool(base_seed)
                if pool.epochs_begun > 0 and not self.persistent_workers:
                    start_afresh_each_epoch(self, pool)
                position = self._next_epoch(iterator)
                pool.begin_epoch(position.epoch, base_seed, iterator._shared_seed)
        except Exception:
            if not self._closed:
                raise
        if self._closed:
            # close() ran meanwhile (a signal handler, another thread): it may have
            # found no pool yet, or ended this one halfway through its epoch start.
            if pool is not None:
                pool.close()
            self._pool = None
            raise LoaderClosedError("the DataLoader was closed while an epoch was starting")
        assert pool is not None
        return position, pool

    def _fingerprint_now(self) -> tuple[bytes | None, int]:
        """The dataset's fingerprint (NOTE [ Fingerprints ] in ``_pickling.py``) and
        the count of changes recorded through ``loader.dataset`` so far: the
        template's copy is the dataset as it is when both are as they were when
        its copy was made (changes recorded since reached the template, but the
        fingerprint then was of the dataset before them)."""
        self._channel.stamp()  # changes still open are counted
        recorded = self._channel.messages_recorded
        limit = 2 * len(self._snapshot or b"") + FINGERPRINT_SLACK
        return _pickling.fingerprint(self._dataset_target, limit), recorded

    def _ensure_pool(self, base_seed: int) -> Pool:
        key = (
            self.num_workers, self.multiprocessing_context, id(self.collate_fn),
            id(self.worker_init_fn), self.seeding, self.max_worker_restarts, self.transport,
            self.max_batch_bytes,
        )  # fmt: skip
        self._leave_inherited_pool()
        pool = self._pool
        if pool is not None and (pool.broken or pool.closed or key != self._pool_key):
            pool.close()
            self._stats.pool_ended(pool.statistics())
            pool = None
        if pool is None:
            pool = start_pool(self, base_seed)
            self._pool, self._pool_key = pool, key
        return pool

    @property
    def _reorder_allowance(self) -> Callable[[float], int]:
        """How many finished batches may wait behind the oldest unfinished one, given
        the mean batch size so far (:func:`reorder_allowance`). Holds no reference
        to the loader: a persistent iterator keeps it, and the loader keeps that
        iterator, so a reference back would keep both (and the workers) alive past
        the loader's last use, until the cycle collector ran."""
        return functools.partial(reorder_allowance, self.reorder_buffer, self.num_workers)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the workers and every process they started. Idempotent."""
        self._closed = True
        self._stop_pool(loader_closed=True)

    def _stop_pool(self, loader_closed: bool = False) -> None:
        """End the iterators' epochs and the pool (its workers, their processes)."""
        for iterator in list(self._iterators):
            iterator.close(loader_closed=loader_closed)
        pool = self._pool
        if pool is not None:
            pool.close()  # interrupted before it claimed the pool, the next close() does
            if self._pool is pool:  # (NOTE [ Closing and Ctrl-C ] in _pool.py)
                self._pool = None
                self._stats.pool_ended(pool.statistics())

    def __enter__(self) -> DataLoader[T_co]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if sys.is_finalizing():
                return  # the pool's atexit hook has already stopped the workers
            self.close()
        except Exception:
            pass
        except BaseException:
            # A Ctrl-C as the collector ends the loader: Python reports it ("Exception
            # ignored in") and drops it; the workers are stopped all the same.
            with contextlib.suppress(BaseException):
                self.close()
            raise

    def statistics(self) -> LoaderStatistics:
        """A snapshot of what the loader has done so far; see :class:`LoaderStatistics`."""
        now = self._pool.statistics() if self._pool is not None else None
        pool = combined(self._stats.ended_pools, now)
        return self._stats.snapshot(pool, self.num_workers, self._channel.messages_recorded)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._pool else "idle")
        return (
            f"poolloader.DataLoader(dataset={type(self._dataset_target).__name__}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, {state})"
        )
