"""Command line: ``python -m poolloader.bench`` (also the console script ``poolloader-bench``).

The run is a list of sections, each named as the table, the JSON and the README
name it: the throughput workloads (``_workloads.py``), start-up and epoch
turnaround, and the control channel. Adding one is adding a :class:`Plan` to
:func:`plans`: its name, what it measures, how many progress steps it reports,
and a function that returns its rows.

``--peers`` runs instead a few of the workloads with every loader of
``_peers.py`` (torch's, torchdata's, SPDL's, poolloader) and prints one table of
them side by side (:func:`peer_plans`).

The table, the JSON and the plot go into a results folder named at the end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _manifest, _peers, _report, _runner
from ._progress import Progress, ProgressDisplay, Section
from ._report import Row
from ._runner import PeerResult
from ._workloads import Workload, workloads

#: Throughput targets (poolloader / stock) per workload.
TARGETS = {
    "tensor_19mb": 4.0,
    "numpy_19mb": 4.0,
    "tiny_batches": 1.0,
    "cpu_bound": 0.95,
    "io_stalls": 1.5,
}
IDEAL_SHARE = 0.9  # poolloader's target share of the work-conserving ideal
FORKSERVER_FIRST_BATCH = 0.1  # seconds: poolloader's target for a second forkserver loader
TURNAROUND_EPOCHS = 3
#: The workloads ``--peers`` runs, each with this many times ``--num-workers``.
#: The skewed costs are sleeps, so workers beyond the cores still help: with
#: twice as many, how a loader schedules uneven batches decides, not the CPU.
PEER_WORKLOADS = {"tensor_19mb": 1, "numpy_19mb": 1, "tiny_batches": 1, "cpu_bound": 1,
                  "dynamic_costs": 2}  # fmt: skip
#: Where results go unless ``--out`` says otherwise: one folder per run inside it.
DEFAULT_RESULTS = "bench-results"


@dataclass
class Found:
    """What one section measured."""

    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # every figure, for the JSON
    seen: Any = None  # both loaders' median runs, by kind (the statistics table)
    extras: dict[str, Any] = field(default_factory=dict)  # the control channel's figures
    peers: PeerResult | None = None  # with --peers: every loader's figures
    error: str = ""  # why the section has no figures (--peers: a loader's batches differ)


@dataclass(frozen=True)
class Plan:
    """One section of the run: how the display counts it, what it says, how it runs."""

    section: Section
    description: str
    run: Callable[[Progress], Found]


def plans(
    quick: bool, repeats: int, num_workers: int, manifest_records: int | None = None
) -> list[Plan]:
    """Every section, in the order they run."""
    found = [
        _throughput_plan(w, repeats, num_workers) for w in workloads(quick, num_workers).values()
    ]
    found += [_startup_plan(method, num_workers) for method in ("spawn", "forkserver", "fork")]
    found.append(_turnaround_plan(num_workers))
    found.append(_control_plan(num_workers))
    records = _manifest.records_for(quick, manifest_records)
    found.append(_manifest_plan(records, _manifest.series_for(quick), _manifest.samples_for(quick)))
    return found


def peer_plans(quick: bool, repeats: int, num_workers: int, columns: list[str]) -> list[Plan]:
    """The workloads of :data:`PEER_WORKLOADS`, each with every loader in ``columns``."""
    found = workloads(quick, num_workers)
    return [_peers_plan(found[name], columns, repeats, num_workers * factor)
            for name, factor in PEER_WORKLOADS.items()]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolloader.bench",
        description="Compare poolloader with torch's stock DataLoader on this machine.",
    )
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per loader")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one repeat")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="sections to run (--list)")
    parser.add_argument("--skip-startup", action="store_true", help="skip start-up timings")
    parser.add_argument(
        "--manifest-records", type=int, metavar="N",
        help=f"records of the manifest section (default: {_manifest.RECORDS:,}; "
        f"{_manifest.QUICK_RECORDS:,} with --quick)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the sections and exit")
    parser.add_argument("--peers", action="store_true",
                        help="compare torchdata's and SPDL's loaders too, in one table "
                             "(a peer not installed is skipped)")  # fmt: skip
    parser.add_argument(
        "--out", metavar="DIR", help=f"results folder (default: a new one in ./{DEFAULT_RESULTS}/)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON here instead")
    parser.add_argument("--plot", metavar="PATH",
                        help="draw the ratios here instead (needs matplotlib)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if args.manifest_records is not None and args.manifest_records < 1:
        parser.error(f"--manifest-records should be positive, but got {args.manifest_records}")
    missing = _peers.missing_packages() if args.peers else []
    peers: dict[str, Any] | None = None  # with --peers: the columns, versions, peers left out
    if args.peers:
        columns = _peers.columns(missing)
        peers = {"columns": columns, "versions": _peers.versions(missing),
                 "skipped": _peers.skipped_lines(missing)}  # fmt: skip
        every = peer_plans(args.quick, repeats, args.num_workers, columns)
    else:
        every = plans(args.quick, repeats, args.num_workers, args.manifest_records)
    chosen = _choose(every, args, parser)
    if args.list:
        for plan in chosen:
            print(f"{plan.section.name:<18} {plan.description}")
        return 0
    outputs = _Outputs.from_args(args, parser)  # before the run: a missing matplotlib fails now
    for line in peers["skipped"] if peers else []:
        print(line, flush=True)
    found, seconds = _run(chosen)
    run = {"quick": args.quick, "repeats": repeats, "num_workers": args.num_workers,
           "section_seconds": seconds}  # fmt: skip
    outputs.write(found, run, peers)
    return 1 if any(f.error for f in found.values()) else 0


def _choose(
    every: list[Plan], args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[Plan]:
    names = [plan.section.name for plan in every]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"--only names sections of the run ({', '.join(names)}), but got {unknown}")
    chosen = [plan for plan in every if not args.only or plan.section.name in args.only]
    if args.skip_startup:
        chosen = [plan for plan in chosen if plan.section.name not in _STARTUP_SECTIONS]
    return chosen


def _run(chosen: list[Plan]) -> tuple[dict[str, Found], dict[str, float]]:
    display = ProgressDisplay([plan.section for plan in chosen])
    found: dict[str, Found] = {}
    seconds: dict[str, float] = {}
    with _runner.quiet_warnings():
        for plan in chosen:
            display.begin(plan.section.name)
            started = time.perf_counter()
            found[plan.section.name] = plan.run(display.step)
            seconds[plan.section.name] = round(time.perf_counter() - started, 1)
    display.close()
    return found, seconds


@dataclass
class _Outputs:
    """Where the table, the JSON and the plot go."""

    folder: Path
    json: Path
    plot: Path | None  # None: matplotlib is not installed

    @classmethod
    def from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser) -> _Outputs:
        if args.plot and not _report.can_plot():
            parser.error(f"--plot needs matplotlib, which is not installed: {_report.PLOT_INSTALL}")
        folder = Path(args.out or Path(DEFAULT_RESULTS, time.strftime("%Y%m%d-%H%M%S")))
        json = Path(args.json or folder / "bench.json")
        plot = Path(args.plot or folder / "bench.png") if _report.can_plot() else None
        return cls(folder, json, plot)

    def write(
        self, found: dict[str, Found], run: dict[str, Any], peers: dict[str, Any] | None = None
    ) -> None:
        """``peers`` (with ``--peers``): the columns, the versions and the skipped peers."""
        rows = [row for f in found.values() for row in f.rows]
        extras = {k: v for f in found.values() for k, v in f.extras.items()}
        seen = {name: f.seen for name, f in found.items() if f.seen is not None}
        document = None  # the peers' part of the JSON
        if peers is not None:
            text, document = self._peers(found, run["num_workers"], peers)
        else:
            text = _report.table(rows, extras)
        if seen:
            text += "\n\n" + _report.statistics_table(seen)
        print(text)
        for path in (self.folder, self.json.parent, *([self.plot.parent] if self.plot else [])):
            path.mkdir(parents=True, exist_ok=True)
        (self.folder / "bench.txt").write_text(text + "\n")
        raw = {name: f.raw for name, f in found.items()}
        _report.write_json(str(self.json), rows, extras, raw, run=run, peers=document)
        if self.plot is not None and rows:
            _report.plot(str(self.plot), rows)
        print(self._summary(bool(rows)))

    @staticmethod
    def _peers(
        found: dict[str, Found], num_workers: int, context: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """The peers' table and its part of the JSON."""
        results = [f.peers for f in found.values() if f.peers is not None]
        errors = {name: f.error for name, f in found.items() if f.error}
        rows = _report.peer_rows(results, num_workers)
        failed = {result.workload: result.failed for result in results if result.failed}
        text = _report.peers_table(rows, context["columns"], context["versions"], num_workers,
                                   errors, failed)  # fmt: skip
        return text, _report.peers_document(rows, results, errors, failed, context)

    def _summary(self, any_rows: bool) -> str:
        written = [str(self.folder / "bench.txt"), str(self.json)]
        if self.plot is not None and any_rows:
            written.append(str(self.plot))
        lines = ["", "results written: " + ", ".join(written)]
        if self.plot is None:
            lines.append(f"no plot: matplotlib is not installed; {_report.PLOT_INSTALL}")
        return "\n".join(lines)


