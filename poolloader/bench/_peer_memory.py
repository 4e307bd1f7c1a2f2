"""Peak memory of one loader of ``--peers``, alone in a fresh interpreter.

Run as ``python -m poolloader.bench._peer_memory COLUMN WORKERS`` with the pickled
:class:`~._workloads.Workload` on stdin; prints the peak proportional set size (bytes)
of this process and its descendants over one epoch, after a warm-up epoch, and
the peak memory they held (NOTE [ Held memory ] in ``_runner.py``).

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
from ._runner import _drain, memory_of_epoch, shared_memory_in_use
from ._workloads import Workload


def peak_memory(column: str, workload: Workload, num_workers: int) -> tuple[int, int]:
    """Peak PSS and peak held memory of one epoch after a warm-up epoch."""
    baseline = shared_memory_in_use()  # before the loader makes any
    loader = _peers.build(column, workload, num_workers)
    try:
        _drain(loader)
        memory = memory_of_epoch(loader, baseline)
        return memory.peak, memory.peak_held
    finally:
        _peers.close(loader)


if __name__ == "__main__":
    pss, held = peak_memory(sys.argv[1], pickle.load(sys.stdin.buffer), int(sys.argv[2]))
    print(pss, held)
