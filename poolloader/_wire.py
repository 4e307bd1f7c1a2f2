"""How messages travel on a worker's connection: :func:`encode` and :func:`decode`.

NOTE [ Hot messages ]: every batch costs one :class:`~poolloader._messages.Task`
from the main process and one :class:`~poolloader._messages.Done` back. Pickled
as themselves, each names its class (and a ``Done`` its payload's class), which
pickle looks up by module and name at both ends, and rebuilds through the
class's constructor call: 8 µs to pickle a ``Task`` and 16 µs for a ``Done``
holding a tiny batch, 5 and 11 µs to unpickle them, paid on the main process's
hot path for batches that take a few microseconds to load. These two travel as
plain tuples instead, led by a small integer that says which message it is,
with a ``Done``'s inline payload flattened into it: about 1 µs to pickle, 3 µs to
unpickle and rebuild. Every other message, rarer, travels pickled as itself.
Both ends of a connection use this module, so the form never reaches anything
else; a message still arrives as its named dataclass.

NOTE [ Framing ]: :func:`send` and :func:`recv` frame a message as
``Connection.send_bytes`` and ``recv_bytes`` do (a 4-byte big-endian length, or
-1 and an 8-byte one), so either end may use either; they only take fewer
Python steps (``recv_bytes`` reads through two ``BytesIO`` objects and six
calls): a few µs per message, two messages per batch in the main process and two
in the worker. Closed connections raise what the ``Connection`` methods raise.
"""

from __future__ import annotations

import os
import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

from ._messages import Done, Task
from ._packing import Inline

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The leading integer of a message that travels as a tuple.
_TASK = 0
_DONE_INLINE = 1  # a Done whose payload is Inline, flattened
_DONE = 2  # a Done with any other payload (slab or pickled), pickled as itself
_TASK_IN_SLAB = 3  # a Task that names a slab or may not make one


def encode(message: object) -> bytes:
    """``message`` as the bytes sent on a worker's connection."""
    kind = type(message)
    if kind is Task:
        task: Task = message  # type: ignore[assignment]
        if task.slab or not task.may_make:
            grant = (task.slab, task.slab_size, task.may_make)
            return pickle.dumps(
                (_TASK_IN_SLAB, task.seq, task.epoch, task.position, task.index, *grant), _PROTOCOL
            )
        return pickle.dumps((_TASK, task.seq, task.epoch, task.position, task.index), _PROTOCOL)
    if kind is Done:
        done: Done = message  # type: ignore[assignment]
        if type(done.payload) is Inline:
            fields = (_DONE_INLINE, done.seq, done.payload.skeleton, done.nbytes, done.elapsed)
        else:
            fields = (_DONE, done.seq, done.payload, done.nbytes, done.elapsed)
        return pickle.dumps(fields, _PROTOCOL)
    return pickle.dumps(message, _PROTOCOL)


def decode(data: bytes) -> Any:
    """The message :func:`encode` made ``data`` of."""
    found = pickle.loads(data)
    if type(found) is not tuple:
        return found
    kind = found[0]
    if kind == _TASK:
        return Task(found[1], found[2], found[3], found[4])
    if kind == _DONE_INLINE:
        return Done(found[1], Inline(found[2]), found[3], found[4])
    if kind == _DONE:
        return Done(found[1], found[2], found[3], found[4])
    if kind == _TASK_IN_SLAB:
        return Task(*found[1:])
    raise ValueError(f"not a poolloader message: a tuple led by {kind!r}")


_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
#: Up to this size a message goes out in one write with its length (as
#: ``Connection.send_bytes`` sends it); longer ones go through ``send_bytes``.
_ONE_WRITE = 16384


def send(conn: Connection, data: bytes) -> None:
    """``conn.send_bytes(data)`` (NOTE [ Framing ])."""
    if len(data) > _ONE_WRITE:
        conn.send_bytes(data)
        return
    framed = _LENGTH.pack(len(data)) + data
    fd = conn.fileno()  # (OSError once the connection is closed)
    written = os.write(fd, framed)
    if written < len(framed):  # (a full socket buffer)
        rest = memoryview(framed)[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def recv(conn: Connection) -> bytes:
    """``conn.recv_bytes()`` (NOTE [ Framing ])."""
    fd = conn.fileno()
    (size,) = _LENGTH.unpack(_read(fd, 4))
    if size == -1:
        (size,) = _LONG_LENGTH.unpack(_read(fd, 8))
    return _read(fd, size) if size else b""


def _read(fd: int, size: int) -> bytes:
    data = os.read(fd, size)
    if len(data) == size:
        return data
    if not data:
        raise EOFError
    chunks, left = [data], size - len(data)
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise OSError("got end of file during message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
