"""The dataset examples run end to end (real WAV files, manifests, workers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def _run(name: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_speech_manifest_example_doubles_the_crop():
    out = _run("speech_manifest.py")
    assert out[0] == "40 utterances, 94.1 s of audio"
    crops = [re.search(r"crop lengths \[(.*)\] samples", line) for line in out]
    lengths = [m.group(1) for m in crops if m]
    assert lengths == ["4000", "4000", "8000", "8000"]
    assert all(
        "40 utterances" in line for line in out if line.startswith("epoch") and "batches" in line
    )


def test_lhotse_example_covers_every_cut_per_epoch():
    pytest.importorskip("lhotse")
    out = _run("lhotse_cuts.py")
    assert out.count("epoch 0: 30 cuts in all") == 1 and out.count("epoch 1: 30 cuts in all") == 1
    for line in out:
        match = re.search(r"\(([\d.]+) s of audio\)", line)
        if match:
            assert float(match.group(1)) <= 15.0