# ---------------------------------------------------------------- sections

_STARTUP_SECTIONS = ("startup_spawn", "startup_forkserver", "startup_fork", "epoch_turnaround")
#: Seconds each non-workload section takes on a 2-core machine (the progress
#: bar's weights; a wrong guess only skews the time left until the pace is known).
STARTUP_ESTIMATE = 7.5
TURNAROUND_ESTIMATE = 7.0
CONTROL_ESTIMATE = 3.0


def _throughput_plan(workload: Workload, repeats: int, num_workers: int) -> Plan:
    def run(progress: Progress) -> Found:
        measured = _runner.measure_throughput(workload, num_workers, repeats, progress)
        raw = {kind: m.__dict__ for kind, m in measured.items()}
        return Found(_throughput_rows(workload, measured), raw, measured)

    steps = _runner.throughput_steps(workload, repeats)
    return Plan(Section(workload.name, steps, workload.estimate), workload.description, run)


def _throughput_rows(workload: Workload, found: dict[str, Any]) -> list[Row]:
    stock, ours, name = found["stock"], found["poolloader"], workload.name
    row = Row(name, "batches/s", "/s", stock.throughput, ours.throughput, True)
    if name in TARGETS:
        row.target, row.met = f">= {TARGETS[name]}x", row.ratio >= TARGETS[name]
    rows = [row]
    if workload.ideal_seconds:
        share, target = workload.ideal_seconds / ours.seconds, f"poolloader >= {IDEAL_SHARE:.0%}"
        rows.append(Row(name, "share of ideal", "%", workload.ideal_seconds / stock.seconds,
                        share, True, target, share >= IDEAL_SHARE))  # fmt: skip
    if workload.measure_memory:
        rows.append(Row(name, "peak memory", "MB", stock.peak_memory, ours.peak_memory,
                        False, "<= stock", ours.peak_memory <= stock.peak_memory))  # fmt: skip
    return rows


