"""Errors from workers come home intact; bad input fails early and clearly."""

from __future__ import annotations

import functools
import textwrap
import threading

import pytest
import torch
from _datasets import (
    Failing,
    FailsAt,
    HoldsLock,
    Plain,
    Sleepy,
    SlowToUnpickle,
    StopsAt,
    sleep_in_init,
)

from poolloader import DataLoader
from poolloader.errors import LoaderTimeoutError, NotPicklableError, RemoteTraceback


def _loader(dataset, **kwargs):
    kwargs.setdefault("num_workers", 2)
    kwargs.setdefault("multiprocessing_context", "forkserver")
    return DataLoader(dataset, **kwargs)


def test_dataset_exception_keeps_its_type_and_says_where():
    with _loader(Failing(bad=5), batch_size=2) as loader:
        iterator = iter(loader)
        assert next(iterator).tolist() == [0, 1]
        assert next(iterator).tolist() == [2, 3]
        with pytest.raises(ValueError) as info:
            next(iterator)
        message = str(info.value)
        assert "item 5 is corrupt" in message
        assert "while loading batch 2 with indices [4, 5]" in message
        assert "DataLoader worker" in message and "pid" in message
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "__getitem__" in cause.tb and "ValueError: item 5 is corrupt" in cause.tb
        # The iterator goes on with the next batch, as torch's does.
        assert next(iterator).tolist() == [6, 7]
        # And the loader works for another epoch.
        assert len(list(_skip_errors(loader))) == 5


@pytest.mark.parametrize("batch_size", [2, None])
def test_an_iterable_datasets_error_says_which_batch_without_indices(batch_size):
    """An IterableDataset's batches have no indices (torch's sampler yields None for
    each item): the message said "with indices [None, None]"."""
    with _loader(FailsAt(bad=5), batch_size=batch_size) as loader:
        with pytest.raises(ValueError) as info:
            list(loader)
    message = str(info.value)
    assert "record 5 is corrupt" in message
    assert "while loading batch" in message and "indices" not in message, message


def _skip_errors(loader):
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except ValueError:
            continue


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_iteration_from_a_map_style_dataset_is_an_error_not_the_end(num_workers):
    """torch's loader ends the epoch without a word when __getitem__ raises
    StopIteration, dropping the batches left; poolloader raises, with or without
    workers, and the epoch goes on after it as after any other error."""
    theirs = [b.tolist() for b in torch.utils.data.DataLoader(StopsAt(), batch_size=2)]
    assert theirs == [[0, 1], [2, 3]]  # the epoch's other four batches dropped silently
    context = "forkserver" if num_workers else None
    with DataLoader(StopsAt(), batch_size=2, num_workers=num_workers,
                    multiprocessing_context=context) as loader:  # fmt: skip
        iterator, got = iter(loader), []
        with pytest.raises(RuntimeError, match="raised StopIteration") as info:
            while True:
                got.append(next(iterator).tolist())
        assert "batch 2" in str(info.value) or num_workers == 0
        got += [b.tolist() for b in iterator]
    assert got == [[0, 1], [2, 3], [6, 7], [8, 9], [10, 11]]


def test_key_error_message_reads_as_text():
    with _loader(Failing(bad=-1, missing=3), batch_size=None) as loader:
        with pytest.raises(KeyError) as info:
            list(loader)
    text = str(info.value)
    assert text.startswith("utt3\n(raised in DataLoader worker"), text


