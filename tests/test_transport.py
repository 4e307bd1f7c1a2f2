"""The shared-memory slab transport: same batches, memory reused, nothing leaked."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from _compare import assert_same, assert_same_epochs
from _datasets import (
    DtypeZoo,
    Growing,
    LazyBits,
    Mixed,
    NumpyZoo,
    RegistersReducer,
    SizedParts,
    SlowFirst,
    as_is,
    keep_numpy,
    wrong_parts,
)
from _procs import slab_maps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolloader import DataLoader
from poolloader.errors import ResultTooLargeError


def _loader(dataset, **kwargs):
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("multiprocessing_context", "forkserver")
    return DataLoader(dataset, **kwargs)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_nested_batches_match_torch(transport):
    ours = _loader(Mixed(), batch_size=4, transport=transport)
    theirs = torch.utils.data.DataLoader(Mixed(), batch_size=4)
    with ours:
        assert_same_epochs(ours, theirs)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_conjugated_and_negated_views_arrive_with_their_values(transport):
    """A complex tensor's ``.conj()`` (as an STFT's conjugate is) and the ``.imag``
    of that are views whose conjugation or negation is a bit on the tensor, not in
    its memory. Shared memory carries the memory: torch's workers hand such a
    tensor over unconjugated, un-negated. Both transports give its values, its
    type and whether it needs grad."""
    expected = list(torch.utils.data.DataLoader(LazyBits(), batch_size=None))
    with _loader(LazyBits(), batch_size=None, transport=transport) as loader:
        got = list(loader)
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.keys() == theirs.keys()
        for key, tensor in theirs.items():
            assert type(ours[key]) is type(tensor), key
            assert ours[key].requires_grad == tensor.requires_grad, key
            assert torch.equal(ours[key].detach(), tensor.detach()), key


def test_numpy_arrays_stay_numpy_and_big_ones_use_slabs():
    with _loader(Mixed(n=48, side=128), batch_size=4, collate_fn=keep_numpy,
                 persistent_workers=True) as loader:  # fmt: skip
        for _ in range(3):
            for batch in loader:
                assert type(batch["arrays"]) is np.ndarray and batch["arrays"].dtype == np.int32
                assert batch["names"][0].startswith("utt")
        stats = loader.statistics()
    assert stats.slab_batches == 36
    assert stats.slab_reuse_rate > 0.6, stats


def _new_slabs(stats) -> int:
    return round(stats.slab_batches * (1 - stats.slab_reuse_rate))


def test_slabs_are_reused_in_steady_state():
    with _loader(Mixed(n=64, side=256), batch_size=4, persistent_workers=True) as loader:
        created = []
        for _ in range(4):
            for batch in loader:
                assert batch["image"].shape == (4, 256, 256)
            created.append(_new_slabs(loader.statistics()))
    # Slabs are created while the pipeline fills, then mostly reused: epochs 2 to
    # 4 move 48 batches with at most a third of them in new slabs (one per batch
    # without reuse). How many a worker needs at its busiest depends on timing (a
    # worker that runs ahead under a loaded machine holds more), hence the margin.
    assert created[-1] - created[0] <= 16, created
    assert created[-1] <= 32, created


def test_batches_kept_alive_fall_back_to_fresh_memory():
    want = [b["image"].clone() for b in torch.utils.data.DataLoader(Mixed(n=80), batch_size=2)]
    with _loader(Mixed(n=80), batch_size=2, reorder_buffer=2) as loader:
        kept = list(loader)  # every batch stays alive: slabs run out, nothing waits
    assert len(kept) == 40
    for got, expected in zip(kept, want):
        assert torch.equal(got["image"], expected)


def test_batches_larger_than_any_slab():
    with _loader(Growing(), batch_size=None) as loader:
        sizes = [b.shape[0] for b in loader]
        got = [b.clone() for b in loader]
    assert sizes == [1000 * (k + 1) for k in range(12)]
    want = list(torch.utils.data.DataLoader(Growing(), batch_size=None))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_dtypes_layouts_and_empty_tensors():
    ours = _loader(DtypeZoo(), batch_size=2)
    theirs = torch.utils.data.DataLoader(DtypeZoo(), batch_size=2)
    with ours:
        assert_same_epochs(ours, theirs, epochs=1)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_numpy_dtypes_and_layouts_arrive_as_torch_delivers_them(transport):
    """Structured and datetime dtypes, strings, Fortran order, small and big."""
    ours = _loader(NumpyZoo(), batch_size=None, collate_fn=as_is, transport=transport)
    theirs = torch.utils.data.DataLoader(NumpyZoo(), batch_size=None, collate_fn=as_is,
                                         num_workers=1)  # fmt: skip
    with ours:
        assert_same_epochs(ours, theirs, epochs=1)


def test_too_large_batch_is_an_error_and_the_loader_goes_on():
    with _loader(Growing(), batch_size=None, max_batch_bytes=200_000) as loader:
        iterator = iter(loader)
        assert next(iterator).shape == (1000, 16)
        assert next(iterator).shape == (2000, 16)
        assert next(iterator).shape == (3000, 16)
        with pytest.raises(ResultTooLargeError, match="more than max_batch_bytes=200000 allows"):
            next(iterator)
        with pytest.raises(ResultTooLargeError):
            next(iterator)


def test_delivered_tensors_are_views_of_a_slab_and_mappings_go_away():
    loader = _loader(Mixed(n=8, side=256), batch_size=4)
    batch = next(iter(loader))
    assert slab_maps() >= 1
    image = batch["image"]
    assert not image.is_shared()  # a view of a slab, not a torch shared-memory segment
    image += 1  # writable, and the slab is this batch's alone
    del batch
    loader.close()
    assert slab_maps() >= 1, "the tensor still holds its slab"
    del image
    assert slab_maps() == 0


def test_abandoned_epoch_releases_its_slabs():
    with _loader(Mixed(n=64, side=256), batch_size=4, persistent_workers=True) as loader:
        for i, _ in enumerate(loader):
            if i == 2:
                break
        batches = [b["image"].sum().item() for b in loader]
        stats = loader.statistics()
    assert len(batches) == 16
    # Slabs the abandoned batches held come back: were they lost, the second
    # epoch would make a new slab for most of its batches (reuse near 0.25).
    # A loaded machine delays releases and so costs a few extra slabs.
    assert stats.slab_reuse_rate >= 0.4, stats


def test_unknown_transport_is_refused():
    with pytest.raises(
        ValueError, match="transport should be 'shm' or 'pickle', but got transport='tcp'"
    ):
        DataLoader(Mixed(), transport="tcp")


def test_same_result_as_torch_for_collate_output_kept_in_slab():
    with _loader(Mixed(n=8, side=200), batch_size=4) as loader:
        got = [b["image"] for b in loader]
    want = [b["image"] for b in torch.utils.data.DataLoader(Mixed(n=8, side=200), batch_size=4)]
    for a, b in zip(got, want):
        assert_same(a, b)


def test_one_worker_may_fill_the_whole_window_with_slabs():
    """While worker 0 is stuck on batch 0, worker 1 loads every batch the window and
    its reorder buffer allow (20 here): each goes into a slab of worker 1's, none
    through fresh shared memory, and all arrive in order."""
    with _loader(SlowFirst(24), batch_size=None, reorder_buffer=16) as loader:
        got = [int(batch[0]) for batch in loader]
        stats = loader.statistics()
    assert got == list(range(24))
    assert stats.slab_batches == 24, stats


#: Items that grow past every slab while the consumer holds the slabs: the
#: worker falls back to fresh memory with part of the batch already collated
#: into a slab (NOTE [ Slab fallback ] in _packing.py).
GROWING = [65_536 * (k + 1) for k in range(24)]


def _check_every_batch(dataset, hold: int, **kwargs) -> None:
    kept: deque = deque(maxlen=hold + 1)
    with _loader(dataset, batch_size=1, **kwargs) as loader:
        for k, batch in enumerate(loader):
            kept.append((k, batch))
            for j, held in kept:
                assert not wrong_parts(held, j), (
                    f"batch {j}, checked at {k}: {wrong_parts(held, j)}"
                )


@pytest.mark.parametrize("transport", ["shm", "pickle"])
@pytest.mark.parametrize(
    "hold, kwargs",
    [(18, {"num_workers": 1}), (1, {"num_workers": 1, "prefetch_factor": 1, "reorder_buffer": 0})],
)
def test_batches_that_outgrow_held_slabs_arrive_intact(transport, hold, kwargs):
    _check_every_batch(SizedParts(GROWING), hold, transport=transport, **kwargs)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sizes=st.lists(st.integers(0, 400_000), min_size=1, max_size=24),
    parts=st.integers(1, 3),
    hold=st.integers(0, 20),
    workers=st.integers(1, 3),
    prefetch=st.integers(1, 3),
    reorder=st.sampled_from([0, 1, None]),
)
def test_every_batch_arrives_as_its_worker_built_it(sizes, parts, hold, workers, prefetch, reorder):
    """Whatever the sizes, however many batches the consumer holds, whatever the
    window: every batch holds what its worker built, as long as it is held."""
    _check_every_batch(
        SizedParts(sizes, parts), hold, num_workers=workers, prefetch_factor=prefetch,
        reorder_buffer=reorder,
    )  # fmt: skip


DESCRIPTOR_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from _datasets import SizedParts
from poolloader import DataLoader
from poolloader.errors import TransportError

if __name__ == "__main__":
    loader = DataLoader(SizedParts([300_000] * 40, parts=1), batch_size=1, num_workers=1,
                        transport={transport!r})
    iterator = iter(loader)
    kept = [next(iterator)]
    taken = []
    try:
        while True:
            taken.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        for batch in iterator:
            kept.append(batch)
        print("NO ERROR", len(kept))
    except TransportError as exc:
        print("ERROR", len(kept), str(exc).replace(chr(10), " "))
    for fd in taken:
        os.close(fd)
    del kept
    print("NEXT EPOCH", len(list(loader)), flush=True)
"""


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_running_out_of_descriptors_is_a_clear_error_not_a_hang(transport):
    """A main process with no file descriptor left cannot receive a new slab (or, with
    transport="pickle", a tensor's shared memory): the batch fails with an error that
    names the limit and the fix, within seconds, and the loader goes on."""
    import os
    import subprocess
    import sys

    script = DESCRIPTOR_SCRIPT.format(tests=os.path.dirname(__file__), transport=transport)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ERROR"), done.stdout + done.stderr
    assert "ulimit -n" in lines[0] and "Too many open files" in lines[0], lines[0]
    assert lines[1] == "NEXT EPOCH 40"


