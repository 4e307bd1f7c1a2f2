"""Curricula as training code writes them, through ``loader.dataset``: item writes
under fork, weights loaded into a feature extractor, a list rebuilt from the
dataset's own records, a property setter that reshuffles, and what is refused."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from poolloader import DataLoader, unwrap


def keep(item):
    """collate_fn: the item as the dataset returned it."""
    return item


class Knobs(torch.utils.data.Dataset):
    """Returns the state it sees, so a batch says what its worker holds."""

    def __init__(self) -> None:
        self.cfg = {"crop": 1.0}
        self.ids = ["a", "b", "c"]
        self.durs = np.array([1.0, 2.0, 3.0])

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return (self.cfg["crop"], self.ids[0], float(self.durs[0]), tuple(self.ids))


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_item_writes_of_numbers_and_strings_reach_workers_whatever_the_start(method):
    """Under fork the channel has no pickled base: item writes (recorded together,
    as SetItems) were dropped there, silently, while other changes went through."""
    with DataLoader(Knobs(), batch_size=None, collate_fn=keep, num_workers=2, persistent_workers=True,
                    multiprocessing_context=method) as loader:  # fmt: skip
        list(loader)
        loader.dataset.cfg["crop"] = 2.0
        loader.dataset.ids[0] = "z"
        loader.dataset.durs[0] = 9.0
        random.Random(0).shuffle(loader.dataset.ids)
        seen = set(loader)
    assert seen == {unwrap(loader.dataset)[0]}
    assert next(iter(seen))[:3] == (2.0, unwrap(loader.dataset).ids[0], 9.0)


class Extractor(torch.utils.data.Dataset):
    """A dataset holding a feature extractor whose weights the trainer updates."""

    def __init__(self) -> None:
        self.fe = torch.nn.Linear(64, 64)  # 16 KiB of weights: replayed as calls

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> float:
        return float(self.fe.weight.detach().sum())


def test_weights_loaded_or_updated_under_no_grad_reach_the_workers():
    """Replayed with autograd on, an in-place change to a parameter that needs
    grad failed in the worker (and the template): load_state_dict, an EMA step."""
    with DataLoader(Extractor(), batch_size=None, num_workers=1, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        list(loader)
        loader.dataset.fe.load_state_dict(torch.nn.Linear(64, 64).state_dict())
        with torch.no_grad():
            loader.dataset.fe.weight.mul_(0.5)
        got = list(loader)
    assert got == [pytest.approx(float(unwrap(loader.dataset).fe.weight.sum()))] * 2


@dataclass
class Utt:
    uid: int
    dur: float
    gain: float = 1.0


class Speech(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.all = [Utt(i, 1.0 + i % 7) for i in range(n)]
        self.utts = list(self.all)

    def set_epoch(self, max_dur: float) -> None:
        self.utts = [u for u in self.all if u.dur <= max_dur]  # built through the view

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int):
        return (self.utts[i].uid, self.utts[i].gain)


@pytest.mark.parametrize("n", [1000, 3000], ids=["small", "over-the-mirror-limit"])
def test_a_list_rebuilt_from_the_dataset_holds_records_not_views(n):
    """A list of more than 1,024 records built through the view was stored holding
    views: a later change through one of its items landed on ``all`` in the workers."""
    with DataLoader(Speech(n), batch_size=None, collate_fn=keep, num_workers=1, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        list(loader)
        loader.dataset.set_epoch(4.0)
        held = unwrap(loader.dataset).utts
        assert {type(u) for u in held} == {Utt}
        loader.dataset.utts[0].gain = 0.5
        first = next(iter(loader))
    assert first == (0, 0.5) and held[0].gain == 0.5


class Shuffled(torch.utils.data.Dataset):
    """An epoch property whose setter draws a new order."""

    def __init__(self) -> None:
        self.order = list(range(40))
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value
        order = list(range(40))
        random.shuffle(order)
        self.order = order

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return hash(tuple(self.order)) % 100_003


def test_a_property_setter_runs_once_and_its_result_reaches_every_worker():
    """Run again in each worker, the setter drew another order in each: the
    workers disagreed with the main process and with each other."""
    random.seed(0)
    with DataLoader(Shuffled(), batch_size=None, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        for epoch in range(1, 3):
            loader.dataset.epoch = epoch
            expected = hash(tuple(unwrap(loader.dataset).order)) % 100_003
            assert set(loader) == {expected}
            assert unwrap(loader.dataset).epoch == epoch


class Leveled(torch.utils.data.Dataset):
    level = 0

    def set_level(self, level: int) -> None:
        type(self).level = level

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return self.level


def test_a_class_attribute_set_through_type_self_is_refused_not_misplaced():
    """``type(self)`` in a method run through the view is the view's class: the
    assignment set an attribute of poolloader's class, for every dataset's view."""
    loader = DataLoader(Leveled(), batch_size=None)
    with pytest.raises(TypeError, match=r"type\(self\) is poolloader's view class"):
        loader.dataset.set_level(3)
    assert Leveled.level == 0 and not hasattr(type(loader.dataset), "level")


@dataclass(frozen=True)
class Augment:
    p: float = 0.5


@dataclass(frozen=True)
class Config:
    crop: float = 1.0
    augment: Augment = Augment()


class Configured(torch.utils.data.Dataset):
    """A frozen config, changed the only way it can be: dataclasses.replace."""

    def __init__(self) -> None:
        self.cfg = Config()

    def set_epoch(self, epoch: int) -> None:
        self.cfg = dataclasses.replace(self.cfg, crop=1.0 + epoch)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return (self.cfg.crop, self.cfg.augment.p)


def test_dataclasses_functions_work_on_views_and_replace_reaches_workers():
    """``dataclasses`` goes by ``type(obj)``: on a view is_dataclass was False and
    replace/asdict raised, where torch's loader hands out the object itself."""
    with DataLoader(Configured(), batch_size=None, collate_fn=keep, num_workers=1,
                    persistent_workers=True, multiprocessing_context="forkserver") as loader:  # fmt: skip
        cfg = loader.dataset.cfg
        assert dataclasses.is_dataclass(cfg) and dataclasses.asdict(cfg) == {
            "crop": 1.0,
            "augment": {"p": 0.5},
        }
        assert [f.name for f in dataclasses.fields(cfg)] == ["crop", "augment"]
        list(loader)
        loader.dataset.set_epoch(3)
        assert list(loader) == [(4.0, 0.5)] * 2
    held = unwrap(loader.dataset).cfg
    assert type(held) is Config and type(held.augment) is Augment  # no views inside
