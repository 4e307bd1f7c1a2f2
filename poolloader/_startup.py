"""poolloader's own import, in the processes multiprocessing starts for it.

NOTE [ Imports without the collector ]: importing torch makes about 180,000
objects that live as long as the process, and the garbage collector walks them
all again at each full collection that the import's own allocations set off:
0.1-0.3 s of a 1.0-1.4 s import on a 2-core machine. A fork server and a spawned
template import torch before anything can load, so that time is part of every
loader's first batch. So where multiprocessing's fork server preloads
poolloader (and the main module it imports for it, NOTE [ The fork server's
__main__ ] in ``_forkserver.py``), or a process that ``spawn`` started imports
it, the import runs with the collector held, which then goes back to how it was.

The fork server also freezes what it imported (``gc.freeze()``), so that a
process forked from it never has the collector walk, and write to, the pages of
those objects (which would copy them), as the template does for its dataset
(NOTE [ Frozen objects ] in ``_template.py``). What the imports left as garbage
is frozen with them: about 83,000 objects, 6.5 MB, that one collection would
free but that cost that collection's 0.13 s. They stay in the server, whose
pages every process forked from it shares and never writes (nothing refers to
them), so they are counted once, not once per worker.

Anywhere else (the user's own process) the import leaves the collector alone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Iterator

#: multiprocessing's functions a process it starts runs first, by file: whether
#: what it imports is frozen (a fork server's is inherited by all it forks).
_STARTERS = {"forkserver.py": ("main", True), "spawn.py": ("spawn_main", False)}


def _started_by() -> bool | None:
    """Whether this import runs inside a fork server (True), inside a process
    that spawn started (False), or neither (None)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        starter = _STARTERS.get(os.path.basename(code.co_filename))
        if (
            starter is not None
            and code.co_name == starter[0]
            and os.path.basename(os.path.dirname(code.co_filename)) == "multiprocessing"
        ):
            return starter[1]
        frame = frame.f_back  # type: ignore[assignment]
    return None


@contextlib.contextmanager
def collector_held() -> Iterator[None]:
    """Hold the garbage collector for the imports inside, where multiprocessing
    started this process (NOTE [ Imports without the collector ])."""
    started = _started_by() if gc.isenabled() else None
    if started is None:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if started:
            gc.freeze()
        gc.enable()