def _open_descriptors() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_held_slab_batches_cost_the_main_process_one_descriptor_per_slab():
    """NOTE [ File descriptors ] in _transport.py: the pool keeps one descriptor per
    slab, to lend it to the workers, and none per batch: a consumer that keeps
    every batch holds one for each slab its batches fill (at most the pool's
    size), and the descriptors that came with new slabs are not left open."""

    def slabs(loader) -> int:
        return loader.statistics().slab_bytes // 2**20  # 100 kB batches: 1 MiB slabs

    with _loader(SizedParts([100_000] * 30, parts=1), batch_size=1, num_workers=2) as loader:
        iterator = iter(loader)
        kept = [next(iterator)]
        before = _open_descriptors() - slabs(loader)
        kept += list(iterator)
        assert loader.statistics().slab_batches == 30
        assert slabs(loader) == 30  # the consumer holds every one
        assert _open_descriptors() - before == 30
        del kept
    assert _open_descriptors() <= before


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_tensors_that_cannot_be_laid_out_travel_as_torch_sends_them(transport):
    """Nested, sparse and quantized tensors, subclasses and Parameters arrive with
    their type, layout, grad flag and values. (torch's own loader delivers quantized
    tensors without their quantizer, unusable; poolloader keeps it.)"""
    from _datasets import Exotic, dense, keep_items

    dataset = Exotic()
    with _loader(dataset, batch_size=2, collate_fn=keep_items, transport=transport) as loader:
        got = [item for batch in loader for item in batch]
    assert len(got) == len(dataset)
    for i, item in enumerate(got):
        for key, value in item.items():
            original = dataset[i][key]
            assert type(value) is type(original), key
            assert value.layout == original.layout and value.is_nested == original.is_nested
            assert value.requires_grad == original.requires_grad, key
            a, b = dense(value), dense(original)
            pairs = zip(a, b, strict=True) if isinstance(a, list) else [(a, b)]
            assert all(torch.equal(x, y) for x, y in pairs), key


