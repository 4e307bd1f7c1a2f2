"""The declared requirements are the checked ones: below torch 2.6 the import says so."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from poolloader._requirements import OLDEST_TORCH, torch_too_old

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("version", "too_old"),
    [("2.5.1", True), ("2.5.1+cpu", True), ("1.13.1", True), ("2.6.0", False),
     ("2.6.0a0+git1234abc", False), ("2.13.0+cpu", False), ("3.0.0", False), ("local", False)],
)  # fmt: skip
def test_torch_versions_below_the_floor_are_too_old(version, too_old):
    assert torch_too_old(version) is too_old


def test_setup_cfg_declares_the_floor_the_import_checks():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].split()
    (torch,) = [Requirement(line) for line in lines if line.startswith("torch")]
    floor = ".".join(map(str, OLDEST_TORCH))
    assert torch.specifier.contains(floor) and not torch.specifier.contains("2.5.1")


def test_importing_poolloader_with_an_older_torch_says_what_to_do():
    script = "import torch; torch.__version__ = '2.5.1'; import poolloader"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: poolloader needs torch>=2.6 (DataLoader's in_order= ")
    assert "but found torch 2.5.1 in " in last
    assert last.endswith("upgrade it with: pip install 'torch>=2.6,<3'")
