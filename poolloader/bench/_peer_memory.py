"""Peak memory of one loader of ``--peers``, alone in a fresh interpreter.

Run as ``python -m poolloader.bench._peer_memory COLUMN WORKERS`` with the pickled
:class:`~._workloads.Workload` on stdin; prints the peak proportional set size (bytes)
of this process and its descendants over one epoch, after a warm-up epoch.

Measured in the process that ran the other loaders, a loader would be charged for
what they left behind: memory the main process freed but the allocator kept (a
19 MB batch received by one loader stays in the heap of the process), and modules
only they imported. The package does not import this module, so that ``-m`` runs it
afresh (and the workers a spawn loader starts import it without running it).
"""

from __future__ import annotations

import pickle
import sys

from . import _peers
from ._runner import _drain, _peak_memory_of_epoch
from ._workloads import Workload


def peak_memory(column: str, workload: Workload, num_workers: int) -> int:
    loader = _peers.build(column, workload, num_workers)
    try:
        _drain(loader)
        return _peak_memory_of_epoch(loader)
    finally:
        _peers.close(loader)


if __name__ == "__main__":
    found = peak_memory(sys.argv[1], pickle.load(sys.stdin.buffer), int(sys.argv[2]))
    print(found)
