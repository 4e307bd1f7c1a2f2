"""Time to first batch, measured in a fresh interpreter so that no forkserver or
imported module from an earlier measurement helps (or hurts) the next one.

Run as ``python -m poolloader.bench._startup KIND METHOD NUM_WORKERS``; prints
the seconds the *second* loader of that start method took to its first batch
(the first pays for starting the forkserver, once per program).
"""

from __future__ import annotations

import sys
import time

import torch

from ..loader import DataLoader
from ._workloads import Tiny


def _first_batch_seconds(kind: str, method: str, num_workers: int) -> float:
    cls = DataLoader if kind == "poolloader" else torch.utils.data.DataLoader
    started = time.perf_counter()
    loader = cls(Tiny(64), batch_size=4, num_workers=num_workers, multiprocessing_context=method)
    next(iter(loader))
    seconds = time.perf_counter() - started
    close = getattr(loader, "close", None)
    if close is not None:
        close()
    return seconds


if __name__ == "__main__":
    kind, method, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _first_batch_seconds(kind, method, workers)
    print(_first_batch_seconds(kind, method, workers))
