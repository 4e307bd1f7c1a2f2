"""A SharedList (or anything on shared memory) sent through loader.dataset stays
openable until every worker and the template have unpickled it, however soon the
main process lets it go, and is let go once they have (NOTE [ Pinned segments ])."""

from __future__ import annotations

import gc
import pickle
import time
import weakref

import pytest
import torch

import poolloader
from poolloader import SharedList
from poolloader._control import Channel
from poolloader._messages import SetAttr

ROWS = 64


def version(v: int) -> SharedList:
    """Version ``v`` of the rows: record i holds ``1000 * v + i`` (and 100 KB in
    all, so that with workers started directly the channel's snapshots, which let
    old changes go, come due within the test)."""
    return SharedList([{"id": 1000 * v + i, "text": "x" * 1600} for i in range(ROWS)])


class SlowRows(torch.utils.data.Dataset):
    """Reads one record per item, slowly, so that a worker is busy with a batch
    while the main process has already replaced the list its next task needs."""

    def __init__(self, length: int = ROWS) -> None:
        self.rows = version(0)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> int:
        time.sleep(0.01)
        return self.rows[i]["id"]


def _check_batch(batch: list[int], start: int) -> int:
    """The version every item of a batch of items ``start, start + 1, ...`` was read from."""
    versions = {x // 1000 for x in batch}
    assert len(versions) == 1, f"one batch read two lists: {batch}"
    v = versions.pop()
    assert batch == [1000 * v + start + k for k in range(len(batch))]
    return v


@pytest.mark.parametrize(
    ("method", "persistent", "template"),
    [
        ("forkserver", True, True),
        ("spawn", True, True),
        ("fork", True, True),
        ("forkserver", False, True),
        ("spawn", True, False),
        ("spawn", False, False),
    ],
)
def test_a_list_replaced_while_a_worker_is_busy_reaches_it(
    monkeypatch, method, persistent, template
):
    """A new list after every batch: each is let go in the main process by the
    next one, typically before the busy workers unpickled the change that sent it
    (without pins: FileNotFoundError in the worker or the template). Every batch
    reads one list, never an older one than the batch before, and the last
    epoch (no changes) reads the last list. ``template=False``: workers started
    directly, as where Linux has no pidfds (they start from the channel's base
    and snapshots)."""
    if not template:
        monkeypatch.setattr(poolloader._pool, "can_fork_workers", lambda: False)
    with poolloader.DataLoader(SlowRows(), batch_size=4, num_workers=2,
                               persistent_workers=persistent,
                               multiprocessing_context=method) as loader:  # fmt: skip
        v_set = 0
        for _ in range(3):
            seen = 0
            for k, batch in enumerate(loader):
                v = _check_batch(batch.tolist(), 4 * k)
                assert seen <= v <= v_set, "a batch read an older list, or one not yet made"
                seen = v
                v_set += 1
                loader.dataset.rows = version(v_set)
                gc.collect()  # the list just replaced is gone here
        last = [x for b in loader for x in b.tolist()]
        assert last == [1000 * v_set + i for i in range(ROWS)]
        # 48 lists were made; the channel holds only what a receiver may still need.
        assert loader._channel.pinned < 16, f"{loader._channel.pinned} segments still held"


def test_workers_with_no_task_acknowledge_so_replaced_lists_go():
    """One batch per epoch with three workers: two never get a task and are
    brought up to date while idle (a Sync follows the changes). Without their
    answer the channel would hold every list ever assigned."""
    with poolloader.DataLoader(SlowRows(length=4), batch_size=4, num_workers=3,
                               persistent_workers=True,
                               multiprocessing_context="forkserver") as loader:  # fmt: skip
        for v in range(1, 13):
            loader.dataset.rows = version(v)
            gc.collect()
            assert [b.tolist() for b in loader] == [[1000 * v + i for i in range(4)]]
        deadline = time.monotonic() + 30
        while loader._channel.pinned > 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # the idle workers' Synced arrive on the I/O thread
        assert loader._channel.pinned <= 4, f"{loader._channel.pinned} segments held"
        stats = loader.statistics()
    assert stats.restarts == 0


def _segment_ref(shared: SharedList) -> weakref.ref:
    return weakref.ref(shared._records.segment)


def test_the_channel_holds_what_it_logged_until_receivers_acknowledge():
    """Unit level: the pickled change keeps its segment; compaction retires it;
    release() below its generation keeps it, at its generation lets it go."""
    channel = Channel()
    channel.start(None)
    rows = version(1)
    ref = _segment_ref(rows)
    with channel.pinning():
        payload = pickle.dumps(rows)
    channel.record(SetAttr((), "rows", payload))
    generation = channel.stamp()
    del rows
    gc.collect()
    assert ref() is not None, "the logged change's segment went with the list"
    assert pickle.loads(payload)[0]["id"] == 1000, "the logged change no longer unpickles"
    channel.advance_base(generation)  # the template took it
    channel.compact(generation, [generation])  # and every worker was sent it
    assert channel.log_entries == 0 and channel.holds_released
    channel.release(generation - 1)
    gc.collect()
    assert ref() is not None, "released before every receiver acknowledged it"
    channel.release(generation)
    gc.collect()
    assert ref() is None and not channel.holds_released and channel.pinned == 0


def test_a_stopped_channel_holds_nothing():
    channel = Channel()
    channel.start(None)
    rows = version(2)
    ref = _segment_ref(rows)
    with channel.pinning():
        channel.record(SetAttr((), "rows", pickle.dumps(rows)))
    del rows
    channel.stop()
    gc.collect()
    assert ref() is None and channel.pinned == 0


def test_pins_collected_before_a_fresh_start_stay_until_its_generation():
    """A Replace (a new epoch's snapshot) takes the open group's pins with its own:
    the later generation, so they are held at least as long as what names them."""
    channel = Channel()
    channel.start(None)
    first, second = version(3), version(4)
    refs = [_segment_ref(first), _segment_ref(second)]
    with channel.pinning():
        channel.record(SetAttr((), "rows", pickle.dumps(first)))
    with channel.pinning():
        snapshot = pickle.dumps({"rows": second})
    channel.record(poolloader._messages.Replace(snapshot))
    generation = channel.stamp()
    del first, second
    channel.advance_base(generation)
    channel.compact(generation, [generation])
    channel.release(generation - 1)
    gc.collect()
    assert all(r() is not None for r in refs)
    assert pickle.loads(snapshot)["rows"][0]["id"] == 4000
    channel.release(generation)
    gc.collect()
    assert all(r() is None for r in refs)
