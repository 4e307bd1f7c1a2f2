"""poolloader: torch's DataLoader on a process pool.

::

  main process                                        worker processes (spawn / forkserver, not daemonic)
  ┌───────────────────────────────────────────────┐   ┌────────────────────────────────────────────────┐
  │ DataLoader (a torch DataLoader subclass)      │   │ started once per loader with the dataset,      │
  │  iterator: sampler → batch specs, in order    │   │   collate_fn and worker_init_fn (cached)       │
  │   ≤ prefetch_factor*num_workers unfinished    │   │ inbox thread: reads messages, watches parent   │
  │  pool: pending tasks → a free worker          ├──►│ control update → change the cached dataset     │
  │   (control updates it lacks go first)         │   │ task → seed, fetch, collate, pack              │
  │  I/O thread: results, deaths, respawns        │◄──┤ result / exception / shard exhausted           │
  │  loader.dataset: live view, records changes   │   │ on Stop or parent death: end own process tree  │
  └───────────────────────────────────────────────┘   └────────────────────────────────────────────────┘

Data flows one way: sampler → batch spec → worker → batch → consumer. Control
flows beside it: each change to ``loader.dataset`` (or ``loader.broadcast``)
bumps a generation number, and a worker receives the changes it lacks right
before the first task that must see them (NOTE [ Control ordering ] in
``_control.py``).
"""

from ._control import unwrap
from ._stats import LoaderStatistics
from ._version import __version__
from ._worker import WorkerInfo, get_worker_info
from .loader import DataLoader

__all__ = [
    "DataLoader",
    "LoaderStatistics",
    "WorkerInfo",
    "__version__",
    "get_worker_info",
    "unwrap",
]
