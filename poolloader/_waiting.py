"""Waiting for the batch the consumer asks for: the part of
:class:`~poolloader._iterator.PoolIterator` that sleeps until a batch of the
window finishes, refills the window meanwhile, and raises when the loader's
``timeout`` passes or the pool broke.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from typing import TYPE_CHECKING, Any, NoReturn

from ._deaths import batch_words, unloaded_error
from ._tasks import AnyFuture, TaskRecord
from .errors import LoaderTimeoutError

#: Seconds between health checks while the consumer waits for a batch with
#: ``timeout=0``. The pool fails waiting futures itself when it breaks; this
#: guards against a wait that nothing would ever end, and bounds how late a
#: Ctrl-C that another thread took is raised: the kernel may hand it to one of
#: NumPy's or torch's native threads, and then only the main thread's next
#: Python step runs its handler (NOTE [ Signals go to the main thread ] in
#: ``_threads.py``).
WAIT_SLICE = 0.5
#: Shortest wait for a batch to turn late (seconds): batches of microseconds
#: would otherwise have the consumer spin.
LATE_RECHECK_FLOOR = 0.001
#: Seconds a batch may stay unresolved after the pool broke before the consumer
#: raises the pool's error for it anyway (the break resolves every batch in flight).
BREAK_SETTLE = 2.0


class Waiting:
    """The iterator's methods that wait for a batch of its window."""

    if TYPE_CHECKING:  # the iterator's state these methods share (PoolIterator)
        _window: deque[TaskRecord]
        _in_order: bool
        _timeout: float
        _cut_short: bool
        _taken: TaskRecord | None
        _loader_stats: Any
        _pool: Any
        _news: queue.SimpleQueue[None]

        def _end(self) -> NoReturn: ...
        def _outcome_of(self, record: TaskRecord) -> AnyFuture: ...
        def _late_in(self, record: TaskRecord) -> float | None: ...
        def _fill_past_a_break(self) -> None: ...

    def _take(self) -> TaskRecord:
        started = time.perf_counter()
        # One deadline for the whole wait, however it is spent.
        deadline = time.monotonic() + self._timeout if self._timeout > 0 else None
        record = self._window[0] if self._in_order else self._first_done(deadline)
        self._wait(record, deadline)
        if self._cut_short:  # close() while it waited: the window is gone
            self._end()
        self._taken = record
        self._window.remove(record)
        self._loader_stats.record_wait(time.perf_counter() - started)
        return record

    def _first_done(self, deadline: float | None) -> TaskRecord:
        """The first batch of the window that is ready, waiting for one if none is.

        Returns the oldest at the ``deadline`` (or when the pool broke), for
        :meth:`_wait` to raise about."""
        while True:
            if self._cut_short or not self._window:  # close() meanwhile
                self._end()
            for record in self._window:
                if self._outcome_of(record).done():
                    return record
            left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0 or self._pool.broken is not None:
                return self._window[0]
            self._await_news(left)

    def _wait(self, record: TaskRecord, deadline: float | None) -> None:
        """Wait for ``record`` until ``deadline`` (``None``: for ever), submitting
        more work each time another batch finishes.

        While the consumer waits for a slow batch, the other workers finish the
        batches after it; refilling the window as they do keeps them busy (the
        stock loader only refills when a batch is consumed)."""
        future = self._outcome_of(record)
        broke_seen = 0.0
        while not future.done():
            left = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise self._timeout_error(record)
            # Wake when the batch turns late too: the reorder allowance opens then,
            # and no other batch may finish to say so (the other workers idle).
            late = self._late_in(record)
            if late is not None and late > 0:
                left = min(left, max(late, LATE_RECHECK_FLOOR))
            self._await_news(left)
            self._fill_past_a_break()
            if self._cut_short:  # close() from a signal handler or another thread
                self._end()
            broken = self._pool.broken
            if broken is not None and not future.done():
                # The break fails every batch in flight right after it is set; one
                # it missed would otherwise be waited for in vain.
                broke_seen = broke_seen or time.monotonic()
                if time.monotonic() - broke_seen > BREAK_SETTLE:
                    raise unloaded_error(broken, record.position, record.index)

    def _await_news(self, seconds: float) -> None:
        """Sleep until a batch of the window finishes (or ``seconds``, at most
        :data:`WAIT_SLICE`, pass).

        NOTE [ Waiting and Ctrl-C ]: the consumer waits on a SimpleQueue that the
        batches' done-callbacks feed, not with ``concurrent.futures.wait``. That
        one holds every future's lock while it sets up and tears down its waiter;
        a KeyboardInterrupt landing there leaves some locks held, and the I/O
        thread, resolving one of those futures, would block forever (and close()
        with it). SimpleQueue's get and put are single C calls."""
        try:
            self._news.get(timeout=min(seconds, WAIT_SLICE))
        except queue.Empty:
            pass

    def _timeout_error(self, record: TaskRecord) -> LoaderTimeoutError:
        where, look = self._pool.whereabouts(record)
        return LoaderTimeoutError(
            f"DataLoader timed out after {self._timeout} seconds waiting for "
            f"{batch_words(record.position, record.index)} {where}. Raise `timeout`, {look}."
        )


def announce(news: queue.SimpleQueue[None], _: AnyFuture) -> None:
    """A batch finished: wake the consumer if it waits (holds the queue, not the iterator)."""
    news.put(None)
