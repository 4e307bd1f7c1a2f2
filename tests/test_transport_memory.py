"""The slab transport's memory: slabs go back to the system when the loader is
idle (NOTE [ Idle slabs ] in ``poolloader/_transport.py``), a batch held by the
consumer keeps its slab, and batch_buffer puts NumPy batches in slabs."""

from __future__ import annotations

import numpy as np
import torch
from _datasets import Mixed, OneUnpicklableIndex, SlowEvery, stack_into_batch_buffer
from _procs import child_slab_maps, child_slabs, slab_mappings, slab_maps, wait_until

import poolloader
from poolloader import DataLoader
from poolloader._slab_transport import SLAB_IDLE_BATCHES

#: Bytes of one Mixed(side=256) batch of 4: its images (4 x 256 x 256 float32), at least.
BATCH_BYTES = 4 * 256 * 256 * 4


def _images(loader) -> list[float]:
    return [float(b["image"].sum()) for b in loader]


def test_an_idle_loader_gives_its_slabs_back_and_keeps_what_a_batch_holds():
    dataset = Mixed(n=48, side=256)
    expected = [float(b["image"].sum()) for b in torch.utils.data.DataLoader(dataset, batch_size=4)]
    with DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        for batch in loader:
            pass
        kept, kept_sum = batch, float(batch["image"].sum())
        del batch
        busy = loader.statistics().slab_bytes
        assert busy >= BATCH_BYTES
        assert child_slab_maps() >= 2 and slab_maps() >= 2
        # Idle: every slab but the kept batch's goes, here and in the workers.
        wait_until(lambda: len(child_slabs()) == 1)  # (a slab lent to both maps twice)
        wait_until(lambda: slab_maps() == 1)
        assert 0 < loader.statistics().slab_bytes < busy
        assert float(kept["image"].sum()) == kept_sum  # the kept batch is untouched
        del kept
        # Its slab goes too once it dies.
        wait_until(lambda: child_slab_maps() == 0 and slab_maps() == 0)
        assert loader.statistics().slab_bytes == 0
        # The next epoch makes new slabs and loads the same batches.
        assert _images(loader) == expected
        assert loader.statistics().slab_bytes >= BATCH_BYTES


