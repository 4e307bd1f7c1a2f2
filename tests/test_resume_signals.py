"""``state_dict()`` taken while ``next()`` runs: from a signal handler (a cluster's
pre-emption signal that saves a checkpoint, as Lightning's SLURM handler does), or
after a Ctrl-C caught around ``next()``. The state must describe the batches the
caller has had, no more: a batch counted inside ``next()`` and not yet returned
is not the caller's, and a resume that skips it never trains on it."""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _datasets import Counted, Failing, Plain, Sleepy
from _procs import collector_held

import poolloader
from poolloader.samplers import DynamicBatchSampler

PACKAGE = str(Path(poolloader.__file__).parent) + os.sep
LENGTHS = [float(1 + (i * 7) % 13) for i in range(60)]
#: The parts of a state that say where the epoch is (``drawn`` and ``limits`` say
#: how far the sampler was read ahead, which moves inside next()).
WHERE = ("yielded", "yielded_after", "sampler", "rng")


def _samplers(kind: str) -> dict[str, Any]:
    if kind == "replayed":  # torch's samplers: resumed by drawing again under the saved RNG
        return {"batch_size": 3, "shuffle": True, "generator": torch.Generator().manual_seed(7)}
    # a poolloader sampler: resumed from its own state_dict
    return {"batch_sampler": DynamicBatchSampler(LENGTHS, max_duration=20.0, seed=3)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _where(state: dict[str, Any]) -> dict[str, Any]:
    where = {key: state["in_epoch"].get(key) for key in WHERE}
    if where["rng"] is not None:  # ("undrawn": the same random state, before the first draw)
        where["rng"] = {k: v for k, v in where["rng"].items() if k != "undrawn"}
    return where


def _states_inside_each_next(
    loader: poolloader.DataLoader, iterator: Iterator[Any]
) -> Iterator[tuple[list[int], dict[str, Any], list[dict[str, Any]], list[int]]]:
    """For each next() of ``iterator``'s epoch: the items the caller had before it
    (its batches' items in order), the state taken right before it, the states
    taken inside it, one as each C call made by poolloader's code returns (where a
    signal handler runs), and the batch it returned."""
    had: list[int] = []
    while True:
        before = loader.state_dict()
        try:
            batch, inside = _states_inside(loader, lambda: next(iterator))
        except StopIteration:
            return
        yield list(had), before, inside, batch.tolist()
        had.extend(batch.tolist())


def _states_inside(loader: poolloader.DataLoader, call: Any) -> tuple[Any, list[dict[str, Any]]]:
    """What ``call()`` returns, and the states of ``loader`` taken inside it, one as
    each C call made by poolloader's code returns (where a signal handler runs)."""
    inside: list[dict[str, Any]] = []

    def take_state(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and frame.f_code.co_filename.startswith(PACKAGE):
            inside.append(loader.state_dict())  # (the profile hook is off in its own calls)

    sys.setprofile(take_state)
    try:
        return call(), inside
    finally:
        sys.setprofile(None)


def _raised(call: Any) -> BaseException | None:
    """What ``call()`` raised (an Exception), or None."""
    try:
        call()
    except Exception as exc:
        return exc
    return None


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["replayed", "own_state"])
def test_a_state_taken_inside_next_leaves_out_the_batch_next_has_not_returned(
    num_workers: int, kind: str
) -> None:
    """Every state taken inside next() is the state taken before it: the batch next()
    is handing over counts once next() returns it. And resuming from the last state
    taken inside a next() gives that next()'s batch first. Before, a state taken
    after the batch was counted and before next() returned it said the caller had
    it: a resume from that checkpoint skipped it."""
    with poolloader.DataLoader(Plain(60), num_workers=num_workers, **_samplers(kind)) as loader:
        for _ in loader:  # (the second epoch is observed: a state's epoch is not the first)
            pass
        taken = 0
        resume_from: tuple[list[int], dict[str, Any]] | None = None
        observed: list[int] = []
        for had, before, inside, batch in _states_inside_each_next(loader, iter(loader)):
            assert inside, "no state was taken inside next()"
            for state in inside:
                assert _same(_where(state), _where(before)), (len(had), _where(state))
            taken += len(inside)
            if len(had) > 12 and resume_from is None:
                resume_from = had, inside[-1]
            observed = had + batch
        assert taken > 100
        rest = [i for b in loader for i in b.tolist()]  # after the observed epoch
    assert resume_from is not None
    had, state = resume_from
    with poolloader.DataLoader(Plain(60), num_workers=0, **_samplers(kind)) as fresh:
        fresh.load_state_dict(state)
        resumed = [i for b in fresh for i in b.tolist()]
        following = [i for b in fresh for i in b.tolist()]
    assert had + resumed == observed
    assert following == rest


def test_a_state_taken_inside_next_out_of_order_leaves_out_the_batch_in_hand() -> None:
    """``in_order=False``: the batches after a slow one reach the caller first, and
    the slow one, when it comes, moves the count past all of them at once. States
    taken inside each next() are still the state before it, and a resume from any
    of them gives each batch the caller had not had, once."""
    dataset = Sleepy(24, slow=5, seconds=0.5)
    with poolloader.DataLoader(dataset, batch_size=1, num_workers=2, in_order=False) as loader:
        states: list[tuple[list[int], dict[str, Any]]] = []
        observed: list[int] = []
        for had, before, inside, batch in _states_inside_each_next(loader, iter(loader)):
            for state in inside:
                assert _same(_where(state), _where(before)), (had, _where(state))
            states += [(had, inside[0]), (had, inside[-1])]
            observed = had + batch
    assert observed != sorted(observed), "no batch came out of order"
    assert sorted(observed) == list(range(24))
    late = observed.index(5)
    for had, state in states[2 * late : 2 * late + 4]:  # around the slow batch's next()
        with poolloader.DataLoader(Plain(24), batch_size=1, num_workers=0) as fresh:
            fresh.load_state_dict(state)
            resumed = [int(b) for b in fresh]
        assert sorted(had + resumed) == list(range(24)), (had, resumed)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_taken_while_a_resumed_stream_loads_its_yielded_batches_again_is_the_saved_one(
    num_workers: int,
) -> None:
    """Resuming an IterableDataset's epoch loads the batches the saved epoch had
    yielded once more and drops them, inside the first next(). A state taken before
    that next() returns (right after iter(), or in a signal handler) said this epoch
    had yielded nothing: a resume from it gave those batches a second time."""

    def make() -> poolloader.DataLoader:
        return poolloader.DataLoader(Counted(26), batch_size=2, num_workers=num_workers)

    with make() as loader:
        reference = [b.tolist() for b in loader]
        iterator = iter(loader)
        seen = [next(iterator).tolist() for _ in range(4)]
        saved = loader.state_dict()
        del iterator
    with make() as again, pytest.warns(UserWarning, match="loads again the 4 batch"):
        again.load_state_dict(saved)
        iterator = iter(again)
        right_after_iter = again.state_dict()
        _, before, inside, first = next(_states_inside_each_next(again, iterator))
        for state in [right_after_iter, before, *inside]:
            assert _same(_where(state), _where(saved)), _where(state)
        assert first == reference[4]
        del iterator
    with make() as third, pytest.warns(UserWarning, match="loads again the 4 batch"):
        third.load_state_dict(right_after_iter)
        rest = [b.tolist() for b in third]
    assert seen + rest == reference


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_a_state_taken_inside_iter_is_the_state_before_it(
    num_workers: int, persistent: bool
) -> None:
    """iter() takes a loaded state (or a persistent loader's base seed) off the loader
    well before the new epoch is in place, and starting workers takes seconds. A
    state taken in between said a resumed epoch was starting afresh: a resume from
    it gave again the batches yielded before the state was saved. Every state taken
    inside iter() is now the one taken right before it: fresh, for a later epoch,
    and resumed."""

    def make() -> poolloader.DataLoader:
        return poolloader.DataLoader(
            Plain(20), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5),
            num_workers=num_workers, persistent_workers=persistent,
        )  # fmt: skip

    def checked_iter(loader: poolloader.DataLoader) -> tuple[Any, dict[str, Any]]:
        before = loader.state_dict()
        iterator, inside = _states_inside(loader, lambda: iter(loader))
        assert len(inside) > 5
        for state in inside:
            assert _same(state, before), (state, before)
        return iterator, inside[-1]

    with make() as loader:
        first, _ = checked_iter(loader)
        epoch0 = [next(first).tolist() for _ in range(3)]
        saved = loader.state_dict()
        epoch0 += [b.tolist() for b in first]
        second, _ = checked_iter(loader)
        epoch1 = [b.tolist() for b in second]
    with make() as resumed:
        resumed.load_state_dict(saved)
        iterator, inside_iter = checked_iter(resumed)
        del iterator
    with make() as again:
        again.load_state_dict(inside_iter)
        assert [b.tolist() for b in again] == epoch0[3:]
        assert [b.tolist() for b in again] == epoch1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_taken_between_any_two_lines_of_the_ledger_leaves_the_epoch_whole(
    num_workers: int,
) -> None:
    """A signal lands between any two bytecodes that loop too, not only as calls
    return: a state_dict() in a handler that landed inside the ledger's loop over
    the snapshots it lets go changed the dict under it, and next() raised
    "dictionary changed size during iteration". Here one state is taken inside
    each next(), at the n-th line the ledger runs (each turn of a loop is a line,
    as a tracer sees it), n going round so that each line gets its turn: every
    epoch is whole, and no state says more than the caller had."""
    ledger_file = str(Path(poolloader.__file__).parent / "_resume.py")
    turns = 60
    with poolloader.DataLoader(
        Plain(60), num_workers=num_workers, in_order=False, **_samplers("own_state")
    ) as loader:
        reference = sorted(i for b in loader for i in b.tolist())
        had: list[int] = []
        lines = taken = 0

        def trace(frame: Any, event: str, arg: Any) -> Any:
            nonlocal lines, taken
            if frame.f_code.co_filename != ledger_file:
                return None
            if event == "line":
                lines += 1
                if lines == taken % turns + 1:
                    taken += 1
                    state = loader.state_dict()
                    assert state["in_epoch"] is None or state["in_epoch"]["yielded"] <= len(had)
            return trace

        for _ in range(4):
            had = []
            iterator = iter(loader)
            while True:
                lines = 0
                sys.settrace(trace)
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                finally:
                    sys.settrace(None)
                had += batch.tolist()
            assert sorted(had) == reference
        assert taken > 2 * turns