def test_views_of_a_batch_buffer_arrive_as_views_of_one_storage_as_with_torch():
    """Collated into the staging slab (a worker's batches after its first), views
    of one batch_buffer() keep their strides and share their storage."""
    from _datasets import Filled, views_of_batch_buffer

    def layout(batch):
        pointers = {v.untyped_storage().data_ptr() for v in batch.values()}
        return {k: (v.stride(), v.storage_offset(), v.shape) for k, v in batch.items()}, pointers

    theirs = torch.utils.data.DataLoader(Filled(), batch_size=4, num_workers=2,
                                         collate_fn=views_of_batch_buffer)  # fmt: skip
    with _loader(Filled(), batch_size=4, collate_fn=views_of_batch_buffer,
                 persistent_workers=True) as ours:  # fmt: skip
        for _ in range(2):
            for got, want in zip(ours, theirs, strict=True):
                (got_layout, got_storages), (want_layout, _) = layout(got), layout(want)
                assert got_layout == want_layout and len(got_storages) == 1
                assert all(torch.equal(got[k], want[k]) for k in got)
                got["whole"][0, 3] = -1.0
                assert got["head"][0, 3] == -1.0 and got["t"][3, 0] == -1.0  # one storage
            stats = ours.statistics()
    assert stats.slab_batches > 0, "no batch was collated into a slab: nothing was tested"


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_views_keep_their_strides_and_their_shared_storage_as_with_torch(transport):
    """NOTE [ Views ] in _skeleton.py: a view arrives with torch's strides and
    offset, and views of one storage in a batch share it, as torch's loader gives."""
    from _datasets import Views, keep_items

    def layout(item):
        storage = {k: v.untyped_storage().data_ptr() for k, v in item.items()}
        shares = {(a, b) for a in item for b in item if a < b and storage[a] == storage[b]}
        return {k: (v.stride(), v.storage_offset()) for k, v in item.items()}, shares

    theirs = torch.utils.data.DataLoader(Views(), batch_size=2, collate_fn=keep_items,
                                         num_workers=2)  # fmt: skip
    with _loader(Views(), batch_size=2, collate_fn=keep_items, transport=transport) as ours:
        for got, want in zip(ours, theirs, strict=True):
            for a, b in zip(got, want, strict=True):
                assert layout(a) == layout(b)
                assert all(torch.equal(a[k], b[k]) for k in a)
                a["base"][3, 0] = -1.0
                assert a["row"][0] == -1.0 and a["t"][0, 3] == -1.0  # one storage


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_size_one_and_empty_dimensions_keep_their_strides_as_with_torch(transport):
    """A contiguous tensor whose strides are not a new tensor's (a dimension of size
    1 or 0) arrives with its strides, as torch's loader delivers it."""
    from _datasets import SizeOneStrides, keep_items

    def layout(item):
        return {k: (tuple(v.shape), v.stride(), v.storage_offset()) for k, v in item.items()}

    theirs = torch.utils.data.DataLoader(SizeOneStrides(), batch_size=2, collate_fn=keep_items,
                                         num_workers=1)  # fmt: skip
    with _loader(
        SizeOneStrides(), batch_size=2, collate_fn=keep_items, transport=transport
    ) as ours:
        for got, want in zip(ours, theirs, strict=True):
            for a, b in zip(got, want, strict=True):
                assert layout(a) == layout(b)
                assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_window_of_a_big_storage_moves_only_the_window():
    """A view into a big tensor (a token window) travels as the part it reads, not as
    its 16 MB storage once per batch: the same values as torch's loader, a few KB
    moved per batch, and max_batch_bytes counts the window."""
    from _datasets import TokenWindows

    want = list(torch.utils.data.DataLoader(TokenWindows(), batch_size=None))
    with _loader(TokenWindows(), batch_size=None, max_batch_bytes=64_000) as ours:
        got = list(ours)
        moved = ours.statistics().bytes_moved
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert moved < 2 * sum(b.numel() * b.element_size() for b in want), moved
    assert all(b.untyped_storage().nbytes() < 8192 for b in got)


