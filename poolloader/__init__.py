"""poolloader: torch's DataLoader on a process pool.

::

  main process                                 template (spawn/forkserver/fork)
  ┌──────────────────────────────────────────┐   ┌──────────────────────────────┐
  │ DataLoader (a torch DataLoader subclass) │   │ dataset, collate_fn and      │
  │  iterator: sampler → batch specs         ├──►│   worker_init_fn, once       │
  │   ≤ prefetch_factor*num_workers running  │   │ fork ──► workers (not daemonic)
  │  pool: pending tasks → a free worker,    │   └──────────┬───────────────────┘
  │   the control updates it lacks first     │   ┌──────────▼────────────────────┐
  │  I/O thread: results, deaths, respawns   ├──►│ inbox thread: reads the       │
  │  loader.dataset: records changes         │   │   connection, exits when the  │
  │                                          │◄──┤   main process dies           │
  └──────────────────────────────────────────┘   │ update → change the dataset   │
                                                 │ task → seed, fetch, collate,  │
                                                 │   pack into shared memory     │
                                                 │ stop → end own process tree   │
                                                 └───────────────────────────────┘

Data flows one way: sampler → batch spec → worker → batch → consumer. Control
flows beside it: each change to ``loader.dataset`` (or ``loader.broadcast``)
bumps a generation number, and a worker receives the changes it lacks right
before the first task that must see them (NOTE [ Control ordering ] in
``_control.py``). Workers are forked from the template, which holds the dataset
(NOTE [ Templates ] in ``_template.py``).

Big read-only data, such as a manifest of a million rows, goes in a
:class:`SharedList` or :class:`SharedDict`: built once in the main process, it
pickles to a small handle, and every worker maps the same memory instead of
holding a copy (NOTE [ Shared segments ] in ``_segment.py``).
"""

from ._startup import collector_held

with collector_held():  # NOTE [ Imports without the collector ] in _startup.py
    # First: on a torch older than poolloader supports, importing _requirements
    # raises an ImportError that says so, before any module below meets a missing
    # torch API.
    from . import _requirements  # noqa: F401
    from ._shared import SharedDict, SharedList
    from ._stats import LoaderStatistics
    from ._tracking import unwrap
    from ._version import __version__
    from ._worker import WorkerInfo, batch_buffer, get_worker_info
    from .loader import DataLoader

del collector_held

__all__ = [
    "DataLoader",
    "LoaderStatistics",
    "SharedDict",
    "SharedList",
    "WorkerInfo",
    "__version__",
    "batch_buffer",
    "get_worker_info",
    "unwrap",
]
