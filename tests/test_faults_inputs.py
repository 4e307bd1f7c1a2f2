"""Bad input gets a clear error: workers that cannot start, invalid arguments
(in torch's words where torch has them), batches that cannot travel home or are
too big.
"""

from __future__ import annotations

import dataclasses
import errno
import multiprocessing.context
import re
import threading
from typing import Any

import numpy as np
import pytest
import torch
from _datasets import Plain
from _faults import (
    EXIT_CODE,
    Carrying,
    CrashAtPickle,
    ErrorAtUnpickle,
    ExitAtUnpickle,
    Faulty,
    OpaqueItems,
    SegfaultAtUnpickle,
    always,
    collate_bad_result,
)
from _procs import (
    descendant_pids,
    fault_loader,
)

from poolloader import DataLoader
from poolloader.errors import (
    NotPicklableError,
    ResultTooLargeError,
    WorkerStartError,
)

# ------------------------------------------------------------------ start failures


def test_an_unpicklable_dataset_fails_at_the_first_iteration() -> None:
    """The dataset is pickled for the workers at iter(): NotPicklableError names
    the attribute; no process starts; without the culprit the loader works."""
    dataset = Carrying(CrashAtPickle())
    loader = fault_loader(dataset, batch_size=2)
    try:
        before = descendant_pids()
        with pytest.raises(NotPicklableError) as info:
            iter(loader)
        message = str(info.value)
        assert message.startswith("dataset.payload (part of dataset) cannot be pickled")
        assert "CrashAtPickle refuses to be pickled" in message
        assert descendant_pids() <= before
        dataset.payload = None
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    finally:
        loader.close()


