"""Where a kept reference to part of the dataset is now (NOTE [ Stale references ])."""

from __future__ import annotations

import collections
import pickle
from typing import Any

from ._messages import Path

_MISSING = object()

# NOTE [ Stale references ]
#
# A view records the path it was read at (``dataset.items[1]``), and the workers
# replay a change at that path. A reference kept across a change of the dataset
# may no longer sit there: ``rec = loader.dataset.items[1]``, then the list is
# reordered (``rec`` moved to ``items[2]``), or ``aug = loader.dataset.transform``,
# then ``set_epoch`` assigns a new transform (``aug`` is no longer in the dataset).
# Replayed at the old path, a change through ``rec`` or ``aug`` would land on
# another object in the workers than here. So before a change is recorded, the
# path is followed in the main process's dataset as far as it leads through
# stored objects (instance attributes, items of lists, dicts and deques; not
# properties, calls or array indexing, whose results are new objects every time,
# where the path is trusted). Ending at another object, the view is looked for in
# its parent list, dict or deque, and recorded at its new place; not found there,
# the change is refused before it is made, with an error that says why.


def current_path(root: Any, path: Path, target: Any) -> Path:
    """``path`` (not empty) if it leads from ``root`` to ``target`` (or cannot be
    checked), the place ``target`` moved to in the same parent, or :class:`RuntimeError`."""
    parent, obj = root, root
    for kind, key in path:
        parent = obj
        if kind == "attr":
            stored = getattr(obj, "__dict__", None)
            if not isinstance(stored, dict) or key not in stored:
                return path  # a property, a slot, a class attribute: not checked
            obj = stored[key]
        elif kind == "item" and type(obj) in _PLAIN_ITEMS:
            try:
                obj = obj[key]
            except (KeyError, IndexError, TypeError):
                obj = _MISSING
                break
        else:
            return path  # a call's result, an array's item: new objects each time
    if obj is target:
        return path
    if obj is not _MISSING and path[-1][0] == "item":
        moved = _find(parent, target)
        if moved is not _MISSING:
            return (*path[:-1], ("item", moved))
    raise RuntimeError(
        f"{render(path)} no longer holds the object this reference was taken "
        "from: the dataset changed since (an assignment replaced it, or its container "
        "was reordered), so poolloader cannot tell where this change belongs in the "
        "workers' copies. Nothing was changed. Take the reference again from "
        "loader.dataset after the change that replaced or moved it."
    )


#: Containers whose items are stored objects (``obj[key]`` gives the same one each time).
_PLAIN_ITEMS = frozenset({list, dict, collections.deque, collections.OrderedDict,
                          collections.defaultdict})  # fmt: skip


def _find(container: Any, target: Any) -> Any:
    """The key (or index) at which ``container`` holds ``target`` itself, or _MISSING."""
    pairs = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in pairs:  # (not next() over a generator: NOTE in _tracking._base)
        if value is target:
            return key
    return _MISSING


def render(path: Path) -> str:
    """``(("attr", "cfg"), ("item", "crop"))`` → ``"dataset.cfg['crop']"``."""
    parts = ["dataset"]
    for kind, key in path:
        if kind == "attr":
            parts.append(f".{key}")
        elif kind == "item":
            parts.append(f"[{key!r}]")
        else:
            parts.append(f".{_call_name(key)}(...)")
    return "".join(parts)


def _call_name(pickled: bytes) -> str:
    try:
        fn = pickle.loads(pickled)[0]
    except Exception:
        return "<call>"
    return str(getattr(fn, "__name__", "<call>"))
