"""The benchmark's workloads: datasets (module level, so spawn workers import
them) and the loader arguments each workload runs with."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._worker import batch_buffer


class Images(Dataset):
    """3×224×224 float32 images (~0.6 MB each) as tensors or numpy arrays.

    Items come from a small in-memory cache (as a decoded-image cache would
    serve them), so what the workload measures is collating and moving big
    batches, the loader's own cost."""

    CACHED = 64

    def __init__(self, n: int, as_numpy: bool = False) -> None:
        self.n, self.as_numpy = n, as_numpy
        self._cache: list[Any] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        if self._cache is None:  # built in the worker, not pickled with the dataset
            make = (
                (lambda k: np.full((3, 224, 224), k, dtype=np.float32))
                if self.as_numpy
                else (lambda k: torch.full((3, 224, 224), float(k)))
            )
            self._cache = [make(k) for k in range(self.CACHED)]
        return self._cache[i % self.CACHED]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}


def stack_numpy(batch: list[np.ndarray]) -> np.ndarray:
    """Collate numpy arrays into one numpy array (no conversion to tensors), into
    :func:`poolloader.batch_buffer`: the slab a poolloader batch travels in, and
    plain ``np.empty`` memory for every other loader (the cost of ``np.stack``)."""
    out = batch_buffer((len(batch), *batch[0].shape), batch[0].dtype)
    return np.stack(batch, out=out)


class Tiny(Dataset):
    """Small integers: the loader's own per-batch overhead dominates."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class CpuBound(Dataset):
    """Each item costs ~``ms`` milliseconds of pure-Python CPU work. Items do not
    depend on how much work fitted in that time, so every loader's batches are
    the same (``--peers`` checks that they are)."""

    def __init__(self, n: int, ms: float = 4.0) -> None:
        self.n, self.ms = n, ms

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        end = time.thread_time() + self.ms / 1000
        x = 0
        while time.thread_time() < end:
            x += 1
        return torch.tensor([i, int(x > 0)])


class Skewed(Dataset):
    """Batches of uneven cost, drawn with a fixed seed (``batch_size=None``: one
    item is one batch).

    ``"stalls"``: batches take ``base`` seconds, except that once in every
    ``every`` batches (at a random place in each stretch) one stalls for
    ``slow``, as when a reader opens the next shard of a dataset or refills a
    cold cache. ``"lognormal"``: costs spread around ``2 * base`` (``sigma`` in
    log space), as the batches of a dynamic, duration-bounded sampler do."""

    def __init__(
        self,
        n: int,
        shape: str = "stalls",
        *,
        base: float = 0.005,
        slow: float = 0.3,
        every: int = 20,
        sigma: float = 1.0,
    ) -> None:
        rng = np.random.default_rng(0)
        self.n, self.shape = n, shape
        if shape == "stalls":
            self.costs = np.full(n, base)
            for start in range(0, n, every):
                self.costs[start + rng.integers(0, min(every, n - start))] = slow
        elif shape == "lognormal":
            self.costs = rng.lognormal(np.log(base * 2), sigma, n)
        else:
            raise ValueError(f"shape should be 'stalls' or 'lognormal', but got shape={shape!r}")

    def __len__(self) -> int:
        return self.n

    def cost(self, batch: int) -> float:
        return float(self.costs[batch])

    def __getitem__(self, i: int) -> int:
        time.sleep(self.cost(i))
        return i


#: The words of a manifest's transcripts (:func:`manifest_records`).
MANIFEST_WORDS = ("the", "a", "of", "speech", "model", "audio", "frame", "noise", "clean", "test")


def manifest_records(count: int) -> Iterator[dict[str, Any]]:
    """A speech corpus's manifest rows, seeded: an id, a path, a duration (1 to 20 s) and
    a transcript of 3 to 8 words, each row its own dict and strings, as read from a file."""
    rng = np.random.default_rng(0)
    durations = np.round(rng.uniform(1.0, 20.0, count), 2).tolist()
    lengths = rng.integers(3, 9, count).tolist()
    words = rng.integers(0, len(MANIFEST_WORDS), (count, 8)).tolist()
    for i in range(count):
        yield {
            "id": f"utt{i:07d}",
            "path": f"spk{i % 2000:04d}/utt{i:07d}.flac",
            "dur": durations[i],
            "text": " ".join([MANIFEST_WORDS[w] for w in words[i][: lengths[i]]]),
        }


class Manifest(Dataset):
    """A plain map-style dataset over manifest rows, held as given (a list or a SharedList).

    An item reads every field of its row, as a speech dataset reads the path to open the
    audio and the transcript to tokenise it, and returns the duration and a character
    count: what the benchmark moves between processes is small, what it reads is not."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[float, int]:
        row = self.records[i]
        return row["dur"], len(row["id"]) + len(row["path"]) + len(row["text"])


@dataclass
class Workload:
    """One throughput workload: a dataset, the loader arguments both loaders get,
    and what else to measure. ``name`` is what the table, the JSON and the README
    call it."""

    name: str
    description: str
    dataset: Any
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    ideal_seconds: float | None = None  # work-conserving lower bound, where known
    measure_memory: bool = False  # also measure the peak memory of an epoch
    #: Seconds it took on a 2-core machine (weights of the progress bar; a wrong guess
    #: only skews the time left until the pace of the run is known).
    estimate: float = 10.0


#: Seconds every workload spends starting its loaders and warming up, whatever its
#: size (part of the progress bar's estimate, see ``Workload.estimate``).
WARM_UP_ESTIMATE = 3.0


def _estimate(per_scale: float, scale: int) -> float:
    return WARM_UP_ESTIMATE + per_scale * scale


def workloads(quick: bool, num_workers: int) -> dict[str, Workload]:
    """The throughput workloads by name, sized for about a second per epoch of the
    stock loader (a third of that with ``quick``)."""
    scale = 1 if quick else 3
    stalls, spread = Skewed(100 * scale), Skewed(100 * scale, "lognormal")
    found = [
        Workload(
            "tensor_19mb", "batches of 32×3×224×224 float32 tensors (19 MB)",
            Images(32 * 20 * scale), {"batch_size": 32}, measure_memory=True,
            estimate=_estimate(1.3, scale),
        ),
        Workload(
            "numpy_19mb", "batches of 32×3×224×224 float32 numpy arrays (19 MB)",
            Images(32 * 8 * scale, as_numpy=True), {"batch_size": 32, "collate_fn": stack_numpy},
            measure_memory=True, estimate=_estimate(1.4, scale),
        ),
        Workload(
            "tiny_batches", "batches of 4 small ints: the loader's own per-batch overhead",
            Tiny(1500 * scale), {"batch_size": 4}, estimate=_estimate(1.2, scale),
        ),
        Workload(
            "cpu_bound", "4 ms of Python CPU work per item, batches of 8",
            CpuBound(160 * scale), {"batch_size": 8}, estimate=_estimate(4.4, scale),
        ),
        Workload(
            "io_stalls", "batches cost 5 ms, one in every 20 stalls 300 ms (a shard opens)",
            stalls, {"batch_size": None},
            ideal_seconds=float(stalls.costs.sum()) / num_workers, estimate=_estimate(10.5, scale),
        ),
        Workload(
            "dynamic_costs", "batch costs spread lognormally around 10 ms (dynamic batches)",
            spread, {"batch_size": None},
            ideal_seconds=float(spread.costs.sum()) / num_workers, estimate=_estimate(7.2, scale),
        ),
    ]  # fmt: skip
    return {workload.name: workload for workload in found}