def test_a_dataset_that_fails_to_unpickle_in_the_worker(start_method: str) -> None:
    """Unpickling raises where the dataset is unpickled (the process workers are
    forked from): WorkerStartError says which process, that it failed to start,
    and the original error and traceback."""
    with fault_loader(Carrying(ErrorAtUnpickle()), start_method, batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    message = str(info.value)
    who = r"The process DataLoader workers are forked from"
    assert re.match(who + r" \(pid \d+\) failed to start", message), message
    assert "_faults.CorruptStateError: the saved state is corrupt" in message
    assert "_raise_at_unpickle" in message  # the worker's traceback


@pytest.mark.parametrize(
    "payload, cause",
    [(ExitAtUnpickle(), f"exit code {EXIT_CODE}"), (SegfaultAtUnpickle(), "SIGSEGV")],
    ids=["exit", "segfault"],
)
def test_a_worker_that_dies_while_starting(payload: Any, cause: str) -> None:
    """A worker that vanishes while unpickling its dataset cannot report why;
    WorkerStartError still says it died while starting, and how."""
    with fault_loader(Carrying(payload), batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    message = str(info.value)
    assert "exited while starting" in message and cause in message, message


@pytest.mark.parametrize("payload", [ExitAtUnpickle(), SegfaultAtUnpickle()], ids=["exit", "segv"])
def test_a_worker_dying_while_starting_is_not_blamed_on_the_main_guard(payload: Any) -> None:
    with fault_loader(Carrying(payload), batch_size=2) as loader:
        with pytest.raises(WorkerStartError) as info:
            next(iter(loader))
    assert "__main__" not in str(info.value), str(info.value)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "options",
    [
        {"num_workers": -1},
        {"batch_size": 0},
        {"timeout": -1},
        {"prefetch_factor": 2},
        {"num_workers": 2, "multiprocessing_context": "no-such-method"},
        {"shuffle": True, "sampler": [0, 1]},
        {"batch_sampler": [[0]], "batch_size": 2},
        {"persistent_workers": True},
    ],
    ids=lambda options: ",".join(options),
)
def test_invalid_arguments_fail_as_torch_fails(options: dict[str, Any]) -> None:
    """Where torch refuses an argument, poolloader refuses it with torch's words."""
    with pytest.raises(Exception) as theirs:
        torch.utils.data.DataLoader(Faulty(4), **options)
    with pytest.raises(type(theirs.value)) as ours:
        DataLoader(Faulty(4), **options)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"max_worker_restarts": -1}, ValueError, "max_worker_restarts=-1"),
        ({"max_worker_restarts": 1.5}, TypeError, "max_worker_restarts=1.5"),
        ({"max_batch_bytes": -5}, ValueError, "max_batch_bytes=-5"),
        ({"reorder_buffer": "big"}, TypeError, "reorder_buffer='big'"),
        ({"transport": "zmq"}, ValueError, "transport='zmq'"),
        ({"seeding": "random"}, ValueError, "seeding='random'"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_invalid_poolloader_options_say_what_was_given(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """poolloader's own options: the right built-in, the value given, what is allowed."""
    with pytest.raises(error) as info:
        DataLoader(Faulty(4), **options)
    text = str(info.value)
    assert message in text and "but got" in text, text


def test_a_sampler_index_out_of_range_fails_in_torchs_words() -> None:
    """A sampler yields index 9 of a 4-item TensorDataset: torch's IndexError, naming
    the batch; the loader goes on."""
    dataset = torch.utils.data.TensorDataset(torch.arange(4))
    sampler = [0, 1, 9, 2]
    with pytest.raises(IndexError) as theirs:
        list(torch.utils.data.DataLoader(dataset, sampler=sampler))
    with fault_loader(dataset, sampler=sampler) as loader:
        got, error = [], None
        for_each = iter(loader)
        got += [next(for_each), next(for_each)]
        with pytest.raises(IndexError) as ours:
            next(for_each)
        got += list(for_each)
    first_line = str(ours.value).splitlines()[0]
    assert first_line == str(theirs.value)
    assert "indices [9]" in str(ours.value)
    assert [t.tolist() for (t,) in got] == [[0], [1], [2]]
    assert error is None


def test_items_default_collate_cannot_handle_fail_in_torchs_words() -> None:
    """Items of an unknown type: default_collate's TypeError, as torch words it."""
    with pytest.raises(TypeError) as theirs:
        list(torch.utils.data.DataLoader(OpaqueItems(), batch_size=2))
    with fault_loader(OpaqueItems(), batch_size=2) as loader:
        with pytest.raises(TypeError) as ours:
            list(loader)
    assert str(ours.value).splitlines()[0] == str(theirs.value)
    assert "default_collate: batch must contain tensors" in str(ours.value)
    assert "indices [0, 1]" in str(ours.value)


@pytest.mark.parametrize("transport", ["shm", "pickle"])
def test_a_batch_that_cannot_be_pickled_in_the_worker(transport: str) -> None:
    """collate_fn returns a batch holding a lock: a TypeError for that batch that
    names what failed to pickle and the batch; the loader goes on."""
    dataset = Faulty(8)
    collate = collate_bad_result("lock", bad=2)
    with fault_loader(dataset, batch_size=2, collate_fn=collate, transport=transport) as loader:
        iterator = iter(loader)
        assert next(iterator)["i"].tolist() == [0, 1]
        with pytest.raises(TypeError) as info:
            next(iterator)
        assert [b["i"].tolist() for b in iterator] == [[4, 5], [6, 7]]
    message = str(info.value)
    assert "cannot pickle '_thread.lock' object" in message
    assert "indices [2, 3]" in message


def test_an_unpicklable_batch_names_the_culprit() -> None:
    dataset = Faulty(4)
    with fault_loader(
        dataset, batch_size=2, collate_fn=collate_bad_result("lock", bad=0)
    ) as loader:
        with pytest.raises(NotPicklableError, match=r"\['lock'\]"):
            next(iter(loader))


def test_a_batch_that_fails_to_unpickle_in_the_main_process() -> None:
    """The batch pickles in the worker but its unpickling raises in the main
    process: that batch's error names the cause and the batch; the loader goes on."""
    dataset = Faulty(8)
    collate = collate_bad_result("unpickle", bad=2)
    with fault_loader(dataset, batch_size=2, collate_fn=collate) as loader:
        iterator = iter(loader)
        assert next(iterator)["i"].tolist() == [0, 1]
        with pytest.raises(Exception) as info:
            next(iterator)
        assert "the batch cannot be rebuilt" in str(info.value)
        assert "[2, 3]" in str(info.value)
        assert [b["i"].tolist() for b in iterator] == [[4, 5], [6, 7]]


@pytest.mark.parametrize("num_workers", [2, 0])
def test_a_batch_over_max_batch_bytes(num_workers: int) -> None:
    """One item is 4 MiB with max_batch_bytes=1 MiB: ResultTooLargeError (a
    ValueError) for that batch, naming the sizes and the fix; the loader goes on.
    Also in the main process, where no transport would need the limit."""
    dataset = Faulty(8, "huge", always(5))
    if num_workers:
        loader = fault_loader(dataset, batch_size=1, max_batch_bytes=1 << 20)
    else:
        loader = DataLoader(dataset, batch_size=1, max_batch_bytes=1 << 20)
    with loader:
        iterator = iter(loader)
        got = [next(iterator) for _ in range(5)]
        with pytest.raises(ResultTooLargeError) as info:
            next(iterator)
        got += list(iterator)
    assert [b["i"].tolist() for b in got] == [[0], [1], [2], [3], [4], [6], [7]]
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    # 4 MiB of "x" and the 8 bytes of the collated "i" tensor.
    assert "4194312 bytes" in message and "max_batch_bytes=1048576" in message
    assert "indices [5]" in message


@pytest.mark.parametrize(
    "options",
    [{"transport": "pickle"}, {"collate_fn": list}],
    ids=["pickle-transport", "many-small-tensors"],
)
def test_max_batch_bytes_holds_for_every_batch(options: dict[str, Any]) -> None:
    """Batches of 64 KiB with max_batch_bytes=32 KiB are refused whatever their
    layout: stacked and pickled, or four separate 16 KiB tensors (collate_fn=list)."""
    with fault_loader(Faulty(8), batch_size=4, max_batch_bytes=32 * 1024, **options) as loader:
        with pytest.raises(ResultTooLargeError):
            next(iter(loader))


@dataclasses.dataclass
class Held:
    """A batch class: its tensors are attributes, one inside a NumPy object array."""

    x: torch.Tensor
    parts: np.ndarray


def held_batch(items: list[dict[str, Any]]) -> Held:
    x = torch.stack([item["x"] for item in items])
    parts = np.empty(1, dtype=object)
    parts[0] = x.clone()
    return Held(x, parts)


@pytest.mark.parametrize("transport", ["pickle", "shm", None])
def test_max_batch_bytes_counts_tensors_inside_objects(transport: str | None) -> None:
    """A batch of 2 x 64 KiB held as a dataclass's attribute and inside an object
    array, with max_batch_bytes=96 KiB: refused by every transport, and in the main
    process (``None``), counting both tensors (pickling would send both)."""
    options: dict[str, Any] = {"batch_size": 4, "max_batch_bytes": 96 * 1024,
                               "collate_fn": held_batch}  # fmt: skip
    if transport is None:
        loader = DataLoader(Faulty(8), **options)
    else:
        loader = fault_loader(Faulty(8), transport=transport, **options)
    with loader:
        with pytest.raises(ResultTooLargeError, match="131072 bytes"):
            next(iter(loader))


class _CannotStart(multiprocessing.context.SpawnProcess):
    """A process the system refuses to start (fork's EAGAIN: too many processes)."""

    def start(self) -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


class _NoProcesses(multiprocessing.context.SpawnContext):
    Process = _CannotStart


def test_a_template_that_cannot_start_raises_that_and_leaves_nothing_open():
    """The template starts on a thread while the dataset is pickled: its failure
    reaches the caller of iter() as the system's error, and the pool's pipes and
    threads are closed (the leak check after each test looks)."""
    loader = DataLoader(Plain(8), batch_size=2, num_workers=2,
                        multiprocessing_context=_NoProcesses())  # fmt: skip
    with pytest.raises(BlockingIOError, match="Resource temporarily unavailable"):
        next(iter(loader))
    assert all(t.name != "poolloader-template-start" for t in threading.enumerate())
    loader.close()
