"""Dataset exceptions, timeouts and interruption: in the training loop (an
exception, ``break``, Ctrl-C, dropping the loader) and of the whole process
(Ctrl-C, an exception at exit, SIGKILL). Nothing is left behind and the loader
serves whole epochs afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from _datasets import Counted, Plain, Table
from _faults import (
    CorruptItemError,
    Faulty,
    always,
    once,
    recorded_pids,
)
from _procs import (
    GONE_WITHIN,
    TESTS,
    assert_batches,
    collector_held,
    describe,
    fault_loader,
    handles,
    kill_all,
    live_grandchildren,
    logged_warnings,
    still_alive,
    template_pids,
    torch_batches,
    wait_gone,
    wait_until,
    worker_pids,
)

import poolloader
from poolloader._epoch_rng import RngState
from poolloader._pool import IO_JOIN_TIMEOUT
from poolloader._resume import EpochLedger
from poolloader._waiting import WAIT_SLICE
from poolloader.errors import (
    LoaderTimeoutError,
)

#: Seconds added to a bound that only catches a step never happening, for a busy machine.
HANG_SLACK = 10.0

# ------------------------------------------------------------------ dataset exceptions


def test_a_dataset_exception_is_not_a_crash(
    start_method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The dataset's own exception type arrives for that batch, with where it
    happened; no worker is replaced; the epoch goes on and the next one is whole."""
    caplog.set_level(logging.WARNING, logger="poolloader")
    dataset = Faulty(12, "raise", always(5))
    want = torch_batches(dataset, batch_size=2)
    with fault_loader(dataset, start_method, batch_size=2) as loader:
        iterator = iter(loader)
        got = [next(iterator), next(iterator)]
        templates = template_pids()
        with pytest.raises(CorruptItemError) as info:
            next(iterator)
        got += list(iterator)
        assert "item 5 is corrupt" in str(info.value)
        assert "indices [4, 5]" in str(info.value)
        assert loader.statistics().restarts == 0
        assert_batches(got, want[:2] + want[3:])
        with pytest.raises(CorruptItemError):
            list(loader)
        # Each epoch's workers are fresh (persistent_workers=False), from the same template.
        assert template_pids() == templates
    assert logged_warnings(caplog) == []


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "any-order"])
def test_hang_with_timeout_raises_and_close_reaps_the_hung_worker(
    in_order: bool, where: Path
) -> None:
    """``timeout``: a batch stuck in ``__getitem__`` raises LoaderTimeoutError naming
    it, after one wait of ``timeout`` seconds (not two, whatever the order); the
    batches that did load arrive first; close() ends the stuck worker."""
    timeout = 3
    dataset = Faulty(12, "hang", always(4), where=where)
    loader = fault_loader(dataset, batch_size=2, timeout=timeout, in_order=in_order)
    try:
        iterator = iter(loader)
        got = []
        with pytest.raises(LoaderTimeoutError, match=r"timed out after 3 seconds") as info:
            while True:
                started = time.monotonic()
                got.append(next(iterator)["i"].tolist())
        waited = time.monotonic() - started
        assert timeout <= waited < 2 * timeout, f"waited {waited:.1f} s for one timeout"
        # In any order, batches after the stuck one come first (except one queued
        # behind it at the same worker).
        if in_order:
            assert got == [[0, 1], [2, 3]]
        else:
            assert [0, 1] in got and [2, 3] in got and [4, 5] not in got and len(got) >= 4
        assert "batch 2 (indices [4, 5])" in str(info.value)
        assert isinstance(info.value, TimeoutError)
        victims = handles(recorded_pids(where, "victim"))
        assert len(victims) == 1 and still_alive(victims)
        loader.close()
        assert not still_alive(victims)
    finally:
        loader.close()


# ------------------------------------------------------------------ interruption (in process)


def test_exception_in_the_training_loop_leaves_the_loader_usable() -> None:
    """An exception raised by the loop body, mid-epoch: the next epoch is whole,
    served by workers forked from the same template, none replaced."""
    dataset = Faulty(20)
    with fault_loader(dataset, batch_size=2) as loader:
        next(iter(loader))
        templates = template_pids()
        with pytest.raises(ArithmeticError, match="loss is nan"):
            for k, _ in enumerate(loader):
                if k == 3:
                    raise ArithmeticError("loss is nan")
        assert_batches(list(loader), torch_batches(dataset, batch_size=2))
        assert template_pids() == templates
        assert loader.statistics().restarts == 0


def test_break_then_a_new_epoch_is_whole() -> None:
    """``break`` abandons the prefetched batches; none of them leaks into the
    next epoch."""
    dataset = Faulty(20, delay=0.002)
    with fault_loader(dataset, batch_size=2) as loader:
        for k, _ in enumerate(loader):
            if k == 2:
                break
        assert_batches(list(loader), torch_batches(dataset, batch_size=2))


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_death_in_an_abandoned_epoch_is_not_held_against_the_next(
    transport: str, where: Path
) -> None:
    """``break`` (Lightning's ``limit_val_batches``), then the worker dies while
    loading a batch of the epoch left behind: that batch is not loaded again, the
    death counts neither towards ``max_worker_restarts`` nor as poison, and the
    next epoch is whole."""
    dataset = Faulty(10, "hang", once(where, 2), where=where)
    with fault_loader(dataset, batch_size=1, num_workers=1, max_worker_restarts=0,
                 transport=transport) as loader:  # fmt: skip
        for k, _ in enumerate(loader):
            if k == 1:
                break
        (victim,) = wait_until(lambda: recorded_pids(where, "victim"))
        kill_all(handles([victim]))
        assert not wait_gone(handles([victim]))
        assert_batches(list(loader), torch_batches(dataset, batch_size=1))
        assert loader.statistics().restarts == 1
        assert_batches(list(loader), torch_batches(dataset, batch_size=1))