class HoldsALockError(Exception):
    """An exception that does not pickle (it holds a lock), of a class that does."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _raise_holding_a_lock(batch):
    raise HoldsALockError("item 3 is corrupt")


def test_an_exception_that_does_not_pickle_keeps_its_class_as_with_torch():
    """torch rebuilds every worker exception from its class and message, so
    ``except HoldsALockError`` catches it there; it must here too."""
    with pytest.raises(HoldsALockError, match="item 3 is corrupt"):
        next(iter(torch.utils.data.DataLoader(Plain(4), batch_size=2, num_workers=1,
                                              collate_fn=_raise_holding_a_lock)))  # fmt: skip
    with _loader(Plain(4), batch_size=2, collate_fn=_raise_holding_a_lock) as loader:
        with pytest.raises(HoldsALockError, match="item 3 is corrupt") as info:
            next(iter(loader))
    assert "HoldsALockError: item 3 is corrupt" in str(info.value.__cause__)  # its traceback


def test_exception_that_cannot_be_rebuilt_becomes_runtime_error():
    with _loader(Plain(4), batch_size=2, collate_fn=_raise_unpicklable) as loader:
        with pytest.raises(RuntimeError, match=r"_tests_local\..*Unpicklable: cannot rebuild me"):
            next(iter(loader))


def _raise_unpicklable(batch):
    class Unpicklable(Exception):
        pass

    Unpicklable.__module__ = "_tests_local"
    raise Unpicklable("cannot rebuild me")


def test_lambda_collate_fn_fails_at_construction():
    with pytest.raises(NotPicklableError) as info:
        DataLoader(Plain(4), num_workers=2, collate_fn=lambda batch: batch)
    message = str(info.value)
    assert message.startswith("collate_fn cannot be pickled")
    assert "at module level" in message
    assert isinstance(info.value, TypeError)


def test_a_class_defined_in_a_function_is_named_with_the_fix():
    """The commonest newcomer mistake: a dataset (or a transform) class defined
    inside main(); and a partial over a lambda, whose lambda is named."""

    class Local(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

    with pytest.raises(NotPicklableError) as info:
        iter(_loader(Local(), multiprocessing_context="forkserver"))
    message = str(info.value)
    assert message.startswith("dataset cannot be pickled, but workers started with spawn or ")
    assert (
        "with multiprocessing_context='fork', torch's default on Linux, workers inherit" in message
    )
    assert "test_a_class_defined_in_a_function_is_named_with_the_fix.<locals>.Local" in message
    assert "define it at module level" in message and "Open files" not in message
    with pytest.raises(NotPicklableError) as info:
        _loader(Plain(4), collate_fn=functools.partial(lambda batch, k: batch, k=1))
    assert str(info.value).startswith("collate_fn.func (part of collate_fn) cannot be pickled")
    assert "lambdas and functions defined inside other functions" in str(info.value)


def test_dataset_holding_a_lock_names_the_attribute():
    loader = DataLoader(HoldsLock(), num_workers=1)
    with pytest.raises(NotPicklableError) as info:
        iter(loader)
    message = str(info.value)
    assert message.startswith("dataset.reader.lock (part of dataset) cannot be pickled")
    assert "lock" in message and "worker_init_fn" in message
    loader.close()


def test_unpicklable_batch_from_worker():
    with _loader(Plain(4), batch_size=2, collate_fn=_generator_batch) as loader:
        with pytest.raises(TypeError, match="cannot pickle 'generator' object"):
            next(iter(loader))


def _generator_batch(batch):
    return (x for x in batch)


def test_timeout_names_the_batch():
    with _loader(Sleepy(slow=2, seconds=30), batch_size=2, timeout=1) as loader:
        iterator = iter(loader)
        assert next(iterator).tolist() == [0, 1]
        with pytest.raises(LoaderTimeoutError) as info:
            next(iterator)
    message = str(info.value)
    assert message.startswith("DataLoader timed out after 1 seconds waiting for batch 1")
    assert "indices [2, 3]) at worker 1. Raise `timeout`" in message
    assert "__getitem__" in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, TimeoutError)


@pytest.mark.parametrize(
    "slow, where, look",
    [("unpickling", "the process workers are forked from is still starting",
      "quicker to unpickle"),
     ("worker_init_fn", "worker 0 is still starting", "a worker_init_fn that hangs")],
)  # fmt: skip
def test_timeout_says_when_the_worker_has_not_started(slow, where, look):
    """A timeout counts from the first batch asked for, as torch's does, the
    workers' start included: the message must not blame __getitem__ then."""
    if slow == "unpickling":
        loader = _loader(SlowToUnpickle(8, seconds=4), batch_size=2, timeout=1)
    else:
        loader = _loader(Plain(8), batch_size=2, timeout=1, worker_init_fn=sleep_in_init)
    with loader, pytest.raises(LoaderTimeoutError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "waiting for batch 0 (indices [0, 1]) (" in message
    assert where in message and look in message and "__getitem__" not in message


def test_unpicklable_index_from_sampler():
    sampler = [[0, 1], [_Local()]]
    with _loader(Plain(4), batch_sampler=sampler) as loader:
        iterator = iter(loader)
        with pytest.raises(NotPicklableError, match="the index of batch 1"):
            next(iterator)
            next(iterator)


class _Local:
    def __reduce__(self):
        raise TypeError("no pickling for you")


def test_index_out_of_range_comes_back_as_index_error():
    with _loader(list(range(4)), batch_sampler=[[0, 1], [2, 9]]) as loader:
        iterator = iter(loader)
        next(iterator)
        with pytest.raises(IndexError, match=r"list index out of range\n.*indices \[2, 9\]"):
            next(iterator)


def test_broadcast_of_a_lambda_fails_at_the_call():
    with _loader(Plain(4)) as loader:
        with pytest.raises(
            NotPicklableError, match=r"^the broadcast function .*<lambda> cannot be pickled"
        ):
            loader.broadcast(lambda ds: None)


def test_assigning_an_unpicklable_value_fails_and_changes_nothing():
    import threading

    dataset = Plain(4)
    with _loader(dataset, batch_size=None) as loader:
        list(loader)
        with pytest.raises(NotPicklableError, match=r"^dataset\.scale cannot be pickled"):
            loader.dataset.scale = threading.Lock()
        assert dataset.scale == 1
        assert list(loader) == [0, 1, 2, 3]


#: How the scripts below end: the first batch, or the start error printed.
FIRST_BATCH = """\
loader = DataLoader({dataset}, batch_size=2, num_workers=1)
try:
    next(iter(loader))
except WorkerStartError as exc:
    print("WorkerStartError:", exc)
finally:
    loader.close()
"""

NO_MAIN_GUARD = """
import sys
sys.path.insert(0, {tests!r})
from _datasets import Plain
from poolloader import DataLoader
from poolloader.errors import WorkerStartError

""" + FIRST_BATCH.format(dataset="Plain(4)")


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path):
    """The classic spawn mistake: the worker imports the script, whose module-level
    loader tries to start workers of its own. The worker exits with code 1 before it
    can report; the error says so and names the fix."""
    import os
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD.format(tests=os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    # The template process, which workers are forked from, is the first to import it.
    assert "WorkerStartError: The process DataLoader workers are forked from" in done.stdout, (
        done.stdout + done.stderr
    )
    assert "exited while starting (exit code 1)" in done.stdout
    assert "if __name__ == '__main__':" in done.stdout


GUARDED = """
import sys
sys.path.insert(0, {tests!r})
from _datasets import Plain
from poolloader import DataLoader
from poolloader.errors import WorkerStartError

if __name__ == "__main__":
""" + textwrap.indent(FIRST_BATCH.format(dataset="Plain(4)"), "    ")


def test_a_script_fed_on_standard_input_is_told_why_workers_cannot_start():
    """`python - < script.py`: the guard is there, but spawn workers cannot import
    a main module that is no file; the main-guard advice would mislead."""
    import os
    import subprocess
    import sys

    code = GUARDED.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120
    )
    assert "exited while starting (exit code 1)" in done.stdout, done.stdout + done.stderr
    assert "a script fed on standard input" in done.stdout
    assert "Save it as a .py file" in done.stdout and "__name__" not in done.stdout


CLASS_IN_GUARD = """
import torch
from poolloader import DataLoader
from poolloader.errors import WorkerStartError

if __name__ == "__main__":
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

""" + textwrap.indent(FIRST_BATCH.format(dataset="Items()"), "    ")


def test_a_class_defined_under_the_main_guard_is_told_where_it_must_go(tmp_path):
    """The script is a file, so the fix is not a module of its own: it is to define
    the class at the script's top level, outside the guard."""
    import subprocess
    import sys

    script = tmp_path / "class_in_guard.py"
    script.write_text(CLASS_IN_GUARD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "WorkerStartError:" in done.stdout, done.stdout + done.stderr
    assert "Can't get attribute 'Items'" in done.stdout
    assert "define them at the top level of the script, not inside that block" in done.stdout
