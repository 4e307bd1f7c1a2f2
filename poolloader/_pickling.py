"""Pickling for spawn workers, with errors that name the object that failed.

A bare ``PicklingError: cannot pickle '_thread.lock' object`` from deep inside
``Process.start()`` tells nobody which attribute of which dataset holds the
lock. :func:`dumps` pickles an object once and, when that fails, walks its
attributes to name the culprit (``dataset.reader._fh``) and says how to fix it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
import types
from collections.abc import Callable, Iterator
from typing import Any

from ._messages import PickledObject
from .errors import NotPicklableError

#: How deep :func:`find_culprit` looks for the unpicklable part. Deeper finds
#: the exact attribute in more cases but costs a pickling attempt per object.
CULPRIT_SEARCH_DEPTH = 4
#: Containers longer than this are searched only at their first items.
CULPRIT_SEARCH_WIDTH = 32

PROTOCOL = pickle.HIGHEST_PROTOCOL

#: What takes each part of a pickle as it is made (:func:`ship`).
OnPart = Callable[[bytes | bytearray], None]


def dumps(obj: object, what: str, why: str | None = None) -> bytes:
    """Pickle ``obj`` for spawn workers, or raise :class:`NotPicklableError` naming it.

    Args:
        obj: The object to send.
        what: How the user knows the object, e.g. ``"dataset"`` or ``"collate_fn"``.
        why: Why it must pickle, for the error (by default, :data:`WORKER_PICKLING`).
    """
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise not_picklable(obj, what, exc, why or WORKER_PICKLING) from exc


def dumps_or_none(obj: object) -> bytes | None:
    """``obj`` pickled, or ``None`` if it cannot be (no error: the caller has
    another way to send it)."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        return None


# NOTE [ Fingerprints ]
#
# With persistent_workers=False each epoch's workers must see the dataset as it
# is when the epoch starts, also after changes made to the dataset object
# directly (not through loader.dataset), as torch's new workers would. Only
# pickling the dataset finds such changes. A plain pickle of a big manifest (a
# million dicts) takes 1.5 s here, nearly all of it spent in the pickler's memo,
# which records every object so that one referred to twice is written once.
# A fingerprint pickles in the pickler's fast mode, without the memo (about 6x
# faster), into a BLAKE2b digest (nothing is kept): equal digests mean equal
# contents. What the fast mode cannot tell is which parts are one object: a
# direct change that only makes two equal parts into one (or one into two) is
# not seen. It refuses cyclic objects, and writes a part again at every
# reference, so an object shared many times may pickle far bigger than its
# plain pickle: both give no fingerprint (``None``), and the caller pickles.


class _Digest:
    """A write-only file that hashes what is written, up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.hash = hashlib.blake2b(digest_size=32)
        self.size = 0
        self.limit = limit

    def write(self, data: Any) -> int:  # bytes, or a PickleBuffer (a big array's memory)
        size = memoryview(data).nbytes
        self.size += size
        if self.size > self.limit:
            raise _TooBig
        self.hash.update(data)
        return size


class _TooBig(Exception):
    pass


def fingerprint(obj: object, limit: int) -> bytes | None:
    """A digest of ``obj``'s contents, for telling whether it changed (see NOTE
    [ Fingerprints ]); ``None`` when ``obj`` is cyclic, does not pickle, or its
    fast pickle passes ``limit`` bytes."""
    digest = _Digest(limit)
    pickler = pickle.Pickler(digest, protocol=PROTOCOL)
    try:
        # No memo (see the NOTE). ``fast`` is deprecated: where it is gone, the
        # AttributeError gives no fingerprint, and epochs compare pickles.
        pickler.fast = True
        pickler.dump(obj)
    except Exception:  # _TooBig, ValueError for a cycle, anything that does not pickle
        return None
    return digest.hash.digest()


def ship(obj: object, what: str, *, inherited: bool, on_part: OnPart | None = None) -> object:
    """How ``obj`` travels to the template process (and the workers it forks).

    ``inherited`` (the ``fork`` start method): as itself, never pickled. Else
    pickled once, here, as a :class:`~poolloader._messages.PickledObject`; an
    object that may only be pickled while a process starts (``multiprocessing``
    locks, values, queues: "through inheritance") travels as itself, in the
    process's arguments. Anything else that does not pickle raises
    :class:`NotPicklableError`, naming the part.

    ``on_part``: given each :data:`DATASET_PART` bytes of the pickle as soon as they are
    made, and the rest at the end, so that the receiver unpickles while this
    process still pickles; when pickling fails, what it was given is to be
    thrown away."""
    if inherited:
        return obj
    try:
        return PickledObject(_dumps_sharing_the_gil(obj, on_part))
    except RuntimeError as exc:
        if "through inheritance" in str(exc):
            return obj
        raise not_picklable(obj, what, exc) from exc
    except Exception as exc:
        raise not_picklable(obj, what, exc) from exc


#: Bytes of a pickle handed on at a time while it is made (:func:`ship`): the
#: template process unpickles the dataset's in parts of this size, each while the
#: next travels.
DATASET_PART = 4 << 20


class _Parts:
    """A write-only file that keeps what is written, in parts of
    :data:`DATASET_PART` bytes, each handed on to ``on_part`` (if any) once full.
    Each byte is copied once into its part (and once more when the parts are
    joined), as the pickler's frames and big buffers arrive."""

    def __init__(self, on_part: OnPart | None) -> None:
        self._parts: list[bytes | bytearray] = []
        self._pending = bytearray()
        self._on_part = on_part

    def write(self, data: Any) -> int:  # bytes, or a PickleBuffer (a big array's memory)
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            if self._pending or len(view) < DATASET_PART:
                room = DATASET_PART - len(self._pending)
                self._pending += view[:room]
                view = view[room:]
                if len(self._pending) == DATASET_PART:
                    self._keep_pending()
            else:  # a big buffer: whole parts straight from it
                self._keep(bytes(view[:DATASET_PART]))
                view = view[DATASET_PART:]
        return written

    def _keep_pending(self) -> None:
        """The pending bytes become a part as they are (never written again)."""
        part, self._pending = self._pending, bytearray()
        self._keep(part)

    def _keep(self, part: bytes | bytearray) -> None:
        self._parts.append(part)
        if self._on_part is not None:
            self._on_part(part)

    def close(self) -> bytes:
        """All that was written; the last part is handed on."""
        if self._pending:
            self._keep_pending()
        return b"".join(self._parts)


