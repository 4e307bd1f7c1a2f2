"""The public surface: explicit, sorted, documented, and shaped as promised."""

from __future__ import annotations

import inspect
import logging
import re

import pytest
import torch

import poolloader
import poolloader.datasets
import poolloader.errors
import poolloader.samplers

MODULES = [poolloader, poolloader.datasets, poolloader.samplers, poolloader.errors]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_is_sorted_and_complete(module):
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name
    public = {
        n for n, v in vars(module).items()
        if not n.startswith("_") and not inspect.ismodule(v) and getattr(v, "__module__", "").startswith("poolloader")
    }  # fmt: skip
    assert public <= set(module.__all__), public - set(module.__all__)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_public_name_is_documented(module):
    assert module.__doc__ and len(module.__doc__) > 100
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, str):
            continue
        assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
        for attr, member in vars(obj).items() if inspect.isclass(obj) else []:
            if attr.startswith("_") or not callable(member):
                continue
            assert inspect.getdoc(member), f"{module.__name__}.{name}.{attr} has no docstring"


def test_help_opens_with_the_drop_in_promise():
    doc = inspect.getdoc(poolloader.DataLoader)
    assert doc.startswith("torch's ``DataLoader``, with the same arguments and the same batches")
    assert "Only these differ" in doc


def test_errors_refine_builtins():
    errors = poolloader.errors
    assert issubclass(errors.WorkerCrashedError, RuntimeError)
    assert issubclass(errors.LoaderTimeoutError, TimeoutError)
    assert issubclass(errors.LoaderTimeoutError, RuntimeError)
    assert issubclass(errors.NotPicklableError, TypeError)
    assert issubclass(errors.ResultTooLargeError, ValueError)
    assert issubclass(errors.LoaderClosedError, RuntimeError)
    for name in errors.__all__:
        assert name in errors.__doc__ or name == "RemoteTraceback", name


def test_version_and_changelog():
    assert re.fullmatch(r"\d+\.\d+\.\d+", poolloader.__version__)
    from pathlib import Path

    changelog = Path(__file__).parent.parent / "CHANGELOG.md"
    assert (
        "## [Unreleased]" in changelog.read_text()
        or poolloader.__version__ in changelog.read_text()
    )


def test_repr_is_one_line():
    loader = poolloader.DataLoader(list(range(5)), batch_size=2)
    text = repr(loader)
    assert "\n" not in text and "batch_size=2" in text and "idle" in text
    loader.close()
    assert "closed" in repr(loader)


def test_statistics_snapshot_and_debug_logging(caplog):
    caplog.set_level(logging.DEBUG, logger="poolloader")
    with poolloader.DataLoader(list(range(20)), batch_size=4, num_workers=2,
                               multiprocessing_context="forkserver") as loader:  # fmt: skip
        batches = [b.tolist() for b in loader]
        assert batches[0] == [0, 1, 2, 3]
        stats = loader.statistics()
    assert stats.batches == 5 and stats.tasks_done == 5 and stats.in_flight == 0
    assert 0 <= stats.worker_busy_fraction <= 1 and stats.mean_wait_seconds >= 0
    with pytest.raises(AttributeError):
        stats.batches = 3  # a snapshot
    messages = [r.getMessage() for r in caplog.records if r.name == "poolloader"]
    assert any(m.startswith("starting 2 workers") for m in messages)
    assert any(m == "pool closed" for m in messages)


def test_loader_is_generic_like_torchs():
    alias = poolloader.DataLoader[torch.Tensor]
    assert alias.__origin__ is poolloader.DataLoader