def test_views_of_one_storage_in_a_list_share_what_overlaps():
    """Views the batch holds of one big storage, each sent as the part it reads:
    those that overlap still arrive sharing memory (a write through one shows in
    the other, as with torch), and all hold torch's values."""
    from _datasets import TokenWindows, keep_items

    theirs = torch.utils.data.DataLoader(TokenWindows(), batch_size=3, collate_fn=keep_items)
    with _loader(TokenWindows(), batch_size=3, collate_fn=keep_items) as ours:
        for got, want in zip(ours, theirs, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            got[0][-1] = -1  # the last token of a window is the first of the next
            assert got[1][0] == -1 and got[2][0] != -1


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_view_into_a_storage_of_odd_size_arrives_as_with_torch(transport):
    """int16 samples viewed in bytes whose count is odd (a WAV file's): torch's loader
    delivers them; so does poolloader's."""
    from _datasets import OddWav

    want = list(torch.utils.data.DataLoader(OddWav(), batch_size=None))
    with _loader(OddWav(), batch_size=None, transport=transport) as ours:
        got = list(ours)
    assert all(torch.equal(a, b) and a.dtype == torch.int16 for a, b in zip(got, want, strict=True))


def test_numpy_arrays_that_overlap_in_a_batch_buffer_arrive_as_copies():
    """NumPy arrays arrive as copies, as torch pickles them: two slices of one
    batch_buffer that overlap are independent arrays in the main process too."""
    from _datasets import Ranges, overlapping_parts

    theirs = torch.utils.data.DataLoader(Ranges(), batch_size=8, collate_fn=overlapping_parts)
    with _loader(Ranges(), batch_size=8, collate_fn=overlapping_parts) as ours:
        assert ours.statistics().slab_batches == 0
        for got, want in zip(ours, theirs, strict=True):
            assert all(np.array_equal(got[k], want[k]) for k in want)
            before = got["rest"].copy()
            got["first"][...] = -1
            assert np.array_equal(got["rest"], before)
        assert ours.statistics().slab_batches > 0  # it was laid out in slabs


def test_items_on_another_device_are_collated_as_torch_does():
    """The default collate stacks CPU tensors into a slab; tensors on another device
    (here "meta", which runs without hardware) are stacked where they are, as torch's
    loader stacks them."""
    from _datasets import MetaTensors

    want = [(b.device.type, tuple(b.shape)) for b in torch.utils.data.DataLoader(
        MetaTensors(), batch_size=2)]  # fmt: skip
    with _loader(MetaTensors(), batch_size=2, num_workers=1) as ours:
        assert [(b.device.type, tuple(b.shape)) for b in ours] == want == [("meta", (2, 4))] * 2


def test_keeping_the_small_part_of_each_batch_keeps_no_slab():
    """A consumer that keeps each batch's labels (a 64 KB part of a 12 MB batch)
    keeps copies of them, not the batches' slabs: the workers go on reusing their
    slabs, and the labels hold their values."""
    from _datasets import ImagesWithLabels

    with _loader(ImagesWithLabels(), batch_size=16) as ours:
        labels = [batch["label"] for batch in ours]
        stats = ours.statistics()
    assert [int(t[k, 0]) for t in labels for k in range(16)] == list(range(16 * 40))
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in labels)
    # Labels that kept their batches' slabs would leave no slab free to reuse:
    # every batch would make a new one. How many a worker makes while another
    # runs late follows timing (NOTE [ Slab ageing ]), so half is the bound.
    assert stats.slab_batches == 40 and stats.slab_reuse_rate >= 0.5, stats


