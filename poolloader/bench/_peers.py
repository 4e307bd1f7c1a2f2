"""The loaders ``python -m poolloader.bench --peers`` compares: torch's DataLoader,
torchdata's, SPDL's and poolloader, each built as its own documentation
recommends, over the same dataset objects and the same index batches.

Columns, in the table's order:

- ``torch``: ``torch.utils.data.DataLoader`` with Python's default start method
  (fork on Linux before Python 3.14, forkserver from 3.14).
- ``torch(spawn)``: the same with ``multiprocessing_context="spawn"``, the start
  method of poolloader's own column: its workers start from fresh interpreters.
- ``StatefulDataLoader``: torchdata's drop-in, with torch's arguments.
- ``nodes(process)``, ``nodes(thread)``: torchdata.nodes, the recipe of its
  "Migrating to torchdata.nodes" guide: a sampler of index batches, a
  ``ParallelMapper`` whose function fetches and collates a whole batch, a
  ``Prefetcher``, a ``Loader``.
- ``SPDL(process)``, ``SPDL(thread)``: an SPDL ``Pipeline``: the index batches as
  its source, one ``pipe`` stage that fetches and collates, ``concurrency`` equal
  to the workers, on a ``ProcessPoolExecutor`` or on the pipeline's own thread
  pool (the default).
- ``SPDL(subprocess+shm)``: the same thread pipeline run in one subprocess by
  ``run_pipeline_in_subprocess``, batches handed back through a
  ``SharedMemorySegmentPool`` (SPDL's recommended production pattern, "MTP").
- ``poolloader``, and ``poolloader(fork)``: the same with
  ``multiprocessing_context="fork"``, torch's default start method on Linux, under
  which the workers share the main process's pages (its imported modules, above
  all) as torch's do; poolloader's default, spawn, starts them from a fresh
  interpreter.

torch, StatefulDataLoader and poolloader keep their workers between epochs
(``persistent_workers=True``), as the rest of the benchmark runs them. A peer
whose package is not installed is left out with one line saying so.

# NOTE [ Building the peers ]

Everything a peer receives is what torch's DataLoader builds from the same
arguments: the index batches are torch's ``BatchSampler`` over a
``SequentialSampler`` (or the ``SequentialSampler`` itself for
``batch_size=None``), and :class:`Fetch` does what torch's worker does with one
of them (``collate_fn([dataset[i] for i in batch])``, or ``default_convert`` of
one item). Ordering is each library's in-order mode, so every loader must
deliver the very same batches, which the benchmark checks.

Two choices the peers' documentation leaves open:

- SPDL builds one ``Pipeline`` per epoch (a source that is not ``continuous``).
  A continuous source would keep loading the next epoch in the background, that
  is while the benchmark times another loader, and hand its own next epoch a
  head start. The executor (and with it the worker processes) and the
  subprocess live as long as the loader, as SPDL's documentation shows.
- ``SPDL(process)`` installs the batch function in each worker once, with the
  ``ProcessPoolExecutor``'s initializer, and each task carries only its index
  batch. Passing the function itself to ``pipe`` would pickle the dataset into
  every task. The workers are spawned: SPDL's documentation warns against
  forking them from a process with threads, which the pipeline has.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    Sampler,
    SequentialSampler,
    default_collate,
    default_convert,
)

from ..loader import DataLoader
from ._workloads import Workload

#: Index batches the SPDL pipeline's sink (and its subprocess's queue) holds ready:
#: SPDL's default, about the ``2 * num_workers`` torch keeps in flight.
SPDL_BUFFER = 3
#: Shared-memory segments beyond the buffered batches: the one being written and
#: the one the consumer holds (SPDL's sizing advice: ``buffer_size + 2``).
SPDL_SEGMENTS_EXTRA = 2
#: Bytes added to each segment beyond a batch's arrays: SPDL aligns each array
#: to 64 bytes and keeps small fields inline; a batch whose arrays are all small
#: still needs a segment.
SPDL_SEGMENT_SLACK = 1 << 20
#: Seconds SPDL's writer waits for a free segment before it gives up: the
#: consumer drops every batch at once, so only a broken run waits this long.
SPDL_ACQUIRE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Loader:
    """One column of the table: its name, the package it needs (None: always
    there), and how to build it for a workload with ``num_workers`` workers."""

    column: str
    package: str | None
    build: Callable[[Workload, int], Any]
    #: How torch's and poolloader's columns start workers (None: the peers')
    start_method: str | None = None


# ------------------------------------------------------------ what each epoch runs


class Fetch:
    """One index batch to one batch, as torch's worker makes it: ``collate_fn``
    over the items of a list of indices, or ``default_convert`` of the one item of
    an index (``batch_size=None``)."""

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any] | None, batched: bool):
        self.dataset, self.batched = dataset, batched
        self.collate_fn = collate_fn or (default_collate if batched else default_convert)

    def __call__(self, spec: Any) -> Any:
        if self.batched:
            return self.collate_fn([self.dataset[i] for i in spec])
        return self.collate_fn(self.dataset[spec])


def index_sampler(workload: Workload) -> Sampler:
    """The index batches torch's DataLoader makes from the workload's arguments."""
    unknown = set(workload.loader_kwargs) - {"batch_size", "collate_fn"}
    if unknown:
        raise ValueError(
            f"the peers rebuild only batch_size and collate_fn, but workload "
            f"{workload.name!r} also sets {sorted(unknown)}"
        )
    sampler = SequentialSampler(workload.dataset)
    batch_size = workload.loader_kwargs.get("batch_size", 1)
    if batch_size is None:
        return sampler
    return BatchSampler(sampler, batch_size, drop_last=False)


def fetch_of(workload: Workload) -> Fetch:
    batched = workload.loader_kwargs.get("batch_size", 1) is not None
    return Fetch(workload.dataset, workload.loader_kwargs.get("collate_fn"), batched)


#: The batch function of an SPDL worker process, installed once by the initializer.
_INSTALLED: list[Fetch] = []


def _install(fetch: Fetch) -> None:
    _INSTALLED[:] = [fetch]


def _fetch_installed(spec: Any) -> Any:
    return _INSTALLED[0](spec)


# ------------------------------------------------------------ the builders


def _torch(workload: Workload, num_workers: int) -> Any:
    return torch.utils.data.DataLoader(
        workload.dataset, num_workers=num_workers, persistent_workers=True,
        **workload.loader_kwargs,
    )  # fmt: skip


def _torch_spawn(workload: Workload, num_workers: int) -> Any:
    return torch.utils.data.DataLoader(
        workload.dataset, num_workers=num_workers, persistent_workers=True,
        multiprocessing_context="spawn", **workload.loader_kwargs,
    )  # fmt: skip


def _poolloader(workload: Workload, num_workers: int) -> Any:
    return DataLoader(workload.dataset, num_workers=num_workers, persistent_workers=True,
                      **workload.loader_kwargs)  # fmt: skip


def _poolloader_fork(workload: Workload, num_workers: int) -> Any:
    return DataLoader(workload.dataset, num_workers=num_workers, persistent_workers=True,
                      multiprocessing_context="fork", **workload.loader_kwargs)  # fmt: skip


def _stateful(workload: Workload, num_workers: int) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(workload.dataset, num_workers=num_workers,
                              persistent_workers=True, **workload.loader_kwargs)  # fmt: skip


def _nodes(method: str) -> Callable[[Workload, int], Any]:
    def build(workload: Workload, num_workers: int) -> Any:
        import torchdata.nodes as tn

        node: Any = tn.SamplerWrapper(index_sampler(workload))
        node = tn.ParallelMapper(node, map_fn=fetch_of(workload), num_workers=num_workers,
                                 method=method, in_order=True)  # fmt: skip
        node = tn.Prefetcher(node, prefetch_factor=2 * num_workers)
        return tn.Loader(node)

    return build


class SpdlLoader:
    """An SPDL pipeline, built afresh for each epoch over a lasting executor
    (NOTE [ Building the peers ])."""

    def __init__(self, workload: Workload, num_workers: int, processes: bool) -> None:
        self._source = list(index_sampler(workload))
        self._concurrency = num_workers
        self._executor: ProcessPoolExecutor | None = None
        self._op: Callable[[Any], Any] = fetch_of(workload)
        if processes:
            self._executor = ProcessPoolExecutor(
                num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_install, initargs=(self._op,),
            )  # fmt: skip
            self._op = _fetch_installed

    def __iter__(self) -> Iterator[Any]:
        from spdl.pipeline import PipelineBuilder

        builder: Any = PipelineBuilder().add_source(self._source)
        builder = builder.pipe(
            self._op, concurrency=self._concurrency, executor=self._executor, output_order="input"
        )
        pipeline = builder.add_sink(SPDL_BUFFER).build(num_threads=self._concurrency)
        with pipeline.auto_stop():
            yield from pipeline

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class SpdlSubprocess:
    """The thread pipeline of :class:`SpdlLoader` run in one subprocess, batches
    coming back through a pool of shared-memory segments sized for the biggest
    batch. The subprocess starts with multiprocessing's default start method:
    SPDL 0.8's segment pool makes its lock in that context, and refuses others."""

    def __init__(self, workload: Workload, num_workers: int) -> None:
        from spdl.pipeline import (
            PipelineBuilder,
            SharedMemorySegmentPool,
            run_pipeline_in_subprocess,
        )

        source, fetch = list(index_sampler(workload)), fetch_of(workload)
        builder: Any = PipelineBuilder().add_source(source)
        builder = builder.pipe(fetch, concurrency=num_workers, output_order="input")
        config = builder.add_sink(SPDL_BUFFER).get_config()
        arena = SharedMemorySegmentPool(
            _payload_bytes([fetch(source[0]), fetch(source[-1])]) + SPDL_SEGMENT_SLACK,
            SPDL_BUFFER + SPDL_SEGMENTS_EXTRA, acquire_timeout=SPDL_ACQUIRE_TIMEOUT,
        )  # fmt: skip
        self._segments = [getattr(arena, "_ctrl_name", None), *getattr(arena, "_seg_names", [])]
        self._iterable: Any = run_pipeline_in_subprocess(
            config, num_threads=num_workers, buffer_size=SPDL_BUFFER, arena=arena
        )

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def close(self) -> None:
        """SPDL ends the subprocess and unlinks the segments when the iterable goes.

        The segments are unlinked here first. SPDL 0.8's own unlink, on Python
        before 3.13, takes each name off the resource tracker twice (once when
        it attaches to unlink, once in the unlink), and the tracker prints a
        KeyError traceback per segment. Attaching registers the name again and
        unlinking takes it off once; SPDL then finds the names gone and skips
        them. Mappings still open stay valid: unlinking only removes the name."""
        for name in self._segments:
            if name is None:
                continue
            try:
                segment = shared_memory.SharedMemory(name=name)
            except FileNotFoundError:
                continue
            try:
                segment.unlink()
            finally:
                segment.close()
        self._iterable = None


