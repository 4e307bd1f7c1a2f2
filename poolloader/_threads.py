"""The main process's helper threads, and the signals they leave to the main thread.

NOTE [ Signals go to the main thread ]: the kernel hands a signal sent to the
process as a whole (Ctrl-C's SIGINT, a scheduler's SIGTERM, ``signal.alarm``'s
SIGALRM) to any one of its threads that does not block it; it prefers the main
thread, but not always (when the main thread already has a signal pending, for
one). Python runs signal handlers in the main thread whichever thread took the
signal, but only a signal that the main thread itself took interrupts what it
is blocked in: a training loop in ``time.sleep``, a ``queue.get`` or a socket
read goes on waiting, and Ctrl-C seems lost (a few runs in a hundred, on a
loaded machine). So every thread poolloader starts blocks those signals, and
none of them is taken there. Threads that NumPy and torch start themselves
(BLAS and OpenMP pools) block nothing and may still take one: the consumer's waits in
poolloader are therefore slices of at most ``_waiting.WAIT_SLICE`` seconds,
after each of which the main thread runs the handlers of signals that another
thread took.

A process inherits the signal mask of the thread that starts it, also through
``exec``. A helper thread that starts a process (the I/O thread replacing a
dead worker, the thread that starts the template process, or multiprocessing's
forkserver and resource tracker on first use) restores the mask it inherited
for that, with :func:`inherited_signal_mask`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: Signals only the main thread takes: those sent to the whole process. Those the
#: kernel raises in the thread that caused them (SIGSEGV, SIGPIPE, ...) stay open.
MAIN_THREAD_SIGNALS = frozenset(signal.valid_signals()) - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGXCPU,
}

_local = threading.local()


def helper_thread(
    target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()
) -> threading.Thread:
    """A daemon thread running ``target(*args)`` that blocks :data:`MAIN_THREAD_SIGNALS`
    (not started yet)."""
    return threading.Thread(target=_run, args=(target, args), name=name, daemon=True)


def _run(target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    _local.inherited = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    target(*args)


@contextlib.contextmanager
def inherited_signal_mask() -> Iterator[None]:
    """Within, a helper thread has the signal mask of the thread that started it,
    so that a process it starts gets that mask (elsewhere, nothing changes)."""
    inherited = getattr(_local, "inherited", None)
    if inherited is None:
        yield
        return
    signal.pthread_sigmask(signal.SIG_SETMASK, inherited)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