def test_a_death_after_break_with_persistent_workers_loses_nothing(where: Path) -> None:
    """With ``persistent_workers=True`` torch keeps the iterator between epochs, so
    the batches left behind by ``break`` are only known to be unwanted when the
    next epoch starts: a death before then is survived like any other."""
    dataset = Faulty(10, "hang", once(where, 2), where=where)
    with fault_loader(dataset, batch_size=1, num_workers=1, persistent_workers=True) as loader:
        for k, _ in enumerate(loader):
            if k == 1:
                break
        (victim,) = wait_until(lambda: recorded_pids(where, "victim"))
        kill_all(handles([victim]))
        assert not wait_gone(handles([victim]))
        for _ in range(2):
            assert_batches(list(loader), torch_batches(dataset, batch_size=1))


def test_keyboard_interrupt_while_waiting_for_a_batch(where: Path) -> None:
    """Ctrl-C while the consumer waits in next(): KeyboardInterrupt reaches the
    user at once; the loader then serves a whole epoch and closes cleanly."""
    dataset = Faulty(12, delay=0.2)
    interrupt = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if interrupt.is_set():  # only inside the guarded block below
            interrupt.clear()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with fault_loader(dataset, batch_size=2) as loader:
            iterator = iter(loader)
            next(iterator)
            interrupt.set()
            timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                while True:
                    next(iterator)
            # At once: not after the batches still loading (2 s of them).
            assert time.monotonic() - started < 2.0 + HANG_SLACK
            timer.join()
            del iterator
            assert_batches(list(loader), torch_batches(dataset, batch_size=2))
    finally:
        interrupt.clear()
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_taken_by_another_thread_ends_the_wait_for_a_batch(where: Path) -> None:
    """NOTE [ Signals go to the main thread ]: the kernel may hand Ctrl-C to a
    thread the program did not make (NumPy's BLAS pool), and Python then runs
    the handler only at the main thread's next step. A consumer waiting in
    next() for a batch that takes minutes still gets KeyboardInterrupt within
    one wait slice, not when the batch arrives."""
    assert WAIT_SLICE <= 1.0
    # Python's own Ctrl-C handler, also where the test run started in the
    # background (a shell then starts it with SIGINT ignored, and the signal below
    # would be dropped).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with fault_loader(Faulty(4, "hang", always(1), where=where), batch_size=1) as loader:
            iterator = iter(loader)
            next(iterator)
            # A thread that blocks no signal takes one sent to it alone.
            timer = threading.Timer(
                0.5, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            )
            timer.start()
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                next(iterator)  # batch 1 hangs for ever
            # The signal at 0.5 s, a slice, and slack for a loaded machine: not the
            # 5 s slices of before.
            assert time.monotonic() - started < 4.0
            timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_storm(inside: str = "") -> Iterator[threading.Event]:
    """SIGINT to this thread every 0.3 ms; while the event it yields is set, the
    next one raises KeyboardInterrupt (and clears it). ``inside``: only where the
    interrupted code's file name starts so."""
    armed = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if armed.is_set() and frame is not None and frame.f_code.co_filename.startswith(inside):
            armed.clear()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    stop = threading.Event()
    main = threading.get_ident()

    def pester() -> None:
        while not stop.is_set():
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.0003)

    pesterer = threading.Thread(target=pester, daemon=True)
    pesterer.start()
    try:
        yield armed
    finally:
        armed.clear()
        stop.set()
        pesterer.join(5)
        time.sleep(0.05)  # signals still pending run the (disarmed) handler
        signal.signal(signal.SIGINT, previous)


def test_a_storm_of_ctrl_c_inside_next_leaves_the_loader_closable() -> None:
    """Thousands of KeyboardInterrupts, each landing wherever next() happens to be
    (waiting, submitting, unpacking): every one reaches the caller, batches keep
    coming between them, and close() still returns at once (no lock left held by
    an interrupted wait; NOTE [ Waiting and Ctrl-C ] in _iterator.py).

    An interrupt inside the sampler's generator ends that generator, and so the
    epoch, as with torch's loader: the loop then starts the next epoch."""
    loader = fault_loader(Faulty(10**6, delay=0.002), batch_size=1)
    interrupts = batches = 0
    try:
        iterator = iter(loader)
        next(iterator)
        with _ctrl_c_storm() as armed:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    armed.set()
                    next(iterator)
                    armed.clear()
                    batches += 1
                except KeyboardInterrupt:
                    interrupts += 1
                except StopIteration:
                    armed.clear()
                    iterator = iter(loader)
    finally:
        started = time.monotonic()
        loader.close()
        closing = time.monotonic() - started
    assert interrupts > 100 and batches > 100, (interrupts, batches)
    # A lock left held by an interrupted wait makes close() wait IO_JOIN_TIMEOUT
    # for the I/O thread; a healthy close() returns well before.
    assert closing < IO_JOIN_TIMEOUT, f"close() took {closing:.1f} s after the interrupts"


#: Where poolloader's own code is (its frames' file names start so).
PACKAGE = str(Path(poolloader.__file__).parent) + os.sep


