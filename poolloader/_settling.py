"""The real-list and real-dict views a channel settles before each batch (NOTE
[ Writes into a view's own items ] in ``_tracking_containers.py``)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any


class SettlingViews:
    """The live real-list and real-dict views of one channel's dataset, each
    settled (what C code wrote into its own items recorded) by :meth:`settle`."""

    def __init__(self) -> None:
        # By id: lists and dicts do not hash, so no WeakSet.
        self._views: dict[int, weakref.ref[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._views)

    def watch(self, view: Any) -> None:
        """Settle ``view`` at each :meth:`settle` for as long as it lives."""
        key, views = id(view), self._views
        views[key] = weakref.ref(view, lambda _: views.pop(key, None))

    def settle(self) -> None:
        """Record what C code wrote into the views' own items since each was last
        brought up to date."""
        for key, ref in list(self._views.items()):
            view = ref()
            if view is None:
                continue
            try:
                view._pl_settle()
            except RuntimeError as exc:  # the view's object left the dataset meanwhile
                self._views.pop(key, None)
                warnings.warn(
                    "C code (heapq, say) wrote into a list or dict taken from "
                    f"loader.dataset, and the write cannot reach the workers: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
