"""Padding waste of poolloader's batch samplers against plain shuffled fixed-size batches.

Padding waste of an epoch is ``padded cost / real cost``: the padded cost of a batch is
its size times its longest item (what a padded tensor holds), the real cost the sum of its
lengths. 1.00 means no padding at all. Lengths follow a log-normal distribution, skewed
like utterance durations in speech corpora. The fixed-size baseline uses the same mean
batch size as DynamicBatchSampler, so both run the same number of steps per epoch.

Run: ``python benchmarks/padding_waste.py`` (a few seconds); ``--help`` for the knobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Literal

import numpy as np
import torch

from poolloader.samplers import DynamicBatchSampler, SortedBatchSampler

Batches = list[list[int]]


def padding_waste(lengths: np.ndarray, batches: Batches) -> float:
    """``sum(len(batch) * longest) / sum(lengths)`` over the batches of an epoch."""
    padded = sum(len(batch) * float(lengths[batch].max()) for batch in batches)
    real = sum(float(lengths[batch].sum()) for batch in batches)
    return padded / real


def fixed_size_batches(count: int, batch_size: int, seed: int) -> Batches:
    """Plain shuffled batching: a random permutation cut every ``batch_size`` items."""
    order = np.random.default_rng(seed).permutation(count)
    return [order[i : i + batch_size].tolist() for i in range(0, count, batch_size)]


#: Times each epoch is drawn; the median is reported. The machine this runs on is often
#: shared, so one draw can be several times slower than usual; more repeats cost seconds.
REPEATS = 5


def timed(make: Callable[[], Iterable[list[int]]]) -> tuple[Batches, float]:
    """The batches of one epoch and the median seconds to build and draw it."""
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        batches = [list(batch) for batch in make()]
        seconds.append(time.perf_counter() - start)
    return batches, float(np.median(seconds))


def row(name: str, lengths: np.ndarray, batches: Batches, seconds: float) -> str:
    """One markdown table row: batches, mean batch size, padding waste, time."""
    sizes = [len(batch) for batch in batches]
    return (
        f"| {name:<38} | {len(batches):>7} | {np.mean(sizes):>10.1f} | "
        f"{padding_waste(lengths, batches):>13.3f} | {seconds * 1e3:>9.1f} |"
    )


def make_dynamic(
    lengths: np.ndarray,
    max_duration: float,
    buckets: int,
    seed: int,
    cost: Literal["sum", "padded"] = "sum",
) -> DynamicBatchSampler:
    """A DynamicBatchSampler on ``lengths`` with ``buckets`` buckets."""
    with warnings.catch_warnings():  # the few outliers above max_duration come alone: fine
        warnings.simplefilter("ignore")
        return DynamicBatchSampler(
            lengths, max_duration=max_duration, num_buckets=buckets, seed=seed, cost=cost
        )


def describe(lengths: np.ndarray, args: argparse.Namespace) -> None:
    """Print the length distribution and the machine."""
    print(
        f"{args.items} items, log-normal(1.5, {args.sigma}) seconds: mean {lengths.mean():.2f}, "
        f"median {np.median(lengths):.2f}, p99 {np.quantile(lengths, 0.99):.2f}, "
        f"max {lengths.max():.2f}; max_duration={args.max_duration}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}, torch {torch.__version__}"
    )


def table(lengths: np.ndarray, args: argparse.Namespace) -> list[str]:
    """One row per sampler; "epoch (ms)" is the median time to build it and draw an epoch."""
    rows = [
        "| sampler | batches | mean size | padding waste | epoch (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    dynamic = {
        buckets: timed(partial(make_dynamic, lengths, args.max_duration, buckets, args.seed))
        for buckets in (1, 10, 30)
    }
    mean_size = max(1, round(args.items / len(dynamic[10][0])))
    fixed = timed(partial(fixed_size_batches, args.items, mean_size, args.seed))
    rows.append(row(f"shuffled fixed size ({mean_size} items)", lengths, *fixed))
    for buckets, (batches, seconds) in dynamic.items():
        rows.append(row(f"DynamicBatchSampler num_buckets={buckets}", lengths, batches, seconds))
    padded = timed(partial(make_dynamic, lengths, args.max_duration, 10, args.seed, "padded"))
    rows.append(row("DynamicBatchSampler cost=padded", lengths, *padded))
    ordered = timed(
        lambda: SortedBatchSampler(lengths, max_duration=args.max_duration, seed=args.seed)
    )
    rows.append(row("SortedBatchSampler max_duration", lengths, *ordered))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), print the distribution and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000, help="items in the dataset")
    parser.add_argument("--sigma", type=float, default=0.7, help="log-normal shape (skew)")
    parser.add_argument("--max-duration", type=float, default=300.0, help="seconds per batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lengths = np.random.default_rng(args.seed).lognormal(1.5, args.sigma, size=args.items)
    describe(lengths, args)
    print()
    print("\n".join(table(lengths, args)))


if __name__ == "__main__":
    main()
