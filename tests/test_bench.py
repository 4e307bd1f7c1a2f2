"""``python -m poolloader.bench``: the command runs, prints its table and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from poolloader.bench._workloads import Skewed, workloads


def test_the_command_prints_ratios_and_writes_the_raw_figures(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "poolloader.bench", "--quick", "--only", "tiny_items",
         "--num-workers", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["workload", "stock", "poolloader", "ratio", "target"]
    (row,) = [line for line in lines if line.startswith("tiny_items (batches/s)")]
    assert row.split()[-1] in ("ok", "MISSED")
    assert "tiny_items (batches/s)" in done.stdout and "ratio > 1 means" in done.stdout
    assert "... tiny_items: stock run 1/1" in done.stderr  # progress while it runs
    document = json.loads(out.read_text())
    assert document["machine"]["torch"].startswith("2.")
    figures = document["raw"]["tiny_items"]
    assert figures["stock"]["batches"] == figures["poolloader"]["batches"] == 375
    (tiny,) = [r for r in document["rows"] if r["name"] == "tiny_items (batches/s)"]
    assert tiny["ratio"] == pytest.approx(tiny["ours"] / tiny["stock"])


def test_skewed_workloads_are_seeded_and_their_ideal_is_the_work_over_the_workers():
    first, again = Skewed(300), Skewed(300)
    assert list(first.costs) == list(again.costs)
    assert (first.costs > 0.1).sum() == 15  # one stall in every 20 batches
    assert all((first.costs[k : k + 20] > 0.1).sum() == 1 for k in range(0, 300, 20))
    found = workloads(quick=False, num_workers=2)
    assert found["skewed"].ideal_seconds == pytest.approx(sum(first.costs) / 2)
    with pytest.raises(ValueError, match="shape should be 'stalls' or 'lognormal'"):
        Skewed(3, "bimodal")