def _peers_plan(workload: Workload, columns: list[str], repeats: int, num_workers: int) -> Plan:
    def run(progress: Progress) -> Found:
        try:
            result = _runner.measure_peers(workload, columns, num_workers, repeats, progress)
        except _runner.DifferentBatches as exc:  # an error, not a row; the run goes on
            return Found(raw={"num_workers": num_workers, "error": str(exc)}, error=str(exc))
        raw = {column: m.__dict__ for column, m in result.measurements.items()}
        return Found(raw={"num_workers": num_workers, **raw}, peers=result)

    steps = _runner.peers_steps(workload, columns, repeats)
    estimate = workload.estimate * len(columns) / 2 * (1.5 if workload.measure_memory else 1.0)
    description = f"{workload.description}; {num_workers} workers; every loader"
    return Plan(Section(workload.name, steps, estimate), description, run)


def _startup_plan(method: str, num_workers: int) -> Plan:
    name = f"startup_{method}"

    def run(progress: Progress) -> Found:
        stock = _runner.measure_startup("stock", method, num_workers, progress)
        ours = _runner.measure_startup("poolloader", method, num_workers, progress)
        row = Row(name, "first batch", "s", stock, ours, False)
        if method == "forkserver":
            row.target = f"poolloader <= {FORKSERVER_FIRST_BATCH} s"
            row.met = ours <= FORKSERVER_FIRST_BATCH
        return Found([row], {"stock": stock, "poolloader": ours})

    description = f"seconds from creating a second {method} loader to its first batch"
    return Plan(Section(name, 2, STARTUP_ESTIMATE), description, run)


def _turnaround_plan(num_workers: int) -> Plan:
    def run(progress: Progress) -> Found:
        figures = {
            kind: _runner.measure_turnaround(kind, num_workers, TURNAROUND_EPOCHS, progress)
            for kind in ("stock", "poolloader")
        }
        row = Row("epoch_turnaround", "next epoch's first batch", "s", figures["stock"],
                  figures["poolloader"], False)  # fmt: skip
        return Found([row], figures)

    description = (
        "seconds from an epoch's end to the next one's first batch (persistent_workers=False)"
    )
    steps = 2 * TURNAROUND_EPOCHS
    return Plan(Section("epoch_turnaround", steps, TURNAROUND_ESTIMATE), description, run)


def _control_plan(num_workers: int) -> Plan:
    def run(progress: Progress) -> Found:
        extras = _runner.measure_control(num_workers, progress)
        return Found(raw=dict(extras), extras=extras)

    description = "bytes sent to workers per batch while nothing changes, and for one change"
    return Plan(Section("control_channel", 2, CONTROL_ESTIMATE), description, run)


def _manifest_plan(records: int, series: tuple[int, ...], samples: int) -> Plan:
    def run(progress: Progress) -> Found:
        figures = _manifest.measure(records, series, progress, samples)
        summary = _manifest.summary(figures)
        return Found(_manifest.rows(figures), figures, extras={"manifest": summary})

    description = (
        f"a {records:,}-record manifest, list or SharedList: PSS after an epoch (4 workers), "
        f"first batch with {', '.join(map(str, series))} workers, next epoch"
    )
    section = Section("manifest", _manifest.steps(series, samples), _manifest.estimate(records))
    return Plan(section, description, run)
