"""What a dead worker means: words for exit codes, the errors that end a pool,
and ending the processes a dead worker left behind.

NOTE [ Process trees ] in ``_proctree.py`` says how those processes are found.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import psutil

from . import _proctree
from ._messages import StartFailed
from ._tasks import TaskRecord, raisable
from ._threads import helper_thread
from .errors import PoolBrokenError, WorkerCrashedError, WorkerStartError


@dataclass(frozen=True, slots=True)
class Death:
    """One worker's death, as the pool saw it."""

    worker_id: int
    pid: int
    code: int  # exit code, negative for a signal
    running: TaskRecord | None  # the task it was running, if any
    held_tasks: bool  # whether it held any task (running or queued)


def crash_error(
    death: Death, exitcodes: tuple[int, ...], deaths: int, max_restarts: int, resumable: bool
) -> PoolBrokenError | None:
    """The error that ends the pool after ``death``, or ``None`` to replace the worker.

    Too many deaths, a batch that killed a second worker (a poison batch), or a death
    in an IterableDataset's shard (its position cannot be recovered) end the pool.
    The message opens with torch's own sentence for the death (:func:`torch_words`)."""
    running = death.running
    indices = running.index if running is not None else None
    exits = ", ".join(describe_exit(c) for c in exitcodes)
    if deaths > max_restarts:
        doing = f"loading batch indices {short(indices)}" if running else "not loading a batch"
        why = (
            f"Workers died {deaths} times, more than max_worker_restarts={max_restarts} "
            f"allows ({exits}). This one, worker {death.worker_id}, was {doing}."
        )
    elif running is not None and running.killed:
        # Its own deaths only: ``exitcodes`` has every death of the pool so far.
        exitcodes = (*running.killed, death.code)
        why = (
            f"{batch_words(running.position, running.index, 'Batch')} killed two "
            f"workers ({', '.join(describe_exit(c) for c in exitcodes)}); it is not retried "
            "again."
        )
    elif death.held_tasks and not resumable:
        why = (
            f"Worker {death.worker_id} died while iterating an IterableDataset "
            f"({describe_exit(death.code)}); its position in its shard is lost, so the epoch "
            "cannot continue exactly."
        )
    else:
        return None
    return WorkerCrashedError(
        f"{torch_words(death.pid, death.code)} {why}", exitcodes=exitcodes, indices=indices
    )


def unloaded_error(error: PoolBrokenError, position: int, index: object) -> PoolBrokenError:
    """A copy of a broken pool's ``error`` for batch ``position``, which was not
    loaded when the pool broke, saying so: the message is about the batch that
    broke it, and the consumer gets a copy for every batch (NOTE [ A broken pool ]
    in ``_iterator.py``)."""
    found = raisable(error)
    note = f"{batch_words(position, index, 'Batch')} was not loaded: the pool broke first."
    message = str(found.args[0]) if found.args else ""
    found.args = (f"{message}\n{note}" if message else note, *found.args[1:])
    return found


def torch_words(pid: int, code: int) -> str:
    """The sentence torch's DataLoader raises for worker ``pid`` ended with ``code``
    ("DataLoader worker (pid 4242) is killed by signal: Killed."): scripts that look
    for it in an error, and people who search for it, find it here too."""
    if code >= 0:
        return f"DataLoader worker (pid {pid}) exited unexpectedly with exit code {code}."
    try:
        name = signal.strsignal(-code) or f"signal {-code}"
    except ValueError:
        name = f"signal {-code}"
    return f"DataLoader worker (pid {pid}) is killed by signal: {name}."


def reap_group_later(pid: int, created: float) -> None:
    """End, on a thread of their own, the processes dead worker ``pid`` left in its
    process group: those created from the worker's start (``created``, psutil's
    clock) until now, when it was found dead (see :func:`_proctree.group_members`)."""
    helper_thread(
        _reap_group, f"poolloader-reap-{pid}", (pid, created, _proctree.process_clock())
    ).start()


def _reap_group(pgid: int, since: float, until: float) -> None:
    _proctree.terminate_all(_proctree.group_members({pgid}, since, until))


