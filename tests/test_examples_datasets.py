"""The dataset examples run end to end (real WAV files, manifests, workers), each
with exactly the packages the README's install line for it gives (``_fresh_env.py``)."""

from __future__ import annotations

import re

import _fresh_env
import pytest
from _fresh_env import ROOT, Views, readme_examples


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Views:
    return Views(tmp_path_factory.mktemp("fresh-venvs"))


def _run(views: Views, name: str) -> list[str]:
    line = readme_examples()[name]
    done = _fresh_env.run(views.of(line), str(ROOT / "examples" / name))
    assert done.returncode == 0, f"{name} after `{line}` failed:\n{done.stderr}"
    return done.stdout.splitlines()


def test_speech_manifest_example_doubles_the_crop(views):
    out = _run(views, "speech_manifest.py")
    assert out[0] == "40 utterances, 94.1 s of audio"
    crops = [re.search(r"crop lengths \[(.*)\] samples", line) for line in out]
    lengths = [m.group(1) for m in crops if m]
    assert lengths == ["4000", "4000", "8000", "8000"]
    epochs = [line for line in out if line.startswith("epoch") and "batches" in line]
    assert len(epochs) == 4 and all("batches, 40 utterances" in line for line in epochs)
    assert out.index("epoch 2: crop duration doubled to 1.0 s") == 3


def test_lhotse_example_covers_every_cut_per_epoch(views):
    out = _run(views, "lhotse_cuts.py")
    for epoch in (0, 1):
        assert out.count(f"epoch {epoch}: 30 cuts in all, 30 distinct") == 1
    batches = [re.search(r"\(([\d.]+) s of audio\)", line) for line in out]
    seconds = [float(match.group(1)) for match in batches if match]
    assert len(seconds) >= 4 and all(0 < s <= 15.0 for s in seconds)
