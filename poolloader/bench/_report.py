"""The benchmark's table, JSON and plot (and with ``--peers``, the peers' table)."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from .._version import __version__
from . import _control_cost, _peers
from ._runner import PeerResult


@dataclass
class Row:
    """One line of the table: a figure for each loader and their ratio.

    ``workload`` is the section's name as the README and ``--only`` spell it;
    ``measure`` says which figure of it (``"batches/s"``, ``"peak memory"``, ...)."""

    workload: str
    measure: str
    unit: str
    stock: float
    ours: float
    higher_is_better: bool
    target: str = ""
    met: bool | None = None

    @property
    def name(self) -> str:
        return f"{self.workload}: {self.measure}"

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.ours / self.stock if self.stock else float("inf")
        return self.stock / self.ours if self.ours else float("inf")


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "poolloader": __version__,
        "cpus": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }


def table(rows: list[Row], extras: dict[str, Any]) -> str:
    first = max([len("workload"), *(len(row.workload) for row in rows)])
    second = max([len("measure"), *(len(row.measure) for row in rows)])
    header = (
        f"{'workload':<{first}}  {'measure':<{second}} {'stock':>11} {'poolloader':>11} "
        f"{'ratio':>8}  target"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        mark = "" if row.met is None else ("  ok" if row.met else "  MISSED")
        lines.append(
            f"{row.workload:<{first}}  {row.measure:<{second}} {_fmt(row.stock, row.unit):>11} "
            f"{_fmt(row.ours, row.unit):>11} {row.ratio:>7.2f}x  {row.target}{mark}".rstrip()
        )
    lines.append("")
    lines.append("ratio > 1 means poolloader is better (faster, or less memory)")
    if "bytes_per_batch_idle" in extras:
        lines += ["", *control_lines(extras)]
    if "manifest" in extras:
        lines += ["", *manifest_lines(extras["manifest"])]
    return "\n".join(lines)


def control_lines(extras: dict[str, Any]) -> list[str]:
    """The control channel's cost, idle and after one change, in words."""
    return [
        "control channel (batches of 4 indices):",
        f"  idle: {extras['bytes_per_batch_idle']:.1f} bytes sent per batch; with no channel "
        f"at all the tasks alone are {extras['bytes_per_batch_without_a_channel']:.1f}; "
        f"control bytes per batch: {extras['control_bytes_per_batch_idle']:.1f}",
        f"  one change (loader.dataset.n = ...): {extras['control_messages_after_one_change']} "
        f"messages, {extras['control_bytes_after_one_change']} bytes in all, once",
        *_control_cost.lines(extras),
    ]


def manifest_lines(figures: dict[str, Any]) -> list[str]:
    """Every configuration of the manifest section: PSS after an epoch, first batch by
    worker count, next epoch's first batch (figures from ``_manifest.summary``)."""
    configs = figures["configs"]
    series = list(next(iter(configs.values()))["first_batch"])
    label = max(len(found["label"]) for found in configs.values())
    pickled = max(found["pickled_bytes"] for found in configs.values())
    first = 8 * len(series) - 1
    lines = [
        f"manifest: {figures['records']:,} records ({pickled / 1e6:.1f} MB pickled as a list), "
        f"batch_size {figures['batch_size']}",
        f"  {'':<{label}}  {'PSS, 4 workers':^21}  {'first batch':^{first}}  {'next epoch':>11}",
        f"  {'':<{label}}  {'all':>10} {'main':>10}  "
        + " ".join(f"{f'N={n}':>7}" for n in series)
        + f"  {'N=8':>11}",
    ]
    for found in configs.values():
        seconds = " ".join(f"{value:>5.2f} s" for value in found["first_batch"].values())
        lines.append(
            f"  {found['label']:<{label}}  {_fmt(found['pss'], 'MB'):>10} "
            f"{_fmt(found['main_pss'], 'MB'):>10}  {seconds}  {found['next_epoch']:>9.3f} s"
        )
    for found in configs.values():
        taken = found.get("first_batch_samples", [])
        if len(taken) > 1:
            lines.append(
                f"  {found['label']}: first batch with 8 workers is the median of "
                f"{len(taken)} fresh runs: " + ", ".join(f"{t:.2f}" for t in taken) + " s"
            )
    return lines


