"""poolloader: torch's DataLoader on a process pool.

::

  main process                                   workers (spawn/forkserver, not daemonic)
  ┌──────────────────────────────────────────┐   ┌───────────────────────────────────────┐
  │ DataLoader (a torch DataLoader subclass) │   │ start: dataset, collate_fn and        │
  │  iterator: sampler → batch specs         │   │   worker_init_fn arrive once, cached  │
  │   ≤ prefetch_factor*num_workers running  │   │ inbox thread: reads the connection,   │
  │  pool: pending tasks → a free worker,    ├──►│   exits if the main process dies      │
  │   the control updates it lacks first     │   │ update → change the cached dataset    │
  │  I/O thread: results, deaths, respawns   │◄──┤ task → seed, fetch, collate, pack     │
  │  loader.dataset: records changes         │   │ stop → end own process tree, exit     │
  └──────────────────────────────────────────┘   └───────────────────────────────────────┘

Data flows one way: sampler → batch spec → worker → batch → consumer. Control
flows beside it: each change to ``loader.dataset`` (or ``loader.broadcast``)
bumps a generation number, and a worker receives the changes it lacks right
before the first task that must see them (NOTE [ Control ordering ] in
``_control.py``).

Big read-only data, such as a manifest of a million rows, goes in a
:class:`SharedList` or :class:`SharedDict`: built once in the main process, it
pickles to a small handle, and every worker maps the same memory instead of
holding a copy (NOTE [ Shared segments ] in ``_segment.py``).
"""

# First: on a torch older than poolloader supports, importing _requirements raises
# an ImportError that says so, before any module below meets a missing torch API.
from . import _requirements  # noqa: F401
from ._shared import SharedDict, SharedList
from ._stats import LoaderStatistics
from ._tracking import unwrap
from ._version import __version__
from ._worker import WorkerInfo, get_worker_info
from .loader import DataLoader

__all__ = [
    "DataLoader",
    "LoaderStatistics",
    "SharedDict",
    "SharedList",
    "WorkerInfo",
    "__version__",
    "get_worker_info",
    "unwrap",
]
