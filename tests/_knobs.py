"""Datasets for the control-channel tests: every way a dataset can be changed.

Importable by spawn and forkserver workers (module level, picklable)."""

from __future__ import annotations

import array
import heapq
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


class Knob:
    """A sub-object with a setter method."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def set(self, value: float) -> None:
        self.value = value


class Knobs(Dataset):
    """Item i: ``(i, worker id, summary())``, where the summary holds every knob,
    so each batch shows what its worker's copy of the dataset looked like."""

    def __init__(self, n: int = 8, delay: float = 0.0, gate: str | None = None) -> None:
        self.n, self.delay, self.gate = n, delay, gate
        self.epoch = 0
        self.sub = Knob(0.0)
        self.items = [1, 2, 3]
        self.cfg = {"crop": 1.0, "mean": [0.5, 0.5]}
        self.w = np.zeros(3)
        self.t = torch.zeros(3)
        self.lengths = list(range(100))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def push(self, item: int) -> None:
        """A priority queue kept with heapq, whose C code writes into the list itself."""
        heapq.heappush(self.items, item)

    def durations(self) -> list[float]:
        """A reading method, as a sampler would call it."""
        return [self.lengths[i] / 16000 for i in range(len(self.lengths))]

    def summary(self) -> tuple:
        return (
            self.epoch, self.sub.value, tuple(self.items), self.cfg["crop"],
            tuple(self.w.tolist()), tuple(self.t.tolist()),
        )  # fmt: skip

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        info = get_worker_info()
        return (i, info.id if info is not None else -1, self.summary())


class Counter(array.array):
    """A user type built on a C type: its methods are out of poolloader's sight."""


class WithCounter(Dataset):
    def __init__(self) -> None:
        self.counts = Counter("i", [0])

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return i


class Growing(Dataset):
    """Item i: ``(i, value, len(history))``; ``value`` is assigned every step."""

    def __init__(self, n: int = 100) -> None:
        self.n, self.value, self.history = n, 0, [0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (i, self.value, len(self.history))


def wait_for_gate(worker_id: int) -> None:
    """worker_init_fn: worker 1 starts only once the file ``dataset.gate`` exists."""
    if worker_id != 1:
        return
    gate = get_worker_info().dataset.gate
    deadline = time.monotonic() + 120  # only bounds a hang
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


def keep(item):
    """collate_fn that hands items over as they are (tuples stay tuples)."""
    return item


def _only_in(value: Any, pid: int) -> OnlyInMain:
    if os.getpid() != pid:
        raise RuntimeError(f"OnlyInMain({value!r}) unpickles only in process {pid}")
    return OnlyInMain(value)


class OnlyInMain:
    """A value that pickles, and unpickles only in the process that pickled it: a
    change assigning one fails in every worker (as an object of a class defined
    under the main guard does with spawn)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return _only_in, (self.value, os.getpid())
