"""Folding many writes into one container into its whole contents.

The control channel (``_control.py``) groups the changes recorded between two
batch submissions. Writes into one container that follow each other there form
a :class:`Run`; once they outnumber a fraction of its items, one call that sets
the container's whole contents (:func:`contents_call`) replaces them
(NOTE [ What is carried ] in ``_tracking_record.py``). A recorded call whose arguments
do not pickle carries the same call instead.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _pickling, _segment
from ._messages import THIS, Call, Path, SetItems, Update
from ._replay import assign_contents

#: Writes into one container between two batches travel one by one until they
#: number more than 1/FOLD_FRACTION of its items (and more than RUN_MINIMUM);
#: then its whole contents travel instead, and again after as many more. A
#: write of a number into a list costs about 15 bytes, an item of the list 3 to
#: 9: folding at a quarter keeps a shuffle's message within about twice the
#: contents, and pickles the contents at most eight times per shuffle.
FOLD_FRACTION = 4
RUN_MINIMUM = 64


@dataclass
class Run:
    """The trailing changes of the open group that all write into one container."""

    path: Path
    container: Any
    start: int  # where in the open group the run begins
    limit: int  # writes after which its contents travel instead
    writes: int = 0  # writes recorded since the run began or was last folded
    atoms: list[tuple[Any, Any]] = field(default_factory=list)  # not yet in the group

    @classmethod
    def begin(cls, path: Path, container: Any, start: int) -> Run | None:
        """The run of writes into ``container`` at ``path`` that begins at ``start``
        in the open group (``None`` without a container: nothing to fold into)."""
        fold = _fold_after(container) if container is not None else 0
        return cls(path, container, start, fold) if fold else None

    def flush(self, group: list[Update]) -> None:
        """Add the atoms not yet in the open ``group`` to it, as one :class:`SetItems`."""
        if self.atoms:
            items = pickle.dumps(self.atoms, protocol=_pickling.PROTOCOL)
            group.append(SetItems(self.path, items))
            self.atoms = []

    def fold(self, group: list[Update]) -> list[_segment.Segment]:
        """Replace the run's writes in the open ``group`` (and an earlier fold of
        them) by the container's contents; the segments the contents name."""
        with _segment.pinning() as pinned:
            contents = contents_call(self.container)
        if contents is None:
            self.limit *= 2  # the contents do not pickle: the writes themselves travel
            return pinned
        del group[self.start :]  # the writes, and an earlier fold of them
        group.append(Call(self.path, contents))
        self.writes, self.atoms = 0, []
        return pinned


def _fold_after(container: Any) -> int:
    return max(RUN_MINIMUM, _length(container) // FOLD_FRACTION)


def _length(container: Any) -> int:
    if isinstance(container, np.ndarray):
        return int(container.size)
    if isinstance(container, torch.Tensor):
        return int(container.numel())
    return len(container)


def contents(container: Any) -> Any:
    """A copy of what ``container`` holds, as :func:`~._replay.assign_contents`
    takes it (``None`` for an object that is not such a container)."""
    if isinstance(container, np.ndarray):
        return container.copy()
    if isinstance(container, torch.Tensor):
        return container.detach().clone()
    if isinstance(container, dict):
        return list(container.items())
    if isinstance(container, (list, set, collections.deque, bytearray)):
        return list(container)
    return None


def contents_call(container: Any) -> bytes | None:
    """A pickled :class:`Call` payload that sets ``container``'s whole contents."""
    value = contents(container)
    if value is None:
        return None
    try:
        return pickle.dumps((assign_contents, (THIS, value), {}), protocol=_pickling.PROTOCOL)
    except Exception:  # the writes themselves pickled: keep them
        return None
