"""The examples run end to end and show what they promise, each with exactly the
packages the README's install line for it gives (``_fresh_env.py``)."""

from __future__ import annotations

import ast
import configparser
import re

import _fresh_env
import pytest
from _fresh_env import ROOT, Views, readme_block, readme_examples
from packaging.requirements import Requirement

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Views:
    return Views(tmp_path_factory.mktemp("fresh-venvs"))


def _run(views: Views, name: str, *args: str) -> str:
    line = readme_examples()[name]
    done = _fresh_env.run(views.of(line), str(EXAMPLES / name), *args)
    assert done.returncode == 0, f"{name} after `{line}` failed:\n{done.stderr}"
    return done.stdout


def _header_install_line(name: str) -> str:
    docstring = ast.get_docstring(ast.parse((EXAMPLES / name).read_text())) or ""
    (line,) = [line for line in docstring.splitlines() if line.startswith("Install: ")]
    return line.removeprefix("Install: ").split("   ")[0]


def _extra(name: str) -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    value = config["options.extras_require"][name]
    return {str(Requirement(line)) for line in _fresh_env._lines(value)}


def test_every_example_is_in_the_readme_with_the_install_line_its_header_gives():
    table = readme_examples()
    scripts = sorted(path.name for path in EXAMPLES.glob("*.py"))
    assert sorted(table) == scripts
    for name in scripts:
        assert _header_install_line(name) == table[name], name
        _fresh_env.extras_of(table[name])  # an install line of this repository


def test_the_test_extra_holds_what_the_readme_installs_so_ci_runs_it_all():
    first = readme_block("Install", "bash").splitlines()[1]
    assert first == 'pip install -e ".[bench]" && python -m poolloader.bench'
    named = {"bench"} | {
        e for line in readme_examples().values() for e in _fresh_env.extras_of(line)
    }
    assert named == {"bench", "examples"}
    for extra in named:
        assert _extra(extra) <= _extra("test"), extra


def test_the_readme_clones_into_a_folder_that_cannot_shadow_the_package():
    clone = readme_block("Install", "bash").splitlines()[0]
    folder = re.fullmatch(r"git clone <this repository> (\S+) && cd (\S+)", clone)
    assert folder is not None and folder.group(1) == folder.group(2)
    assert not folder.group(1).isidentifier()  # never importable, so never a namespace package


def test_an_example_fails_without_its_extra_so_the_check_is_real(views):
    done = _fresh_env.run(views.of("pip install -e ."), str(EXAMPLES / "speech_manifest.py"))
    assert done.returncode != 0
    assert "No module named 'soundfile'" in done.stderr


def test_the_quick_start_runs_after_the_first_install_line(views, tmp_path):
    script = tmp_path / "quick_start.py"
    script.write_text(readme_block("Quick start", "python"))
    done = _fresh_env.run(views.of('pip install -e ".[bench]"'), str(script))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == [f"{epoch} torch.Size([16, {n}])" for epoch, n in
                         [(0, 16000), (1, 16000), (2, 32000), (3, 32000)]]  # fmt: skip
    assert lines[4] == "LoaderStatistics"
    assert lines[5].split() == ["batches", "yielded", "4"]


def test_curriculum_set_epoch_reaches_every_worker_unlike_torch(views):
    out = _run(views, "curriculum.py").splitlines()
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


def test_streams_text_rows_continue_across_batches(views):
    out = _run(views, "streams_text.py")
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


def test_streams_gru_loss_goes_down(views):
    lines = _run(views, "streams_gru.py").splitlines()
    losses = [float(line.rsplit("loss ", 1)[1]) for line in lines if line.startswith("epoch")]
    assert len(losses) == 4
    assert losses[-1] < losses[0] / 3
