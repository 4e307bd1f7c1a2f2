"""What unpickling the dataset makes that must be each worker's own (NOTE [ State of
a process's own ] in ``poolloader/_template_process.py``): torch's spawn workers each
unpickle the dataset, so a file its ``__setstate__`` opens, or a generator it seeds
from the system, is each worker's. Workers forked from one template process would
share them; the template sees it and each worker unpickles the dataset itself."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from _datasets import DrawsOnUnpickle, OpensOnUnpickle, RandomOnUnpickle, write_records

from poolloader import DataLoader, SharedList

RECORDS = 48
NOT_SAFE = "forking a template process is not safe"


def _records(loader: DataLoader) -> list[int]:
    return [int(b) for b in loader]


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture
def records(tmp_path: Path) -> str:
    path = str(tmp_path / "records.bin")
    write_records(path, RECORDS)
    return path


def test_a_file_the_dataset_opens_when_unpickled_is_each_workers_own(records, caplog):
    """Two workers seeking and reading one shared file read each other's records
    (63 of 64 wrong before): every record must read back as itself, as in torch."""
    expected = _records(
        torch.utils.data.DataLoader(OpensOnUnpickle(records, RECORDS), batch_size=None)
    )
    assert expected == list(range(RECORDS))
    loader = DataLoader(OpensOnUnpickle(records, RECORDS), batch_size=None, num_workers=2,
                        multiprocessing_context="spawn", persistent_workers=True)  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING):
            assert _records(loader) == expected
            assert _records(loader) == expected
        assert loader._pool.template_pid is None  # each worker unpickled it
        assert NOT_SAFE in _warnings(caplog)
        assert f"opened {records}" in _warnings(caplog)
        assert "in __getitem__" in _warnings(caplog)  # what keeps the faster start
    finally:
        loader.close()


def test_a_generator_seeded_from_the_system_when_unpickled_is_each_workers_own(caplog):
    """Every worker drew the same numbers, and every epoch of non-persistent workers
    the same again: the draws must all differ, as with torch's spawn workers."""
    loader = DataLoader(DrawsOnUnpickle(16), batch_size=None, num_workers=2,
                        multiprocessing_context="spawn")  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING):
            epochs = [[b.tolist() for b in loader] for _ in range(2)]
        draws = [draw for epoch in epochs for draw, _ in epoch]
        assert len(set(draws)) == len(draws) == 32
        assert NOT_SAFE in _warnings(caplog)
        assert "drew the system's randomness" in _warnings(caplog)
    finally:
        loader.close()


def test_a_random_generator_made_when_unpickled_is_each_workers_own(caplog):
    """``random.Random()`` reads the system's randomness in C, unseen by the watch on
    ``os.urandom``: workers forked from one template drew the same numbers (8 of 16
    distinct). The draws must all differ, as with torch's spawn workers."""
    assert len(set(_draws(torch.utils.data.DataLoader, "system"))) == 16
    with caplog.at_level(logging.WARNING):
        assert len(set(_draws(DataLoader, "system"))) == 16
    assert NOT_SAFE in _warnings(caplog)
    assert "random.Random()" in _warnings(caplog)


@pytest.mark.parametrize(("how", "seed"), [("pickled", 7), ("imports", "_lazy_imports")])
def test_a_pickled_generator_or_a_submodule_import_keeps_the_template(how, seed, caplog):
    """Unpickling a pickled ``random.Random`` makes one seeded from the system, then
    gives it its state: the same in every worker, as with torch. And ``from pkg
    import sub`` in ``__setstate__`` imports ``sub``, whose import draws randomness,
    as a library's may: shared by torch's fork workers too. Neither may cost the
    template, and each worker draws from the generator the dataset says."""
    reference = random.Random(seed)
    sequence = {reference.getrandbits(40) for _ in range(16)}
    assert set(_draws(torch.utils.data.DataLoader, how)) <= sequence
    with caplog.at_level(logging.WARNING):
        assert set(_draws(DataLoader, how, template=True)) <= sequence
    assert NOT_SAFE not in _warnings(caplog)


def _draws(loader_class: type, how: str, template: bool = False) -> list[int]:
    loader = loader_class(RandomOnUnpickle(16, how), batch_size=None, num_workers=2,
                          multiprocessing_context="spawn")  # fmt: skip
    try:
        draws = [int(b) for b in loader]
        assert len(draws) == 16
        if template:
            assert loader._pool.template_pid is not None
        return draws
    finally:
        if hasattr(loader, "close"):
            loader.close()


def test_a_file_a_change_opens_in_the_template_is_each_new_workers_own(records, caplog):
    """loader.broadcast() runs in the template too, for the workers it forks later:
    a function that opens a file there moves them to starting on their own."""
    loader = DataLoader(OpensOnUnpickle(records, RECORDS, on_unpickle=False), batch_size=None,
                        num_workers=2, multiprocessing_context="spawn")  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING):
            assert _records(loader) == list(range(RECORDS))  # opened in each worker
            assert NOT_SAFE not in _warnings(caplog)
            loader.broadcast(OpensOnUnpickle.open)
            assert _records(loader) == list(range(RECORDS))
            assert _records(loader) == list(range(RECORDS))
        assert NOT_SAFE in _warnings(caplog)
        assert f"opened {records}" in _warnings(caplog)
    finally:
        loader.close()


class _HoldsShared(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.table = torch.arange(400).reshape(100, 4)
        self.names = SharedList([f"item{i}" for i in range(100)])

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int):
        return self.table[i].sum() + len(self.names[i])


def test_shared_memory_and_tensors_keep_the_template(caplog):
    """What forked workers may share (SharedList's memory, the dataset's tensors)
    does not cost the faster start."""
    from _datasets import Plain

    dataset = _HoldsShared()
    expected = [b.tolist() for b in torch.utils.data.DataLoader(dataset, batch_size=10)]
    for made in (dataset, Plain(20)):
        loader = DataLoader(made, batch_size=10, num_workers=2, multiprocessing_context="spawn")
        try:
            with caplog.at_level(logging.WARNING):
                got = [b.tolist() for b in loader]
            if made is dataset:
                assert got == expected
            assert loader._pool is None or loader._pool.template_pid is not None
            assert NOT_SAFE not in _warnings(caplog)
        finally:
            loader.close()


def test_what_importing_a_module_does_keeps_the_template(caplog):
    """The modules the pickle names are imported to unpickle it; what a library does
    when imported (draws randomness, opens a file) is shared by torch's fork workers
    too, and counted it would cost most datasets the template (importing Lightning
    draws randomness)."""
    from _draws_on_import import FromThisModule

    loader = DataLoader(FromThisModule(), batch_size=4, num_workers=2,
                        multiprocessing_context="spawn")  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING):
            assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert loader._pool.template_pid is not None
        assert NOT_SAFE not in _warnings(caplog)
    finally:
        loader.close()