def test_a_reducer_registered_while_loading_is_used_as_with_torch():
    """A worker keeps one pickler for its batches (NOTE [ One pickler per worker ]),
    yet a reducer registered with multiprocessing's pickler after it packed some
    batches takes effect from the batch that registered it on, as with torch's
    loader, whose queue makes a pickler for every batch (there, batches fetched
    before may be pickled after it too: its queue pickles on a thread of its own)."""
    from _datasets import keep_items

    def hows(loader):
        return [item.how for batch in loader for item in batch]

    dataset = RegistersReducer(12, at=5)
    theirs = hows(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1,
                                              collate_fn=keep_items))  # fmt: skip
    assert theirs[4:] == ["reduced"] * 8
    with _loader(dataset, batch_size=2, num_workers=1, collate_fn=keep_items) as ours:
        assert hows(ours) == ["plain"] * 4 + ["reduced"] * 8


def test_batches_torch_pickles_never_take_a_slab_with_them():
    """A batch part the skeleton cannot describe goes through torch's reducers: a
    subclass stacked by the default collate, a ``batch_buffer()`` that needs grad or
    is viewed as a subclass. Those must not send a slab's storage (whose mapping
    has no descriptor to send): every batch of two epochs in one worker, its slabs
    reused, arrives as torch's loader delivers it, type, grad flag and attributes
    too."""
    from _compare import assert_like_torch_batch_by_batch
    from _datasets import SubclassAndPlain, into_batch_buffer_as_is

    dataset = SubclassAndPlain(24)
    for collate_fn in [None, into_batch_buffer_as_is]:
        theirs = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn))
        with _loader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                     collate_fn=collate_fn) as loader:  # fmt: skip
            assert_like_torch_batch_by_batch(loader, theirs)
            if collate_fn is not None:
                notes = [batch["sub"].note for batch in loader]
                assert notes == [list(range(k, k + 4)) for k in range(0, 24, 4)]