@pytest.mark.parametrize(
    ("num_workers", "persistent", "places"),
    [
        (0, False, range(1, 95, 2)),
        (2, False, (3, 40, 150, 300, 450, 600)),
        (2, True, (3, 40, 150, 300, 450, 600)),
    ],
)
def test_an_interrupted_iter_leaves_the_resumed_epoch_to_the_next(
    num_workers: int, persistent: bool, places: range | tuple[int, ...]
) -> None:
    """A Ctrl-C while iter() starts a resumed epoch (starting workers takes seconds)
    landed after iter() had taken the loaded state off the loader, or after the
    epoch began: the next iter() began the epoch afresh, or the one after it, and
    batches came a second time or not at all. An iter() that raises now puts the
    loader back where it was. The interrupt lands as the n-th call made inside
    iter() begins or returns, for each n of ``places`` (before and after the epoch
    began), each on its own iter(); then one iter() runs."""
    state, expected = _state_and_the_rest(num_workers, persistent)
    with poolloader.DataLoader(Plain(20), **_random_order(num_workers, persistent)) as loader:
        loader.load_state_dict(state)
        landed, iterator = 0, None
        for place in places:
            iterator = _interrupted_iter(loader, place)
            if iterator is not None:
                break  # (iter() made fewer calls than this)
            landed += 1
        assert landed >= 2, landed
        assert _same(_where(loader.state_dict()), _where(state))
        if iterator is None:
            iterator = iter(loader)
        got = [b.tolist() for b in iterator]
        assert got + [b.tolist() for b in loader] == expected


