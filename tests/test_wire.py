"""What travels on a worker's connection: the hot messages' short form, and tiny
batches that travel inside their message."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _compare import assert_same_epochs
from torch.utils.data import Dataset

from poolloader import DataLoader
from poolloader._messages import Done, Forget, Sync, Task
from poolloader._packing import Inline, InSlab, Pickled
from poolloader._wire import decode, encode, recv, send


@pytest.mark.parametrize(
    "message",
    [
        Task(7, 2, 31, [4, 5, 6, 7]),
        Task(8, 0, 0, (1, "a", None)),  # a tuple index, as a custom sampler may yield
        Task(9, 1, 3, {"ids": np.arange(3)}),
        Task(10, 1, 4, [8, 9], 123456789, 1 << 20, True),  # names a slab new to the worker
        Task(11, 1, 5, [10, 11], 0, 0, False),  # may not make a slab
        Done(3, Inline(b"skeleton"), 32, 0.25),
        Done(4, Pickled(b"data"), 1 << 20, 0.5),
        Done(5, InSlab(1, 4096, 512, b"skeleton"), 512, 0.125),
        Forget((3, 4)),
        Sync(12),
    ],
    ids=lambda m: type(m).__name__,
)
def test_messages_arrive_as_they_were_sent(message):
    got = decode(encode(message))
    assert type(got) is type(message)
    if isinstance(message, Task) and isinstance(message.index, dict):
        assert (got.seq, got.epoch, got.position) == (message.seq, message.epoch, message.position)
        np.testing.assert_array_equal(got.index["ids"], message.index["ids"])
    else:
        assert got == message


def test_hot_messages_travel_short_and_others_as_themselves():
    """A Task and a Done with an inline batch name no class on the wire."""
    for hot in (Task(1, 0, 0, [1, 2]), Done(1, Inline(b"x"), 8, 0.0)):
        assert b"poolloader" not in encode(hot)
    assert b"poolloader" in encode(Sync(1))


@pytest.mark.parametrize("size", [0, 1, 100, 16384, 16385, 3 << 20])
def test_messages_are_framed_as_connections_frame_them(size):
    """send/recv and Connection.send_bytes/recv_bytes read each other's messages
    (NOTE [ Framing ]), including one bigger than the socket's buffer."""
    import multiprocessing
    import os
    import threading

    ours, theirs = multiprocessing.Pipe()
    data = os.urandom(size)
    try:
        for sender, receiver in [
            (send, theirs.recv_bytes),
            (ours.send_bytes, lambda: recv(theirs)),
        ]:
            writer = threading.Thread(
                target=sender, args=(ours, data) if sender is send else (data,)
            )
            writer.start()
            assert receiver() == data
            writer.join()
        # Messages back to back arrive one by one, none read into the next.
        for n in (3, 0, 5):
            send(ours, bytes([n]) * n)
        assert [recv(theirs) for _ in range(3)] == [b"\3" * 3, b"", b"\5" * 5]
    finally:
        ours.close()
    with pytest.raises(EOFError):
        recv(theirs)
    with pytest.raises(OSError):
        send(ours, b"x")
    theirs.close()


def test_a_tuple_that_is_no_message_is_refused():
    with pytest.raises(ValueError, match="not a poolloader message"):
        decode(pickle.dumps((99, 1, 2)))


class TinyZoo(Dataset):
    """Tiny tensors (they travel inside the batch's message) of every shape."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        base = torch.arange(6, dtype=torch.float32) + i
        return {
            "scalar": torch.tensor(i),
            "flat": base,
            "matrix": base.view(2, 3),
            "strided": base.view(2, 3).t(),
            "empty": torch.empty(0, 2),
            "bool": base.to(torch.int64) % 2 == 0,
            "bf16": base.to(torch.bfloat16),
            "c64": torch.complex(base, -base),
            "u8": base.to(torch.uint8),
        }


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_tiny_tensors_of_every_shape_arrive_as_torch_delivers_them(transport):
    ours = DataLoader(TinyZoo(), batch_size=3, num_workers=2, transport=transport,
                      multiprocessing_context="forkserver")  # fmt: skip
    theirs = torch.utils.data.DataLoader(TinyZoo(), batch_size=3)
    with ours:
        assert_same_epochs(ours, theirs, epochs=1)
        batch = next(iter(ours))
    assert batch["scalar"].shape == (3,) and batch["empty"].shape == (3, 0, 2)
    assert batch["matrix"].shape == (3, 2, 3) and batch["bf16"].dtype == torch.bfloat16


class TinyViews(Dataset):
    """Tiny tensors that are views with lazy bits (conjugate, negative) or strides,
    returned as they are (``batch_size=None``)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        z = torch.complex(torch.arange(6.0) + i, torch.ones(6))
        return {
            "conj": z.conj(),
            "neg": torch._neg_view(z),
            "strided": (torch.arange(6.0) + i).view(2, 3).t(),
            "scalar": torch.tensor(float(i)),
        }


def test_tiny_views_arrive_with_their_values():
    """(Not with ``transport="pickle"``: torch's own workers send a conjugate or
    negative view's storage without the bit, and that transport is torch's.)"""
    ours = DataLoader(TinyViews(), batch_size=None, num_workers=2,
                      multiprocessing_context="forkserver")  # fmt: skip
    theirs = torch.utils.data.DataLoader(TinyViews(), batch_size=None)
    with ours:
        for got, want in zip(ours, theirs, strict=True):
            for key in want:
                assert torch.equal(got[key].resolve_conj().resolve_neg(),
                                   want[key].resolve_conj().resolve_neg()), key  # fmt: skip
                assert got[key].shape == want[key].shape, key
