"""The examples run end to end and show what they promise."""

from __future__ import annotations

import os
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def _run(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_curriculum_doubles_the_crop_in_every_worker():
    out = _run("curriculum.py").splitlines()
    assert out[0] == "epoch 0: batch shapes [(16, 4000)] from workers [0, 1]"
    assert out[2] == "epoch 2: duration doubled to 1.0 s"
    assert out[3] == "epoch 2: batch shapes [(16, 8000)] from workers [0, 1]"
    assert out[4] == "epoch 3: batch shapes [(16, 8000)] from workers [0, 1]"
