"""Recording a change made through a view (``_tracking.py``): the view's path is
checked against the dataset as it is now, values are pickled for the workers
(refused where they do not pickle, naming what was changed), a call is recorded
in the control channel, and a C method poolloader cannot see into warns once.
What is recorded, and what is not: NOTE [ What is carried ] below.

NOTE [ What is carried ]

Everything done through ``loader.dataset`` that changes it, and nothing that
does not:

* assigning or deleting an attribute or an item, at any depth
  (``loader.dataset.transform.p = 0.3``, ``loader.dataset.cfg["crop"] = 2.0``);
* calling a method written in Python, on the dataset or on anything reached
  through it (``loader.dataset.set_epoch(5)``, ``loader.dataset.sub.set(0.5)``;
  also a Python ``__iter__``, ``__call__``, ``__enter__``/``__exit__``,
  in-place operator, property setter or descriptor ``__set__``: an assignment
  ``loader.dataset.epoch = 3`` to a property runs its setter here, once, and
  what it assigns travels). The method runs in the main process with the view as
  ``self``, so what it assigns is recorded as the assignments above, what it
  only reads is recorded nowhere, and it is not run again in the workers.
  Measured against the alternatives on the benchmark's 1,000,000-row dataset:
  recording the call and running it again in every worker cannot tell a
  reading method from a changing one, so every worker would repeat each
  ``durations()``-style call (45 ms each here) and whatever else the method
  does (logging, files, random draws); comparing the dataset's state before
  and after the call misses ``self.items.append(x)`` when shallow, and costs a
  deep copy (290 ms) when deep. Running against the view costs a reading
  method about 1.2 µs per attribute or item it reads, and nothing per item of
  a list of numbers or strings it iterates (45 ms became 56 ms);
* the mutating methods of lists, dicts, sets, deques and bytearrays
  (``items.append(4)``, ``cfg.update(crop=2.5)``, ``items += [4]``), in-place
  writes into NumPy arrays (``w[0] = 7``, ``w += 1``, ``w.fill(0)``,
  ``np.add(w, 1, out=w)``, ``np.copyto``) and tensors (``t[0] = 7``,
  ``t += 1``, ``t.fill_(0)``, ``torch.nn.init.*``), also through what they
  return that shares their memory (``w.reshape(2, 3)[1] = 0``,
  ``t.view(2, 2)[0].add_(1)``, ``t.numpy()[0] = 9``): these run in C, so the
  call itself is recorded (:class:`~._messages.Call`) and replayed in the
  workers (``x += 1`` is that call, not also a pickled ``x``). A call whose
  arguments do not pickle (``sort(key=lambda ...)``) carries the container's
  contents instead; so does an in-place random fill of a tensor
  (``uniform_``, ``torch.nn.init``), whose replay would draw other numbers,
  and a tensor of at most 4 KiB. A call that changes nothing is not recorded
  (``pop(k, None)`` of a missing key, ``extend([])``, ``discard`` of an absent
  element);
* item writes of numbers and strings (NumPy's scalars too) into one container
  between two batches (``random.shuffle(loader.dataset.items)``,
  ``np.random.shuffle(loader.dataset.arr)``) travel together, a few bytes each
  (:class:`~._messages.SetItems`), and once they outnumber a quarter of its
  items, its whole contents travel instead.

Changes made between two batch submissions travel as one message
(:class:`~._messages.Changes`): a method that sets ten attributes, or a
shuffle, costs one message per worker.

Not carried, and said so where it can be seen cheaply:

* a C-implemented method of an object of a Python class (a class built on a
  C type, ``array.array`` for one): poolloader cannot see what it changes, so
  the first call warns (``RuntimeWarning``), naming the attribute and
  ``loader.broadcast``;
* a Python method that hands ``self`` to code needing the real object
  (``super().update(...)`` into ``dict`` from a dict subclass's method,
  ``type(self)(...)``, ``type(self).level = 3``) raises ``TypeError``: call it
  through ``loader.broadcast``. (``dataclasses`` functions work on a view of a
  dataclass instance: its type carries the fields);
* C code that writes into a large list's memory directly rather than through
  its methods: a list of more than ``MIRROR_LIMIT`` items comes back as a
  proxy, which such code refuses (``heapq`` raises ``TypeError``): pass
  ``poolloader.unwrap(...)`` and carry the change with ``loader.broadcast``.
  (Smaller lists and dicts come back as real ones, whose own items such code
  writes into; those writes are carried, NOTE [ Writes into a view's own
  items ] in ``_tracking_containers.py``);
* changes made through a reference obtained outside the view (the dataset
  object you kept, ``poolloader.unwrap(...)``) or through objects the view
  hands out raw: C objects other than containers, arrays and tensors (files,
  locks, ``random.Random`` and other generators, whose draws are each
  process's own), and class attributes. Use ``loader.broadcast`` for those.

Values travel by value: an object assigned into the dataset arrives in each
worker as its own copy, so two attributes that hold the same object in the
main process hold equal but separate objects in a worker after an assignment.
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