def test_ctrl_c_inside_next_loses_no_batch() -> None:
    """A KeyboardInterrupt caught around next(), wherever it lands (waiting,
    submitting the next batches, between the two), costs no batch: calling next()
    again goes on from the batch that was interrupted, so each epoch's batches are
    consecutive from its first. (An interrupt inside the sampler's generator ends
    that generator and so the epoch, as with torch's loader.) Interrupts land only
    inside the loader's code: one in this test's own lines, right after next()
    returned, would drop the batch here."""
    epochs: list[list[int]] = [[]]
    interrupts = 0
    with fault_loader(Faulty(10**6, delay=0.002), batch_size=1) as loader:
        iterator = iter(loader)
        with _ctrl_c_storm(inside=PACKAGE) as armed:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    armed.set()
                    batch = next(iterator)
                    armed.clear()
                    epochs[-1].append(int(batch["i"]))
                except KeyboardInterrupt:
                    interrupts += 1
                except StopIteration:
                    armed.clear()
                    epochs.append([])
                    iterator = iter(loader)
    assert interrupts > 100 and sum(map(len, epochs)) > 100, (interrupts, len(epochs))
    for got in epochs:
        skipped = sorted(set(range(len(got))) - set(got))
        assert got == list(range(len(got))), f"batches lost: {skipped[:10]}"


#: The functions of poolloader that write to the workers (NOTE [ Writes and Ctrl-C ]
#: in _outbox.py), and those that run between giving a worker a task and queuing it
#: (NOTE [ Tasks never sent ] in _iothread.py).
WRITERS = ("flush", "_flush", "_write", "send")
GIVERS = ("_send_task", "_send", "put")


def _interrupted_epochs(
    functions: tuple[str, ...],
    calls: tuple[str, ...] = (),
    every: int = 1,
    interrupts: int = 40,
    num_workers: int = 2,
    dataset: Any = None,
    events: tuple[str, ...] = ("c_return",),
) -> tuple[int, list[int], list[int]]:
    """A 300-batch epoch (``dataset``: ``Plain(300)`` unless given) interrupted as
    :func:`_interrupted_epoch` says, then a whole epoch: how many interrupts
    landed and each epoch's batches."""
    timeout = HANG_SLACK if num_workers else 0
    dataset = Plain(300) if dataset is None else dataset
    with poolloader.DataLoader(dataset, batch_size=1, num_workers=num_workers,
                               timeout=timeout) as loader:  # fmt: skip
        landed, got = _interrupted_epoch(iter(loader), functions, calls, every, interrupts, events)
        return landed, got, [int(b) for b in loader]


def _interrupted_epoch(
    iterator: Iterator[Any],
    functions: tuple[str, ...],
    calls: tuple[str, ...] = (),
    every: int = 1,
    interrupts: int = 40,
    events: tuple[str, ...] = ("c_return",),
) -> tuple[int, list[int]]:
    """The rest of ``iterator``'s epoch, its next() calls interrupted by
    KeyboardInterrupts that land as a C call (of ``calls``, or any) returns inside
    poolloader's ``functions`` (or, with ``"call"`` among ``events``, as one of them
    begins): how many landed, and the batches. ``every``: the n-th such return of
    a next() call is interrupted, n going round 1 to ``every``, so that each place
    gets its turn; ``interrupts`` in all. They are raised where a signal's would
    be, as the call returns, by a profile hook (which Python unsets when it
    raises: set again before each next())."""
    landed = seen = 0
    turn = 1

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        nonlocal landed, seen
        if (
            event in events
            and landed < interrupts
            and frame.f_code.co_name in functions
            and (event != "c_return" or not calls or getattr(arg, "__name__", "") in calls)
            and frame.f_code.co_filename.startswith(PACKAGE)
        ):
            seen += 1
            if seen == turn:
                landed += 1
                raise KeyboardInterrupt

    got: list[int] = []
    while True:
        seen = 0
        try:
            with collector_held():
                sys.setprofile(interrupt)
                batch = next(iterator)
                sys.setprofile(None)
            got.append(int(batch))
        except KeyboardInterrupt:
            turn = turn % every + 1
        except StopIteration:
            return landed, got
        finally:
            sys.setprofile(None)


def _drain_interrupted(
    iterator: Iterator[Any], caught: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
) -> tuple[list[int], list[str]]:
    """The rest of ``iterator``'s epoch, going on past the ``caught`` exceptions
    (a Ctrl-C caught around next()): the batches, and the names of those raised."""
    got: list[int] = []
    raised: list[str] = []
    while True:
        try:
            got.append(int(next(iterator)))
        except caught as exc:
            raised.append(type(exc).__name__)
        except StopIteration:
            return got, raised


def test_ctrl_c_as_a_message_is_written_loses_and_blocks_nothing() -> None:
    """A KeyboardInterrupt that lands right after the consumer takes the lock it
    writes under, or right after it wrote a task (before the task left the queue),
    reaches the caller, and the loader goes on: every batch once, in order, and a
    new epoch after. One that landed between taking the lock and the ``try`` that
    lets it go left it held, and no task was written again: the epoch waited for
    its next batch for ever."""
    landed, first, second = _interrupted_epochs(WRITERS, calls=("acquire", "write"))
    assert landed == 40, landed
    assert first == list(range(300)) and second == list(range(300))


def test_ctrl_c_between_giving_a_task_and_sending_it_leaves_no_worker_waiting() -> None:
    """A KeyboardInterrupt that lands after submit gave a worker a task and before
    the task was queued left the worker holding a place for a task it never got:
    after four, no batch could be handed out (the epoch waited for ever), and a
    worker that is never idle cannot start afresh for the next epoch. The pool now
    audits its workers after an interrupted submit and hands such tasks out again."""
    landed, first, second = _interrupted_epochs(GIVERS, every=3, interrupts=60)
    assert landed == 60, landed
    assert first == list(range(300)) and second == list(range(300))


#: The functions of poolloader that run once next() has taken its batch.
DELIVERERS = ("_next_data", "_deliver", "_take", "consumed", "__next__")


