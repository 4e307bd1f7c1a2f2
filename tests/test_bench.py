"""``python -m poolloader.bench``: runs clean, shows its progress, names its sections as
the README does, and writes its results folder."""

from __future__ import annotations

import configparser
import faulthandler
import io
import json
import mmap
import multiprocessing
import os
import re
import subprocess
import sys

import _fresh_env
import numpy as np
import pytest
import torch
from _fresh_env import ROOT, Views

from poolloader.bench import _cli, _manifest, _peers, _report, _runner
from poolloader.bench._progress import ProgressDisplay, Section
from poolloader.bench._report import Row
from poolloader.bench._workloads import Skewed, Tiny, Workload, manifest_records, workloads

SECTIONS = [plan.section.name for plan in _cli.plans(quick=True, repeats=1, num_workers=1)]
#: Seconds the manifest section may take with --quick (it takes one or two minutes).
SECTION_DEADLINE = 600
PROGRESS_LINE = r"\[\s*\d+%, (estimating time left|about \d+:\d\d left)\] "


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Views:
    return Views(tmp_path_factory.mktemp("fresh-venvs"))


def test_the_command_runs_clean_after_the_plain_install_and_writes_its_results(views, tmp_path):
    """With ``pip install -e .`` only (no tqdm, no matplotlib) and every RuntimeWarning
    an error, in this process and in the workers it starts."""
    out = tmp_path / "results"
    done = _fresh_env.run(
        views.of("pip install -e ."), "-W", "error::RuntimeWarning", "-m", "poolloader.bench",
        "--quick", "--only", "tiny_batches", "--num-workers", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["workload", "measure", "stock", "poolloader", "ratio", "target"]
    (row,) = [line for line in lines if line.split()[:2] == ["tiny_batches", "batches/s"]]
    assert row.split()[-1] in ("ok", "MISSED")
    assert re.search(PROGRESS_LINE + r"tiny_batches: stock run 1/1\n", done.stderr)
    assert re.search(r"  done in \d+:\d\d\n$", done.stderr)
    assert f"results written: {out / 'bench.txt'}, {out / 'bench.json'}" in done.stdout
    assert "no plot: matplotlib is not installed; pip install 'poolloader[bench]'" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.txt"]
    assert (out / "bench.txt").read_text().splitlines()[0] == lines[0]
    document = json.loads((out / "bench.json").read_text())
    assert document["machine"]["torch"].startswith("2.")
    assert document["run"]["quick"] and list(document["run"]["section_seconds"]) == ["tiny_batches"]
    figures = document["raw"]["tiny_batches"]
    assert figures["stock"]["batches"] == figures["poolloader"]["batches"] == 375
    (tiny,) = [r for r in document["rows"] if r["workload"] == "tiny_batches"]
    assert tiny["measure"] == "batches/s"
    assert tiny["ratio"] == pytest.approx(tiny["ours"] / tiny["stock"])


def test_plot_without_matplotlib_fails_before_the_run(views, tmp_path):
    done = _fresh_env.run(
        views.of("pip install -e ."), "-m", "poolloader.bench", "--quick",
        "--plot", str(tmp_path / "ratios.png"), "--out", str(tmp_path / "results"),
    )  # fmt: skip
    assert done.returncode == 2
    assert "--plot needs matplotlib, which is not installed: pip install 'poolloader[bench]'" in (
        done.stderr
    )
    assert not re.search(PROGRESS_LINE, done.stderr)  # nothing ran
    assert list(tmp_path.iterdir()) == []


def test_python_m_and_the_console_script_run_clean_under_W_error():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    (entry,) = config["options.entry_points"]["console_scripts"].split("\n")[1:]
    name, target = (part.strip() for part in entry.split("="))
    module, function = target.split(":")
    assert name == "poolloader-bench" and not module.endswith("__main__")
    script = f"import sys; from {module} import {function}; sys.exit({function}(['--list']))"
    for command in (["-m", "poolloader.bench", "--list"], ["-c", script]):
        done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", *command],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert [line.split()[0] for line in done.stdout.splitlines()] == SECTIONS


def test_one_set_of_names_in_the_command_its_json_and_the_readmes():
    readme = (ROOT / "README.md").read_text().split("\n## Benchmarks\n")[1].split("\n## ")[0]
    in_readme = set(re.findall(r"^\| `(\w+)`", readme, re.MULTILINE))
    assert in_readme and in_readme <= set(SECTIONS)
    recorded = json.loads((ROOT / "benchmarks" / "bench.json").read_text())
    assert {row["workload"] for row in recorded["rows"]} <= set(SECTIONS)
    assert set(recorded["raw"]) <= set(SECTIONS)
    assert "](benchmarks/bench.png)" in readme and (ROOT / "benchmarks" / "bench.png").exists()
    method = (ROOT / "benchmarks" / "README.md").read_text()
    assert set(re.findall(r"^- `(\w+)`", method, re.MULTILINE)) <= set(SECTIONS)


def test_the_results_folder_holds_table_json_and_plot(tmp_path):
    rows = [Row("tiny_batches", "batches/s", "/s", 100.0, 150.0, True, ">= 1.0x", True),
            Row("startup_spawn", "first batch", "s", 1.5, 1.0, False)]  # fmt: skip
    outputs = _cli._Outputs(tmp_path, tmp_path / "bench.json", tmp_path / "bench.png")
    outputs.write({"tiny_batches": _cli.Found(rows)}, {"quick": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png", "bench.txt"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["ratio"] == 1.5


def test_unknown_section_names_are_refused_before_the_run(capsys):
    with pytest.raises(SystemExit) as stop:
        _cli.main(["--only", "tiny_items"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "--only names sections of the run (tensor_19mb, " in error
    assert "but got ['tiny_items']" in error


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _walk(display: ProgressDisplay) -> list[float]:
    seen = []
    display.begin("a")
    for label in ("a: run 1/2", "a: run 2/2", "a: one too many"):
        display.step(label)
        seen.append(display.done)
    display.begin("b")
    display.step("b: only")
    seen.append(display.done)
    display.close()
    seen.append(display.done)
    return seen


SECTIONS_AB = [Section("a", 2, 1.0), Section("b", 1, 3.0)]


def test_progress_counts_estimated_seconds_and_a_section_stays_in_its_share():
    plain = io.StringIO()
    assert _walk(ProgressDisplay(SECTIONS_AB, stream=plain)) == [0.0, 0.5, 1.0, 1.0, 4.0]
    lines = plain.getvalue().splitlines()
    assert lines[0] == "  [  0%, estimating time left] a: run 1/2"
    assert re.fullmatch(r"  \[ 12%, about \d+:\d\d left\] a: run 2/2", lines[1])
    assert re.fullmatch(r"  \[ 25%, about \d+:\d\d left\] b: only", lines[3])
    assert re.fullmatch(r"  done in \d+:\d\d", lines[-1])


def test_progress_on_a_terminal_is_a_tqdm_bar_with_the_label_and_time_left():
    pytest.importorskip("tqdm")
    terminal = _Terminal()
    _walk(ProgressDisplay(SECTIONS_AB, stream=terminal))
    frames = terminal.getvalue().split("\r")
    assert any(re.match(r" 25%\|#+ +\| \d\d:\d\d<\d\d:\d\d  b: only", f) for f in frames)
    assert frames[-1].startswith("100%|") and frames[-1].rstrip().endswith("done")


def test_io_stalls_are_seeded_and_their_ideal_is_the_work_over_the_workers():
    first, again = Skewed(300), Skewed(300)
    assert list(first.costs) == list(again.costs)
    assert (first.costs > 0.1).sum() == 15  # one stall in every 20 batches
    assert all((first.costs[k : k + 20] > 0.1).sum() == 1 for k in range(0, 300, 20))
    found = workloads(quick=False, num_workers=2)
    assert found["io_stalls"].ideal_seconds == pytest.approx(sum(first.costs) / 2)
    with pytest.raises(ValueError, match="shape should be 'stalls' or 'lognormal'"):
        Skewed(3, "bimodal")


# ---------------------------------------------------------------- --peers

EVERY_COLUMN = [loader.column for loader in _peers.LOADERS]


def _peers_run(python: list[str], out, *args: str, env=None) -> subprocess.CompletedProcess:
    command = [*python, "-m", "poolloader.bench", "--peers", "--quick", "--only", "tiny_batches",
               "--out", str(out), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_peers_quick_runs_every_loader_and_each_delivers_torchs_batches(tmp_path):
    pytest.importorskip("torchdata")
    # (SPDL 0.8 installs on Python 3.10 and fails to import there: typing.Self)
    pytest.importorskip("spdl.pipeline", exc_type=ImportError)
    out = tmp_path / "results"
    done = _peers_run([sys.executable], out)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "skipped" not in done.stdout
    lines = done.stdout.splitlines()
    assert lines[0].split() == EVERY_COLUMN
    figures, relative, *verdicts = [line for line in lines
                                    if line.startswith("tiny batches, batches/s ")]  # fmt: skip
    for row in (figures, relative):  # the label's three words, then a figure for each loader
        assert len(row.split()) == 3 + len(EVERY_COLUMN)
    # Each poolloader column against the fastest other loader; one round can only
    # say ahead or behind.
    best = max(EVERY_COLUMN[:-2], key=lambda c: float(figures.split()[3 + EVERY_COLUMN.index(c)]))
    assert [v.split()[3:5] for v in verdicts] == [["poolloader", best], ["poolloader(fork)", best]]
    assert all(v.split()[-1] in ("ahead", "behind") for v in verdicts)
    cpu, cpu_relative = [line for line in lines if line.startswith("main CPU/batch, tiny ")]
    assert cpu.count(" µs") == len(EVERY_COLUMN) and cpu_relative.split()[4] == "1.00x"
    assert relative.split()[3] == "1.00x"  # torch against itself
    document = json.loads((out / "bench.json").read_text())
    peers = document["peers"]
    assert peers["columns"] == EVERY_COLUMN and peers["skipped"] == []
    assert {"torchdata", "spdl", "spdl_core", "torch", "poolloader"} <= set(peers["versions"])
    checksums = peers["checksums"]["tiny_batches"]
    assert list(checksums) == EVERY_COLUMN
    assert all(found == checksums["torch"] for found in checksums.values())
    assert checksums["torch"]["batches"] == 375
    assert all(document["raw"]["tiny_batches"][c]["batches"] == 375 for c in EVERY_COLUMN)


def test_a_peer_not_installed_is_skipped_with_one_line(views, tmp_path):
    """After ``pip install -e .`` neither torchdata nor SPDL is there: one line each,
    and the table holds the loaders that are."""
    view = views.of("pip install -e .")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(ROOT)])}
    done = _peers_run([sys.executable, "-S"], tmp_path / "results", "--num-workers", "1", env=env)
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skipped ")]
    assert skipped == [
        "skipped StatefulDataLoader, nodes(process), nodes(thread): torchdata is not installed "
        "(pip install 'poolloader[bench]')",
        "skipped SPDL(process), SPDL(thread), SPDL(subprocess+shm): spdl is not installed "
        "(pip install 'poolloader[bench]')",
    ]
    header = done.stdout.splitlines()[len(skipped)]
    assert header.split() == ["torch", "torch(spawn)", "poolloader", "poolloader(fork)"]


class _Breaks:
    """A peer that delivers torch's batches for ``good`` epochs, then fails as SPDL
    0.8's subprocess mode does on Python 3.13.0."""

    def __init__(self, workload: Workload, good: int) -> None:
        self._reference = torch.utils.data.DataLoader(workload.dataset, **workload.loader_kwargs)
        self._good = good

    def __iter__(self):
        if not self._good:
            raise RuntimeError(
                "The worker subprocess quit. Failed to fetch the next item: "
                "'_pickle.Pickler' object attribute 'persistent_id' is read-only"
            )
        self._good -= 1
        yield from self._reference


def _cannot_build(workload: Workload, num_workers: int) -> None:
    raise ImportError("cannot import name 'Loader' from 'torchdata.nodes'")


def test_a_peer_that_fails_is_left_out_with_its_error_and_the_others_are_measured(
    monkeypatch, tmp_path, capsys
):
    """At its start, at its checked epoch or at a timed one: the workload goes on
    without it, the table says which and why; torch's or poolloader's failure ends it."""
    breaking = {"StatefulDataLoader": _cannot_build,
                "nodes(thread)": lambda w, n: _Breaks(w, good=2),  # warm-up and run 1
                "SPDL(thread)": lambda w, n: _Breaks(w, good=0)}  # fmt: skip
    for column, build in breaking.items():
        monkeypatch.setitem(_peers._BY_COLUMN, column, _peers.Loader(column, "any", build))
    workload = Workload("tiny_batches", "", Tiny(48), {"batch_size": 4})
    columns = ["torch", *breaking, "poolloader"]
    steps: list[str] = []
    result = _runner.measure_peers(workload, columns, 1, 2, steps.append)
    assert len(steps) == _runner.peers_steps(workload, columns, 2)
    assert list(result.measurements) == list(result.rounds) == ["torch", "poolloader"]
    assert list(result.checksums) == ["torch", "poolloader"]
    assert all(len(rounds) == 2 for rounds in result.rounds.values())
    assert result.measurements["poolloader"].batches == 12
    read_only = ("RuntimeError: The worker subprocess quit. Failed to fetch the next item: "
                 "'_pickle.Pickler' object attribute 'persistent_id' is read-only")  # fmt: skip
    assert result.failed == {
        "StatefulDataLoader": "ImportError: cannot import name 'Loader' from 'torchdata.nodes'",
        "nodes(thread)": read_only,
        "SPDL(thread)": read_only,
    }
    outputs = _cli._Outputs(tmp_path, tmp_path / "bench.json", None)
    context = {"columns": columns, "versions": {"torch": "2"}, "skipped": []}
    outputs.write({"tiny_batches": _cli.Found(peers=result)}, {"num_workers": 1}, context)
    text = capsys.readouterr().out
    assert f"left out of tiny batches: SPDL(thread), which failed: {read_only}\n" in text
    figures = next(line for line in text.splitlines() if line.startswith("tiny batches, b"))
    assert figures.split()[3:][1:4] == ["-", "-", "-"]  # the three peers' cells
    peers = json.loads((tmp_path / "bench.json").read_text())["peers"]
    assert peers["failed"] == {"tiny_batches": result.failed}
    assert [(v["column"], v["other"]) for v in peers["verdicts"]] == [("poolloader", "torch")]
    # The reference and the product are not left out: their failure is the run's.
    monkeypatch.setitem(_peers._BY_COLUMN, "poolloader",
                        _peers.Loader("poolloader", None, lambda w, n: _Breaks(w, good=0)))  # fmt: skip
    with pytest.raises(RuntimeError, match="persistent_id"):
        _runner.measure_peers(workload, ["torch", "poolloader"], 1, 1, steps.append)


def test_a_loader_that_delivers_other_batches_is_an_error_not_a_row():
    same = _runner.checksum_epoch([torch.arange(4), np.arange(3), 7])
    assert same == _runner.checksum_epoch([torch.arange(4), np.arange(3), 7])
    others = [
        [torch.arange(4), np.arange(3)],  # a batch short
        [torch.arange(4), torch.arange(3), 7],  # a tensor where torch gives an array
        [torch.arange(4).float(), np.arange(3), 7],  # another dtype
        [torch.arange(4).reshape(2, 2), np.arange(3), 7],  # another shape
        [np.arange(3), torch.arange(4), 7],  # another order
    ]
    for batches in others:
        found = _runner.checksum_epoch(batches)
        assert found != same
        with pytest.raises(_runner.DifferentBatches, match=r"^SPDL\(thread\) delivered other "
                           r"batches than torch's DataLoader on tiny_batches: "):  # fmt: skip
            _runner.check_same_batches("tiny_batches", {"torch": same, "SPDL(thread)": found})


def _rounds_row(label: str, rounds: dict[str, list[float]]) -> _report.PeerRow:
    medians = {c: sorted(found)[len(found) // 2] for c, found in rounds.items()}
    return _report.PeerRow("tiny_batches", label, "batches/s", medians, rounds)


def test_verdicts_judge_each_round_of_the_alternating_runs():
    """Ahead or behind only when every round says so; rounds that disagree are level
    within the noise, whatever the medians say. Memory: against torch's, bound 1.1x."""
    columns = ["torch", "nodes(thread)", "SPDL(thread)", "poolloader"]
    rows = [
        _rounds_row("ahead", {"torch": [10, 11, 9], "nodes(thread)": [50, 40, 60],
                              "SPDL(thread)": [30, 30, 30], "poolloader": [55, 41, 61]}),
        _rounds_row("behind", {"torch": [10, 10, 10], "nodes(thread)": [50, 40, 60],
                               "SPDL(thread)": [5, 5, 5], "poolloader": [49, 39, 59]}),
        # a better median, but round 2 lost: level
        _rounds_row("level", {"torch": [10, 10, 10], "nodes(thread)": [50, 40, 60],
                              "SPDL(thread)": [5, 5, 5], "poolloader": [70, 35, 80]}),
        _report.PeerRow("tiny_batches", "memory within", "peak PSS",
                        {"torch": 100.0, "nodes(thread)": 90.0, "SPDL(thread)": 80.0,
                         "poolloader": 110.0}),
        _report.PeerRow("tiny_batches", "memory over", "peak held",
                        {"torch": 100.0, "nodes(thread)": 90.0, "SPDL(thread)": 80.0,
                         "poolloader": 111.0}),
        _report.PeerRow("tiny_batches", "CPU", "main CPU", {c: 1e-4 for c in columns}),
    ]  # fmt: skip
    found = {v.label: v for v in _report.peer_verdicts(rows, columns)}
    assert list(found) == ["ahead", "behind", "level", "memory within", "memory over"]
    assert {v.column for v in found.values()} == {"poolloader"}
    assert [found[k].other for k in ("ahead", "behind", "level")] == ["nodes(thread)"] * 3
    assert (found["ahead"].low, found["ahead"].high) == (61 / 60, 55 / 50)
    verdicts = [found[k].verdict for k in ("ahead", "behind", "level")]
    assert verdicts == ["ahead", "behind", "level (within noise): faster in 2 of 3 rounds"]
    assert found["level"].ratio == 70 / 50 and found["level"].low == 35 / 40
    assert found["memory within"].other == "torch" and found["memory within"].low is None
    assert found["memory within"].verdict == "within 1.1x of torch's"
    assert found["memory over"].verdict == "over 1.1x torch's (1.11x)"
    text = _report.verdicts_table(list(found.values()))
    level = "level          poolloader  nodes(thread)  1.40x  0.88-1.40x  level (within noise): "
    assert level in text
    assert "memory within  poolloader  torch          0.91x  one sample  within 1.1x" in text


def test_memory_is_judged_against_torchs_and_against_torchs_with_the_same_start_method():
    """poolloader's spawn column pays one more interpreter than a fork loader: it is
    judged against the stock loader and against torch's spawn loader, each stated;
    the fork column against the torch column that forks."""
    columns = ["torch", "torch(spawn)", "nodes(thread)", "poolloader", "poolloader(fork)"]
    values = {"torch": 100.0, "torch(spawn)": 180.0, "nodes(thread)": 90.0,
              "poolloader": 150.0, "poolloader(fork)": 105.0}  # fmt: skip
    row = _report.PeerRow("tensor_19mb", "held", "peak held", values)
    found = [(v.column, v.other, v.verdict) for v in _report.peer_verdicts([row], columns)]
    assert found == [("poolloader", "torch", "over 1.1x torch's (1.50x)"),
                     ("poolloader", "torch(spawn)", "within 1.1x of torch(spawn)'s"),
                     ("poolloader(fork)", "torch", "within 1.1x of torch's")]  # fmt: skip
    assert _peers.torch_alike("poolloader", columns) == "torch(spawn)"
    # the stock column forks where Python's default start method does (before 3.14)
    default_forks = multiprocessing.get_all_start_methods()[0] == "fork"
    assert _peers.torch_alike("poolloader(fork)", columns) == ("torch" if default_forks else None)
    # Without the spawn column, the stock loader alone
    del values["torch(spawn)"]
    columns.remove("torch(spawn)")
    found = [(v.column, v.other) for v in _report.peer_verdicts([row], columns)]
    assert found == [("poolloader", "torch"), ("poolloader(fork)", "torch")]


def test_one_round_says_ahead_or_behind():
    row = _rounds_row("one", {"torch": [10.0], "poolloader": [12.0]})
    (verdict,) = _report.peer_verdicts([row], ["torch", "poolloader"])
    assert (verdict.other, verdict.low, verdict.high) == ("torch", 1.2, 1.2)
    assert verdict.verdict == "ahead"


def test_peers_lists_its_workloads(capsys):
    assert _cli.main(["--peers", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(_cli.PEER_WORKLOADS)
    assert set(listed) <= set(SECTIONS)


def test_a_refused_workload_is_named_with_why_and_the_others_keep_their_rows(tmp_path, capsys):
    measured = {c: _runner.Measurement(1.0, 100, 2**30) for c in ("torch", "poolloader")}
    tiny = _runner.PeerResult("tiny_batches", 2, False, measured, {})
    found = {
        "tiny_batches": _cli.Found(peers=tiny),
        "numpy_19mb": _cli.Found(error="poolloader delivered other batches than torch's ..."),
    }
    outputs = _cli._Outputs(tmp_path, tmp_path / "bench.json", None)
    context = {"columns": ["torch", "poolloader"], "versions": {"torch": "2"}, "skipped": []}
    outputs.write(found, {"num_workers": 2}, context)
    text = capsys.readouterr().out
    assert "tiny batches, batches/s " in text and "19 MB NumPy" not in text
    assert "ERROR: no figures for these workloads, whose batches differ:\n  numpy_19mb: " in text
    peers = json.loads((tmp_path / "bench.json").read_text())["peers"]
    assert list(peers["errors"]) == ["numpy_19mb"]
    assert [row["measure"] for row in peers["rows"]] == ["batches/s", "main CPU"]
    assert {row["workload"] for row in peers["rows"]} == {"tiny_batches"}
    assert [(v["column"], v["other"]) for v in peers["verdicts"]] == [("poolloader", "torch")]


# ---------------------------------------------------------------- manifest


def test_the_manifest_section_measures_every_configuration(tmp_path):
    """``--quick --only manifest`` with a few hundred records: every row, figures positive,
    and the memory run's process tree told apart (4 workers, poolloader's template).

    Seven fresh interpreters, torch's spawn with 8 workers among them: a minute or two on
    a busy 2-core machine, past the suite's faulthandler timeout; the subprocess's own
    timeout bounds a hang here, so the dump is put off to match it."""
    faulthandler.dump_traceback_later(SECTION_DEADLINE + 60, file=sys.__stderr__)
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "poolloader.bench", "--quick",
         "--only", "manifest", "--manifest-records", "500", "--out", str(out)],
        capture_output=True, text=True, timeout=SECTION_DEADLINE, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "bench.json").read_text())
    ours = [c for c in _manifest.CONFIGS.values() if c.kind == "poolloader"]
    measures = [r["measure"] for r in document["rows"]]
    assert measures == [
        f"{what}, {c.method}+{c.container}"
        for what in ("PSS after epoch", "first batch x8", "next epoch x8")
        for c in ours
    ]
    for row in document["rows"]:
        assert row["workload"] == "manifest" and row["stock"] > 0 and row["ours"] > 0, row
        measure = row["measure"]
        no_goal = (measure.startswith("PSS") and measure.endswith("+list")) or (
            measure.startswith("first batch") and "fork+" in measure
        )
        assert row["met"] in ((None,) if no_goal else (True, False)), row
    figures = document["raw"]["manifest"]
    assert figures["records"] == 500 and set(figures["configs"]) == set(_manifest.CONFIGS)
    for key, found in figures["configs"].items():
        roles = [p["role"] for p in found["processes"]]
        assert roles.count("main") == 1 and roles.count("worker") == 4, (key, roles)
        assert ("template" in roles) == key.startswith("poolloader"), (key, roles)
        assert found["pss"] == sum(p["pss"] for p in found["processes"]) > 0
        assert found["first_batch"] == {"8": pytest.approx(found["first_batch"]["8"])}
        assert found["first_batch"]["8"] > 0 and found["next_epoch"] > 0
    text = (out / "bench.txt").read_text()
    assert "manifest: 500 records" in text and "poolloader, forkserver, SharedList" in text


def test_the_forkserver_first_batch_is_the_median_of_fresh_runs():
    """Its goal is seconds, not a ratio to a loader measured beside it: the full run
    takes it three times (two probes more for each forkserver configuration), and the
    table names every sample; ``--quick`` takes one."""
    assert _manifest.samples_for(quick=True) == 1 and _manifest.samples_for(quick=False) == 3
    series = _manifest.SERIES
    assert _manifest.steps(series, 3) == _manifest.steps(series) + 2 * 2
    config = {"label": "poolloader, forkserver, list", "pss": 2**29, "main_pss": 2**28,
              "first_batch": {8: 2.1}, "next_epoch": 0.2, "pickled_bytes": 10**8}  # fmt: skip
    one = {**config, "label": "poolloader, spawn, list", "first_batch_samples": [1.5]}
    three = {**config, "first_batch_samples": [2.4, 1.9, 2.1]}
    lines = _report.manifest_lines(
        {"records": 10, "batch_size": 4, "configs": {"a": one, "b": three}}
    )
    notes = [line for line in lines if "median" in line]
    assert notes == [
        "  poolloader, forkserver, list: first batch with 8 workers is the median of 3 fresh "
        "runs: 2.40, 1.90, 2.10 s"
    ]


def test_manifest_records_round_trip_through_their_file(tmp_path):
    path = tmp_path / "records.pickle"
    _manifest.write_records(path, _manifest.CHUNK + 7)
    assert list(_manifest.read_records(path)) == list(manifest_records(_manifest.CHUNK + 7))
    first = next(manifest_records(1))
    assert set(first) == {"id", "path", "dur", "text"} and 1.0 <= first["dur"] <= 20.0


def test_the_statistics_table_has_the_main_process_cpu_per_batch_of_both_loaders():
    ours = _runner.Measurement(2.0, 100, busy=0.5, wait=0.001, slab_reuse=1.0, main_cpu=120e-6)
    stock = _runner.Measurement(4.0, 100, main_cpu=1500e-6)
    lines = _report.statistics_table({"tiny_batches": {"poolloader": ours, "stock": stock}})
    header, _, row = lines.splitlines()
    assert header.split()[-3:] == ["main", "CPU/batch", "torch"]
    assert row.split() == ["tiny_batches", "50%", "1.00", "ms", "100%", "120", "µs", "1500", "µs"]


def test_held_memory_counts_shared_memory_no_process_maps():
    """Shared memory kept only by a descriptor (as torch's queued batches are) is
    in no process's PSS; held memory counts it (NOTE [ Held memory ])."""
    size = 64 * 2**20
    baseline = _runner.shared_memory_in_use()
    fd = os.memfd_create("held-memory-test")
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mapped:
            mapped.write(b"\1" * size)  # its pages exist now; unmapped below
        with _runner.PeakMemory(shared_baseline=baseline) as memory:
            pass
        assert memory.peak_held - memory.peak > 0.8 * size
    finally:
        os.close(fd)
    with _runner.PeakMemory(shared_baseline=baseline) as memory:
        pass
    assert abs(memory.peak_held - memory.peak) < 0.2 * size


def test_a_peers_memory_is_measured_in_a_fresh_interpreter():
    """Each loader's peak PSS comes from a process that ran no other loader: more
    than an interpreter with torch, less than a leftover heap of other loaders."""
    workload = workloads(quick=True, num_workers=1)["tensor_19mb"]
    found = {column: _runner._peak_memory_alone(column, workload, 1)
             for column in ("torch", "poolloader")}  # fmt: skip
    for column, (peak, held) in found.items():
        assert 150 * 2**20 < peak < 2**30, (column, peak)
        # Held memory counts shared memory whether mapped or not: at least what PSS
        # counts of it (less a margin for the machine's other programs).
        assert 0.9 * peak < held < 2**30, (column, peak, held)
    with pytest.raises(RuntimeError, match="measuring nobody's memory on tensor_19mb failed"):
        _runner._peak_memory_alone("nobody", workload, 1)
