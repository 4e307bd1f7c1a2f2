"""Batches as torch's own loader gives them, in the corners a hunt against it
found: the default collate before a worker has a slab, one object held twice in
a batch, an IterableDataset that is its own iterator, and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poolloader import DataLoader, unwrap


class MixedFloats(torch.utils.data.Dataset):
    """Items of one batch in two float dtypes (files decoded one way or the other)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        dtype = torch.float32 if i % 2 == 0 else torch.float64
        return torch.full((self.size,), float(i), dtype=dtype)


class ChannelsLast(torch.utils.data.Dataset):
    """Video-like clips stored channels_last."""

    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int) -> torch.Tensor:
        clip = torch.full((2, 3, 32, 32), float(i))
        return clip.contiguous(memory_format=torch.channels_last)


def _layouts(loader) -> list[tuple]:
    return [(b.dtype, b.stride(), b.is_contiguous(), b.sum().item()) for b in loader]


@pytest.mark.parametrize(
    "dataset",
    [MixedFloats(20_000), MixedFloats(20), ChannelsLast()],
    ids=["mixed-dtypes", "mixed-dtypes-small", "channels-last"],
)
def test_default_collate_stacks_every_batch_as_torchs_workers_do(dataset):
    """torch's workers stack into a contiguous batch of the first item's dtype;
    poolloader did so only once a worker had a slab (its first batch, and every
    batch under 32 KiB, were promoted to float64 or kept channels_last)."""
    theirs = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1)
    with DataLoader(dataset, batch_size=2, num_workers=1,
                    multiprocessing_context="forkserver") as ours:  # fmt: skip
        assert _layouts(ours) == _layouts(theirs)


def collate_with_aliases(items):
    """A batch that names one array and one tensor twice (labels = input_ids)."""
    ids = np.repeat(np.array(items), 5000)  # big enough for a slab
    small = torch.tensor(items)
    return {"input_ids": ids, "labels": ids, "t1": small, "t2": small}


class Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_an_object_held_twice_in_a_batch_arrives_as_one_object(transport):
    theirs = torch.utils.data.DataLoader(Indices(), batch_size=3, num_workers=1,
                                         collate_fn=collate_with_aliases)  # fmt: skip
    with DataLoader(Indices(), batch_size=3, num_workers=1, collate_fn=collate_with_aliases,
                    multiprocessing_context="forkserver", transport=transport) as ours:  # fmt: skip
        for got, want in zip(ours, theirs, strict=True):
            assert got["labels"] is got["input_ids"] and want["labels"] is want["input_ids"]
            assert got["t1"] is got["t2"]
            assert np.array_equal(got["input_ids"], want["input_ids"])
            got["labels"][0] = -100  # a masked label is the input's too, as with torch
            assert got["input_ids"][0] == -100


class CountsUpTo(torch.utils.data.IterableDataset):
    """An IterableDataset that is its own iterator, a common pattern."""

    def __init__(self, n: int) -> None:
        self.n, self.k, self.opened = n, 0, 0

    def __iter__(self):
        self.k = 0
        self.opened += 1  # opening a file, say
        return self

    def __next__(self) -> int:
        if self.k >= self.n:
            raise StopIteration
        self.k += 1
        return self.k


def test_an_iterable_dataset_in_process_is_iterated_once_an_epoch_as_torch_does():
    theirs = CountsUpTo(4)
    expected = [list(torch.utils.data.DataLoader(theirs, batch_size=2)) for _ in range(2)]
    ours = CountsUpTo(4)
    loader = DataLoader(ours, batch_size=2)
    got = [list(loader) for _ in range(2)]
    assert [[b.tolist() for b in e] for e in got] == [[b.tolist() for b in e] for e in expected]
    assert unwrap(ours).opened == theirs.opened == 2


def test_prefetch_factor_zero_and_a_generator_that_is_not_one_are_refused():
    with pytest.raises(ValueError, match=r"prefetch_factor should be a positive integer"):
        DataLoader(Indices(), num_workers=2, prefetch_factor=0)
    with pytest.raises(TypeError, match=r"generator should be a torch.Generator"):
        DataLoader(Indices(), generator=5)


class Numbers(torch.utils.data.IterableDataset):
    """Each worker streams its share of 0..23."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return iter(range(info.id, 24, info.num_workers))


def _peek_and_nest(loader_class, **kwargs) -> tuple[list, list]:
    loader = loader_class(Numbers(), batch_size=2, num_workers=2, **kwargs)
    seen, inner = [], []
    for i, batch in enumerate(loader):
        seen.append(batch.tolist())
        if i == 1:
            next(iter(loader))  # a peek: a second, short-lived iterator
        if i == 3:
            inner = [b.tolist() for b in loader]  # a whole epoch inside this one
        if i > 40:
            break
    return seen, inner


@pytest.mark.parametrize("persistent", [False, True])
def test_two_live_iterators_of_an_iterable_dataset_each_stream_once(persistent):
    """Workers served one epoch at a time: a second live iterator restarted the
    first one's streams (repeated batches; nested loops that never ended)."""
    theirs = _peek_and_nest(torch.utils.data.DataLoader, persistent_workers=persistent)
    ours = _peek_and_nest(DataLoader, persistent_workers=persistent,
                          multiprocessing_context="forkserver")  # fmt: skip
    assert ours == theirs


class Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> int:
        return int(torch.randint(0, 10**6, ()))


def test_two_live_iterators_under_worker_seeding_draw_as_torchs_do():
    """seeding="worker": each epoch's workers continue their own random stream
    (the second iterator's epoch reseeded the workers the first one was using, and
    its draws repeated). Which worker loads which batch is the pool's choice, so
    only the first batch of each worker's stream is torch's for certain."""

    def draws(loader_class, **kwargs) -> list[int]:
        torch.manual_seed(0)
        loader = loader_class(Draws(), batch_size=2, num_workers=2, **kwargs)
        return [x for a, _ in zip(loader, loader, strict=True) for x in a.tolist()]

    theirs = draws(torch.utils.data.DataLoader)
    ours = draws(DataLoader, seeding="worker", multiprocessing_context="forkserver")
    assert len(set(ours)) == len(ours) == 16, "a worker's random stream restarted"
    assert ours[0] == theirs[0]
