"""No silent divergence: every change made through ``loader.dataset`` reaches the
workers, and reads change nothing (issue 14)."""

from __future__ import annotations

import heapq
import random
import warnings

import numpy as np
import pytest
import torch
from _knobs import Knobs, WithCounter, keep

from poolloader import DataLoader, unwrap


def _loader(dataset, transport="shm", **kwargs):
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("multiprocessing_context", "forkserver")
    kwargs.setdefault("persistent_workers", True)
    return DataLoader(dataset, batch_size=None, transport=transport, collate_fn=keep, **kwargs)


#: Each row: a change made through ``loader.dataset`` as a new user would make it.
CHANGES = {
    "assign an attribute": lambda ds: setattr(ds, "epoch", 5),
    "call a setter method": lambda ds: ds.set_epoch(5),
    "call a method of a sub-object": lambda ds: ds.sub.set(0.5),
    "list.append": lambda ds: ds.items.append(4),
    "dict.update": lambda ds: ds.cfg.update(crop=2.5),
    "write into an array": lambda ds: ds.w.__setitem__(0, 7),
    "array +=": lambda ds: ds.__setattr__("w", ds.w.__iadd__(1)),
    "tensor.fill_": lambda ds: ds.t.fill_(3),
    "random.shuffle a list": lambda ds: random.Random(1).shuffle(ds.items),
    "sort with a lambda key": lambda ds: ds.items.sort(key=lambda x: -x),
    "heapq.heappush into a list": lambda ds: heapq.heappush(ds.items, 0),
    "a method that uses heapq": lambda ds: ds.push(0),
    "dict.__setitem__ called directly": lambda ds: dict.__setitem__(ds.cfg, "crop", 2.5),
}


