"""Processes that end while a loader is alive: a multiprocessing child and the
ranks of a ``torch.multiprocessing.spawn`` DDP job (importable by spawn children).

Each process that owns a loader writes its workers' pids to ``where`` so the
test can check that none outlives the job."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from poolloader import DataLoader

#: The batch at which a failing rank fails.
FAIL_AT = 2


class Numbers(Dataset):
    def __init__(self, n: int = 64) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((4,), float(i))


def _record_workers(loader: DataLoader, where: str, who: str) -> None:
    pids = " ".join(str(p) for p in loader._pool.worker_pids)
    Path(where, f"workers-{who}-{os.getpid()}").write_text(pids)


def child(where: str, transport: str, ending: str) -> None:
    """A multiprocessing child: a loader, one batch, then ``ending``."""
    loader = DataLoader(Numbers(), batch_size=4, num_workers=1, transport=transport)
    iterator = iter(loader)
    next(iterator)
    _record_workers(loader, where, "child")
    if ending == "raise":
        raise RuntimeError("the child fails with its loader alive")


def rank(index: int, where: str, transport: str, ending: str, port: int) -> None:
    """One DDP rank: gloo, a loader with one worker; rank 1 ends at batch FAIL_AT."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=index, world_size=2)
    loader = DataLoader(Numbers(), batch_size=4, num_workers=1, transport=transport)
    for step, batch in enumerate(loader):
        if step == 0:
            _record_workers(loader, where, f"rank{index}")
        if index == 1 and step == FAIL_AT:
            if ending == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"rank 1 fails at batch {step}")
        dist.all_reduce(batch)


def ddp_job(where: str, transport: str, ending: str, port: int) -> None:
    """Run the two-rank job; print how it ended (the test reads the last line)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(rank, args=(where, transport, ending, port), nprocs=2, join=True)
    except mp.ProcessRaisedException as exc:
        print("ENDED ProcessRaisedException", str(exc).splitlines()[-1], flush=True)
        return
    except mp.ProcessExitedException as exc:
        print("ENDED ProcessExitedException", exc.exit_code, flush=True)
        return
    print("ENDED normally", flush=True)


if __name__ == "__main__":
    ddp_job(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