def _interrupted_iter(loader: poolloader.DataLoader, place: int) -> Any:
    """``iter(loader)``, with a KeyboardInterrupt raised as the ``place``-th call
    poolloader's code makes begins or returns: None when it landed (and was
    caught), else the iterator."""
    seen = 0

    def lands(frame: Any, event: str, arg: Any) -> bool:
        nonlocal seen
        code = frame.f_code
        if event == "call" and code.co_flags & inspect.CO_GENERATOR:
            return False  # (also called as a generator is closed, where an exception is lost)
        if event in ("call", "c_return") and code.co_filename.startswith(PACKAGE):
            seen += 1
        return seen == place

    return _iter_interrupted_where(loader, lands)


def _iter_interrupted_as(
    loader: poolloader.DataLoader, function: str, event_name: str = "call"
) -> Any:
    """``iter(loader)``, with a KeyboardInterrupt raised as poolloader's ``function``
    begins (or with ``event_name="return"``, as it first returns): None when it
    landed (and was caught), else the iterator."""

    def lands(frame: Any, event: str, arg: Any) -> bool:
        code = frame.f_code
        return (
            event == event_name
            and code.co_name == function
            and code.co_filename.startswith(PACKAGE)
        )

    return _iter_interrupted_where(loader, lands)


def _iter_interrupted_where(loader: poolloader.DataLoader, lands: Any) -> Any:
    """``iter(loader)`` under a profile hook that raises KeyboardInterrupt the first
    time ``lands(frame, event, arg)`` is true (where a signal's exception would come):
    None when it landed (and was caught), else the iterator."""

    def interrupt(frame: Any, event: str, arg: Any) -> None:
        if lands(frame, event, arg):
            sys.setprofile(None)
            raise KeyboardInterrupt

    with collector_held():
        sys.setprofile(interrupt)
        try:
            return iter(loader)
        except KeyboardInterrupt:
            return None
        finally:
            sys.setprofile(None)


