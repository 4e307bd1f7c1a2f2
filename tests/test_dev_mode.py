"""Under ``python -X dev`` (Python's development mode, which reports resources the
collector closes, such as sockets and files left open), a script using poolloader
prints nothing that the same script using torch's loader does not.

Development mode is where users look for their own leaks; a warning from the
loader's processes there sends them looking in the wrong place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from _datasets import Plain

    if sys.argv[1] == "poolloader":
        from poolloader import DataLoader
    else:
        from torch.utils.data import DataLoader

    if __name__ == "__main__":
        for method in sys.argv[2:]:
            # Workers forked afresh each epoch, an epoch left with `break`, batches
            # kept past their epoch.
            loader = DataLoader(Plain(24), batch_size=4, num_workers=2,
                                multiprocessing_context=method)
            for i, batch in enumerate(loader):
                if i == 1:
                    break
            kept = list(loader)
            print(method, sum(int(b.sum()) for b in kept), flush=True)
            del kept, loader
        # A persistent loader still mid-epoch when the interpreter exits.
        alive = DataLoader(Plain(24), batch_size=4, num_workers=1,
                           persistent_workers=True, multiprocessing_context=sys.argv[2])
        print("alive", int(next(iter(alive)).sum()), flush=True)
    """
)

#: sum(range(24))
ALL = 276


def _run(tmp_path, loader: str, methods: list[str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "dev_mode.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    return subprocess.run([sys.executable, "-X", "dev", str(script), loader, *methods],
                          capture_output=True, text=True, timeout=180)  # fmt: skip


@pytest.mark.parametrize(
    "loader, methods",
    [("torch", ["fork"]), ("poolloader", ["spawn", "forkserver", "fork"])],
)
def test_development_mode_reports_nothing_of_the_loaders(tmp_path, loader, methods):
    """The template process left the socket it receives descriptors on to the
    collector: ``ResourceWarning: unclosed <socket.socket ...>`` once per template,
    from every spawn and forkserver loader."""
    done = _run(tmp_path, loader, methods)
    expected = [f"{method} {ALL}" for method in methods] + ["alive 6"]
    assert done.stdout.split("\n")[:-1] == expected, done.stdout + done.stderr
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
