"""The ``manifest`` section: a 1,000,000-record manifest through the DataLoader.

A speech corpus's manifest, ``{"id", "path", "dur", "text"}`` dicts held by a plain
map-style dataset (:class:`~._workloads.Manifest`), is where torch's loader gets
expensive: a fork worker copies every page of records it touches (reading a Python
object writes its reference count), and a spawn worker gets the whole list pickled for
it, one worker after the other. The section runs the same dataset through torch's
loader (fork and spawn, records in a list) and poolloader's (spawn and forkserver,
records in a list or in a :class:`~poolloader.SharedList`; fork, records in a list, which
is fork's start-up and copy-on-read memory beside spawn's).

The records are written once, in chunks, to a temporary file, as a manifest is kept on
disk. Every figure comes from a fresh interpreter (a *probe*, ``_manifest_probe.py``
run with ``-m``), so that no imported module, forkserver or freed memory of an earlier
measurement helps or hurts the next one. A probe reads the records first, untimed, into
a list of dicts or into a SharedList built chunk by chunk (its main process never holds
the rows as Python objects), then:

* ``main``: 8 workers, ``persistent_workers=False``, epochs of a few thousand records
  drawn at random from all of them (the first batch costs what it costs with
  ``shuffle=True``; the epoch ends soon): seconds from creating the loader to its first
  batch, and from the end of the epoch to the next one's first batch. Then, those
  workers gone, 4 persistent workers and one shuffled epoch over every record, and the
  proportional set size (PSS) of the whole process tree while they live: the main
  process, the workers, and poolloader's template, forkserver and resource tracker
  where there are some.
* ``start``: the first batch as above, with 1, 2 or 4 workers (the start-up series).
"""

from __future__ import annotations

import itertools
import json
import pickle
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._progress import Progress
from ._report import Row
from ._runner import run_probe
from ._workloads import manifest_records

#: Records of the full run, and of ``--quick``.
RECORDS = 1_000_000
QUICK_RECORDS = 20_000
BATCH_SIZE = 256
#: Workers of the memory run.
MEMORY_WORKERS = 4
#: Workers of the first-batch and next-epoch rows.
START_WORKERS = 8
#: Worker counts of the start-up series (flat in the worker count is the aim), and
#: of ``--quick``'s (only the one of the rows).
SERIES = (1, 2, 4, 8)
QUICK_SERIES = (START_WORKERS,)
#: Records per pickled chunk of the records file (what a probe holds at once while it
#: builds a SharedList).
CHUNK = 10_000
#: Records in each epoch of the start-up measurements: enough for every worker's first
#: batches, few enough that an epoch ends within a second.
START_RECORDS = 2048
#: Epochs whose first batch the ``main`` probe times after the first (one: torch's
#: spawn takes about 40 s for each).
NEXT_EPOCHS = 1
#: First batches with 8 workers the forkserver rows take the median of, each from a
#: fresh interpreter: their goal is a number of seconds, not a ratio to a loader
#: measured beside them, and one sample moves by 0.3 s or more between runs here.
#: ``--quick`` takes one.
FORKSERVER_SAMPLES = 3
#: Seconds one probe may take; only bounds a hang (torch's spawn with 8 workers and
#: 1M records takes about 40 s on a 2-core machine).
PROBE_DEADLINE = 900

# The goals for a 1M-record manifest, as ratios or bounds measured in the same run.
FIRST_BATCH_SPAWN_RATIO = 4.0  # poolloader's spawn first batch: at most 1/4 of torch's
FORKSERVER_FIRST_BATCH = 2.0  # seconds
NEXT_EPOCH = 1.0  # seconds, persistent_workers=False
#: Seconds the section takes on a 2-core machine (the progress bar's weights).
ESTIMATE = 360.0
QUICK_ESTIMATE = 80.0


@dataclass(frozen=True)
class Config:
    """One way of loading the manifest."""

    kind: str  # "stock" (torch's DataLoader) or "poolloader"
    method: str  # start method
    shared: bool  # records in a SharedList (else a list)

    @property
    def container(self) -> str:
        return "SharedList" if self.shared else "list"

    @property
    def key(self) -> str:
        """The JSON's name for it: ``torch_fork_list``, ``poolloader_spawn_shared``, ..."""
        loader = "torch" if self.kind == "stock" else "poolloader"
        return f"{loader}_{self.method}_{'shared' if self.shared else 'list'}"

    @property
    def label(self) -> str:
        """The table's: ``torch, fork, list``, ``poolloader, spawn, SharedList``, ..."""
        return f"{self.key.split('_')[0]}, {self.method}, {self.container}"


CONFIGS = {
    c.key: c
    for c in (
        Config("stock", "fork", False),
        Config("stock", "spawn", False),
        Config("poolloader", "spawn", False),
        Config("poolloader", "spawn", True),
        Config("poolloader", "forkserver", False),
        Config("poolloader", "forkserver", True),
        Config("poolloader", "fork", False),
    )
}


def records_for(quick: bool, given: int | None) -> int:
    """The record count: ``given`` (``--manifest-records``), else the full or quick one."""
    if given is not None:
        return given
    return QUICK_RECORDS if quick else RECORDS


def series_for(quick: bool) -> tuple[int, ...]:
    return QUICK_SERIES if quick else SERIES


def samples_for(quick: bool) -> int:
    """Fresh runs the forkserver rows' 8-worker first batch is the median of."""
    return 1 if quick else FORKSERVER_SAMPLES