@pytest.mark.parametrize("num_workers, every", [(2, 8), (0, 3)])
def test_ctrl_c_as_a_batch_is_handed_over_loses_no_batch(num_workers: int, every: int) -> None:
    """A KeyboardInterrupt that lands after next() took its batch from the window
    (as it is delivered, or as _next_data returns to __next__) lost that batch: the
    next next() gave the one after. Loading in place (``num_workers=0``), one that
    landed after the batch was loaded and counted lost it too. The batch now stays
    for the next call (NOTE [ Handing a batch over ] in _iterator.py), and is
    counted once."""
    landed, first, second = _interrupted_epochs(
        DELIVERERS, every=every, interrupts=80, num_workers=num_workers
    )
    assert landed == 80, landed
    assert first == list(range(300)) and second == list(range(300))


#: The functions of poolloader that draw a batch's spec from the sampler and take
#: it into the window, or load it in place (NOTE [ Drawing once ] in _resume.py).
DRAWERS = ("draw", "_pull", "_submit_next", "_track", "_load_next", "seed_batch")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ctrl_c_as_the_sampler_gives_a_batch_loses_no_batch(num_workers: int) -> None:
    """A KeyboardInterrupt that lands after the sampler gave the next spec and
    before the spec reached the window (or, loading in place, before its batch
    reached the consumer) lost that batch: the next next() drew the one after.
    The spec now stays drawn until it is in the window or delivered, and a next()
    after an interrupt takes it again, without loading a batch twice."""
    landed, first, second = _interrupted_epochs(
        DRAWERS, every=4, interrupts=60, num_workers=num_workers
    )
    assert landed == 60, landed
    assert first == list(range(300)) and second == list(range(300))


def test_ctrl_c_as_a_stream_batch_is_drawn_keeps_torchs_worker_order() -> None:
    """An IterableDataset's batches go to the workers in turn, as in torch: an
    interrupt between choosing a batch's worker and the batch reaching the window
    must not move the turn on (a later state_dict() would then resume with other
    items dropped than were yielded). Counted's workers yield alternate numbers."""
    landed, first, second = _interrupted_epochs(
        (*DRAWERS, "claimed", "_next_pin"), every=5, interrupts=60,
        dataset=Counted(300), events=("call", "c_return"),
    )  # fmt: skip
    assert landed == 60, landed
    assert first == list(range(300)) and second == list(range(300))


def test_ctrl_c_between_queuing_a_stream_batch_and_tracking_it_loses_no_item() -> None:
    """A KeyboardInterrupt that lands after a batch's task was queued and before the
    batch joined the window left the task to run for nobody: a map-style batch is
    only loaded twice, but an IterableDataset's worker moved its stream on, and
    its items were lost. The queued task is now taken into the window when the
    spec comes again (NOTE [ Drawing once ] in _resume.py)."""
    landed, first, second = _interrupted_epochs(
        ("_track",), every=1, interrupts=30, dataset=Counted(300), events=("call",)
    )
    assert landed == 30, landed
    assert first == list(range(300)) and second == list(range(300))


def test_ctrl_c_in_a_samplers_iterator_that_goes_on_is_not_an_early_end() -> None:
    """A sampler whose iterator is an object that goes on after an exception out of
    its ``__next__`` (not a generator, which is finished by one) gives every batch,
    and the epoch's end is not reported as early."""

    class Survives(torch.utils.data.Sampler[int]):
        def __len__(self) -> int:
            return 10

        def __iter__(self) -> Iterator[int]:
            return _Survivor()

    for num_workers in (0, 2):
        loader = poolloader.DataLoader(
            Plain(10), sampler=Survives(), batch_size=None, num_workers=num_workers
        )
        with loader, warnings.catch_warnings():
            warnings.simplefilter("error")
            got, raised = _drain_interrupted(iter(loader))
        assert got == list(range(10)), (num_workers, got)
        assert raised == ["KeyboardInterrupt"], raised


class _Survivor:
    """Counts to 10, raising KeyboardInterrupt once on the way, as a Ctrl-C in it would."""

    def __init__(self) -> None:
        self.i, self.raised = 0, False

    def __iter__(self) -> _Survivor:
        return self

    def __next__(self) -> int:
        if self.i == 4 and not self.raised:
            self.raised = True
            raise KeyboardInterrupt
        if self.i == 10:
            raise StopIteration
        self.i += 1
        return self.i - 1


