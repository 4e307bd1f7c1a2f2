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


def test_curriculum_set_epoch_reaches_every_worker_unlike_torch():
    out = _run("curriculum.py").splitlines()
    shapes = [line.split("; ")[1] for line in out]
    assert out[2].startswith("poolloader epoch 2: set_epoch asks for 1.0 s crops")
    assert shapes[:4] == [
        "batch shapes [(16, 4000)] from workers [0, 1]",
        "batch shapes [(16, 4000)] from workers [0, 1]",
        "batch shapes [(16, 8000)] from workers [0, 1]",
        "batch shapes [(16, 8000)] from workers [0, 1]",
    ]
    assert out[6].startswith("torch epoch 2: set_epoch asks for 1.0 s crops")
    assert shapes[6].startswith("batch shapes [(16, 4000)]"), "torch's workers never see it"


def test_streams_text_rows_continue_across_batches():
    out = _run("streams_text.py")
    batches = [block.splitlines()[1:] for block in out.strip().split("\n\n")]
    assert out.splitlines()[:3] == [
        "- batch1",
        "a_0;a_1;a_2;   <- new stream",
        "b_0;b_1;b_2;   <- new stream",
    ]
    seen: dict[str, list[int]] = {}
    previous = ["(padding)"] * 4
    for rows in batches:
        assert len(rows) == 4
        for row, (line, before) in enumerate(zip(rows, previous)):
            if line == "(padding)":
                continue
            steps = [item.split("_") for item in line.split("   ")[0].rstrip(";").split(";")]
            letter = steps[0][0]
            if not line.endswith("<- new stream"):  # continues the same row's stream
                assert before.startswith(letter), (row, line, before)
            seen.setdefault(letter, []).extend(int(t) for _, t in steps)
        previous = rows
    lengths = [9, 4, 7, 12, 3, 8, 6, 5, 10, 4]
    assert seen == {letter: list(range(n)) for letter, n in zip("abcdefghij", lengths)}


def test_streams_gru_loss_goes_down():
    lines = _run("streams_gru.py").splitlines()
    losses = [float(line.rsplit("loss ", 1)[1]) for line in lines if line.startswith("epoch")]
    assert len(losses) == 4
    assert losses[-1] < losses[0] / 3