def test_back_to_back_epochs_keep_their_slabs():
    """The slabs of an epoch serve the next one when it follows at once: every
    slab mapped after the first epoch is still mapped, at the same place, after
    the second (an idle trim in between would have closed them). How many
    slabs an epoch needs follows timing, so that is not what is checked."""
    with DataLoader(Mixed(n=48, side=256), batch_size=4, num_workers=2, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        _images(loader)
        first = loader.statistics()
        kept = slab_mappings()
        _images(loader)
        second = loader.statistics()
        assert kept and kept <= slab_mappings(), (kept, slab_mappings())
    assert second.slab_batches == 2 * first.slab_batches == 24


def test_slabs_a_burst_added_close_once_the_worker_stops_needing_them():
    """A consumer that holds many batches for a while makes the worker add slabs;
    once it lets go, the slabs no later batch takes close (here and in the
    worker) while the loader keeps running, and every batch stays right."""
    held_batches = 8
    dataset = Mixed(n=4 * (held_batches + 2 * SLAB_IDLE_BATCHES + 8), side=256)
    expected = _images(torch.utils.data.DataLoader(dataset, batch_size=4))
    with DataLoader(dataset, batch_size=4, num_workers=1, prefetch_factor=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        held = [next(iterator) for _ in range(held_batches)]
        burst = loader.statistics().slab_bytes
        one_slab = burst / slab_maps()
        assert slab_maps() >= held_batches
        sums = [float(b["image"].sum()) for b in held]
        del held
        sums += [float(b["image"].sum()) for b in iterator]
        assert sums == expected
        # In flight (2), the batch being consumed and the one let go of (its slab
        # is free at the next task), with one to spare: the burst's 8 or more are gone.
        assert loader.statistics().slab_bytes <= 5 * one_slab < burst
        assert slab_maps() <= 5
        wait_until(lambda: len(child_slabs()) <= 5)


class Rows(torch.utils.data.Dataset):
    """Item k: 64 KiB of float32 rows, every element k (over the inline limit)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, k: int):
        return np.full((16, 1024), k, dtype=np.float32)


class BigThenSmall(torch.utils.data.Dataset):
    """Items 0..big-1 are 256 KiB tensors (batches travel in slabs), the rest ints
    (batches travel inline, in no slab)."""

    def __init__(self, big: int, n: int) -> None:
        self.big, self.n = big, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((256, 256), float(i)) if i < self.big else i


def test_slabs_closed_while_batches_travel_inline_are_unmapped_once_idle():
    """Slabs a worker closes while its batches no longer use slabs are named to
    the main process by no batch; the idle trim names them, so that they are
    unmapped here too and their memory goes."""
    held_batches = 8
    dataset = BigThenSmall(4 * (held_batches + 2), 4 * (held_batches + 2 + 2 * SLAB_IDLE_BATCHES))
    expected = [b.sum().item() for b in torch.utils.data.DataLoader(dataset, batch_size=4)]
    with DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        iterator = iter(loader)
        held = [next(iterator) for _ in range(held_batches)]
        assert slab_maps() >= held_batches
        sums = [b.sum().item() for b in held]
        del held
        sums += [b.sum().item() for b in iterator]
        assert sums == expected
        wait_until(lambda: child_slab_maps() == 0)
        wait_until(lambda: slab_maps() == 0)
        assert loader.statistics().slab_bytes == 0


def test_batch_buffer_collates_numpy_batches_into_the_slab_they_travel_in():
    theirs = list(
        torch.utils.data.DataLoader(Rows(), batch_size=4, collate_fn=stack_into_batch_buffer)
    )
    with DataLoader(Rows(), batch_size=4, num_workers=1, collate_fn=stack_into_batch_buffer,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        ours = list(loader)
    assert len(ours) == len(theirs) == 6
    for mine, stock in zip(ours, theirs):
        assert isinstance(mine["x"], np.ndarray) and mine["x"].dtype == np.float32
        np.testing.assert_array_equal(mine["x"], stock["x"])
    assert not any(b["in_slab"] for b in theirs)  # plain memory in torch's loader
    # A worker learns the batch size from its first batch; from then on the
    # collate_fn writes straight into the slab the batch is read from.
    assert [b["in_slab"] for b in ours[1:]] == [True] * 5, [b["in_slab"] for b in ours]


def test_batch_buffer_is_plain_memory_without_slabs():
    for kwargs in (
        {"num_workers": 0},
        {"num_workers": 1, "transport": "pickle", "multiprocessing_context": "forkserver"},
    ):
        with DataLoader(Rows(), batch_size=4, collate_fn=stack_into_batch_buffer,
                        **kwargs) as loader:  # fmt: skip
            batches = list(loader)
        assert not any(b["in_slab"] for b in batches), kwargs
        assert [float(b["x"][0, 0, 0]) for b in batches] == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]
    tensor = poolloader.batch_buffer((2, 3), torch.float16)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 3)
    assert tensor.dtype == torch.float16


def test_numpy_batches_held_by_the_consumer_keep_their_slabs():
    """A NumPy batch read in place from a slab keeps that slab busy while it
    lives, however the array is viewed, so no later batch is written over it."""
    theirs = [
        b.copy() for b in torch.utils.data.DataLoader(Rows(), batch_size=2, collate_fn=np.stack)
    ]
    with DataLoader(Rows(), batch_size=2, num_workers=2, collate_fn=np.stack,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        held = [batch[1:] for batch in loader]  # a view of each batch; the batch itself goes
        for mine, stock in zip(held, theirs):
            np.testing.assert_array_equal(mine, stock[1:])
    assert len(held) == 12


def _most_slabs_over_epochs(loader, epochs: int) -> tuple[int, list[int]]:
    """The most slab bytes mapped after any batch of ``epochs`` epochs, and the
    first item of every batch (a consumer that keeps none of them)."""
    most, firsts = 0, []
    for _ in range(epochs):
        for batch in loader:
            firsts.append(int(batch[0]))
            most = max(most, loader.statistics().slab_bytes)
    return most, firsts


def test_the_workers_share_one_pool_of_slabs():
    """NOTE [ One pool of slabs ] in _slab_transport.py: with slow batches landing
    on one worker after another, each worker in turn runs ahead of the slow one
    and holds finished batches waiting behind it. Slabs of each worker's own
    numbered what each needed at its busiest, summed; one pool holds what is
    alive at once: the window (prefetch_factor * num_workers, no reorder
    allowance here), the batch the consumer takes and the one it let go of."""
    dataset = SlowEvery(96, kib=1024)
    with DataLoader(dataset, batch_size=None, num_workers=4, prefetch_factor=2,
                    reorder_buffer=0, persistent_workers=True,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        most, firsts = _most_slabs_over_epochs(loader, 3)
        assert firsts == list(range(96)) * 3
        assert most <= (4 * 2 + 2) * 2**20, most / 2**20


def test_fresh_workers_of_each_epoch_are_lent_the_slabs_of_the_last():
    """With torch's default ``persistent_workers=False`` every epoch has new worker
    processes. The pool's slabs outlive them: the next epoch's workers are lent
    them (mapped, no new memory), where workers' own slabs went with them and
    every epoch made its slabs anew."""
    dataset = SlowEvery(24, kib=1024, every=1000, fast=0.001)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert sum(1 for _ in loader) == 24
        first, pool = loader.statistics(), slab_mappings()  # (the main process maps each once)
        got = [int(batch[0]) for batch in loader]
        second, grown = loader.statistics(), slab_mappings()
    assert got == list(range(24))
    made = (second.slab_batches - first.slab_batches) - round(
        second.slab_reuse_rate * second.slab_batches - first.slab_reuse_rate * first.slab_batches
    )
    assert second.slab_batches - first.slab_batches == 24
    # Every slab of the first epoch served the second. A new one was made only to
    # grow the pool, when the second epoch had more batches alive at once than the
    # first ever had (as a busy machine's timing may have it).
    assert pool and pool <= grown, (pool, grown)
    assert made == len(grown - pool), (made, len(grown - pool))


def test_a_task_that_cannot_be_sent_leaves_no_slab_counted_as_lent():
    """A task is given its slab (with the slab's descriptor, for a worker new to it)
    as it is sent. One whose index cannot be pickled is never sent, nor is the
    descriptor: the worker was still counted as mapping the slab, so each later
    task given it there came without the descriptor, and the worker made slabs
    anew. Each epoch's fresh workers are lent the slabs of the last, also after
    a batch that could not be sent."""
    from poolloader.errors import NotPicklableError

    sampler = OneUnpicklableIndex(24, epoch=1, position=0)
    dataset = SlowEvery(24, kib=1024, every=1000, fast=0.001)
    with DataLoader(dataset, batch_sampler=sampler, num_workers=2,
                    multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert sum(1 for _ in loader) == 24
        first = loader.statistics()
        got, failed = [], 0
        iterator = iter(loader)
        while True:
            try:
                got.append(int(next(iterator)[0, 0]))
            except StopIteration:
                break
            except NotPicklableError:
                failed += 1
        second = loader.statistics()
    assert failed == 1 and got == list(range(1, 24))
    made = (second.slab_batches - first.slab_batches) - round(
        second.slab_reuse_rate * second.slab_batches - first.slab_reuse_rate * first.slab_batches
    )
    assert made == 0, made


def test_fork_templates_do_not_keep_the_slabs_of_an_idle_loader():
    """NOTE [ Slabs across a fork ] in _slab_transport.py: with fork and torch's
    default ``persistent_workers=False``, each epoch's workers come from a template
    forked from the main process then, which inherited the pool's mappings and
    kept every slab alive after the idle loader closed them."""
    dataset = SlowEvery(12, kib=1024, every=1000, fast=0.001)
    with DataLoader(dataset, batch_size=None, num_workers=2,
                    multiprocessing_context="fork") as loader:  # fmt: skip
        for _ in range(3):
            assert sum(1 for _ in loader) == 12
        assert slab_maps() > 0
        wait_until(lambda: slab_maps() == 0)  # idle: the pool closed its slabs
        wait_until(lambda: child_slab_maps() == 0)
        assert loader.statistics().slab_bytes == 0


def _pool_with_one_free_slab(key):
    """A slab pool with one slab worker ``key`` made (a real memfd, its descriptor
    passed on the worker's connection), whose batch has died: the slab is free."""
    from multiprocessing import Pipe
    from multiprocessing.reduction import sendfds

    from poolloader._packing import InSlab, Slab, descriptor_socket, new_slab_id
    from poolloader._slab_transport import SlabTransport

    transport = SlabTransport(max_slabs=8, max_batch_bytes=None)
    ours, theirs = Pipe()
    transport.attach(key, ours)
    made = Slab(new_slab_id(), 1 << 16)
    with descriptor_socket(theirs) as sock:
        sendfds(sock, [made.fd])
    payload = InSlab(made.id, made.size, made.size, b"")
    transport.receive(key, 1, payload)
    transport.discard(key, payload)
    return transport, made, (ours, theirs)


def test_slabs_given_to_a_worker_its_template_never_reported_are_closed_not_given_again():
    """A worker whose template died between forking it and reporting its pid may
    still run and write into the slab its task was given: the slab leaves the pool.
    A worker known to have exited gives its slab back for the next task."""
    for exited in (True, False):
        transport, made, pipes = _pool_with_one_free_slab("orphan")
        try:
            assert transport.grant("orphan", 2).slab == made.id
            transport.detach("orphan", exited=exited)
            transport.attach("next", pipes[0])
            given = transport.grant("next", 1)
            if exited:
                assert given.slab == made.id and given.slab_size == made.size  # lent to it
            else:
                assert given.slab == 0 and given.may_make  # a new slab, made by "next"
                assert transport.mapped_bytes == 0
        finally:
            transport.close()
            made.close()
            for conn in pipes:
                conn.close()
