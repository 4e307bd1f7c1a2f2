"""Throughput of poolloader's streams against pytorch-stream-dataloader 1.0.

Both loaders read the same synthetic streams with the same iterator: each stream is a
sequence of chunks of ``--chunk-size`` time steps, and producing a chunk costs a fixed
``--cost-ms`` milliseconds, either sleeping (I/O-bound readers: decoding from disk or
the network) or spinning the CPU (CPU-bound readers: decompression, feature extraction).
Both build batches of ``--batch-size`` rows with ``--workers`` workers and pad idle rows
with a dummy value. Reported per loader: steps per epoch and the share of padded rows
(of the last epoch), the chunks its busiest worker reads (the median over the epochs: an
epoch lasts at least that many chunks' time), the median epoch time over ``--epochs``
epochs after one warm-up epoch (poolloader's warm-up starts its pool;
pytorch-stream-dataloader forks new workers every epoch, as its torch DataLoader does by
default, so that cost stays in its epochs), and real chunks per second. poolloader's
sampler is told each epoch (``set_epoch``), so its stream order changes every epoch;
pytorch-stream-dataloader shuffles with the clock.

pytorch-stream-dataloader (``pip install pytorch-stream-dataloader==1.0``) splits the
streams between the workers up front and collates in the main process per worker FIFO;
poolloader assigns streams to rows just in time across all rows, keeps each stream's
iterator in one worker and gives each worker rows whose chunks add up evenly
(``StreamSampler`` + ``StreamDataset(iterate=...)``).

Run: ``python benchmarks/streams_vs_stream_dataloader.py`` (about a minute);
``--help`` for the knobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from poolloader import DataLoader
from poolloader.datasets import StreamDataset
from poolloader.samplers import StreamChunk, StreamSampler

FEATURES = 64
FILL = -1.0  # the value of a dummy row; real data is >= 0


def spin(seconds: float) -> None:
    """Keep the CPU busy for ``seconds``."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


@dataclass(frozen=True)
class SyntheticStreams:
    """``streams(stream)``: an iterator over one stream's chunks, each costing ``cost_ms``.

    Every chunk has ``chunk_size`` rows (the last is padded, as pytorch-stream-dataloader's
    text example does), filled with the stream's index.
    """

    lengths: tuple[int, ...]
    chunk_size: int
    cost_ms: float
    kind: str  # "sleep" or "cpu"

    def __call__(self, stream: int) -> Iterator[torch.Tensor]:
        wait: Callable[[float], None] = time.sleep if self.kind == "sleep" else spin
        for _ in range(0, self.lengths[stream], self.chunk_size):
            wait(self.cost_ms / 1000)
            yield torch.full((self.chunk_size, FEATURES), float(stream))


def seed_collate(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """pytorch-stream-dataloader's collate: one chunk per row, stacked time-major ``[T, B, F]``."""
    return torch.stack(list(values), dim=1)


@dataclass
class Result:
    """One loader's epochs: steps, padded share, busiest worker, median epoch seconds,
    real chunks."""

    name: str
    steps: int
    padded: float
    busiest: float
    epoch_seconds: float
    real_chunks: int

    def row(self) -> str:
        rate = self.real_chunks / self.epoch_seconds
        return (
            f"| {self.name:<29} | {self.steps:>5} | {100 * self.padded:>5.1f} % | "
            f"{self.busiest:>8.0f} | {self.epoch_seconds:>9.3f} | {rate:>8.0f} |"
        )


HEADER = (
    "| loader                        | steps | padded  | busiest worker (chunks) | epoch (s) "
    "| chunks/s |\n|---|---:|---:|---:|---:|---:|"
)


@dataclass
class Epochs:
    """A loader's epochs: ``run(e)`` reads epoch ``e`` and returns, per step, which rows
    hold real data; ``busiest(e)`` is how many chunks its busiest worker reads in it."""

    run: Callable[[int], list[torch.Tensor]]
    busiest: Callable[[int], int]


def poolloader_epochs(
    streams: SyntheticStreams, args: argparse.Namespace, stack: ExitStack
) -> Epochs:
    sampler = StreamSampler(streams.lengths, batch_size=args.batch_size,
                            chunk_size=args.chunk_size, shuffle=True)  # fmt: skip
    dataset = StreamDataset(iterate=streams, pad_value=FILL)
    loader = stack.enter_context(
        DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=args.workers,
                   multiprocessing_context="forkserver")
    )  # fmt: skip

    def run(epoch: int) -> list[torch.Tensor]:
        sampler.set_epoch(epoch)
        return [batch.mask[0] for batch in loader]

    def busiest(epoch: int) -> int:
        sampler.set_epoch(epoch)
        steps = list(sampler)
        layout = steps[0].layout(min(args.workers, args.batch_size))
        return max(
            sum(isinstance(step.slots[b], StreamChunk) for step in steps for b in ids)
            for ids in layout
        )

    return Epochs(run, busiest)