def test_a_stream_epoch_begun_again_after_an_interrupted_iter_starts_its_streams_afresh() -> None:
    """An iter() interrupted after its epoch began (its first batches were sent to
    the workers) goes back, and the next iter() begins that epoch again, under the
    same number. Persistent workers still in it must start their streams afresh:
    a worker that went on from where the first try left its stream lost the items
    that try had read."""
    with poolloader.DataLoader(Counted(26), batch_size=2, num_workers=2,
                               persistent_workers=True) as loader:  # fmt: skip
        reference = sorted(i for b in loader for i in b.tolist())
        landed = 0
        for place in (390, 300, 200, 120):
            iterator = _interrupted_iter(loader, place)
            if iterator is None:
                landed += 1
                time.sleep(0.2)  # (the workers run the batches the try had sent)
            else:
                del iterator
        assert landed >= 2, landed
        assert sorted(i for b in loader for i in b.tolist()) == reference


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_stream_epoch_begun_again_while_another_iterator_runs_starts_afresh(
    num_workers,
) -> None:
    """Two iterators of one loader take turns on its workers, and a worker keeps the
    stream of the epoch it leaves for the other's. An iter() interrupted after its
    epoch's first batches were sent goes back; the other iterator's next batch takes
    the workers away from that epoch (they keep its stream, read two batches in),
    and the next iter() begins the epoch again under the same number. The workers
    must start its streams afresh: going back to the kept stream lost the items the
    interrupted try had read."""
    with poolloader.DataLoader(Counted(40), batch_size=2, num_workers=num_workers) as loader:
        reference = sorted(i for b in loader for i in b.tolist())
        other = iter(loader)
        first = [i for _ in range(num_workers) for i in next(other).tolist()]

        assert _iter_interrupted_as(loader, "_fill", "return") is None  # the window sent
        time.sleep(0.5)  # (the workers read the batches the try had sent)
        first += next(other).tolist()
        assert sorted(i for b in loader for i in b.tolist()) == reference
        assert sorted(first + [i for b in other for i in b.tolist()]) == reference


def test_a_persistent_iterator_whose_next_epoch_failed_to_begin_says_so() -> None:
    """With persistent workers the loader keeps one iterator, and iter() begins the
    next epoch on it. When that iter() is interrupted after the epoch's first batches
    were sent, the iterator's old epoch is given up and the new one did not begin:
    next() on it must say so, not hand out the batches the try had sent (which
    skipped the start of an epoch nobody began). iter() again begins it whole."""
    with poolloader.DataLoader(
        Counted(40), batch_size=2, num_workers=1, persistent_workers=True
    ) as loader:
        reference = [b.tolist() for b in loader]
        iterator = iter(loader)
        next(iterator)

        assert _iter_interrupted_as(loader, "_fill", "return") is None  # the window sent
        time.sleep(0.5)  # (the worker reads the batches the try had sent)
        with pytest.raises(RuntimeError, match=r"Call iter\(loader\) again"):
            next(iterator)
        assert [b.tolist() for b in loader] == reference


def test_a_failed_iter_leaves_the_other_iterators_of_its_loader_running() -> None:
    """Going back after an iter() that raised ends only what that iter() made: an
    iterator of the same loader still in its epoch goes on to the end of it."""
    sampler = _FailsOnSecondIter(Plain(20))
    with poolloader.DataLoader(Plain(20), batch_sampler=sampler, num_workers=2) as loader:
        first = iter(loader)
        got = [next(first).tolist() for _ in range(2)]
        with pytest.raises(RuntimeError, match="second iter"):
            iter(loader)
        got += [b.tolist() for b in first]
        assert got == [[i, i + 1] for i in range(0, 20, 2)]


class _FailsOnSecondIter(torch.utils.data.Sampler[list[int]]):
    """Batches of two in order; its second ``iter()`` raises."""

    def __init__(self, data: Any) -> None:
        self.n, self.iters = len(data), 0

    def __len__(self) -> int:
        return self.n // 2

    def __iter__(self) -> Iterator[list[int]]:
        self.iters += 1
        if self.iters == 2:
            raise RuntimeError("the sampler fails on its second iter()")
        return iter([[i, i + 1] for i in range(0, self.n, 2)])