def _first_batch_samples(config: Config, samples: int) -> int:
    """How many fresh runs ``config``'s 8-worker first batch takes: ``samples`` for
    the forkserver rows (their goal is seconds), one for the others."""
    return samples if config.method == "forkserver" else 1


def steps(series: tuple[int, ...], samples: int = 1) -> int:
    """Probes the section runs (the progress display's steps)."""
    extra = sum(_first_batch_samples(c, samples) - 1 for c in CONFIGS.values())
    return len(CONFIGS) * len(series) + extra


def estimate(records: int) -> float:
    return ESTIMATE if records > QUICK_RECORDS else QUICK_ESTIMATE


def write_records(path: Path, count: int) -> None:
    """Write ``count`` manifest rows to ``path``, pickled in chunks of :data:`CHUNK`."""
    rows = manifest_records(count)
    with open(path, "wb") as fh:
        while chunk := list(itertools.islice(rows, CHUNK)):
            pickle.dump(chunk, fh, protocol=pickle.HIGHEST_PROTOCOL)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The rows :func:`write_records` wrote, a chunk at a time."""
    with open(path, "rb") as fh:
        while True:
            try:
                chunk = pickle.load(fh)
            except EOFError:
                return
            yield from chunk


def _probe(kind: str, config: Config, path: Path, workers: int) -> dict[str, Any]:
    found = run_probe("_manifest_probe", [kind, config.key, str(path), str(workers)],
                      f"the manifest's {kind} probe of {config.label}", PROBE_DEADLINE)  # fmt: skip
    return dict(json.loads(found))


def measure(
    records: int, series: tuple[int, ...], progress: Progress, samples: int = 1
) -> dict[str, Any]:
    """Every configuration's figures: PSS after an epoch, first batch for each worker
    count of ``series``, next epoch's first batch; the forkserver's first batch with
    8 workers is the median of ``samples``."""
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="poolloader-manifest-") as folder:
        path = Path(folder, "records.pickle")
        write_records(path, records)
        for config in CONFIGS.values():
            found[config.key] = _measure_config(config, path, series, progress, samples)
    return {"records": records, "batch_size": BATCH_SIZE, "configs": found}


def _measure_config(
    config: Config, path: Path, series: tuple[int, ...], progress: Progress, samples: int
) -> dict[str, Any]:
    progress(f"manifest: {config.label}, {START_WORKERS} workers, then an epoch with "
             f"{MEMORY_WORKERS}")  # fmt: skip
    found = {"label": config.label, **_probe("main", config, path, START_WORKERS)}
    taken = [found.pop("first_batch")]
    wanted = _first_batch_samples(config, samples)
    for sample in range(2, wanted + 1):
        progress(f"manifest: {config.label}, first batch with {START_WORKERS} workers, "
                 f"sample {sample}/{wanted}")  # fmt: skip
        taken.append(_probe("start", config, path, START_WORKERS)["first_batch"])
    found["first_batch_samples"] = taken
    first = {START_WORKERS: statistics.median(taken)}
    for workers in series:
        if workers != START_WORKERS:
            progress(f"manifest: {config.label}, first batch with {workers} worker(s)")
            first[workers] = _probe("start", config, path, workers)["first_batch"]
    found["first_batch"] = {w: first[w] for w in series}
    found["next_epoch"] = statistics.mean(found["next_epochs"])
    return found


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    """What the report's lines show: the figures less each process's PSS."""
    configs = {
        key: {**{k: v for k, v in found.items() if k != "processes"},
              "main_pss": sum(p["pss"] for p in found["processes"] if p["role"] == "main")}
        for key, found in figures["configs"].items()
    }  # fmt: skip
    return {**figures, "configs": configs}


def rows(figures: dict[str, Any]) -> list[Row]:
    """The table's rows: memory against torch's fork, start-up against torch's spawn."""
    configs = figures["configs"]
    fork, spawn = configs["torch_fork_list"], configs["torch_spawn_list"]
    ours = [c for c in CONFIGS.values() if c.kind == "poolloader"]
    found = []
    for config in ours:
        pss = configs[config.key]["pss"]
        row = Row("manifest", f"PSS after epoch, {_short(config)}", "MB", fork["pss"], pss, False)
        if config.shared:
            row.target, row.met = "<= torch fork", pss <= fork["pss"]
        found.append(row)
    for config in ours:
        seconds = configs[config.key]["first_batch"][START_WORKERS]
        # poolloader's fork against torch's fork (no goal), the others against torch's spawn
        stock = fork if config.method == "fork" else spawn
        row = Row("manifest", f"first batch x{START_WORKERS}, {_short(config)}", "s",
                  stock["first_batch"][START_WORKERS], seconds, False)  # fmt: skip
        if config.method == "fork":
            pass
        elif config.method == "spawn":
            row.target = f">= {FIRST_BATCH_SPAWN_RATIO:.1f}x torch spawn"
            row.met = row.ratio >= FIRST_BATCH_SPAWN_RATIO
        else:
            row.target = f"poolloader <= {FORKSERVER_FIRST_BATCH:.1f} s"
            row.met = seconds <= FORKSERVER_FIRST_BATCH
        found.append(row)
    for config in ours:
        seconds = configs[config.key]["next_epoch"]
        stock = fork if config.method == "fork" else spawn
        found.append(Row("manifest", f"next epoch x{START_WORKERS}, {_short(config)}", "s",
                         stock["next_epoch"], seconds, False,
                         f"poolloader <= {NEXT_EPOCH:.1f} s", seconds <= NEXT_EPOCH))  # fmt: skip
    return found


def _short(config: Config) -> str:
    return f"{config.method}+{config.container}"
