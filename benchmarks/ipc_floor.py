"""How many tiny batches per second one message per batch each way allows.

The least a loader with worker processes must do per batch: send the worker an
index batch, have it collate four ints into a tensor, send the tensor back.
Two spawned workers, four batches in flight (``prefetch_factor=2``), the main
process either waiting on the pipes itself (``single``) or through an I/O thread
that hands each batch to the consumer over a queue (``thread``, poolloader's
shape, which keeps loading while the consumer trains). Nothing else: no seeding,
no crash watch, no control channel, no slabs.

The tensor travels two ways: pickled (``pickled``: torch's reduction, which
writes the storage with ``torch.save``, what a plain ``pickle.dumps`` of a
tensor does) and as its dtype, shape and bytes, rebuilt with
``torch.frombuffer`` (``raw``: what poolloader does with a small batch). The
first costs more than the rest of the round trip together, so only the second
is the floor.

    python benchmarks/ipc_floor.py

It prints batches/s and the main process's CPU per batch for both, and for the
same batches through poolloader and through torch with ``num_workers=0``: the
median of five runs, the four alternating. See
``benchmarks/README.md`` (``--peers``, tiny batches) for what it tells.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import select
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate

BATCHES = 20_000
IN_FLIGHT = 4
WORKERS = 2
ROUNDS = 5


def _worker(conn: Connection) -> None:
    torch.set_num_threads(1)
    while True:
        message = pickle.loads(conn.recv_bytes())
        if message is None:
            return
        seq, indices, raw = message
        batch = default_collate(indices)
        if raw:
            batch = (str(batch.dtype), tuple(batch.shape), batch.numpy().tobytes())
        conn.send_bytes(pickle.dumps((seq, batch)))


def _rebuild(found: tuple[int, Any], raw: bool) -> tuple[int, torch.Tensor]:
    seq, batch = found
    if not raw:
        return seq, batch
    dtype, shape, data = batch
    flat = torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype.split(".")[-1]))
    return seq, flat.view(shape)


def _receiver(conns: list[Connection], raw: bool) -> Callable[[], list[tuple[int, torch.Tensor]]]:
    watch = select.poll()
    by_fd = {conn.fileno(): conn for conn in conns}
    for fd in by_fd:
        watch.register(fd, select.POLLIN)

    def receive() -> list[tuple[int, torch.Tensor]]:
        return [_rebuild(pickle.loads(by_fd[fd].recv_bytes()), raw) for fd, _ in watch.poll()]

    return receive


def _run(mode: str, conns: list[Connection], raw: bool) -> tuple[float, float]:
    batches = [[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3] for i in range(BATCHES)]
    receive = _receiver(conns, raw)
    arrived: queue.SimpleQueue[tuple[int, torch.Tensor]] = queue.SimpleQueue()

    def io_thread() -> None:
        got = 0
        while got < BATCHES:
            for found in receive():
                arrived.put(found)
                got += 1

    def send(seq: int) -> None:
        conns[seq % WORKERS].send_bytes(pickle.dumps((seq, batches[seq], raw)))

    started, cpu = time.perf_counter(), time.process_time()
    thread = threading.Thread(target=io_thread) if mode == "thread" else None
    if thread is not None:
        thread.start()
    ready: dict[int, torch.Tensor] = {}
    for seq in range(IN_FLIGHT):
        send(seq)
    for seq in range(BATCHES):
        while seq not in ready:
            if thread is not None:
                found = arrived.get()
                ready[found[0]] = found[1]
            else:
                ready.update(receive())
        del ready[seq]
        if seq + IN_FLIGHT < BATCHES:
            send(seq + IN_FLIGHT)
    seconds = time.perf_counter() - started
    if thread is not None:
        thread.join()
    return BATCHES / seconds, (time.process_time() - cpu) / BATCHES


def _epoch_rate(loader: torch.utils.data.DataLoader) -> tuple[float, float]:
    started, cpu, count = time.perf_counter(), time.process_time(), 0
    for _ in loader:
        count += 1
    return count / (time.perf_counter() - started), (time.process_time() - cpu) / count


def main() -> None:
    from poolloader import DataLoader

    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(WORKERS)]
    workers = [context.Process(target=_worker, args=(end,)) for _, end in pipes]
    for process in workers:
        process.start()
    conns = [ours for ours, _ in pipes]
    data = list(range(4 * BATCHES))
    loaders = {
        "poolloader, 2 workers": DataLoader(
            data, batch_size=4, num_workers=WORKERS, persistent_workers=True
        ),
        "torch, num_workers=0": torch.utils.data.DataLoader(data, batch_size=4),
    }
    found: dict[str, list[tuple[float, float]]] = {}
    try:
        _run("single", conns, raw=False)  # warm-up: the workers import torch
        for loader in loaders.values():
            _epoch_rate(loader)
        for _ in range(ROUNDS):  # alternating: the machine's noise hits each alike
            for raw in (False, True):
                for mode in ("single", "thread"):
                    name = f"{'raw' if raw else 'pickled'}, {mode}"
                    found.setdefault(name, []).append(_run(mode, conns, raw))
            for name, loader in loaders.items():
                found.setdefault(name, []).append(_epoch_rate(loader))
    finally:
        for conn in conns:
            conn.send_bytes(pickle.dumps(None))
        for process in workers:
            process.join()
        loaders["poolloader, 2 workers"].close()  # type: ignore[attr-defined]
    print(f"one message each way; median of {ROUNDS} runs   batches/s   main CPU/batch")
    for name, runs in found.items():
        rate, cpu = sorted(runs)[len(runs) // 2]
        print(f"{name:<40} {rate:9.0f} {cpu * 1e6:10.0f} µs")


if __name__ == "__main__":
    main()