@pytest.mark.parametrize("transport", ["shm", "pickle"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_reaches_persistent_workers(change, transport):
    dataset = Knobs(n=8, delay=0.005)  # slow enough that both workers load batches
    with _loader(dataset, transport) as loader:
        before = list(loader)
        CHANGES[change](loader.dataset)
        after = list(loader)
        expected = unwrap(loader.dataset).summary()
    assert {row[2] for row in before} == {Knobs().summary()}
    assert expected != Knobs().summary(), "the change changed the main process's dataset"
    assert {row[2] for row in after} == {expected}, "every worker agrees with the main process"
    assert {row[1] for row in after} == {0, 1}


def test_numpy_shuffle_of_an_array_reaches_the_workers():
    """np.random.shuffle writes NumPy scalars back one at a time; they travel as
    item writes of numbers do (folded into the contents), and keep their dtype."""
    dataset = Knobs(n=8)
    dataset.w = np.arange(300, dtype=np.float32)
    with _loader(dataset) as loader:
        list(loader)
        with warnings.catch_warnings():  # NumPy: "not a subclass of 'Sequence'"
            warnings.simplefilter("ignore", UserWarning)
            np.random.RandomState(1).shuffle(loader.dataset.w)
        rows = list(loader)
    assert dataset.w.dtype == np.float32 and sorted(dataset.w.tolist()) == list(range(300))
    assert dataset.w.tolist() != list(range(300))
    assert {row[2] for row in rows} == {dataset.summary()}


def test_the_table_of_issue_14_as_written():
    """The table's rows, typed as a user would, against torch's own result:
    torch's persistent workers keep the old values; poolloader's change."""
    dataset = Knobs(n=8)
    with _loader(dataset) as loader:
        list(loader)
        loader.dataset.epoch = 5
        loader.dataset.set_epoch(6)
        loader.dataset.sub.set(0.5)
        loader.dataset.items.append(4)
        loader.dataset.cfg.update(crop=2.5)
        loader.dataset.w[0] = 7
        loader.dataset.w += 1
        loader.dataset.t.fill_(2)
        rows = list(loader)
        stats = loader.statistics()
    expected = (6, 0.5, (1, 2, 3, 4), 2.5, (8.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert dataset.summary() == expected
    assert {row[2] for row in rows} == {expected}
    assert stats.control_messages == 1, "changes made between two batches travel together"


def test_a_method_call_mid_epoch_splits_batches_by_submission():
    with _loader(Knobs(n=40, delay=0.002)) as loader:
        iterator = iter(loader)
        seen = [next(iterator) for _ in range(5)]
        cut = iterator.submitted
        loader.dataset.set_epoch(3)
        loader.dataset.items.append(9)
        seen += list(iterator)
    for row in seen:
        position, epoch, items = row[0], row[2][0], row[2][2]
        expected = (0, (1, 2, 3)) if position < cut else (3, (1, 2, 3, 9))
        assert (epoch, items) == expected, f"batch {position} (change at {cut})"


def test_heapq_mid_epoch_is_ordered_against_the_batches():
    """NOTE [ Writes into a view's own items ]: heapq writes into the list through
    the C API, past the view's methods; the write still reaches the batches
    submitted after it, and only those, as a method's change would."""
    with _loader(Knobs(n=40, delay=0.002)) as loader:
        iterator = iter(loader)
        seen = [next(iterator) for _ in range(5)]
        cut = iterator.submitted
        loader.dataset.push(0)  # a method of the dataset: heapq.heappush(self.items, 0)
        seen += list(iterator)
        after = list(loader)
    assert unwrap(loader.dataset).items == [0, 1, 3, 2]
    for row in seen:
        position, items = row[0], row[2][2]
        expected = (1, 2, 3) if position < cut else (0, 1, 3, 2)
        assert items == expected, f"batch {position} (change at {cut})"
    assert {row[2][2] for row in after} == {(0, 1, 3, 2)}


def test_heapq_between_epochs_reaches_fresh_workers():
    """``persistent_workers=False``: each epoch's fresh workers see the heap as the
    main process holds it, written by heapq directly or inside a method."""
    with _loader(Knobs(n=6), persistent_workers=False) as loader:
        assert {row[2][2] for row in loader} == {(1, 2, 3)}
        heapq.heappush(loader.dataset.items, 0)
        assert {row[2][2] for row in loader} == {(0, 1, 3, 2)}
        loader.dataset.push(-1)
        assert {row[2][2] for row in loader} == {(-1, 0, 3, 2, 1)}
    assert unwrap(loader.dataset).items == [-1, 0, 3, 2, 1]


def test_heapq_reaches_the_dataset_of_a_loader_without_workers():
    """``num_workers=0`` loads from the dataset object itself: a heapq write through
    ``loader.dataset`` reaches it before the next batch, also mid-epoch."""
    loader = DataLoader(Knobs(n=4), batch_size=None, collate_fn=keep)
    heapq.heappush(loader.dataset.items, 0)
    assert {row[2][2] for row in loader} == {(0, 1, 3, 2)}
    iterator = iter(loader)
    first = next(iterator)
    loader.dataset.push(-1)  # a method; its heapq write lands in the view's items
    rest = list(iterator)
    assert first[2][2] == (0, 1, 3, 2)
    assert {row[2][2] for row in rest} == {(-1, 0, 3, 2, 1)}


def test_reads_send_nothing_and_run_nowhere_else():
    dataset = Knobs(n=8)
    with _loader(dataset) as loader:
        list(loader)
        view = loader.dataset
        assert len(view) == 8 and view[3][0] == 3
        assert view.epoch == 0 and view.sub.value == 0.0
        assert view.durations() == dataset.durations()
        assert view.cfg.get("crop") == 1.0 and list(view.items) == [1, 2, 3]
        assert float(view.w.sum()) == 0.0 and float(view.t.sum()) == 0.0
        assert view.cfg.pop("missing", None) is None
        view.items.extend([])
        list(loader)
        stats = loader.statistics()
    assert stats.control_messages == 0 and stats.control_messages_sent == 0


def test_nested_objects_tensors_and_modules_in_place():
    dataset = Knobs(n=8)
    dataset.model = torch.nn.Linear(3, 1)
    with _loader(dataset) as loader:
        list(loader)
        with torch.no_grad():
            loader.dataset.model.weight.fill_(1.0)
            loader.dataset.model.bias.zero_()
        loader.dataset.t.view(3, 1)[2].add_(5)
        loader.dataset.w.reshape(3, 1)[1, 0] = 4
        loader.dataset.cfg["mean"][1] = 0.25
        loader.dataset.cfg.setdefault("extra", {})["p"] = 0.3
        outputs = loader.broadcast(_model_output)
        rows = list(loader)
    assert outputs == 3.0
    assert {row[2] for row in rows} == {dataset.summary()}
    assert dataset.summary()[4:] == ((0.0, 4.0, 0.0), (0.0, 0.0, 5.0))
    assert dataset.cfg == {"crop": 1.0, "mean": [0.5, 0.25], "extra": {"p": 0.3}}


def _model_output(dataset):
    """Run in the main process and in every worker: the workers' model must agree."""
    out = float(dataset.model(torch.ones(1, 3)).item())
    if out != 3.0:
        raise AssertionError(f"a worker's model gives {out}")
    return out


def test_a_c_method_of_a_user_type_warns_once_naming_broadcast():
    with DataLoader(WithCounter(), num_workers=0) as loader:
        with pytest.warns(RuntimeWarning, match=r"dataset\.counts\.append.*loader\.broadcast"):
            loader.dataset.counts.append(1)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.dataset.counts.append(2)  # once is enough


def test_reads_through_the_view_give_what_the_object_gives():
    import copy
    import json
    import pickle
    import weakref

    from torch.utils.data import ConcatDataset, Subset

    dataset = Knobs(n=4)
    view = DataLoader(dataset).dataset
    assert json.dumps(view.cfg) == json.dumps(dataset.cfg)
    assert view.items * 2 == dataset.items * 2
    assert view.items + [4] == [1, 2, 3, 4]  # noqa: RUF005 - the operator is what is tested
    assert [0] + view.items == [0, 1, 2, 3]  # noqa: RUF005
    assert view.items < [9] and view.items == [1, 2, 3]
    assert view.cfg | {"a": 1} == dataset.cfg | {"a": 1} and {"a": 1} | view.cfg == {
        "a": 1,
        **dataset.cfg,
    }
    assert weakref.ref(view)() is view and weakref.ref(view.cfg)() is view.cfg
    assert copy.copy(view.cfg) == dataset.cfg and type(copy.deepcopy(view)) is Knobs
    assert pickle.loads(pickle.dumps(view)).summary() == dataset.summary()
    assert np.array_equal(np.asarray(view.w), dataset.w) and np.asarray(view.w).dtype == np.float64
    assert torch.zeros(view.items).shape == torch.zeros(dataset.items).shape == (1, 2, 3)
    assert Subset(view, [1, 3])[1] == dataset[3]
    concat = ConcatDataset([view, Knobs(n=2)])
    assert len(concat) == 6 and concat[5][0] == 1
    assert (
        isinstance(view, Knobs)
        and isinstance(view.w, np.ndarray)
        and isinstance(view.t, torch.Tensor)
    )
    assert isinstance(view.cfg, dict) and isinstance(view.items, list)
    assert view.t + 1 is not None and torch.equal(view.t * 2, dataset.t * 2)


def test_a_write_that_would_be_lost_raises_instead():
    view = DataLoader(Knobs(n=4)).dataset
    with pytest.raises(ValueError, match="read-only"):
        np.asarray(view.w)[0] = 1


def test_an_in_place_change_of_a_tensors_shape_reaches_the_workers():
    """``t.resize_(1)`` and ``t.unsqueeze_(0)`` through loader.dataset: a small
    tensor's new contents travel, and the workers' copies take its new shape, where
    writing the values into the old shape broadcast them (three zeros in every
    batch while the main process held one)."""
    dataset = Knobs(n=4)
    with _loader(dataset) as loader:
        list(loader)
        for change in (lambda t: t.resize_(1), lambda t: t.unsqueeze_(0)):
            change(loader.dataset.t)
            want = unwrap(loader.dataset).summary()
            assert [row[2] for row in loader] == [want] * 4
