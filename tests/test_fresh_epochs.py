"""``persistent_workers=False``: each epoch's workers see the dataset as it is when
the epoch starts, as torch's new workers do, without pickling an unchanged dataset
again (NOTE [ Fingerprints ] in ``poolloader/_pickling.py``)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from _datasets import Rows, WaitsForTemplate

from poolloader import DataLoader, _pickling
from poolloader.errors import NotPicklableError

KINDS = {
    "records": {},
    "cyclic": {"cyclic": True},  # no fingerprint: fast pickling refuses cycles
    "shared_blob": {"shared_blob": True},  # no fingerprint: past its size limit (6 MiB)
}


@pytest.fixture
def pickles(monkeypatch):
    """How many times the main process pickled the whole dataset to compare it."""
    made: list[int] = []
    real = _pickling.dumps_or_none

    def counting(obj):
        made.append(1)
        return real(obj)

    monkeypatch.setattr(_pickling, "dumps_or_none", counting)
    return made


def _loader(dataset, start_method="forkserver"):
    return DataLoader(dataset, batch_size=None, num_workers=2,
                      multiprocessing_context=start_method)  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_change_deep_inside_the_dataset_reaches_the_next_epoch(kind):
    dataset = Rows(**KINDS[kind])
    with _loader(dataset) as loader:
        assert list(loader) == [0, 1, 2, 3, 4, 5]
        dataset.rows[3]["v"] = 30  # in place, behind the loader's back
        assert list(loader) == [0, 1, 2, 30, 4, 5]
        assert list(loader) == [0, 1, 2, 30, 4, 5]
        dataset.rows.append({"v": 6, "blob": dataset.rows[0]["blob"]})
        assert list(loader) == [0, 1, 2, 30, 4, 5, 6]


def test_with_spawn_too():
    dataset = Rows()
    with _loader(dataset, "spawn") as loader:
        assert list(loader) == [0, 1, 2, 3, 4, 5]
        dataset.rows[0]["v"] = -1
        assert list(loader) == [-1, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_dataset_made_unpicklable_between_epochs_is_named_and_can_be_mended(start_method):
    """It raised pickle's bare TypeError from inside the new template's start; a new
    loader names the part (NotPicklableError), and so does the next epoch. Mended,
    the epoch after runs."""
    dataset = Rows()
    with _loader(dataset, start_method) as loader:
        assert list(loader) == [0, 1, 2, 3, 4, 5]
        dataset.reader = threading.Lock()
        with pytest.raises(NotPicklableError, match=r"dataset\.reader"):
            list(loader)
        dataset.reader = None
        dataset.rows[0]["v"] = -1
        assert list(loader) == [-1, 1, 2, 3, 4, 5]


def test_an_unchanged_dataset_is_not_pickled_again(pickles):
    dataset = Rows()
    with _loader(dataset) as loader:
        for _ in range(3):
            assert list(loader) == [0, 1, 2, 3, 4, 5]
        assert pickles == []
        dataset.rows[1]["v"] = 10
        assert list(loader) == [0, 10, 2, 3, 4, 5]
        assert len(pickles) == 1  # a change: pickled once, sent to the template
        assert list(loader) == [0, 10, 2, 3, 4, 5]
        assert len(pickles) == 1


def test_a_change_through_the_loader_then_one_behind_its_back(pickles):
    dataset = Rows()
    with _loader(dataset) as loader:
        assert list(loader) == [0, 1, 2, 3, 4, 5]
        loader.dataset.rows[2]["v"] = 20  # reaches the template through the channel
        assert list(loader) == [0, 1, 20, 3, 4, 5]
        assert list(loader) == [0, 1, 20, 3, 4, 5]
        dataset.rows[4]["v"] = 40
        assert list(loader) == [0, 1, 20, 3, 40, 5]
        settled = len(pickles)
        assert list(loader) == [0, 1, 20, 3, 40, 5]
        assert len(pickles) == settled


def test_a_cyclic_dataset_is_compared_by_its_pickle(pickles):
    dataset = Rows(cyclic=True)
    with _loader(dataset) as loader:
        assert list(loader) == list(loader) == [0, 1, 2, 3, 4, 5]
        assert len(pickles) == 1


def test_fingerprints_tell_contents_apart_and_refuse_what_they_cannot_do():
    rows = Rows().rows
    before = _pickling.fingerprint(rows, 10**6)
    assert before == _pickling.fingerprint([dict(r) for r in rows], 10**6)
    rows[5]["v"] = 6
    assert before != _pickling.fingerprint(rows, 10**6) is not None
    assert _pickling.fingerprint(Rows(cyclic=True), 10**6) is None
    assert _pickling.fingerprint(Rows(shared_blob=True), 3 * 2**20) is None
    assert _pickling.fingerprint(lambda: 0, 10**6) is None


def test_fingerprints_see_inside_arrays_and_tensors():
    """Big arrays reach the pickler's file as buffers of their own (protocol 5)."""
    array, tensor = np.zeros(100_000), torch.zeros(100_000)
    before = _pickling.fingerprint((array, tensor), 10**7)
    assert before is not None
    array[7] = 1.0
    after_array = _pickling.fingerprint((array, tensor), 10**7)
    tensor[7] = 1.0
    after_tensor = _pickling.fingerprint((array, tensor), 10**7)
    assert len({before, after_array, after_tensor}) == 3
    shipped = _pickling.ship((array, tensor), "dataset", inherited=False)
    assert shipped.data == pickle.dumps((array, tensor), protocol=_pickling.PROTOCOL)


