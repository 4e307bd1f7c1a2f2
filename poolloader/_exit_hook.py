"""Closing this process's pools when it exits, before ``multiprocessing`` joins
their workers (NOTE [ Exit with live loaders ]). A pool joins :data:`live_pools`
when it starts and leaves when it closes (``_pool.py``).
"""

from __future__ import annotations

import multiprocessing.util
import os
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pool

#: Priority of the exit hook among multiprocessing's finalizers. Those with a
#: priority run before multiprocessing joins the process's non-daemonic
#: children (our workers), which would otherwise wait for them forever; higher
#: runs earlier, and ours must run before any that waits for data (a
#: ``multiprocessing.Manager`` ends at priority 0).
EXIT_PRIORITY = 100


live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_exit_hook_pid = 0  # the process that registered the exit hook


def close_all() -> None:
    for pool in list(live_pools):
        pool.close()


def ensure_exit_hook() -> None:
    """Close this process's pools when it exits, before its children are joined.

    NOTE [ Exit with live loaders ]: at exit, ``multiprocessing`` joins every
    non-daemonic child, and our workers are not daemonic, so a process that
    ends with a loader alive would wait for them forever. The finalizers that
    ``multiprocessing.util.Finalize`` registers with an ``exitpriority`` run just
    before those joins, in the main process (from ``atexit``) and in every
    multiprocessing child (whose bootstrap runs them, not ``atexit``: a
    ``torch.multiprocessing.spawn`` rank is such a child). A forked child starts
    with an empty registry, so each process registers once, when it starts its
    first pool."""
    global _exit_hook_pid
    if _exit_hook_pid != os.getpid():
        _exit_hook_pid = os.getpid()
        multiprocessing.util.Finalize(None, close_all, exitpriority=EXIT_PRIORITY)