def statistics_table(seen: dict[str, Any]) -> str:
    """poolloader's own view of its median run of each workload (``loader.statistics()``),
    and the main process's CPU per batch of both loaders (``time.process_time()``: every
    thread of the main process, not the workers)."""
    header = (
        f"{'poolloader statistics':<22} {'workers busy':>13} {'consumer wait':>14} "
        f"{'slab reuse':>11} {'main CPU/batch':>15} {'torch':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, runs in seen.items():
        run, stock = runs["poolloader"], runs["stock"]
        reuse = f"{run.slab_reuse:.0%}" if run.slab_reuse is not None else "-"
        lines.append(
            f"{name:<22} {run.busy:>13.0%} {run.wait * 1000:>11.2f} ms {reuse:>11} "
            f"{run.main_cpu * 1e6:>12.0f} µs {stock.main_cpu * 1e6:>6.0f} µs"
        )
    return "\n".join(lines)


def _fmt(value: float, unit: str) -> str:
    if unit == "MB":
        return f"{value / 2**20:.0f} MB"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "%":
        return f"{value:.0%}"
    return f"{value:.1f} {unit}"


def write_json(
    path: str,
    rows: list[Row],
    extras: dict[str, Any],
    raw: dict[str, Any],
    run: dict[str, Any] | None = None,
    peers: dict[str, Any] | None = None,
) -> None:
    """Every figure: the machine, how the run was made (``run``), the table's rows,
    the control channel and each section's raw measurements (``raw``), keyed by
    the workload names of the table; with ``--peers``, the peers' table
    (:func:`peers_document`)."""
    document = {
        "machine": machine(),
        "run": run or {},
        "rows": [{**row.__dict__, "ratio": row.ratio} for row in rows],
        "extras": extras,
        "raw": raw,
        **({"peers": peers} if peers is not None else {}),
    }
    with open(path, "w") as fh:
        json.dump(document, fh, indent=2, default=str)


#: What to install for the plot; said when matplotlib is missing.
PLOT_INSTALL = "pip install 'poolloader[bench]' (or: pip install matplotlib)"


def can_plot() -> bool:
    """Whether matplotlib is installed; checked before the run, not after it."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot(path: str, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r.name for r in rows]
    ratios = [r.ratio for r in rows]
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    finite = [r for r in ratios if 0 < r < float("inf")] or [1.0]
    ratios = [min(max(r, min(finite)), max(finite)) for r in ratios]  # inf and 0 at the ends
    ax.barh(names, [r - 1.0 for r in ratios], color=colors, left=1.0)  # bars start at 1x
    ax.set_xscale("log")  # ratios span 0.9x to several hundred x
    for y, row in enumerate(rows):
        ax.annotate(f"{row.ratio:.2f}x", (ratios[y], y), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)  # fmt: skip
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("poolloader vs stock torch DataLoader (ratio, log scale, > 1 is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- peers

#: What the peers' table calls each workload.
PEER_LABELS = {
    "tensor_19mb": "19 MB tensor",
    "numpy_19mb": "19 MB NumPy",
    "tiny_batches": "tiny batches",
    "cpu_bound": "4 ms CPU per item",
    "dynamic_costs": "skewed costs",
}


@dataclass
class PeerRow:
    """One line of the peers' table: a figure for each loader."""

    workload: str
    label: str
    measure: str  # "batches/s", "peak PSS", "peak held" or "main CPU" (seconds per batch)
    values: dict[str, float]
    #: batches/s rows: each loader's figure in each round of the alternating runs
    rounds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def relative(self) -> dict[str, float]:
        """Each value against torch's, > 1 better (faster, less memory or less CPU)."""
        torch_value = self.values["torch"]
        if self.measure in ("peak PSS", "peak held", "main CPU"):
            return {c: torch_value / v if v else float("inf") for c, v in self.values.items()}
        return {c: v / torch_value if torch_value else float("inf") for c, v in self.values.items()}


def peer_rows(results: list[PeerResult], num_workers: int) -> list[PeerRow]:
    """Throughput rows in the run's order, then the peak PSS rows, then the main
    process's CPU per batch where batches are tiny (where the loader's own work
    per batch is what is measured)."""
    rows, memory, cpu = [], [], []
    for result in results:
        label = PEER_LABELS.get(result.workload, result.workload)
        if result.num_workers != num_workers:
            label += f" ({result.num_workers} workers)"
        found = result.measurements
        speeds = {c: m.throughput for c, m in found.items()}
        rows.append(PeerRow(result.workload, f"{label}, batches/s", "batches/s", speeds,
                            result.rounds))  # fmt: skip
        if result.measure_memory:
            memory.append(PeerRow(result.workload, f"peak PSS, {label}", "peak PSS",
                                  {c: float(m.peak_memory) for c, m in found.items()}))  # fmt: skip
            if all(m.peak_held for m in found.values()):
                held = {c: float(m.peak_held) for c, m in found.items()}
                memory.append(PeerRow(result.workload, f"peak held memory, {label}", "peak held",
                                      held))  # fmt: skip
        if result.workload == "tiny_batches":
            cpu.append(PeerRow(result.workload, f"main CPU/batch, {label}", "main CPU",
                               {c: m.main_cpu for c, m in found.items()}))  # fmt: skip
    return rows + memory + cpu


def peers_table(rows: list[PeerRow], columns: list[str], versions: dict[str, str],
                num_workers: int, errors: dict[str, str],
                failed: dict[str, dict[str, str]]) -> str:  # fmt: skip
    """The loaders side by side, then the same figures against torch's, then the
    peers that failed on a workload (``failed``: workload, column, error; their
    cells are "-"), then the workloads refused because a loader delivered other
    batches than torch's."""
    first = max([len("relative to torch"), *(len(row.label) for row in rows)])
    widths = [max(len(c), 8) for c in columns]

    def line(label: str, cells: list[str]) -> str:
        return f"{label:<{first}}" + "".join(
            f"  {x:>{w}}" for x, w in zip(cells, widths, strict=True)
        )

    header = line("", columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(line(row.label, [_peer_cell(row.values.get(c), row.measure) for c in columns]))
    lines += ["", line("relative to torch", columns), "-" * len(header)]
    for row in rows:
        relative = row.relative
        lines.append(line(row.label, [f"{relative[c]:.2f}x" if c in relative else "-"
                                      for c in columns]))  # fmt: skip
    lines += [
        "",
        "relative to torch: > 1 is better (faster, less memory or less CPU)",
        f"{num_workers} workers per loader unless the row says; versions: "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
    ]
    verdicts = verdicts_table(peer_verdicts(rows, columns))
    if verdicts:
        lines += ["", verdicts]
    if failed:
        lines.append("")
    for workload, columns_failed in failed.items():
        label = PEER_LABELS.get(workload, workload)
        lines += [f"left out of {label}: {column}, which failed: {error}"
                  for column, error in columns_failed.items()]  # fmt: skip
    if errors:
        lines += ["", "ERROR: no figures for these workloads, whose batches differ:"]
        lines += [f"  {name}: {error}" for name, error in errors.items()]
    return "\n".join(lines)


def _peer_cell(value: float | None, measure: str) -> str:
    if value is None:
        return "-"
    if measure in ("peak PSS", "peak held"):
        return f"{value / 2**20:.0f} MB"
    if measure == "main CPU":
        return f"{value * 1e6:.0f} µs"
    return f"{value:.1f}"


# NOTE [ Verdicts ]: the machines this runs on are shared, and the same loader's
# batches/s moves by a quarter or more between runs seconds apart, more than some
# rows' differences between loaders. A throughput row is therefore judged round
# by round: the timed runs alternate (round ``i`` of every loader, one after the
# other), so each round compares the loaders under about the same load. Ahead:
# poolloader beats the best other loader in every round; behind: it loses every
# round; level (within noise): the rounds disagree, so the difference is smaller
# than the noise between runs (the rounds it won say which way it leans). One
# round (``--quick``) can only say ahead or behind. Memory is one sample per
# loader (each alone, in a fresh interpreter), judged against torch's with the
# bound :data:`MEMORY_BOUND`.

#: Peak memory at most this many times torch's counts as level with it.
MEMORY_BOUND = 1.1


@dataclass(frozen=True)
class Verdict:
    """How one of poolloader's columns stands on one row of the peers' table
    (NOTE [ Verdicts ]); ratios are > 1 where poolloader is better."""

    label: str  # the row's
    column: str  # poolloader's column
    other: str  # the best other loader of the row; torch for memory
    ratio: float  # of the medians (memory: of the one sample each)
    low: float | None  # the least and the greatest of the rounds' ratios (memory: None)
    high: float | None
    verdict: str


def peer_verdicts(rows: list[PeerRow], columns: list[str]) -> list[Verdict]:
    """Each poolloader column against the fastest other loader on every throughput
    row, and against torch on every memory row (NOTE [ Memory by start method ])."""
    ours = [c for c in columns if c.startswith("poolloader")]
    others = [c for c in columns if not c.startswith("poolloader")]
    found = []
    for row in rows:
        present = [c for c in others if c in row.values]
        if row.measure == "main CPU" or not present:
            continue
        for column in [c for c in ours if c in row.values]:
            if row.measure == "batches/s":
                found.append(_throughput_verdict(row, column, present))
            else:
                found += _memory_verdicts(row, column, present)
    return found


def _memory_verdicts(row: PeerRow, column: str, others: list[str]) -> list[Verdict]:
    """``column``'s memory against torch's (the stock loader), and against torch's
    with the same start method where that is another column (NOTE [ Memory by
    start method ])."""
    torches = list(dict.fromkeys(c for c in ("torch", _peers.torch_alike(column, others))
                                 if c in row.values))  # fmt: skip
    found = []
    for other in torches:
        ratio = row.values[other] / row.values[column] if row.values[column] else float("inf")
        verdict = (f"within {MEMORY_BOUND}x of {other}'s" if ratio * MEMORY_BOUND >= 1
                   else f"over {MEMORY_BOUND}x {other}'s ({1 / ratio:.2f}x)")  # fmt: skip
        found.append(Verdict(row.label, column, other, ratio, None, None, verdict))
    return found


# NOTE [ Memory by start method ]: a worker started by spawn or forkserver
# imports torch in an interpreter of its own, where fork workers share the
# pages of the main process's import: ``import torch`` alone makes about 143 MB
# of anonymous memory on the benchmark's machine, and nothing can share it with
# a process that did not fork from the one that made it. poolloader's default
# (spawn) therefore pays one more import than a fork loader, whatever it does
# with batches; its template process shares its own import with the workers it
# forks, where torch's spawn workers import torch once each. Each poolloader
# column is judged against the stock loader (``torch``) and against torch's
# with the same start method, so that both the price of the start method and
# that of the transport are stated.


def _throughput_verdict(row: PeerRow, column: str, others: list[str]) -> Verdict:
    other = max(others, key=lambda c: row.values[c])
    ratio = row.values[column] / row.values[other] if row.values[other] else float("inf")
    ours, theirs = row.rounds.get(column, []), row.rounds.get(other, [])
    pairs = [a / b for a, b in zip(ours, theirs, strict=False) if b] or [ratio]
    low, high = min(pairs), max(pairs)
    won = sum(r > 1 for r in pairs)
    verdict = (
        "ahead" if won == len(pairs)
        else "behind" if not any(r >= 1 for r in pairs)
        else f"level (within noise): faster in {won} of {len(pairs)} rounds"
    )  # fmt: skip
    return Verdict(row.label, column, other, ratio, low, high, verdict)


def verdicts_table(verdicts: list[Verdict]) -> str:
    """The verdicts, one line each (empty when there are none)."""
    if not verdicts:
        return ""
    header = ("", "loader", "against", "ratio", "rounds", "verdict")
    cells = [header] + [
        (v.label, v.column, v.other, f"{v.ratio:.2f}x",
         "one sample" if v.low is None else f"{v.low:.2f}-{v.high:.2f}x", v.verdict)
        for v in verdicts
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in cells) for i in range(len(header) - 1)]
    lines = ["poolloader against the best other loader: the medians' ratio and each round's "
             "(> 1 is better)"]  # fmt: skip
    for line in cells:
        lines.append("  ".join(f"{x:<{w}}" for x, w in zip(line, widths, strict=False))
                     + "  " + line[-1])  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def peers_document(rows: list[PeerRow], results: list[PeerResult], errors: dict[str, str],
                   failed: dict[str, dict[str, str]],
                   context: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The peers' part of the JSON: the columns, versions and skipped peers
    (``context``), the table's rows, the workloads refused and why (``errors``), the
    peers that failed on a workload and their errors (``failed``), and what each
    loader's checked epoch delivered (its batches and their digest)."""
    return {
        **context,
        "rows": [{**row.__dict__, "relative_to_torch": row.relative} for row in rows],
        "verdicts": [v.__dict__ for v in peer_verdicts(rows, context["columns"])],
        "errors": errors,
        "failed": failed,
        "checksums": {
            result.workload: {column: found.__dict__ for column, found in result.checksums.items()}
            for result in results
        },
    }