def test_a_dataset_shared_many_times_over_is_compared_by_its_pickle(pickles):
    dataset = Rows(shared_blob=True)
    with _loader(dataset) as loader:
        assert list(loader) == list(loader) == [0, 1, 2, 3, 4, 5]
        assert len(pickles) == 1


def test_the_template_has_numpy_random_before_it_forks_a_worker():
    """NumPy 2 imports ``numpy.random`` on first use, 15-60 ms; every worker seeds
    NumPy as it starts. A template that had not imported it left each worker it
    forked to import it again (each epoch with ``persistent_workers=False``)."""
    code = "import sys, poolloader._template_process; print('numpy.random' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.stdout.strip() == "True", found.stderr


def test_the_template_starts_while_the_dataset_is_pickled(start_method):
    """The template's start (an interpreter importing torch) and the main process's
    pickling of a big dataset overlap instead of adding up."""
    WaitsForTemplate.template_seen.clear()
    with _loader(WaitsForTemplate(), start_method) as loader:
        assert list(loader) == [0, 1, 2, 3]
    assert WaitsForTemplate.template_seen == [True]


@pytest.mark.parametrize("context", ["forkserver", "fork"])
def test_an_iterator_left_unfinished_does_not_keep_a_changed_dataset_from_the_next_epoch(
    context,
):
    """Lightning (reload_dataloaders_every_n_epochs) makes an iterator before its
    epoch hook changes the dataset and another after, leaving the first: the
    second epoch's workers must see the change, as torch's fresh workers do."""
    from _datasets import Scaled

    dataset = Scaled()
    kept = []
    with DataLoader(dataset, batch_size=4, num_workers=2,
                    multiprocessing_context=context) as loader:  # fmt: skip
        for scale in (1, 100, 10_000):
            dataset.scale = scale  # directly, not through loader.dataset
            kept.append(iter(loader))  # made and left, as a framework does
            fresh = iter(loader)
            assert next(fresh).tolist() == [0, scale, 2 * scale, 3 * scale]
        # Still whole (its later batches, loaded by the fresh workers, see the change).
        assert len(list(kept[0])) == 10


def test_a_persistent_loader_peeked_at_keeps_torchs_order():
    """A peek drops the persistent iterator mid-epoch; the next one keeps its base
    seed, as torch's one persistent iterator does, so the orders stay torch's."""

    def run(loader_class):
        torch.manual_seed(0)
        loader = loader_class(list(range(12)), batch_size=4, shuffle=True, num_workers=2,
                              persistent_workers=True)  # fmt: skip
        peek = next(iter(loader)).tolist()
        epochs = [[b.tolist() for b in loader] for _ in range(2)]
        if isinstance(loader, DataLoader):
            loader.close()
        return peek, epochs

    assert run(DataLoader) == run(torch.utils.data.DataLoader)
