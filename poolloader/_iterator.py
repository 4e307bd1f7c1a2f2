"""One epoch over the pool: the prefetch window and in-order delivery.

The iterator walks the (batch) sampler in the consumer's thread, only as far
as the window needs: at most ``prefetch_factor * num_workers`` tasks are
*unfinished* at once, and at most ``reorder_buffer`` more finished batches wait
behind a slow one. A slow batch therefore does not stop the other workers: they
keep loading the batches after it until the reorder buffer is full. Batches are
yielded in sampler order (``in_order=True``) or as they finish.

The sampler is never read ahead of the window, so a change to it (say a new
``max_duration``) applies from the next batch the iterator asks it for.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch.utils.data.dataloader import _BaseDataLoaderIter, _DatasetKind

from ._deaths import indices_words
from ._loader_resume import replaced_error
from ._pin_memory import pin_when_done, start_pinner
from ._resume import EpochBeginning, sampler_length
from ._tasks import (
    AnyFuture,
    Ended,
    GroupRecord,
    Loaded,
    Lost,
    Outcome,
    Raised,
    TaskRecord,
    part_tasks,
)
from ._waiting import Waiting, announce
from .errors import LoaderClosedError, _append_to_message

_profiler_enabled = torch._C._autograd._profiler_enabled

if TYPE_CHECKING:
    from .loader import DataLoader


class PoolIterator(Waiting, _BaseDataLoaderIter):
    """Iterates one epoch of a poolloader :class:`~poolloader.DataLoader`."""

    _handed: tuple[Any] | None  # NOTE [ Handing a batch over ]

    def __init__(self, loader: DataLoader[Any]) -> None:
        beginning = loader._before_iter()
        beginning.init_iterator(
            loader, functools.partial(_BaseDataLoaderIter.__init__, self, loader)
        )
        self._loader_stats = loader._stats
        self._window: deque[TaskRecord] = deque()
        self._limit = (loader.prefetch_factor or 2) * loader.num_workers
        self._allowance = loader._reorder_allowance
        self._paced = False  # read the sampler a fixed window ahead (SamplerBase.paced)
        self._in_order = loader.in_order
        self._iterable = self._dataset_kind == _DatasetKind.Iterable
        self._outcomes: dict[int, AnyFuture] = {}
        self._pinner = start_pinner() if self._pin_memory else None
        self._news: queue.SimpleQueue[None] = queue.SimpleQueue()  # see _await_news
        self._on_time = (-1, 0.0)  # a batch's seq, and until when it is not late (_late_in)
        # Each batch's done-callback (it holds the queue, not the iterator).
        self._announce = functools.partial(announce, self._news)
        self._cut_short = False  # close() ended the epoch before its last batch
        self._loader_closed = False  # ... because the loader was closed
        self._begin_epoch(loader, beginning)

    def __next__(self) -> Any:
        # torch wraps each step in a profiler range (about 8 µs even when nothing
        # records it); the range is kept whenever a profiler is on.
        if self._iterable or _profiler_enabled():
            data = super().__next__()  # (with torch's IterableDataset length warning)
            self._handed = self._ledger.in_hand = None  # NOTE [ Handing a batch over ]
            return data
        if self._sampler_iter is None:
            self._reset()  # type: ignore[call-arg]
        data = self._next_data()
        self._handed = self._ledger.in_hand = None  # no call from here to the caller
        self._num_yielded += 1
        return data

    # ------------------------------------------------------------ epochs

    def _begin_epoch(self, loader: DataLoader[Any], beginning: EpochBeginning) -> None:
        # The loader (its pool) lives while an epoch runs, however the caller holds
        # this iterator (``it = iter(DataLoader(...))``). Only while it runs: a
        # persistent iterator is the loader's, and a reference back for good would
        # keep both, and the workers, alive past the loader's last use.
        self._loader: DataLoader[Any] | None = loader
        loader.hold_iterator(self, weakly=True)
        self._ledger = beginning.ledger(self)
        if beginning.in_epoch is not None:
            self._base_seed = beginning.in_epoch["base_seed"]
        elif beginning.base_seed is not None:
            self._base_seed = beginning.base_seed
        self._position, self._pool = loader._begin_epoch(self, int(self._base_seed))
        self._paced = bool(getattr(self._index_sampler, "paced", False))
        self._batches: int | None = -1  # the sampler's length, asked when first needed
        self._epoch = self._position.epoch
        self._window = deque()
        # The batch next() took from the window and has not handed over yet: a
        # next() interrupted meanwhile (Ctrl-C) leaves it for the next call.
        self._taken: TaskRecord | None = None
        self._handed = None  # NOTE [ Handing a batch over ]
        self._pin: int | None = None  # the worker of the spec drawn (IterableDataset)
        self._tracked_to = -1  # the last position in the window, or that went through it
        self._sampler_done = self._cut_short = self._withdrawn = False
        self._active_workers = list(range(self._num_workers))
        self._round_robin = itertools.cycle(range(self._num_workers))
        self._fill()

    def _reset(self, loader: Any, first_iter: bool = False) -> None:
        # persistent_workers=True: torch keeps one iterator and resets it per epoch.
        self._abandon()
        beginning = loader._before_iter()
        super()._reset(loader, first_iter)
        self._begin_epoch(loader, beginning)

    def _abandon(self) -> None:
        self._taken = self._handed = None
        if self._window:
            self._pool.cancel(part_tasks(self._window))
            self._window.clear()
            self._outcomes.clear()
        self._pool.end_epoch(self._epoch)

    def _withdraw(self) -> None:
        """An ``iter(loader)`` that began a new epoch on this persistent iterator
        raised, and the loader went back to before it: the epoch it was in was given
        up (as every ``iter()`` of a persistent loader gives it up) and the new one
        did not begin. Its batches loaded ahead are cancelled, and ``next()`` says
        so rather than hand out batches of an epoch nobody began."""
        self._sampler_done = self._cut_short = self._withdrawn = True
        self._taken = self._handed = None
        self._abandon()

    def close(self, loader_closed: bool = False) -> None:
        """Cancel the batches loaded ahead; the iterator yields nothing more.

        The epoch is left unfinished (``state_dict()`` still says where it
        stopped). ``loader_closed``: the loader itself was closed, and the next
        ``next()`` raises :class:`~poolloader.errors.LoaderClosedError` rather than
        end the loop as if the epoch were done."""
        self._sampler_done = self._cut_short = True
        self._taken = self._handed = None
        self._loader_closed = self._loader_closed or loader_closed
        self._loader = None
        if not self._pool.closed and not self._pool.foreign:
            self._abandon()
        if self._pinner is not None:
            self._pinner.shutdown(wait=False, cancel_futures=True)

    def _shutdown_workers(self) -> None:
        """torch's name, which Lightning and torch's tests call on a persistent
        iterator: stop the workers. The loader starts new ones when iterated again."""
        self.close()
        if not self._pool.foreign:
            self._pool.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
        except BaseException:  # a Ctrl-C as the collector ends it (as DataLoader.__del__)
            with contextlib.suppress(BaseException):
                self.close()
            raise

    # ----------------------------------------------------------- submitting

    def _unfinished(self) -> int:
        return sum(1 for r in self._window if not r.future.done())

    def _fill(self) -> None:
        # Below the limit the window may always grow (its unfinished batches are
        # fewer still); only beyond it are the slower checks needed, and of those
        # the window's limit first: it is the limit itself unless the oldest
        # batch runs late, while counting the unfinished asks every batch.
        while not self._sampler_done and (
            len(self._window) < self._limit
            or (
                len(self._window) < self._window_limit()
                and self._unfinished() < self._limit
                and not self._at_the_end()
            )
        ):
            self._submit_next()

    def _at_the_end(self) -> bool:
        """Whether the sampler has given every batch it has (by its length).

        Asking it once more ends its iterator, and torch's RandomSampler then draws
        one more permutation from its generator. Torch's loader asks that only when
        its window reaches the end, so beyond the window (the reorder allowance)
        poolloader does not either: an epoch left early (``break``) would leave the
        generator one draw further on than torch's, depending on how late a batch
        ran, and every later epoch's order with it."""
        batches = self._length()
        return batches is not None and self._ledger.next_position >= batches

    def _length(self) -> int | None:
        """The sampler's number of batches, ``None`` where it has none. Asked only
        when needed (some samplers count by iterating), once."""
        if self._batches == -1:
            self._batches = None if self._iterable else sampler_length(self._index_sampler)
        return self._batches

    def _window_limit(self) -> int:
        """``prefetch_factor * num_workers``, plus the reorder allowance while the
        oldest batch is running late (NOTE [ Late by the main process's clock ] in
        _pool.py): extra batches only go ahead of a slow one,
        never merely ahead of a slow consumer, nor of a worker that has not
        started yet (a change made meanwhile would reach none of them)."""
        if self._window and not self._paced and self._running_late(self._window[0]):
            return self._limit + self._allowance(self._pool.mean_batch_bytes)
        return self._limit

    def _running_late(self, record: TaskRecord) -> bool:
        return self._late_in(record) == 0.0

    def _late_in(self, record: TaskRecord) -> float | None:
        """Seconds until every unfinished part of ``record`` runs late (0.0: they
        do), or ``None`` while one is not running."""
        if not isinstance(record, GroupRecord):
            if not record.started or record.future.done():
                return None  # (asked first without the pool's lock: the common case)
            # Asked two or three times per batch of the same oldest batch: an answer
            # of "not yet" holds until then (the mean it was measured against moves
            # by a batch at most meanwhile).
            on_time, until = self._on_time
            if record.seq == on_time:
                left = until - time.monotonic()
                if left > 0:
                    return left
            found = self._pool.late_in(record)
            if found:
                self._on_time = (record.seq, time.monotonic() + found)
            return found
        unfinished = [r for r in record.parts if not r.future.done()]
        waits = [self._pool.late_in(r) for r in unfinished]
        if not waits or None in waits:
            return None
        return max(w for w in waits if w is not None)

    def _submit_next(self) -> None:
        # The spec drawn stays the ledger's until it is in the window: a next()
        # interrupted in between (Ctrl-C) leaves it to the next call, which submits
        # it again unless it made it into the window (the first submission, if any,
        # only loads a batch nobody reads). NOTE [ Drawing once ] in _resume.py. An
        # IterableDataset's worker is chosen for a spec not in the window yet, and
        # kept with it until it is (_track lets it go).
        try:
            position, index = self._ledger.draw(self._sampler_iter)
        except StopIteration:
            self._sampler_done = True
            return
        if position > self._tracked_to:  # not submitted yet (the window may have passed it)
            pin = None
            if self._iterable:
                pin = self._pin
                if pin is None:
                    pin = self._pin = self._next_pin()
                    if pin is None:
                        self._sampler_done = True
                        return
            self._track(self._submit(position, index, pin))
        self._ledger.claimed()

    def _submit(self, position: int, index: Any, pin: int | None) -> TaskRecord:
        split = getattr(index, "poolloader_split", None)
        if split is None or self._iterable:
            last = self._pool.last_submitted
            if (
                last is not None  # queued before an interrupt kept it from the window
                and (last.index is index and last.position == position)
                and (last.epoch == self._epoch and not last.cancelled)
            ):  # NOTE [ Drawing once ] in _resume.py
                return last
            return self._pool.submit(self._epoch, position, index, pin)
        parts = [
            self._pool.submit(self._epoch, position, part, worker)
            for worker, part in split(self._num_workers)
        ]
        return GroupRecord.of(parts, index, position)

    def _track(self, record: TaskRecord) -> None:
        if record.position > self._tracked_to:  # set before the append: no call between
            self._tracked_to = record.position
            self._pin = None
        self._window.append(record)
        last = self._pool.last_submitted  # ours now (NOTE [ Drawing once ] in _resume.py)
        if last is record or any(part is last for part in getattr(record, "parts", ())):
            self._pool.last_submitted = None
        announce = self._announce
        record.future.add_done_callback(announce)
        if self._pinner is not None:
            pinned = pin_when_done(record.future, self._pinner, self._pin_memory_device)
            pinned.add_done_callback(announce)
            self._outcomes[record.seq] = pinned

    def _outcome_of(self, record: TaskRecord) -> AnyFuture:
        """What the consumer waits for: the pinned batch when pinning, else the loaded one."""
        return self._outcomes.get(record.seq, record.future)

    def _next_pin(self) -> int | None:
        # IterableDataset: each worker iterates its own shard; tasks go round-robin
        # to the workers whose shard is not exhausted yet, as in torch.
        for _ in range(self._num_workers):
            worker = next(self._round_robin)
            if worker in self._active_workers:
                return worker
        return None

    @property
    def loading(self) -> bool:
        """Whether this iterator's epoch still has batches to load or to yield."""
        return not self._cut_short and (bool(self._window) or not self._sampler_done)

    @property
    def submitted(self) -> int:
        """How many batches of this epoch have been submitted to the workers so far.

        Batch ``k`` sees every change made while ``submitted <= k``."""
        return self._ledger.next_position

    @property
    def finished(self) -> bool:
        """Whether the epoch has ended: the consumer was told so (StopIteration).

        Not merely "the last batch was yielded": a state taken right after the
        last batch is a state inside the epoch (nothing left to yield), as with
        ``num_workers=0``, so a resumed loop finishes that epoch instead of
        running the next one in its place."""
        return self._position.finished

    @property
    def epoch(self) -> int:
        """The loader's number for this epoch (0, 1, ... over the loader's life)."""
        return self._epoch

    def state_dict(self) -> dict[str, Any]:
        """This epoch's resume state (see NOTE [ Resume ] in ``_resume.py``)."""
        return self._ledger.state(int(self._base_seed))

    def refresh(self) -> int:
        """Discard the batches loaded ahead and load them again with every change
        made so far; returns how many were reloaded.

        An IterableDataset's batches cannot be loaded again: a worker's iterator
        has moved past the items of a batch it started. Only the batches no
        worker has started yet are brought up to date."""
        if self._iterable:
            return self._pool.restamp(part_tasks(self._window))
        stale = list(self._window)
        self._pool.cancel(part_tasks(stale))
        self._window.clear()
        self._outcomes.clear()
        for old in stale:
            self._track(self._submit(old.position, old.index, old.pin))
        return len(stale)

    # ------------------------------------------------------------- delivery

    # NOTE [ Handing a batch over ]: a KeyboardInterrupt comes as a call returns
    # (or as a Python function begins), so one can land after next() took a batch
    # and before the caller has it: in delivering it, or in __next__ as
    # _next_data returns. That batch was lost, and the next next() gave the one
    # after. The batch stays taken until it is delivered, and once delivered it is
    # kept as handed, both set together with no call between; __next__ lets it go
    # with no call between that and its return. A next() after an interrupt gives
    # the same batch again; InProcessIterator, loading in place, does the same. (One
    # landing in the caller's own code, as next() returns there, takes the batch
    # with it, as with any Python iterator.)

    def _next_data(self) -> Any:
        handed = self._handed
        if handed is not None:
            return handed[0]  # an interrupt took it on its way to the caller
        while True:
            record = self._taken
            if record is None:
                if not self._window:
                    self._refill_or_end()
                record = self._take()
            try:
                outcome = self._outcomes.get(record.seq, record.future).result()
            except Exception:
                self._taken = None  # the batch failed: the next is next
                self._outcomes.pop(record.seq, None)
                # The future holds the exception, whose traceback holds this frame:
                # without this the cycle keeps the iterator, the loader and its
                # processes until the garbage collector runs.
                record = None
                raise
            try:
                self._fill_past_a_break()
            except Exception:
                # The sampler failed: its error now, the batch dropped, as torch does.
                self._taken = None
                self._outcomes.pop(record.seq, None)
                raise
            # An interrupt (KeyboardInterrupt) above leaves the batch taken.
            try:
                data = self._deliver(record, outcome)
            except Exception:  # the batch's own error: the next batch is next
                self._outcomes.pop(record.seq, None)
                # Last, with no call after: the error is the caller's from here on.
                self._taken = self._ledger.in_hand = None
                raise
            self._handed, self._taken = (None if data is _SKIP else (data,)), None
            self._outcomes.pop(record.seq, None)
            if data is not _SKIP:
                return data

    def _fill_past_a_break(self) -> None:
        """:meth:`_fill`, where a broken pool's error is not this call's to raise:
        the batch being taken or waited for has its own outcome, and the batch
        drawn keeps the error for its own ``next()`` (NOTE [ A broken pool ])."""
        try:
            self._fill()
        except Exception:
            if self._pool.broken is None:
                raise

    def _refill_or_end(self) -> None:
        """The window is empty: the epoch ended, unless the pool broke first.

        NOTE [ A broken pool ]: once the pool breaks (a batch killed two workers,
        or workers died more often than ``max_worker_restarts`` allows), the
        batches in the window that had not loaded fail with its error, and each
        batch the sampler still has fails with it too, one per ``next()``: a
        consumer that catches the error and goes on sees one outcome for every
        batch of the epoch, then the epoch's end, never an end that looks like a
        whole epoch, nor a loop without end. Batches that loaded before it broke
        are delivered. A resume from ``state_dict()`` loads the failed ones again.
        Where the batches left are not counted (an IterableDataset, a sampler with
        no length), the epoch ends after the window's."""
        counted = self._pool.broken is None or self._length() is not None
        if not self._sampler_done and not self._cut_short and counted:
            try:
                self._fill()
            except Exception:
                if self._pool.broken is not None:
                    self._pin = None  # the batch drawn: this error is its outcome
                    self._ledger.claimed()
                raise
        if not self._window:
            self._end()

    def _end(self) -> NoReturn:
        """No batch is left: the epoch ended, or was cut short by :meth:`close`."""
        try:
            if not self._cut_short:
                self._sampler_done = self._position.finished = True
                self._pool.end_epoch(self._epoch)
                self._ledger.warn_if_cut_short()
            elif self._withdrawn:
                raise RuntimeError(
                    "iter(loader) raised while it began a new epoch on this iterator "
                    "(with persistent_workers=True a loader keeps one iterator, and each "
                    "iter() begins its next epoch on it): the epoch this iterator was in "
                    "had been given up, and the new one did not begin. Call iter(loader) "
                    "again to begin it."
                )
            elif self._position.replaced and not self._position.finished:
                raise replaced_error(self._epoch, self._position.ledger.yielded)
            elif self._loader_closed and not self._position.finished:
                raise LoaderClosedError(
                    f"the DataLoader was closed during epoch {self._epoch}, after "
                    f"{self._position.ledger.yielded} of its batches; the rest were not "
                    "loaded. loader.state_dict() still says where it stopped: a new "
                    "DataLoader given load_state_dict(state) continues from there"
                )
            raise StopIteration
        finally:
            # Last: dropping the loader may close it (its last reference), which
            # closes this iterator too; the epoch is settled by then.
            if self._loader is not None:
                self._loader.hold_iterator(self, weakly=False)
            self._loader = None

    def _deliver(self, record: TaskRecord, outcome: Outcome) -> Any:
        ledger = self._ledger
        if not (isinstance(outcome, Ended) or ledger.will_drop(record.position)):
            ledger.in_hand = record.position  # the caller's: NOTE [ The batch in hand ]
        ledger.consumed(record.position)
        if isinstance(outcome, Ended):
            if outcome.worker_id in self._active_workers:
                self._active_workers.remove(outcome.worker_id)
            self._fill()
            return _SKIP
        if self._ledger.dropped(record.position):
            return _SKIP
        if isinstance(outcome, Raised):
            raise _reraise(outcome, record)
        if isinstance(outcome, Lost):
            error = outcome.error
            if hasattr(error, "add_note"):  # Python 3.11+
                indices = indices_words(record.index)
                error.add_note(
                    f"(batch {record.position}{', ' + indices if indices else ''}, loaded by "
                    f"DataLoader worker {outcome.worker_id}, pid {outcome.pid})"
                )
            raise error
        assert isinstance(outcome, Loaded)
        self._loader_stats.batches += 1
        return outcome.data


_SKIP = object()


def _reraise(outcome: Raised, record: TaskRecord) -> BaseException:
    """The worker's exception, as its own type, with where it happened in the message."""
    exc = outcome.error.rebuild()
    indices = indices_words(record.index)
    context = (
        f"raised in DataLoader worker {outcome.worker_id} (pid {outcome.pid}) while loading "
        f"batch {record.position}{' with ' + indices if indices else ''}"
    )
    if not _append_to_message(exc, f"({context})") and hasattr(exc, "add_note"):
        exc.add_note(context.capitalize())  # (Python 3.11+)
    return exc