def _dumps_sharing_the_gil(obj: object, on_part: OnPart | None) -> bytes:
    """``pickle.dumps(obj)``, written out frame by frame through Python code, so
    that other threads run meanwhile (``pickle.dumps`` holds the GIL until it is
    done, 1.5 s for a million records) and ``on_part`` gets the pickle as it is
    made (see :func:`ship`)."""
    out = _Parts(on_part)
    pickle.Pickler(out, protocol=PROTOCOL).dump(obj)
    return out.close()


#: Why most objects must pickle, for the error when one does not.
WORKER_PICKLING = (
    "workers started with spawn or forkserver receive it by pickling (spawn is "
    "poolloader's default; with multiprocessing_context='fork', torch's default on "
    "Linux, workers inherit it instead)"
)
#: Why a change made through ``loader.dataset`` must pickle (whatever the start method).
CHANGE_PICKLING = (
    "a change made through loader.dataset reaches running workers by pickling, with "
    "every start method (fork included); loader.broadcast(fn, ...) can build such a "
    "value in each worker instead"
)


def not_picklable(
    obj: object, what: str, exc: BaseException, why: str = WORKER_PICKLING, hint: str = ""
) -> NotPicklableError:
    """Build the error for ``obj`` (known to the user as ``what``) failing with ``exc``.

    ``why`` says why it had to pickle; ``hint``, how to fix it (by default, advice
    for objects sent to workers)."""
    path, part = find_culprit(obj, what)
    subject = what if path == what else f"{path} (part of {what})"
    hint = hint or _hint(part)
    message = f"{subject} cannot be pickled, but {why}: {type(exc).__name__}: {exc}. {hint}"
    return NotPicklableError(message)


def find_culprit(obj: object, name: str, depth: int = CULPRIT_SEARCH_DEPTH) -> tuple[str, object]:
    """The most specific part of ``obj`` that fails to pickle, as ``(path, part)``."""
    if depth > 0:
        for child_name, child in _children(obj, name):
            if not _pickles(child):
                return find_culprit(child, child_name, depth - 1)
    return name, obj


def _pickles(obj: object) -> bool:
    try:
        pickle.dump(obj, _NullWriter(), protocol=PROTOCOL)
    except Exception:
        return False
    return True


class _NullWriter(io.RawIOBase):
    def write(self, b: Any) -> int:
        return len(b)


def _children(obj: object, name: str) -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for i, (key, value) in enumerate(obj.items()):
            if i >= CULPRIT_SEARCH_WIDTH:
                return
            yield f"{name}[{key!r}]", value
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj[:CULPRIT_SEARCH_WIDTH]):
            yield f"{name}[{i}]", value
    elif isinstance(obj, functools.partial):
        yield f"{name}.func", obj.func
        for i, value in enumerate(obj.args[:CULPRIT_SEARCH_WIDTH]):
            yield f"{name}.args[{i}]", value
        for key, value in list(obj.keywords.items())[:CULPRIT_SEARCH_WIDTH]:
            yield f"{name}.keywords[{key!r}]", value
    elif isinstance(obj, types.FunctionType | types.MethodType | type):
        return
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            for key, value in list(state.items())[:CULPRIT_SEARCH_WIDTH]:
                yield f"{name}.{key}", value


def _hint(part: object) -> str:
    if isinstance(part, types.FunctionType) and (
        part.__name__ == "<lambda>" or "<locals>" in part.__qualname__
    ):
        return (
            "Workers import functions by their qualified name, so lambdas and functions "
            "defined inside other functions cannot reach them: define it with `def` at module "
            "level (functools.partial of a module-level function works too)."
        )
    cls = part if isinstance(part, type) else type(part)
    if "<locals>" in getattr(cls, "__qualname__", ""):
        return (
            f"Workers import classes by their qualified name, so a class defined inside a "
            f"function ({cls.__qualname__}) cannot reach them: define it at module level."
        )
    if isinstance(part, types.GeneratorType):
        return "Generators cannot be pickled: create the iterator inside the worker instead."
    return (
        "Open files, locks, sockets, database handles and similar resources cannot be "
        "pickled: create them lazily in the worker (on first use in __getitem__, or in "
        "worker_init_fn), or leave them out in __getstate__."
    )


def broadcast_payload(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a broadcast call, failing with the function's name when it cannot be."""
    name = getattr(fn, "__qualname__", repr(fn))
    dumps(fn, f"the broadcast function {name}")
    return dumps((fn, args, kwargs), f"the arguments of broadcast({name}, ...)")
