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
"""

from __future__ import annotations

import pickle
from typing import Any

from ._messages import Done, Task
from ._packing import Inline

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The leading integer of a message that travels as a tuple.
_TASK = 0
_DONE_INLINE = 1  # a Done whose payload is Inline, flattened
_DONE = 2  # a Done with any other payload (slab or pickled), pickled as itself


def encode(message: object) -> bytes:
    """``message`` as the bytes sent on a worker's connection."""
    kind = type(message)
    if kind is Task:
        task: Task = message  # type: ignore[assignment]
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
    raise ValueError(f"not a poolloader message: a tuple led by {kind!r}")