def seed_epochs(streams: SyntheticStreams, args: argparse.Namespace, stack: ExitStack) -> Epochs:
    try:
        from pytorch_stream_dataloader.stream_dataloader import StreamDataLoader
        from pytorch_stream_dataloader.stream_dataset import StreamDataset as SeedDataset
        from pytorch_stream_dataloader.utils import split_batch_size, split_dataset_sizes
    except ImportError as exc:
        raise SystemExit(
            f"this benchmark compares with pytorch-stream-dataloader, which is not importable "
            f"({exc}); install it with: pip install pytorch-stream-dataloader==1.0"
        ) from exc

    fill = torch.full((args.chunk_size, FEATURES), FILL)
    dataset = SeedDataset(list(range(len(streams.lengths))), streams, args.batch_size,
                          "zeros", fill)  # fmt: skip
    loader = StreamDataLoader(dataset, args.workers, seed_collate)
    # Its workers take fixed runs of the stream list, whatever the epoch.
    groups = split_dataset_sizes(
        dataset.stream_list, split_batch_size(args.batch_size, args.workers)
    )
    chunks = max(sum(-(-streams.lengths[s] // args.chunk_size) for s in group) for group in groups)
    return Epochs(lambda _: [batch[0, :, 0] != FILL for batch in loader], lambda _: chunks)


LOADERS = {
    "pytorch-stream-dataloader 1.0": seed_epochs,
    "poolloader StreamSampler": poolloader_epochs,
}


def compare(streams: SyntheticStreams, args: argparse.Namespace) -> list[Result]:
    """Epochs of the loaders in turn (the machine's load hits both alike); medians."""
    with ExitStack() as stack:
        loaders = {name: make(streams, args, stack) for name, make in LOADERS.items()}
        for loader in loaders.values():
            loader.run(0)  # warm-up: starts poolloader's pool
        seconds: dict[str, list[float]] = {name: [] for name in loaders}
        real_rows: dict[str, list[torch.Tensor]] = {}
        for epoch in range(1, args.epochs + 1):
            for name, loader in loaders.items():
                started = time.perf_counter()
                real_rows[name] = loader.run(epoch)
                seconds[name].append(time.perf_counter() - started)
    results = []
    for name, rows in real_rows.items():
        real = sum(int(row.sum()) for row in rows)
        padded = 1 - real / (len(rows) * args.batch_size)
        busiest = statistics.median(loaders[name].busiest(e) for e in range(1, args.epochs + 1))
        median = statistics.median(seconds[name])
        results.append(Result(name, len(rows), padded, busiest, median, real))
    return results


def cost_of_one_chunk(streams: SyntheticStreams) -> float:
    """What producing one chunk really costs here (sleep overshoots on a busy machine)."""
    one = SyntheticStreams((streams.chunk_size,), streams.chunk_size, streams.cost_ms, streams.kind)
    times = []
    for _ in range(100):
        started = time.perf_counter()
        next(one(0))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def stream_lengths(args: argparse.Namespace) -> tuple[int, ...]:
    """Random lengths: 4 to 40 chunks, the last chunk partly filled."""
    rng = np.random.default_rng(args.seed)
    chunks = rng.integers(4, 41, args.streams)
    tails = rng.integers(0, args.chunk_size, args.streams)
    return tuple(int(c * args.chunk_size - t) for c, t in zip(chunks, tails, strict=True))


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cost-ms", type=float, default=2.0)
    parser.add_argument("--kind", choices=["sleep", "cpu", "both"], default="both")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = stream_lengths(args)
    total = sum(-(-n // args.chunk_size) for n in lengths)
    print(
        f"{args.streams} streams, {total} chunks in all, batch_size={args.batch_size}, "
        f"chunk_size={args.chunk_size}, {args.workers} workers, {args.cost_ms} ms per chunk"
    )
    print(machine())
    for kind in ["sleep", "cpu"] if args.kind == "both" else [args.kind]:
        streams = SyntheticStreams(lengths, args.chunk_size, args.cost_ms, kind)
        ideal = total * cost_of_one_chunk(streams) / args.workers
        print(f"\n{kind}: the chunks alone take {ideal:.3f} s per epoch split evenly over "
              f"{args.workers} workers")  # fmt: skip
        print(HEADER)
        for result in compare(streams, args):
            print(result.row(), flush=True)


if __name__ == "__main__":
    main()
