"""Run a script as if in a fresh venv holding exactly what an install line gives.

``pip install -e ".[examples]"`` in a fresh venv gives poolloader, the
requirements of poolloader and of the ``examples`` extra, their requirements in
turn, and what every venv has (pip, setuptools). Everything else installed on
the test machine must be invisible, or a script that imports an undeclared
package (``soundfile`` without the extra, ``urllib3`` that lhotse imports
without requiring it) passes here and fails for a user.

So: work out that closure from setup.cfg and the installed packages' metadata,
link exactly those distributions (their top-level files and their metadata)
into a folder, and run ``python -S`` (no site-packages) with that folder and the
repository on ``PYTHONPATH``. Spawned workers inherit both (``-S`` is among the
flags multiprocessing passes on), so they see the same packages.
"""

from __future__ import annotations

import configparser
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from poolloader.bench._peers import PEER_PACKAGES

ROOT = Path(__file__).resolve().parent.parent
#: What ``python -m venv`` puts in every venv (Python 3.11).
IN_EVERY_VENV = ("pip", "setuptools")
#: Requirements this machine may lack: the loaders ``python -m poolloader.bench
#: --peers`` compares, which it leaves out with one line each when they are not
#: installed. A view leaves them out too, as an install without them would be.
OPTIONAL = frozenset(canonicalize_name(name) for name in PEER_PACKAGES)


def setup_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """poolloader's own requirements plus those of ``extras``, as setup.cfg says."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = _lines(config["options"]["install_requires"])
    for extra in extras:
        lines += _lines(config["options.extras_require"][extra])
    return [Requirement(line) for line in lines]


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and "#" not in line]


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution a fresh install of ``requirements`` brings (canonical names)."""
    found: set[str] = set()
    pending = [*requirements, *map(Requirement, IN_EVERY_VENV)]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found or (name in OPTIONAL and not _installed(name)):
            continue
        found.add(name)
        pending += _requires(metadata.distribution(name), requirement.extras)
    return found


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _requires(dist: metadata.Distribution, extras: set[str]) -> list[Requirement]:
    wanted = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(
            marker.evaluate({**default_environment(), "extra": extra}) for extra in extras or {""}
        ):
            wanted.append(requirement)
    return wanted


def link_view(names: set[str], folder: Path) -> Path:
    """A folder holding links to exactly these distributions' files and metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        dist = metadata.distribution(name)
        site = Path(str(dist.locate_file(""))).resolve()
        for top in _top_level(dist):
            target, link = site / top, folder / top
            if target.exists() and not link.exists():
                link.symlink_to(target)
    return folder


def _top_level(dist: metadata.Distribution) -> set[str]:
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    return {top for top in tops if top not in ("..", "__pycache__") and not top.endswith(".pth")}


def run(view: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -S args...`` (a script and its arguments, or ``-m module``, ...)
    seeing only ``view`` and the repository."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(view), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-S", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


def extras_of(install_line: str) -> tuple[str, ...]:
    """``pip install -e ".[a,b]"`` -> ("a", "b"); ``pip install -e .`` -> ()."""
    match = re.fullmatch(r'pip install -e "?\.(?:\[([\w,]+)\])?"?', install_line.strip())
    if match is None:
        raise ValueError(f"not an install line of this repository: {install_line!r}")
    return tuple(match.group(1).split(",")) if match.group(1) else ()


def readme_examples() -> dict[str, str]:
    """The README's examples table: script name -> the install line it names."""
    rows = re.findall(r"^\| `(\w+\.py)` \| `(pip install[^`]*)` \|", _readme(), re.MULTILINE)
    return dict(rows)


def readme_block(heading: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced ``language`` block under the README's ``## heading``."""
    section = _readme().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)[index]


def _readme() -> str:
    return (ROOT / "README.md").read_text()


class Views:
    """One linked folder per install line, made once (see :func:`link_view`)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._made: dict[tuple[str, ...], Path] = {}

    def of(self, install_line: str) -> Path:
        extras = extras_of(install_line)
        if extras not in self._made:
            names = closure(setup_requirements(extras))
            self._made[extras] = link_view(names, self._folder / ("-".join(extras) or "base"))
        return self._made[extras]
