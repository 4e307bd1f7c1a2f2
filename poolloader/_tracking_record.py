"""Recording a change made through a view (``_tracking.py``): the view's path is
checked against the dataset as it is now, values are pickled for the workers
(refused where they do not pickle, naming what was changed), a call is recorded
in the control channel, and a C method poolloader cannot see into warns once.
What is recorded, and what is not: NOTE [ What is carried ] in ``_control.py``.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _pickling
from ._folding import contents_call
from ._messages import Call, Path
from ._tracking_paths import current_path, render

if TYPE_CHECKING:
    from ._tracking import View

_get = object.__getattribute__  # a view's own state, past its __getattribute__


def _state(view: Any) -> tuple[Any, Path, Any]:
    """``(object, path, channel)`` of a view about to record a change: its path
    checked against the dataset as it is now (NOTE [ Stale references ]), and
    what C code wrote into its own items recorded first (NOTE [ Writes into a
    view's own items ] in ``_tracking_containers.py``)."""
    _get(view, "_pl_settle")()
    target, path = _get(view, "_pl_target"), _get(view, "_pl_path")
    channel = _get(view, "_pl_channel")
    if path and channel.active:
        current = current_path(channel.source, path, target)
        if current is not path:
            object.__setattr__(view, "_pl_path", current)
            path = current
    return target, path, channel


def _payload(channel: Any, value: Any, where: Any) -> bytes | None:
    """Pickle a value for the workers (``None`` when no workers need it), or raise
    :class:`~poolloader.errors.NotPicklableError` naming it: ``where()`` (or
    ``where``, a string) is how the user knows it."""
    if not channel.active:
        return None
    try:
        with channel.pinning():
            return pickle.dumps(value, _pickling.PROTOCOL)
    except Exception as exc:
        what = where if isinstance(where, str) else where()
        raise _pickling.not_picklable(value, what, exc, _pickling.CHANGE_PICKLING) from exc


# NOTE [ A change and Ctrl-C ]: a change made through ``loader.dataset`` is
# made in the main process's dataset, then recorded for the workers. A
# KeyboardInterrupt landing in between (it lands as any call returns) left the
# main process's dataset changed and the workers' not, for good with persistent
# workers: every later batch loaded with the old value, silently. A change
# that may be replayed twice with the same result (setting an attribute or an
# item; deleting one unless it was recorded already) is therefore recorded on
# the way out of an interrupt too, if the main process's object shows it made.


def change_and_record(
    channel: Any,
    change: Any,
    update: Any,
    was_made: Any,
    container: Any = None,
    whole: Any = None,
) -> None:
    """``change()`` in the main process, then record ``update`` (``None``: no worker
    needs it); interrupted in between, ``update`` is recorded all the same when
    ``was_made()`` says the change was made (NOTE [ A change and Ctrl-C ]).
    ``whole``: the view of a sequence the change may shorten or lengthen (a slice
    set, an item deleted), which replayed twice is another change: on the way out
    of an interrupt its contents are recorded too (NOTE [ A C call and Ctrl-C ])."""
    if update is None:
        change()
        return
    try:
        change()
        channel.record(update, container)
    except BaseException as exc:
        if not made(lambda: channel.recorded_last(update)) and made(was_made):
            channel.record(update, container)
        if whole is not None:
            record_contents_if_interrupted(exc, (whole,), container=True)
        raise


# NOTE [ A C call and Ctrl-C ]: a C call that changes an object in place
# (``items.append(x)``, ``w += 1``, ``t.add_(1)``, ``t[0] = 7``) runs here and is
# then recorded as the call, which the workers run again. Run twice it gives
# another result, and once it returned nothing tells whether it ran. On the way
# out of an interrupt (KeyboardInterrupt, or SystemExit from a signal handler)
# the object's whole contents are recorded as well, as they now are here: the
# workers' copy then matches the main process's whether the call ran or not,
# and whether or not it was recorded before the interrupt. An ordinary error
# records nothing more: a C call that raises has changed nothing
# (``items.remove(x)`` of a missing ``x``).


def record_contents_if_interrupted(
    exc: BaseException, views: Iterable[Any], container: bool = False
) -> None:
    """After ``exc`` left a C call that changes the objects of ``views``: if it is
    an interrupt, record each object's whole contents (NOTE [ A C call and Ctrl-C ])."""
    if isinstance(exc, Exception):
        return
    for view in views:
        if _get(view, "_pl_channel").active:
            with contextlib.suppress(Exception):  # (contents that do not pickle: as before)
                record_call(view, None, _get(view, "_pl_target") if container else None)


def made(check: Any) -> bool:
    """``check()``, or ``False`` if it raises."""
    try:
        return bool(check())
    except Exception:
        return False


def record_call(view: Any, call: bytes | None, container: Any = None) -> None:
    """Record a call that changed the view's object (its contents if ``call`` is None)."""
    target, path, channel = _state(view)
    if call is None:
        with channel.pinning():
            call = contents_call(target)
        if call is None:  # its items do not pickle: say which
            _pickling.dumps(target, render(path), _pickling.CHANGE_PICKLING)
            return
    channel.record(Call(path, call), container)


_warned: set[tuple[type, str]] = set()


def _untracked_call(view: View, name: str, bound: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a C method poolloader cannot see into, warning the first time."""
    tp = type(_get(view, "_pl_target"))
    if (tp, name) not in _warned:
        _warned.add((tp, name))
        where = render(_get(view, "_pl_path"))
        owner = next((k.__qualname__ for k in tp.__mro__ if name in vars(k)), tp.__qualname__)
        warnings.warn(
            f"{where}.{name}() is implemented in C (by {owner}), so poolloader cannot see "
            f"what it changes: if it changes {where}, the workers' copies do not change "
            "with it. Make such a change with loader.broadcast(fn, ...), which runs "
            "fn(dataset, ...) here and in every worker.",
            RuntimeWarning,
            stacklevel=2,
        )
    return bound(*args, **kwargs)
