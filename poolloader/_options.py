"""The loader's own options: defaults, checks, and what they resolve to."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
from typing import Any

from . import _seeding

#: Finished batches that may wait behind one slow batch (beyond the prefetch
#: window), unless ``reorder_buffer`` says otherwise: as many as fit this many
#: bytes at the mean batch size, at most MAX per worker (UNSIZED per worker
#: before any batch has arrived). More keeps workers busy behind longer stalls;
#: each waiting batch holds its memory, which the prefetch window alone (torch's
#: bound) would not: batches as big as the budget get none, as in torch.
REORDER_MEMORY_BUDGET = 16 * 2**20
REORDER_UNSIZED_PER_WORKER = 2
REORDER_MAX_PER_WORKER = 16
DEFAULT_MAX_WORKER_RESTARTS = 3
TRANSPORTS = ("shm", "pickle")
#: What poolloader asks the fork server to preload (NOTE [ The fork server's
#: __main__ ] in _forkserver.py).
FORKSERVER_PRELOAD = ("__main__", "poolloader._template_process", "poolloader._forkserver_main")


def reorder_allowance(reorder_buffer: int | None, num_workers: int, mean_batch_bytes: float) -> int:
    """How many finished batches may wait behind the oldest unfinished one.

    ``reorder_buffer`` when given; otherwise as many as fit
    :data:`REORDER_MEMORY_BUDGET` at the batch size seen so far, at most
    :data:`REORDER_MAX_PER_WORKER` per worker, and
    :data:`REORDER_UNSIZED_PER_WORKER` per worker while no batch has arrived.
    """
    if reorder_buffer is not None:
        return reorder_buffer
    if mean_batch_bytes <= 0:
        return REORDER_UNSIZED_PER_WORKER * num_workers
    fit = int(REORDER_MEMORY_BUDGET // mean_batch_bytes)
    return min(REORDER_MAX_PER_WORKER * num_workers, fit)


def resolve_context(context: Any) -> Any:
    """The multiprocessing context workers start with: spawn unless the loader
    says otherwise (torch resolved a string to a context already)."""
    if context is None:
        return multiprocessing.get_context("spawn")
    if context.get_start_method() == "forkserver":
        # NOTE [ The fork server's __main__ ] in _forkserver.py; added to what the
        # script asked the server to preload (set_forkserver_preload), not instead.
        server = getattr(multiprocessing.forkserver, "_forkserver", None)
        asked = list(getattr(server, "_preload_modules", None) or [])
        context.set_forkserver_preload(asked + [m for m in FORKSERVER_PRELOAD if m not in asked])
    return context


def start_method(context: Any) -> str:
    return "spawn" if context is None else str(context.get_start_method())


def check_count(name: str, value: object, *, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be a non-negative integer, but got {name}={value!r}")
    if value < 0 and not allow_negative:
        raise ValueError(f"{name} should be a non-negative integer, but got {name}={value!r}")


def check_options(
    seeding: object,
    reorder_buffer: object,
    max_worker_restarts: object,
    transport: object,
    max_batch_bytes: object,
) -> None:
    if seeding not in _seeding.SEEDING_POLICIES:
        raise ValueError(f"seeding should be 'batch' or 'worker', but got seeding={seeding!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport should be 'shm' or 'pickle', but got transport={transport!r}")
    if reorder_buffer is not None:
        check_count("reorder_buffer", reorder_buffer)
    if max_batch_bytes is not None:
        check_count("max_batch_bytes", max_batch_bytes)
    check_count("max_worker_restarts", max_worker_restarts)
