"""Command line: ``python -m poolloader.bench`` (also ``poolloader-bench``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import _report, _runner
from ._report import Row
from ._workloads import workloads

#: Throughput targets (poolloader / stock) per workload.
TARGETS = {
    "big_tensor": 4.0,
    "big_numpy": 4.0,
    "tiny_items": 1.0,
    "cpu_bound": 0.95,
    "skewed": 1.5,
}
SKEWED_IDEAL_SHARE = 0.9
FORKSERVER_FIRST_BATCH = 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolloader.bench",
        description="Compare poolloader with torch's stock DataLoader on this machine.",
    )
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per loader")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one repeat")
    parser.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    parser.add_argument("--skip-startup", action="store_true", help="skip start-up timings")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the ratios (needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    progress = _runner.stderr_progress if sys.stderr.isatty() else _plain_progress
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    with _runner.quiet_warnings():
        for name, workload in workloads(args.quick, args.num_workers).items():
            if args.only and name not in args.only:
                continue
            found = _runner.measure_throughput(workload, args.num_workers, repeats, progress)
            raw[name] = {kind: m.__dict__ for kind, m in found.items()}
            seen[name] = found["poolloader"]
            rows.extend(_throughput_rows(name, workload, found))
        if not args.skip_startup and not args.only:
            rows.extend(_startup_rows(args.num_workers, progress, raw))
        extras = _runner.measure_control(args.num_workers, progress) if not args.only else {}
    sys.stderr.write("\r\033[K" if sys.stderr.isatty() else "")
    print(_report.table(rows, extras))
    if seen:
        print()
        print(_report.statistics_table(seen))
    if args.json:
        _report.write_json(args.json, rows, extras, raw)
    if args.plot:
        _report.plot(args.plot, rows)
    return 0


def _plain_progress(line: str) -> None:
    print(f"  ... {line}", file=sys.stderr, flush=True)


def _throughput_rows(name: str, workload: Any, found: dict[str, Any]) -> list[Row]:
    stock, ours = found["stock"], found["poolloader"]
    target = TARGETS.get(name)
    row = Row(f"{name} (batches/s)", "/s", stock.throughput, ours.throughput, True)
    if target is not None:
        row.target, row.met = f">= {target}x", row.ratio >= target
    rows = [row]
    if workload.ideal_seconds:
        share = workload.ideal_seconds / ours.seconds
        ideal = Row(f"{name} (share of ideal)", "%", workload.ideal_seconds / stock.seconds,
                    share, True, f"poolloader >= {SKEWED_IDEAL_SHARE:.0%}",
                    share >= SKEWED_IDEAL_SHARE)  # fmt: skip
        rows.append(ideal)
    if workload.measure_memory:
        rows.append(Row(f"{name} peak memory", "MB", stock.peak_memory, ours.peak_memory,
                        False, "<= stock", ours.peak_memory <= stock.peak_memory))  # fmt: skip
    return rows


def _startup_rows(num_workers: int, progress: Any, raw: dict[str, Any]) -> list[Row]:
    rows = []
    for method in ("spawn", "forkserver"):
        stock = _runner.measure_startup("stock", method, num_workers, progress)
        ours = _runner.measure_startup("poolloader", method, num_workers, progress)
        raw[f"startup_{method}"] = {"stock": stock, "poolloader": ours}
        row = Row(f"first batch, {method} (s)", "s", stock, ours, False)
        if method == "forkserver":
            row.target = f"poolloader <= {FORKSERVER_FIRST_BATCH} s"
            row.met = ours <= FORKSERVER_FIRST_BATCH
        rows.append(row)
    stock = _runner.measure_turnaround("stock", num_workers, 3, progress)
    ours = _runner.measure_turnaround("poolloader", num_workers, 3, progress)
    raw["epoch_turnaround"] = {"stock": stock, "poolloader": ours}
    rows.append(Row("epoch turnaround (s)", "s", stock, ours, False))
    return rows


if __name__ == "__main__":
    sys.exit(main())