def test_limits_set_after_loading_a_state_survive_an_interrupted_iter() -> None:
    """Starting a resumed epoch loads the sampler's saved state, and with it the
    saved limits; an iter() interrupted after that left them in place of the ones
    the caller set after load_state_dict(), and the epoch was cut with the wrong
    ones. They are put back with the rest."""
    lengths = [float(1 + (i * 7) % 13) for i in range(60)]

    def make() -> poolloader.DataLoader:
        sampler = DynamicBatchSampler(lengths, max_duration=20.0, seed=3)
        return poolloader.DataLoader(Plain(60), batch_sampler=sampler)

    with make() as loader:
        iterator = iter(loader)
        for _ in range(4):
            next(iterator)
        state = loader.state_dict()
    with make() as plain:
        plain.load_state_dict(state)
        plain.batch_sampler.max_duration = 30.0
        expected = [b.tolist() for b in plain]
    with make() as interrupted:
        interrupted.load_state_dict(state)
        interrupted.batch_sampler.max_duration = 30.0
        assert _iter_interrupted_as(interrupted, "_next_epoch") is None
        assert interrupted.batch_sampler.max_duration == 30.0
        assert [b.tolist() for b in interrupted] == expected


def _random_order(num_workers: int, persistent: bool = False) -> dict[str, Any]:
    return {"batch_size": 2, "shuffle": True, "num_workers": num_workers,
            "persistent_workers": persistent,
            "generator": torch.Generator().manual_seed(9)}  # fmt: skip


def _state_and_the_rest(
    num_workers: int, persistent: bool
) -> tuple[dict[str, Any], list[list[int]]]:
    """A state saved after 3 batches of a loader's second epoch, and the batches
    that follow them in that epoch and the next."""
    with poolloader.DataLoader(Plain(20), **_random_order(num_workers, persistent)) as loader:
        for _ in loader:
            pass
        iterator = iter(loader)
        for _ in range(3):
            next(iterator)
        state = loader.state_dict()
        rest = [b.tolist() for b in iterator]
        return state, rest + [b.tolist() for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_taken_inside_a_next_that_raises_the_batchs_error_leaves_that_batch_out(
    num_workers: int,
) -> None:
    """A batch's own error is its outcome: next() counts it, then raises it. A state
    taken in between (a signal handler) counted it before the caller had the error,
    and a resume from it went past the batch without raising. Every state taken
    inside that next() is the state before it; the one after counts the batch."""
    with poolloader.DataLoader(Failing(12, bad=5), num_workers=num_workers) as loader:
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
        before = loader.state_dict()
        error, inside = _states_inside(loader, lambda: _raised(lambda: next(iterator)))
        assert isinstance(error, ValueError) and "item 5 is corrupt" in str(error)
        assert len(inside) > 3
        for state in inside:
            assert _same(_where(state), _where(before)), _where(state)
        assert loader.state_dict()["in_epoch"]["yielded"] == 6
        assert [int(b) for b in iterator] == list(range(6, 12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_state_taken_after_a_ctrl_c_inside_next_resumes_with_the_batch_not_returned(
    num_workers: int,
) -> None:
    """A Ctrl-C caught around next() and a checkpoint saved in the ``except``: where
    the interrupt landed after next() counted its batch, that batch never reached
    the caller, and the state must give it again."""
    with poolloader.DataLoader(Plain(40), batch_size=2, num_workers=num_workers) as loader:
        iterator = iter(loader)
        for _ in range(5):
            next(iterator)
        landed = 0

        def interrupt(frame: Any, event: str, arg: Any) -> None:
            nonlocal landed
            code = frame.f_code
            if (
                event == "return"
                and code.co_name == "_next_data"
                and not landed
                and (code.co_filename.startswith(PACKAGE))
            ):
                landed += 1
                raise KeyboardInterrupt

        sys.setprofile(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                next(iterator)
        finally:
            sys.setprofile(None)
        assert landed == 1
        state = loader.state_dict()
        assert state["in_epoch"]["yielded"] == 5, state["in_epoch"]
        assert next(iterator).tolist() == [10, 11]  # the batch the interrupt held up
    with poolloader.DataLoader(Plain(40), batch_size=2, num_workers=0) as fresh:
        fresh.load_state_dict(state)
        assert [b.tolist() for b in fresh] == [[i, i + 1] for i in range(10, 40, 2)]
