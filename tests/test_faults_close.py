"""close() while the consumer waits, from another thread (or a signal handler),
and a loader whose pool broke: the loop ends with a clear error, and nothing
stays alive behind the loader."""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil
import pytest
import torch

from poolloader import DataLoader
from poolloader.errors import LoaderClosedError, WorkerCrashedError


class SlowAfter(torch.utils.data.Dataset):
    """Items from 8 on take far longer than the test: batch 2 is still loading."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= 8:
            time.sleep(60)
        return torch.tensor(i)


@pytest.mark.parametrize("in_order", [True, False])
def test_close_while_the_consumer_waits_ends_the_loop_with_loader_closed(in_order):
    """The window was cleared under the waiting consumer: with in_order=False it
    spun for ever; with in_order=True it failed with a ValueError from a deque."""
    loader = DataLoader(SlowAfter(), batch_size=4, num_workers=2, in_order=in_order,
                        multiprocessing_context="forkserver")  # fmt: skip
    seen = []
    # Closed once the consumer waits for batch 2 (which sleeps): timed from the
    # second batch, not from the start, which a busy machine can make slower.
    closer = threading.Timer(0.5, loader.close)
    try:
        with pytest.raises(LoaderClosedError, match="closed during epoch 0"):
            for batch in loader:
                seen.append(batch.tolist())
                if len(seen) == 2:
                    closer.start()
    finally:
        closer.cancel()
        loader.close()
    assert sorted(seen) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # what had loaded, nothing more


class Poison(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 6:
            os.kill(os.getpid(), 9)
        return torch.tensor(i)


def _attempt() -> None:
    loader = DataLoader(Poison(), batch_size=2, num_workers=2, max_worker_restarts=0,
                        multiprocessing_context="forkserver")  # fmt: skip
    with pytest.raises(WorkerCrashedError):
        for _ in loader:
            pass


def _ours() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def test_a_loader_whose_pool_broke_goes_with_its_last_reference():
    """The pool kept its error, which the raise gave a traceback holding the
    caller's frame, so the loader: the I/O thread kept the template and the
    surviving workers alive until the interpreter exited."""
    before = {p.pid for p in _ours()}
    _attempt()
    gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for p in _ours() if p.pid not in before and p.is_running()]
        threads = [t for t in threading.enumerate() if t.name == "poolloader-io"]
        if not left and not threads:
            break
        time.sleep(0.2)
    assert not left, f"processes outlived the loader: {left}"
    assert not threads, "the pool's I/O thread outlived the loader"