FILE_SYSTEM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from _compare import assert_like_torch_batch_by_batch
from _datasets import SubclassAndPlain, into_batch_buffer_as_is, share_by_file_system
from poolloader import DataLoader

if __name__ == "__main__":
    dataset = SubclassAndPlain(24)
    kept = []
    for collate_fn in [None, into_batch_buffer_as_is]:
        theirs = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn))
        with DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                        collate_fn=collate_fn, worker_init_fn=share_by_file_system) as loader:
            assert_like_torch_batch_by_batch(loader, theirs)
            kept.append(next(iter(loader)))
    del kept  # freed after the loaders closed: torch's shared-memory manager still serves
    print("OK", flush=True)
"""


def test_torch_file_system_sharing_in_workers_neither_moves_a_slab_nor_ends_torchs_manager():
    """With torch's ``file_system`` strategy in the workers (what the error on running
    out of descriptors suggests), torch's reducer moves a storage into new shared
    memory in place: given a slab's, later batches in that slab went where the main
    process does not read. And torch's shared-memory manager, started by a worker,
    serves the main process too: ended with the worker's processes, it took the
    main process down (libshm aborts) when that freed a batch after ``close()``.
    Batches arrive intact, the process exits cleanly, no shared memory is left."""
    import os
    import subprocess
    import sys
    import time

    before = set(os.listdir("/dev/shm"))
    script = FILE_SYSTEM_SCRIPT.format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "OK\n", done.stdout + done.stderr
    deadline = time.monotonic() + 30  # torch's manager removes its files as it exits
    while (left := set(os.listdir("/dev/shm")) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name in left if name.startswith("torch_")], left


STRATEGY_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from _datasets import SharingStrategySeen
from poolloader import DataLoader

if __name__ == "__main__":
    torch.multiprocessing.set_sharing_strategy("file_system")
    with DataLoader(SharingStrategySeen(), batch_size=4, num_workers=2, transport="pickle",
                    multiprocessing_context="spawn") as loader:
        for k, batch in enumerate(loader):
            values = batch["x"][:, 0].tolist()
            print(batch["strategy"], values == [4.0 * k + j for j in range(4)])
"""


def test_workers_share_by_the_strategy_the_main_process_set_as_torchs_fork_workers_do():
    """Running out of descriptors, the error (and torch's own advice) says to call
    ``torch.multiprocessing.set_sharing_strategy("file_system")``. torch's fork
    workers inherit that from the main process; spawn and forkserver workers
    started with the default, so the advice did nothing. Each worker now shares
    tensors by the strategy the main process had when the pool started."""
    import os
    import subprocess
    import sys

    script = STRATEGY_SCRIPT.format(tests=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = ["['file_system', 'file_system', 'file_system', 'file_system'] True"] * 2
    assert done.stdout.splitlines() == want, done.stdout + done.stderr
