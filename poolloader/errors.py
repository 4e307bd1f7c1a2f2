"""Exceptions raised by poolloader.

Every class refines a built-in exception, so code written against torch's
``DataLoader`` (which raises ``RuntimeError`` for worker trouble) keeps
catching what it caught before::

    Exception
    ├── RuntimeError
    │   ├── LoaderClosedError ............ closed by you: the loader was closed
    │   ├── PoolBrokenError .............. broken by circumstance
    │   │   ├── WorkerCrashedError ....... workers died too often, or one batch killed two
    │   │   └── WorkerStartError ......... a worker could not start (unpickling, worker_init_fn)
    │   ├── LoaderTimeoutError ........... (also TimeoutError) ``timeout`` seconds passed
    │   │                                  waiting for a batch; the loader goes on
    │   └── TransportError ............... one batch could not be moved to the main
    │                                      process (out of file descriptors); the
    │                                      loader goes on
    ├── TypeError
    │   └── NotPicklableError ............ (also pickle.PicklingError) an object cannot
    │                                      be sent to spawn workers
    └── ValueError
        └── ResultTooLargeError .......... a batch does not fit the shared-memory transport

Exceptions raised by dataset or collate code inside a worker are not wrapped in
any of these: they come back as their own type, with the worker's traceback
attached as ``__cause__`` (see :class:`RemoteTraceback`).
"""

from __future__ import annotations

import pickle

__all__ = [
    "LoaderClosedError",
    "LoaderTimeoutError",
    "NotPicklableError",
    "PoolBrokenError",
    "RemoteTraceback",
    "ResultTooLargeError",
    "TransportError",
    "WorkerCrashedError",
    "WorkerStartError",
]


class LoaderClosedError(RuntimeError):
    """The loader was closed (``close()``, ``with`` exit) and cannot load any more."""


class PoolBrokenError(RuntimeError):
    """The worker pool can no longer deliver batches, through no call of the user's."""


class WorkerCrashedError(PoolBrokenError):
    """Worker processes died more often than ``max_worker_restarts`` allows.

    Also raised when the same batch killed a worker twice (a "poison" batch),
    since retrying it again would only kill a third.

    Attributes:
        exitcodes: The exit codes of the dead workers, negative for signals
            (``-9`` is SIGKILL, most often the kernel's out-of-memory killer).
        indices: The indices of the batch that was running when a worker died,
            or ``None`` when no batch was.
    """

    def __init__(
        self, message: str, *, exitcodes: tuple[int, ...] = (), indices: object = None
    ) -> None:
        super().__init__(message)
        self.exitcodes = exitcodes
        self.indices = indices

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (self.args[0], self.exitcodes, self.indices))


def _rebuild_crash(message: str, exitcodes: tuple[int, ...], indices: object) -> WorkerCrashedError:
    return WorkerCrashedError(message, exitcodes=exitcodes, indices=indices)


class WorkerStartError(PoolBrokenError):
    """A worker process failed while starting: the dataset, ``collate_fn`` or
    ``worker_init_fn`` could not be unpickled there, or ``worker_init_fn`` raised."""


class LoaderTimeoutError(RuntimeError, TimeoutError):
    """No batch arrived within the loader's ``timeout`` seconds.

    The pool is not broken: the batch may still arrive, and the loader can be
    iterated again."""


class TransportError(RuntimeError):
    """A batch could not be moved from its worker to the main process, most often
    because the main process ran out of file descriptors. That batch is lost; the
    loader goes on."""


class NotPicklableError(TypeError, pickle.PicklingError):
    """An object the workers need cannot be pickled, which spawn workers require."""


class ResultTooLargeError(ValueError):
    """A batch is larger than the shared-memory transport was allowed to allocate."""


def _map_style_stop_iteration() -> RuntimeError:
    """The error for a map-style dataset's ``__getitem__`` (or a ``collate_fn``)
    that raised StopIteration. torch's loader ends the epoch there without a word,
    dropping the batches left; poolloader says so, with or without workers, and the
    epoch goes on as after any other error."""
    return RuntimeError(
        "a map-style dataset's __getitem__ (or the collate_fn) raised StopIteration, "
        "which would end the epoch early without a word (torch's DataLoader does); raise "
        "IndexError or another exception for an item that cannot be loaded"
    )


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of a re-raised error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _append_to_message(exc: BaseException, text: str) -> bool:
    """Put ``text`` after ``exc``'s message, on a line of its own, where rewriting
    its ``args`` changes the message and nothing else; whether it did (otherwise
    the caller adds a note, on Python 3.11+)."""
    if len(exc.args) > 1 or (exc.args and not isinstance(exc.args[0], str)):
        return False
    if type(exc).__str__ not in (BaseException.__str__, KeyError.__str__):
        return False
    original = str(exc.args[0]) if exc.args else ""
    message = f"{original}\n{text}" if original else text
    exc.args = (_Message(message),) if isinstance(exc, KeyError) else (message,)
    return True


class _Message(str):
    """A KeyError message that prints as text, not as the repr of a key."""

    def __repr__(self) -> str:
        return str(self)
