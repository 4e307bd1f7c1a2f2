"""Datasets and functions for the drop-in fidelity tests (importable by spawn
workers): multiprocessing objects inside a dataset, unpickling counted in a
file, seeds as worker_init_fn sees them, process state across epochs."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


class Primitives(Dataset):
    """Holds multiprocessing objects that may only travel "through inheritance":
    each item takes the lock, counts itself in the shared value, reports through
    the queue, and reads the event and the manager's dict."""

    def __init__(self, context, manager_dict, n: int = 8) -> None:
        self.n = n
        self.lock = context.Lock()
        self.count = context.Value("i", 0)
        self.queue = context.Queue()
        self.event = context.Event()
        self.shared = manager_dict

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with self.lock:
            self.count.value += 1
        self.queue.put(i)
        return i, self.event.is_set(), self.shared["scale"] * i


class CountsUnpickling(Dataset):
    """Appends a line to ``path`` each time a copy of it is unpickled."""

    def __init__(self, path: str, n: int = 16) -> None:
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with open(self.path, "a") as fh:
            fh.write(f"{os.getpid()}\n")


def unpicklings(path: str | Path) -> int:
    try:
        return len(Path(path).read_text().splitlines())
    except FileNotFoundError:
        return 0


class SeedsSeen(Dataset):
    """Item i: what the worker's generators give (the seeds worker_init_fn left)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        seed = torch.initial_seed() % 2**62  # a per-batch seed has 64 bits; collate takes 63
        return seed, random.random(), float(np.random.rand()), float(torch.rand(1))


def record_seeds(worker_id: int) -> None:
    """worker_init_fn: what torch's rules give a worker, kept in its dataset."""
    info = get_worker_info()
    info.dataset.seen = (
        worker_id, info.seed, torch.initial_seed(), random.random(), float(np.random.rand()),
        float(torch.rand(1)),
    )  # fmt: skip


class SeenAtInit(Dataset):
    """Item i: what worker_init_fn saw in the worker that loaded it."""

    seen: tuple = ()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return self.seen


def seed_12345(worker_id: int) -> None:
    torch.manual_seed(12345)


_INITS: list[int] = []  # process state worker_init_fn leaves behind


def count_inits(worker_id: int) -> None:
    _INITS.append(worker_id)


class InitsSeen(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return len(_INITS)


class Unpicklable(Dataset):
    """Holds a lambda and a thread lock: only a fork-started worker can have it."""

    def __init__(self, n: int = 12, gate: Path | None = None) -> None:
        self.n = n
        self.transform = lambda x: x * 10
        self.lock = threading.Lock()
        self.gate = gate  # items after the first wait until this file exists

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if self.gate is not None and i > 0:
            wait_for(self.gate)
        with self.lock:
            return self.transform(i)


def wait_for(path: Path, seconds: float = 60.0) -> None:
    """Wait until ``path`` exists; raise after ``seconds`` (a test that forgot to
    create it fails instead of hanging)."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds} s")
        time.sleep(0.01)