def _payload_bytes(batches: list[Any]) -> int:
    """The most bytes of arrays any of ``batches`` holds."""

    def size(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.untyped_storage().nbytes()
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if isinstance(obj, (list, tuple)):
            return sum(size(x) for x in obj)
        if isinstance(obj, dict):
            return sum(size(x) for x in obj.values())
        return 0

    return max(size(batch) for batch in batches)


#: Every column, in the table's order.
LOADERS: tuple[Loader, ...] = (
    Loader("torch", None, _torch, multiprocessing.get_all_start_methods()[0]),
    Loader("torch(spawn)", None, _torch_spawn, "spawn"),
    Loader("StatefulDataLoader", "torchdata", _stateful),
    Loader("nodes(process)", "torchdata", _nodes("process")),
    Loader("nodes(thread)", "torchdata", _nodes("thread")),
    Loader("SPDL(process)", "spdl", lambda w, n: SpdlLoader(w, n, processes=True)),
    Loader("SPDL(thread)", "spdl", lambda w, n: SpdlLoader(w, n, processes=False)),
    Loader("SPDL(subprocess+shm)", "spdl", SpdlSubprocess),
    Loader("poolloader", None, _poolloader, "spawn"),
    Loader("poolloader(fork)", None, _poolloader_fork, "fork"),
)
_BY_COLUMN = {loader.column: loader for loader in LOADERS}
#: The packages the peers need, as the ``bench`` extra names them.
PEER_PACKAGES = tuple(dict.fromkeys(loader.package for loader in LOADERS if loader.package))
#: The distribution whose version names each package's code (``spdl`` is a
#: meta-package: its pipeline is in ``spdl_core``).
_DISTRIBUTIONS = {"torchdata": ("torchdata",), "spdl": ("spdl", "spdl_core")}


# ------------------------------------------------------------ what is installed


def missing_packages() -> list[str]:
    """The peers' packages that are not installed, in the table's order."""
    return [package for package in PEER_PACKAGES if importlib.util.find_spec(package) is None]


def columns(missing: list[str]) -> list[str]:
    """The columns whose packages are installed, in the table's order."""
    return [loader.column for loader in LOADERS if loader.package not in missing]


def skipped_lines(missing: list[str]) -> list[str]:
    """One line per package that is not installed, naming the columns it leaves out."""
    return [
        f"skipped {', '.join(c.column for c in LOADERS if c.package == package)}: "
        f"{package} is not installed (pip install 'poolloader[bench]')"
        for package in missing
    ]


def versions(missing: list[str]) -> dict[str, str]:
    """torch's, poolloader's and each installed peer's version."""
    found = {"torch": str(torch.__version__)}
    for package, distributions in _DISTRIBUTIONS.items():
        if package not in missing:
            for name in distributions:
                found[name] = importlib.metadata.version(name)
    from .._version import __version__

    found["poolloader"] = __version__
    return found


def build(column: str, workload: Workload, num_workers: int) -> Any:
    return _BY_COLUMN[column].build(workload, num_workers)


def torch_alike(column: str, columns: list[str]) -> str | None:
    """The torch column among ``columns`` that starts workers as ``column`` does."""
    method = _BY_COLUMN[column].start_method
    return next(
        (c for c in columns if c.startswith("torch") and _BY_COLUMN[c].start_method == method),
        None,
    )


def is_peer(column: str) -> bool:
    """Whether ``column`` is another project's loader: one that fails is left out of
    the workload, where torch's (the reference) or poolloader's failing ends the run."""
    return _BY_COLUMN[column].package is not None


#: How much of a failed peer's error message the table shows.
FAILURE_CHARS = 200


def failure(exc: BaseException) -> str:
    """A peer's error in one line, for the table: its type and its message's last line
    (where an error from a worker that carries the worker's traceback states itself)."""
    lines = str(exc).strip().splitlines()
    message = lines[-1] if lines else ""
    if len(message) > FAILURE_CHARS:
        message = message[: FAILURE_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def build_order(chosen: list[str]) -> list[str]:
    """``chosen`` with the forked subprocess first: it forks before the other
    loaders start their threads."""
    return sorted(chosen, key=lambda column: column != "SPDL(subprocess+shm)")


def close(loader: Any) -> None:
    """End a loader's workers: ``close()`` where it has one; torch's persistent
    workers through their iterator, as torch's own ``__del__`` does. torchdata.nodes
    workers end with each epoch."""
    close = getattr(loader, "close", None)
    if close is not None:
        close()
        return
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