def test_an_epoch_cut_short_by_an_exception_in_the_sampler_says_so() -> None:
    """A generator that raised is finished: an exception out of the sampler's
    iterator (a Ctrl-C inside its code) ends the epoch there, as with torch's
    loader. The loader says so with a warning at that end, naming the batch,
    instead of ending the epoch silently short; the next epoch is whole."""

    class Interrupted(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 0

        def __len__(self) -> int:
            return 20

        def __iter__(self) -> Iterator[int]:
            self.epoch += 1
            for i in range(20):
                if self.epoch < 3 and i == 7:
                    raise KeyboardInterrupt
                yield i

    for num_workers in (0, 2):
        loader = poolloader.DataLoader(
            Plain(20), sampler=Interrupted(), batch_size=None, num_workers=num_workers
        )
        with loader:
            with pytest.warns(RuntimeWarning, match="raised KeyboardInterrupt while drawing "
                              "batch 7 .* ended early, after 7 batches") as found:  # fmt: skip
                got, _ = _drain_interrupted(iter(loader))
            assert got == list(range(7)), (num_workers, got)
            assert {w.filename for w in found} == {__file__}  # names the caller's next()
            # Said at the end, after the last batch: as an error it costs no batch.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got, ends = _drain_interrupted(iter(loader), (KeyboardInterrupt, RuntimeWarning))
            assert got == list(range(7)), (num_workers, got)
            assert ends == ["KeyboardInterrupt", "RuntimeWarning"], ends
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert [int(b) for b in loader] == list(range(20))


def test_ctrl_c_as_a_resumed_epoch_draws_its_yielded_batches_again_loses_nothing() -> None:
    """Resuming torch's RandomSampler replays it: the batches the saved epoch had
    yielded are drawn again and skipped. An interrupt among those draws shifted the
    positions, and the resumed epoch gave batches twice. The skipped draws now go
    through draw()'s own loop (NOTE [ Drawing once ]), and the caller's random
    state is put back once the first batch to load is drawn. Loading in place, so
    that the replay runs inside next() (a pool's runs inside iter())."""
    num_workers = 0

    def make() -> Any:
        generator = torch.Generator()
        generator.manual_seed(1)
        return poolloader.DataLoader(Plain(60), batch_size=1, shuffle=True,
                                     generator=generator, num_workers=num_workers)  # fmt: skip

    with make() as loader:
        whole = [int(b) for b in loader]
    with make() as loader:
        iterator = iter(loader)
        got = [int(next(iterator)) for _ in range(25)]
        state = loader.state_dict()
    functions = ("draw", "_pull", "_first_draw", "_end_replay", "apply", "claimed")
    with make() as loader:
        loader.load_state_dict(state)
        landed, rest = _interrupted_epoch(iter(loader), functions, every=4, interrupts=30)
    got += rest
    assert landed >= 10, landed
    assert got == whole


def test_a_state_taken_after_an_interrupted_count_is_whole() -> None:
    """An interrupt as the ledger counts a batch (after it joined yielded_after,
    before yielded moved past it) left a state that load_state_dict() refused
    (yielded=2, yielded_after=[2]), and a batch said again was not counted again.
    The count is finished by the next count or by state()."""
    ledger = EpochLedger((), RngState.capture(()), None)
    specs = iter(range(5))
    for _ in range(3):
        ledger.draw(specs)
        ledger.claimed()
    ledger.consumed(0)
    ledger.consumed(1)
    ledger.yielded_after.add(2)  # what an interrupt inside consumed(2) leaves
    state = ledger.state(0)
    assert (state["yielded"], state["yielded_after"]) == (3, [])
    ledger.consumed(2)  # said again: counted once
    assert (ledger.yielded, ledger.yielded_after) == (3, set())


def test_a_task_never_sent_is_handed_out_again_after_an_interrupted_submit() -> None:
    """Whatever an interrupt leaves half done in a submit, a task counted as given
    to a worker that never reached it is found and handed out again: here the
    outbox loses up to four of the consumer's tasks, each as a KeyboardInterrupt
    leaves submit. Each worker answers the pool's Audit with them unanswered.
    Without the audit each such task keeps a worker's place for ever: the workers
    never idle cannot start afresh, and the next epoch waits for ever."""
    with poolloader.DataLoader(Plain(60), batch_size=1, num_workers=2,
                               timeout=HANG_SLACK) as loader:  # fmt: skip
        iterator = iter(loader)
        got = [int(next(iterator))]
        outbox = loader._pool._outbox
        queue = outbox.put
        given = lost = 0

        def lose_four(entry: Any) -> None:
            nonlocal given, lost
            if entry[2] and threading.current_thread() is threading.main_thread():
                given += 1  # a task alone, given by the consumer
                if given % 2 == 0 and lost < 4:
                    lost += 1
                    raise KeyboardInterrupt  # and never queued
            queue(entry)

        outbox.put = lose_four
        try:
            while True:
                try:
                    got.append(int(next(iterator)))
                except KeyboardInterrupt:
                    pass
                except StopIteration:
                    break
        finally:
            outbox.put = queue
        assert lost >= 2
        assert got == list(range(60))
        assert [int(b) for b in loader] == list(range(60))  # (workers start afresh)


def test_del_loader_ends_workers_and_their_children(where: Path) -> None:
    """Dropping the loader (and its iterator) mid-epoch, without close(), ends the
    workers and every process they started."""
    dataset = Faulty(12, "grandchild", always(0, 1, 2, 3), where=where)
    loader = fault_loader(dataset, batch_size=2)
    iterator = iter(loader)
    next(iterator), next(iterator)
    workers = handles(worker_pids())
    grandchildren = live_grandchildren(where)
    assert len(workers) == 2 and len(grandchildren) == 4
    del iterator, loader
    gc.collect()
    assert not wait_gone(workers + grandchildren, timeout=GONE_WITHIN)


# ------------------------------------------------------------------ interruption (whole process)

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    # As started from a terminal: a shell that runs the tests in the background
    # ignores SIGINT, and every process it starts would inherit that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from _faults import Faulty, always
    from poolloader import DataLoader

    if __name__ == "__main__":
        dataset = Faulty(400, "grandchild", always(0, 1, 2, 3), where={where!r}, delay=0.01)
        loader = DataLoader(dataset, batch_size=2, num_workers=2,
                            multiprocessing_context={start_method!r})
        for k, batch in enumerate(loader):
            if k == 4:
                print("READY", flush=True)
                sys.stdin.readline()  # the test has counted the family
                {ending}
            time.sleep(0.02)
        for k, batch in enumerate(loader):
            if k == 2:
                raise RuntimeError("boom in the training loop")
    """
)

ENDINGS = {
    # Ctrl-C: the terminal sends SIGINT to the whole process group. The loop
    # sleeps in steps, as a training loop runs Python steps: the kernel may hand
    # the signal to NumPy's BLAS thread, and then one long C-level sleep in the
    # main thread would sit it out (NOTE [ Signals go to the main thread ]).
    "ctrl-c": "for _ in range(600): time.sleep(0.1)",
    # break, then a new epoch whose loop body raises: the interpreter exits with
    # the loader neither closed nor collected (the atexit path).
    "break-exception": "break",
    "sigkill": "os.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize(
    "start_method, ending",
    [("forkserver", e) for e in ENDINGS] + [("spawn", "sigkill")],
)
def test_the_main_process_ending_leaves_nothing_behind(
    start_method: str, ending: str, where: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """However the main process ends (Ctrl-C, an exception, falling off the end
    without close(), SIGKILL), its workers, their children and the multiprocessing
    helpers all go, and stderr has no resource-tracker "leaked" warning and no
    ignored exception."""
    code = SCRIPT.format(
        tests=TESTS, where=str(where), start_method=start_method, ending=ENDINGS[ending]
    )
    stderr_path = tmp_path_factory.mktemp("stderr") / "stderr.txt"
    family: list[int] = []
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"script failed: {stderr_path.read_text()}"
        family = psutil.Process(proc.pid).children(recursive=True) + live_grandchildren(where)
        assert len(live_grandchildren(where)) == 4
        # The script holds its ending until the family is counted: a break that
        # ran at once would end the first epoch's workers (and their children)
        # while they were being counted.
        assert proc.stdin is not None
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        if ending == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        returncode = proc.wait(timeout=60)
        left = wait_gone(family)
        assert not left, f"left behind: {[describe(p) for p in left]}"
    finally:
        kill_all([*handles([proc.pid]), *family])
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    text = stderr_path.read_text()
    expected_rc = {"ctrl-c": (1, -signal.SIGINT), "break-exception": (1,)}
    assert returncode in expected_rc.get(ending, (-signal.SIGKILL,)), text
    if ending == "break-exception":
        assert "RuntimeError: boom in the training loop" in text
    if ending == "ctrl-c":
        assert "KeyboardInterrupt" in text
    assert "leaked" not in text, text
    assert "Exception ignored" not in text, text
    assert "poolloader I/O thread failed" not in text, text


# ------------------------------------------------------------------ signals and threads


def _blocked(pid: int | str = "self", tid: int | None = None) -> set[int]:
    """The signals thread ``tid`` of process ``pid`` (its main thread by default) blocks."""
    where = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    with open(where) as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_signals_sent_to_the_process_reach_its_main_thread(start_method: str) -> None:
    """NOTE [ Signals go to the main thread ]: the kernel may hand Ctrl-C to any
    thread that does not block SIGINT, and only the main thread's own signal
    interrupts a training loop asleep in ``time.sleep`` (Ctrl-C then waited out
    the sleep, one run in ten on a loaded machine). Every thread poolloader starts
    blocks the signals sent to a whole process, and no process it starts inherits
    that: neither workers, the template, nor workers the I/O thread starts
    itself once the template is gone."""
    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1}
    assert not wanted & _blocked()  # (as the test runs: the main thread takes them)
    with poolloader.DataLoader(list(range(64)), batch_size=2, num_workers=2,
                               persistent_workers=True,
                               multiprocessing_context=start_method) as loader:  # fmt: skip
        iterator = iter(loader)
        next(iterator)
        helpers = [t for t in threading.enumerate() if t.name.startswith("poolloader")]
        assert any(t.name == "poolloader-io" for t in helpers)
        for thread in helpers:
            assert thread.native_id is not None
            assert wanted <= _blocked(tid=thread.native_id), thread.name
        template = loader._pool.template_pid  # (another test's may still be exiting)
        assert template is not None
        started = set(worker_pids())
        for pid in [template, *started]:
            assert not wanted & _blocked(pid), pid
        # Without its template, the I/O thread starts a dead worker's replacement.
        os.kill(template, signal.SIGKILL)
        os.kill(min(started), signal.SIGKILL)
        assert len(list(iterator)) == 31
        fresh = set(worker_pids()) - started
        assert fresh
        for pid in fresh:
            assert not wanted & _blocked(pid), pid


#: The functions that retire an idle worker and fork a fresh one in its place, for
#: a new epoch of non-persistent workers (``Pool._recycle``).
RECYCLERS = ("_recycle", "retire", "launch", "fork", "_send_started_slot", "attach")


def _epoch_interrupted_in(
    loader: Any, functions: tuple[str, ...] | None, turn: int, event_name: str = "c_return"
) -> list[int]:
    """One epoch of ``loader``, its ``iter()`` and ``next()`` calls interrupted by a
    KeyboardInterrupt as the ``turn``-th C call inside poolloader's ``functions``
    (any of its functions: ``None``) returns, or with ``event_name="call"`` as the
    ``turn``-th of its functions begins (once per call: then it goes on, run
    again): the batches."""
    seen = 0

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        nonlocal seen
        if (
            event == event_name
            and (functions is None or frame.f_code.co_name in functions)
            and frame.f_code.co_filename.startswith(PACKAGE)
        ):
            seen += 1
            if seen == turn:
                raise KeyboardInterrupt

    def call(fn: Any) -> Any:
        nonlocal seen
        armed = True
        while True:
            seen = 0
            if armed:  # the call run again after an interrupt runs undisturbed
                sys.setprofile(interrupt)
            armed = False
            try:
                with collector_held():
                    return fn()
            except KeyboardInterrupt:
                continue
            finally:
                sys.setprofile(None)

    iterator = call(lambda: iter(loader))
    got: list[int] = []
    while True:
        try:
            got.append(int(call(lambda: next(iterator))))
        except StopIteration:
            return got


@pytest.mark.parametrize(
    ("num_workers", "context"), [(1, "spawn"), (2, "spawn"), (1, "forkserver"), (1, "fork")]
)
def test_ctrl_c_while_a_worker_starts_afresh_for_an_epoch_loses_no_worker(
    num_workers, context
) -> None:
    """Non-persistent workers start afresh for each epoch: the pool retires the
    idle worker and forks a new one in its slot. A KeyboardInterrupt landing in
    between left the slot holding the retired worker, marked dead, which no
    one replaced: no task went to that slot again, and with one worker the next
    epoch waited for ever. Each epoch here is interrupted at another place."""
    with poolloader.DataLoader(Plain(6), batch_size=1, num_workers=num_workers,
                               multiprocessing_context=context,
                               timeout=HANG_SLACK) as loader:  # fmt: skip
        assert [int(b) for b in loader] == list(range(6))
        before = wait_until(
            lambda: (found := worker_pids()) and len(found) == num_workers and found
        )
        for turn in range(1, 25):
            assert _epoch_interrupted_in(loader, RECYCLERS, turn) == list(range(6)), turn
            # Retired workers exit; one forked for a slot the pool forgot would not.
            now = wait_until(
                lambda: (found := worker_pids()) and len(found) == num_workers and found
            )
            assert not now & before, "the epoch ran on fresh workers"
            before = now
        assert [int(b) for b in loader] == list(range(6))


#: The functions that log the changes made through ``loader.dataset`` and a new
#: epoch's fresh start, and trim that log (``_control.Channel``, ``_dispatch``).
LOGGERS = (
    "stamp", "_seal", "_entry", "_append", "_start_afresh", "record", "compact",
    "advance_base", "updates", "fresh_start", "_stamp", "_trim_control_log", "begin_epoch",
)  # fmt: skip


@pytest.mark.parametrize("persistent", [False, True])
def test_ctrl_c_while_changes_are_logged_loses_no_change_and_breaks_no_epoch(persistent) -> None:
    """The main process logs the changes made through ``loader.dataset`` (and each
    epoch's fresh start, for non-persistent workers) inside iter() and next(). A
    KeyboardInterrupt landing between the log's parallel lists' appends left them
    of different lengths: every later epoch start raised IndexError. One landing
    between moving the log's base and sending the template its changes left the
    template behind for good. Here every epoch changes the dataset, and its
    iter() and next() calls are interrupted at another place of the logging: each
    epoch must be whole and see its change."""
    with poolloader.DataLoader(Plain(6), batch_size=1, num_workers=1,
                               persistent_workers=persistent,
                               timeout=HANG_SLACK) as loader:  # fmt: skip
        assert [int(b) for b in loader] == list(range(6))
        for turn in range(1, 40):
            loader.dataset.scale = turn + 1
            expected = [i * (turn + 1) for i in range(6)]
            assert _epoch_interrupted_in(loader, LOGGERS, turn) == expected, turn
        loader.dataset.scale = 1
        assert [int(b) for b in loader] == list(range(6))


@pytest.mark.parametrize(
    ("persistent", "event_name", "turns"),
    [(True, "c_return", range(1, 700, 3)), (True, "call", range(1, 700, 3)),
     (False, "c_return", range(1, 400, 9)), (False, "call", range(2, 400, 9))],
)  # fmt: skip
def test_ctrl_c_anywhere_in_iter_or_next_leaves_every_epoch_whole(
    persistent, event_name, turns
) -> None:
    """Each epoch's iter() and next() calls are interrupted at another place of
    poolloader's code (the n-th C call to return in it, or the n-th of its
    functions to begin, n going up epoch by epoch): every interrupt reaches the
    caller, and the epoch, the call run again, is whole, in order, with nothing
    twice, and the loader goes on. This found the control log's interrupt
    windows (``test_ctrl_c_while_changes_are_logged_loses_no_change_and_breaks_no_epoch``)."""
    with poolloader.DataLoader(Plain(4), batch_size=1, num_workers=1,
                               persistent_workers=persistent,
                               timeout=HANG_SLACK) as loader:  # fmt: skip
        assert [int(b) for b in loader] == list(range(4))
        for turn in turns:
            assert _epoch_interrupted_in(loader, None, turn, event_name) == list(range(4)), turn
        assert [int(b) for b in loader] == list(range(4))


def _change(dataset: Any, kind: str, turn: int) -> None:
    if kind == "attribute":
        dataset.scale = turn + 1
    elif kind == "attribute deleted":
        del dataset.extra
    elif kind == "item":
        dataset.table[2] = 100 + turn
    elif kind == "item deleted":
        del dataset.table[3]
    elif kind == "list appended":
        dataset.log.append(turn)
    elif kind == "list item deleted":
        del dataset.log[0]
    elif kind == "list slice set":  # one item becomes two
        dataset.log[0:1] = [turn, turn]
    elif kind == "array added to":
        dataset.weights += 1
    else:
        dataset.offsets.add_(turn)


@pytest.mark.parametrize(
    "kind",
    [
        "attribute",
        "attribute deleted",
        "item",
        "item deleted",
        "list appended",
        "list item deleted",
        "list slice set",
        "array added to",
        "tensor added to",
    ],
)
@pytest.mark.parametrize("event_name", ["c_return", "call"])
def test_a_change_interrupted_by_ctrl_c_reaches_the_workers_if_made_here(kind, event_name) -> None:
    """``loader.dataset.scale = 3`` changes the main process's dataset, then
    records the change for the workers. A KeyboardInterrupt landing in between
    left the main process's dataset changed and the persistent workers' not:
    every later batch loaded with the old value. Here the change is interrupted
    at another place each time (the n-th C call returning in poolloader, or the
    n-th of its functions beginning), and the next epoch must load what the main
    process's dataset now holds, whether or not the change was made. The C calls
    (``append``, ``+=`` on an array, a tensor's ``add_``) and a list's item
    deleted or slice set give another result when replayed twice: neither lost
    nor doubled."""
    with poolloader.DataLoader(Table(6), batch_size=None, num_workers=1,
                               persistent_workers=True, timeout=HANG_SLACK) as loader:  # fmt: skip
        ours = poolloader.unwrap(loader.dataset)
        assert list(loader) == [ours[i] for i in range(6)]
        landed = 0
        for turn in range(1, 66):  # (an append's, the longest, takes 62 C calls)
            if kind == "attribute deleted":
                loader.dataset.extra = 50  # (made in full)
            elif kind == "item deleted":
                loader.dataset.table[3] = 50
            elif kind.startswith("list "):
                loader.dataset.log.append(0)
            seen = 0

            def interrupt(frame: Any, event: str, arg: Any) -> None:
                nonlocal seen, landed
                if event == event_name and frame.f_code.co_filename.startswith(PACKAGE):
                    seen += 1
                    if seen == turn:
                        landed += 1
                        raise KeyboardInterrupt

            sys.setprofile(interrupt)
            try:
                with collector_held():
                    _change(loader.dataset, kind, turn)
            except KeyboardInterrupt:
                pass
            finally:
                sys.setprofile(None)
            assert list(loader) == [ours[i] for i in range(6)], (turn, ours.__dict__)
        assert landed >= 5, landed


def _loaded_loader() -> tuple[Any, list[psutil.Process]]:
    """A one-worker fork loader after an epoch, and its processes."""
    loader = poolloader.DataLoader(Plain(4), batch_size=2, num_workers=1,
                                   persistent_workers=True,
                                   multiprocessing_context="fork")  # fmt: skip
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]
    pool = loader._pool
    return loader, handles([*pool.worker_pids, pool.template_pid])


def _interrupt_at(turn: int, event_name: str) -> Any:
    """A profile hook that raises KeyboardInterrupt (once) at the ``turn``-th
    ``event_name`` event inside poolloader's code."""
    seen = 0

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        nonlocal seen
        if event == event_name and frame.f_code.co_filename.startswith(PACKAGE):
            seen += 1
            if seen == turn:
                sys.setprofile(None)
                raise KeyboardInterrupt

    return interrupt


def _left(procs: list[psutil.Process]) -> list[str]:
    """What is left of ``procs`` once they had time to go: running, or not reaped."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        left = []
        for proc in procs:
            try:
                left.append(f"{proc.pid} {proc.status()}")
            except psutil.Error:
                pass  # gone, and reaped
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("event_name", "turns"), [("c_return", range(1, 230, 6)), ("call", range(1, 90, 3))]
)
def test_ctrl_c_anywhere_in_close_leaves_no_process(event_name, turns) -> None:
    """A Ctrl-C landing inside ``loader.close()`` (a second one as a ``with`` block
    closes the loader, say) left the workers running for good where it landed
    before the pool claimed its closing: the loader had let go of the pool, so the
    next close() did nothing. One landing as the template was told to stop left it
    unreaped, and one as the workers were killed could raise ValueError in place of
    the KeyboardInterrupt. Each place in turn here (the n-th C call returning in
    poolloader, or the n-th of its functions beginning): the interrupt reaches the
    caller, the next close() returns, and every process of the loader is gone."""
    landed = 0
    for turn in turns:
        loader, procs = _loaded_loader()
        sys.setprofile(_interrupt_at(turn, event_name))
        try:
            with collector_held():
                loader.close()
        except KeyboardInterrupt:
            landed += 1
        finally:
            sys.setprofile(None)
        loader.close()
        assert _left(procs) == [], turn
    assert landed >= 15, landed


def test_ctrl_c_as_the_collector_ends_a_loader_leaves_no_process() -> None:
    """A loader in a reference cycle ends when the garbage collector runs, inside
    ``DataLoader.__del__``. A Ctrl-C landing there is reported by Python and dropped
    ("Exception ignored in"); the workers must be stopped all the same."""
    ignored: list[type[BaseException]] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda report: ignored.append(report.exc_type)
    try:
        for turn in range(1, 200, 9):
            loader, procs = _loaded_loader()
            loader.cycle = loader  # (only the collector ends it)
            del loader
            sys.setprofile(_interrupt_at(turn, "c_return"))
            try:
                gc.collect()
            finally:
                sys.setprofile(None)
            assert _left(procs) == [], turn
    finally:
        sys.unraisablehook = hook
    assert len(ignored) >= 10 and set(ignored) == {KeyboardInterrupt}, ignored


def test_a_loader_freed_without_closing_its_pool_ends_its_workers() -> None:
    """A Ctrl-C landing as ``DataLoader.__del__`` begins (the collector ending a
    loader in a reference cycle) is dropped by Python before ``close()`` can run:
    the pool, its worker and its template ran on until the interpreter exited, and
    replaced the worker when it was killed. The pool sees its loader gone and
    closes itself."""
    loader, procs = _loaded_loader()
    loader.cycle = loader  # (only the collector ends it)
    del loader
    module = poolloader.loader.__file__

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == "__del__" and code.co_filename == module:
            sys.setprofile(None)
            raise KeyboardInterrupt

    ignored: list[type[BaseException]] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda report: ignored.append(report.exc_type)
    sys.setprofile(interrupt)
    try:
        gc.collect()
    finally:
        sys.setprofile(None)
        sys.unraisablehook = hook
    assert ignored == [KeyboardInterrupt]
    assert _left(procs) == []