def descendants(pids: list[int]) -> list[psutil.Process]:
    """Every live descendant of the processes ``pids``."""
    found = []
    for pid in pids:
        try:
            found.extend(psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return found


#: The exit code of a worker whose thread reading the main process's messages
#: failed (its traceback is on stderr): deaf to tasks, it ends rather than wait.
#: Dataset code may exit with the same code: the worker first writes
#: :data:`INBOX_FAILED` into its started slot, which tells the two apart.
EXIT_INBOX_FAILED = 4
#: What a worker's started slot holds at :data:`INBOX_FAILED_AT` once its message
#: thread failed. A field of its own: the seq of a task the worker's main thread
#: starts meanwhile, written at 0, must not overwrite it.
INBOX_FAILED = -2
INBOX_FAILED_AT = 8
#: The bytes of a started slot: the seq of the task started, then the failure mark.
STARTED_SLOT_BYTES = 16


class InboxFailed(int):
    """:data:`EXIT_INBOX_FAILED`, from a worker that said its message thread failed."""


def describe_exit(code: int) -> str:
    """Words for a worker's exit code: ``-9`` → "killed by SIGKILL (...)"."""
    if isinstance(code, InboxFailed):
        return f"exit code {code} (its thread reading messages failed; traceback on stderr)"
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    cause = {
        "SIGKILL": " (most often the out-of-memory killer)",
        "SIGSEGV": " (a crash in native code, such as a decoder)",
        "SIGBUS": " (often /dev/shm too small for shared memory)",
    }.get(name, "")
    return f"killed by {name}{cause}"


def short(obj: object, limit: int = 200) -> str:
    """``repr(obj)``, cut to ``limit`` characters for a message."""
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def indices_words(index: object) -> str:
    """``"indices [4, 5]"`` for a message; nothing for an IterableDataset's batch,
    whose sampler yields ``None`` for each item (it has no indices)."""
    if index is None or (isinstance(index, list) and all(i is None for i in index)):
        return ""
    return f"indices {short(index)}"


def batch_words(position: int, index: object, noun: str = "batch") -> str:
    """``"batch 3 (indices [4, 5])"``, or ``"batch 3"`` for an IterableDataset's
    (``noun``: ``"Batch"`` to open a sentence)."""
    words = indices_words(index)
    return f"{noun} {position} ({words})" if words else f"{noun} {position}"


def start_error(message: StartFailed) -> WorkerStartError:
    """The error for a worker (or the template process, ``worker_id`` -1) that
    reported why it could not start."""
    error = message.error
    hint = ""
    if "__main__" in error.message or "__mp_main__" in error.message:
        hint = (
            " Spawn workers import your main script again (as __mp_main__, without running "
            'what is under `if __name__ == "__main__":`) and look classes and functions '
            "up there by name: define them at the top level of the script, not inside "
            "that block or a function; in an interactive session, which workers cannot "
            "import, move them into a module (a .py file) and import them."
        )
    return WorkerStartError(
        f"{_who(message.worker_id)} (pid {message.pid}) failed to start: "
        f"{error.type_name}: {error.message}.{hint}\nWorker traceback:\n{error.traceback}"
    )


#: The exit code of a spawned interpreter whose start raised before poolloader's
#: code ran: most often the main module, imported again in the worker, started
#: workers itself (no ``if __name__ == "__main__":`` guard).
EXIT_BOOTSTRAP_ERROR = 1


def silent_start_error(worker_id: int, pid: int, code: int) -> WorkerStartError:
    """The error for a worker that exited before it reported ready or why not."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if code == EXIT_BOOTSTRAP_ERROR and main_file and not os.path.exists(main_file):
        hint = (
            f"It raised before it could report why (its traceback is on stderr): spawn and "
            f"forkserver workers import your main script again, and it is not a file they "
            f"can read ({main_file}: a script fed on standard input, `python - < script.py`). "
            "Save it as a .py file and run that, or pass multiprocessing_context='fork'."
        )
    elif code == EXIT_BOOTSTRAP_ERROR:
        hint = (
            "It raised before it could report why (its traceback is on stderr). Most often "
            "this is a script without a main guard: spawn and forkserver workers import your "
            "main module, so a script that creates and iterates a DataLoader at module level "
            "must guard that code with `if __name__ == '__main__':`."
        )
    else:
        hint = (
            "It ended before it could report why, while unpickling the dataset, collate_fn "
            "or worker_init_fn, or while running worker_init_fn: look there for native code "
            "that crashes or for a call to os._exit()."
        )
    return WorkerStartError(
        f"{_who(worker_id)} (pid {pid}) exited while starting ({describe_exit(code)}). " + hint
    )


def _who(worker_id: int) -> str:
    """A worker by its id; -1 is the template process (it unpickles what workers need)."""
    if worker_id >= 0:
        return f"DataLoader worker {worker_id}"
    return "The process DataLoader workers are forked from"
