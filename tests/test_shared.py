"""SharedList and SharedDict: list and dict behaviour, handles, and memory across processes.

The cross-process tests run real spawn, forkserver and fork children and a SIGKILLed
main process, and read ``/proc/<pid>/maps`` to see who maps a segment.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from _procs import handles

import poolloader
import poolloader._records
from poolloader import SharedDict, SharedList
from poolloader._segment import SegmentHandle, is_sealed_array, open_segment, pinning

#: Seconds a child or an orphaned worker gets to finish; only bounds a hang.
DEADLINE = 120.0

RECORDS = [1, 2.0, "three", None, {"id": "u5", "dur": 1.5}, (6, "six"), b"seven", [8]]


def segment_of(shared: SharedList | SharedDict) -> str:
    records = shared._records if isinstance(shared, SharedList) else shared._keys
    return records.segment.name


def mappers(name: str) -> set[int]:
    """Pids of the live processes that map segment ``name``."""
    found = set()
    for pid in psutil.pids():
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        if name + " " in maps or maps.rstrip().endswith(name):
            found.add(pid)
    return found


# ---------------------------------------------------------------- list behaviour


def test_list_reads_like_a_tuple_of_its_records_and_keeps_their_types():
    shared = SharedList(RECORDS)
    assert len(shared) == len(RECORDS)
    assert list(shared) == RECORDS and shared == RECORDS and shared == tuple(RECORDS)
    assert [type(r) for r in shared] == [type(r) for r in RECORDS]
    assert shared[0] == 1 and shared[-1] == [8] and shared[-len(RECORDS)] == 1
    assert shared[np.int64(2)] == "three"
    assert list(reversed(shared)) == RECORDS[::-1]
    assert "three" in shared and {"id": "u5", "dur": 1.5} in shared and "four" not in shared
    assert shared.index((6, "six")) == 5 and shared.count(None) == 1
    with pytest.raises(ValueError, match=r"^\(6, 'six'\) is not in SharedList$"):
        shared.index((6, "six"), 0, 5)  # as list.index says it
    assert shared != RECORDS[:-1] and shared != [*RECORDS[:-1], [9]]
    assert (shared == {1: 2}) is False
    with pytest.raises(IndexError, match=r"SharedList index 8 is out of range for 8 records"):
        shared[8]
    with pytest.raises(IndexError):
        shared[-9]
    with pytest.raises(TypeError, match=r"integers or slices, not str"):
        shared["0"]


@pytest.mark.parametrize("step", [1, 2, 3, -1, -2, -5])
def test_slices_are_views_of_the_same_memory_with_list_semantics(step):
    records = [f"r{i}" for i in range(23)]
    shared = SharedList(records)
    for start in (None, 0, 3, -4, 30, -30):
        for stop in (None, 0, 7, -2, 40, -40):
            view = shared[start:stop:step]
            assert list(view) == records[start:stop:step]
            assert view == records[start:stop:step]
            assert view._records is shared._records
    nested = shared[2:20][::-3][1:]
    assert list(nested) == records[2:20][::-3][1:]
    assert pickle.loads(pickle.dumps(nested)) == nested
    assert nested[-1] == records[2:20][::-3][1:][-1]


def test_numbers_are_a_typed_array_that_numpy_reads_without_a_copy():
    floats = SharedList([0.5, 1.5, 2.5, 3.5])
    array = floats.numpy()
    assert array.dtype == np.float64 and array.tolist() == [0.5, 1.5, 2.5, 3.5]
    assert not array.flags.writeable and is_sealed_array(array)
    assert np.shares_memory(np.asarray(floats), array)
    assert np.shares_memory(floats[::-2].numpy(), array)
    assert floats[::-2].numpy().tolist() == [3.5, 1.5]
    with pytest.raises(ValueError, match=r"read-only"):
        array[0] = 9.0
    assert type(SharedList([1, 2])[0]) is int and SharedList([1, 2]).numpy().dtype == np.int64
    assert SharedList([True, False])[0] is True
    assert SharedList([2**70, 1])[0] == 2**70  # beyond int64: kept exactly, pickled
    assert np.asarray(SharedList([1, 2.5])).tolist() == [1.0, 2.5]  # objects: a copy


def test_dtype_stores_converted_numbers_and_refuses_what_does_not_convert():
    shared = SharedList([1, 2.5, 3], dtype=np.float32)
    assert shared.numpy().dtype == np.float32 and shared == [1.0, 2.5, 3.0]
    grid = SharedList(np.arange(6, dtype=np.int16).reshape(3, 2))
    assert grid.numpy().shape == (3, 2) and grid[1].tolist() == [2, 3]
    big_endian = SharedList(np.array([1.0, 2.0], dtype=">f8"))
    assert big_endian.numpy().dtype == np.float64 and big_endian == [1.0, 2.0]
    with pytest.raises(TypeError, match=r"cannot be stored as an array of dtype float64"):
        SharedList(["a", "b"], dtype=np.float64)
    with pytest.raises(TypeError, match=r"dtype should be a numeric NumPy dtype"):
        SharedList([1, 2], dtype=object)
    with pytest.raises(TypeError, match=r"holds Python objects, not a typed array; build it"):
        SharedList(["a"]).numpy()


def test_strings_round_trip_exactly_including_lone_surrogates():
    records = ["", "plain", "ünïcødé ✓", "emoji 🎧", "\udcff from a filename", "a\x00b"]
    shared = SharedList(records)
    assert shared._records.kind == "str"
    assert list(shared) == records and "emoji 🎧" in shared and 3 not in shared
    assert SharedList(np.array(["x", "yz"]))[1] == "yz"


STREAMS = [
    ["a", "b", "c", "d", "é", 1, "x"],  # strings, then an int: everything pickled
    [1, 2, 3, 4, 5, "s", 6],
    [1, 2, 3, 4, 5.0],  # ints then a float stay an int and a float
    [1.0, 2.0, 3.0, 4.0, 5.0],
    [True, False, True, False, True],
    [1, 2, 3, 4, 2**70],  # beyond int64 after the first chunk
    ["a", "b", "c", "d", "e", "f", "g"],
]


@pytest.mark.parametrize("records", STREAMS, ids=range(len(STREAMS)))
def test_an_iterator_is_read_in_chunks_and_stored_as_a_list_would_be(monkeypatch, records):
    monkeypatch.setattr(poolloader._records, "CHUNK_RECORDS", 3)
    from_list, from_iterator = SharedList(records), SharedList(iter(records))
    assert from_iterator._records.kind == from_list._records.kind
    for shared in (from_list, from_iterator):
        assert list(shared) == records and [type(r) for r in shared] == [type(r) for r in records]
    with pytest.raises(ValueError, match=r"record 4 has no 'dur'"):
        SharedList(iter([{"dur": 1}] * 4 + [{}]), columns=["dur"])
    with pytest.raises(TypeError, match=r"record 4 cannot be stored"):
        SharedList(iter([*records[:4], lambda: 0]))


def test_columns_give_numbers_inside_records_as_arrays():
    rows = [{"id": f"u{i}", "dur": 0.5 * i, "frames": i} for i in range(10)]
    shared = SharedList(rows, columns=["dur", "frames"])
    assert shared.columns == ("dur", "frames")
    assert shared.column("dur").tolist() == [0.5 * i for i in range(10)]
    assert shared.column("frames").dtype == np.int64
    assert shared[::-3].column("dur").tolist() == [4.5, 3.0, 1.5, 0.0]
    assert is_sealed_array(shared.column("dur"))
    with pytest.raises(KeyError, match=r"no column 'text' \(columns: \['dur', 'frames'\]\)"):
        shared.column("text")
    with pytest.raises(ValueError, match=r"record 1 has no 'dur' for column 'dur'"):
        SharedList([{"dur": 1}, {"len": 2}], columns=["dur"])
    with pytest.raises(TypeError, match=r"column 'dur' should hold one number per record"):
        SharedList([{"dur": 1}, {"dur": "long"}], columns=["dur"])
    with pytest.raises(TypeError, match=r"a list of names, but got a string"):
        SharedList(rows, columns="dur")


def test_take_copies_chosen_records_and_columns_into_a_new_list():
    rows = [{"id": f"u{i}", "dur": float(i)} for i in range(10)]
    shared = SharedList(rows, columns=["dur"])
    part = shared.take([9, 0, -2])
    assert part == [rows[9], rows[0], rows[8]] and part.column("dur").tolist() == [9.0, 0.0, 8.0]
    assert part._records.segment is not shared._records.segment
    assert shared[::-1].take([0, 1]) == [rows[9], rows[8]]
    assert SharedList(["a", "b"]).take(np.array([1, 1, 0])) == ["b", "b", "a"]
    assert SharedList([1.5, 2.5]).take(range(2)).numpy().tolist() == [1.5, 2.5]
    assert SharedList(["a"]).take([]) == []
    with pytest.raises(IndexError, match=r"position 10 is out of range for a SharedList of 10"):
        shared.take([0, 10])
    with pytest.raises(TypeError, match=r"1-D sequence of integers"):
        shared.take([0.5])


def test_a_container_built_from_another_shares_its_memory():
    shared, mapping = SharedList(["a", "b"], columns=()), SharedDict({"a": 1})
    assert SharedList(shared)._records is shared._records and SharedList(shared) == shared
    assert SharedList(shared[::-1]) == ["b", "a"]
    assert SharedDict(mapping)._keys.segment is mapping._keys.segment
    floats = SharedList([1.0, 2.0])
    assert SharedList(floats, dtype=np.float32).numpy().dtype == np.float32  # a new copy


def test_a_record_that_does_not_pickle_is_named():
    with pytest.raises(TypeError, match=r"record 2 cannot be stored in shared memory: .*lambda"):
        SharedList([1, "a", lambda: 0])
    with pytest.raises(TypeError, match=r"the value of key 'b' cannot be stored .*lambda"):
        SharedDict({"a": 1, "b": lambda: 0})


def test_a_container_inside_a_record_is_refused_saying_what_to_store():
    """Pickled into a record, a SharedList would name its own memory, which goes
    when it does: reads would fail later, depending on the collector."""
    inner = SharedList(["a.wav", "b.wav"])
    with pytest.raises(TypeError, match=r"key 'spk1' .*holds a SharedList.*list\(x\)"):
        SharedDict({"spk1": inner})
    with pytest.raises(TypeError, match=r"record 1 .*holds a SharedList or SharedDict"):
        SharedList([1, {"nested": SharedDict({"k": 1})}])
    assert SharedDict({"spk1": list(inner)})["spk1"] == ["a.wav", "b.wav"]


def test_numpy_dates_and_structured_records_keep_their_type():
    days = np.array(["2020-01-01", "2021-06-01"], dtype="datetime64[ns]")
    spans = np.array([1, 2], dtype="timedelta64[s]")
    rows = np.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")])
    for array in (days, spans, rows):
        shared = SharedList(array)
        assert shared == list(array) and type(shared[0]) is type(array[0])
    assert days[0] in SharedList(days)


def test_a_column_value_too_big_for_an_array_is_named():
    with pytest.raises(TypeError, match=r"fit a 64-bit integer.*record 2 has 18446744073709551616"):
        SharedList([{"d": 1}, {"d": 2}, {"d": 2**64}], columns=["d"])


def test_empty_containers_and_repr():
    assert SharedList() == [] and len(SharedList([])) == 0 and list(SharedList()) == []
    assert SharedDict() == {} and not SharedDict() and list(SharedDict().items()) == []
    assert repr(SharedList(["a", 1])) == "SharedList(['a', 1])"
    assert repr(SharedList(range(8))) == "SharedList([0, 1, 2, 3, 4, ...], len=8)"
    assert repr(SharedDict({"a": 1})) == "SharedDict({'a': 1})"
    long = repr(SharedList(["x" * 500]))
    assert long.startswith("SharedList(['xxx") and len(long) < 100


LIST_MUTATIONS = [
    lambda s: s.__setitem__(0, 1),
    lambda s: s.__delitem__(0),
    lambda s: s.append(1),
    lambda s: s.extend([1]),
    lambda s: s.insert(0, 1),
    lambda s: s.pop(),
    lambda s: s.remove(1),
    lambda s: s.clear(),
    lambda s: s.sort(),
    lambda s: s.reverse(),
    lambda s: s.__iadd__([1]),
    lambda s: s.__imul__(2),
]
DICT_MUTATIONS = [
    lambda d: d.__setitem__("a", 1),
    lambda d: d.__delitem__("a"),
    lambda d: d.pop("a"),
    lambda d: d.popitem(),
    lambda d: d.setdefault("b", 2),
    lambda d: d.update(b=2),
    lambda d: d.clear(),
    lambda d: d.__ior__({"b": 2}),
]


def test_every_mutation_is_refused_saying_what_to_do_instead():
    shared, mapping = SharedList([1, 2]), SharedDict({"a": 1})
    for mutate in LIST_MUTATIONS:
        with pytest.raises(TypeError, match=r"SharedList is read-only: .* Build|Copy|Use|Drop"):
            mutate(shared)
    for mutate in DICT_MUTATIONS:
        with pytest.raises(TypeError, match=r"SharedDict is read-only: .* Build|Copy|Drop"):
            mutate(mapping)
    with pytest.raises(TypeError, match=r"SharedList is read-only: .*item assignment"):
        shared[0] = 5
    with pytest.raises(AttributeError):
        shared.extra = 1  # no __dict__: nothing to change behind the records' back
    assert shared == [1, 2] and mapping == {"a": 1}
    assert copy.copy(shared) is shared and copy.deepcopy(mapping) is mapping


# ---------------------------------------------------------------- dict behaviour


def test_dict_reads_like_a_dict_in_insertion_order():
    plain = {"b": 2, "a": [1], 3: "three", b"raw": None, -(2**80): 1.5}
    shared = SharedDict(plain)
    assert shared == plain and plain == shared and dict(shared) == plain
    assert list(shared) == list(plain) and list(shared.keys()) == list(plain)
    assert list(shared.values()) == list(plain.values())
    assert list(shared.items()) == list(plain.items())
    assert list(reversed(shared)) == list(reversed(plain))
    assert shared["a"] == [1] and shared[3] == "three" and shared[b"raw"] is None
    assert shared[3.0] == "three" and shared[np.int64(3)] == "three"  # equal keys find it
    assert "b" in shared and "c" not in shared and 4 not in shared and [1] not in shared
    assert shared.get("zz") is None and shared.get("zz", 7) == 7 and shared.get("b") == 2
    assert ("b", 2) in shared.items() and 2 in shared.values() and "a" in shared.keys()  # noqa: SIM118
    with pytest.raises(KeyError, match=r"'missing'"):
        shared["missing"]
    assert shared != {**plain, "extra": 1} and shared != {**plain, "b": 3}
    assert (shared == [1]) is False


def test_dict_from_pairs_keeps_the_last_value_of_a_repeated_key():
    shared = SharedDict([("a", 1), ("b", 2), ("a", 3)])
    assert list(shared.items()) == [("a", 3), ("b", 2)]


def test_keys_of_other_types_are_refused_with_the_fix():
    for key in (1.5, (1, 2), True, None):
        with pytest.raises(TypeError, match=r"keys should be str, bytes or int, but key 0"):
            SharedDict({key: 1})


def test_many_keys_and_crc_collisions_are_all_found():
    # "plumless" and "buckeroo" have the same CRC-32: the lookup compares the keys.
    plain = {f"utt{i:06d}": i for i in range(20_000)} | {"plumless": -1, "buckeroo": -2}
    shared = SharedDict(plain)
    assert shared["plumless"] == -1 and shared["buckeroo"] == -2
    assert all(shared[key] == value for key, value in plain.items())
    assert not any(f"utt{i:06d}" in shared for i in range(20_000, 20_500))
    assert shared.numpy().dtype == np.int64 and shared.numpy()[-1] == -2


def test_dict_values_as_arrays_and_columns():
    durations = SharedDict({"u1": 2.5, "u2": 3.0})
    assert durations.numpy().tolist() == [2.5, 3.0] and is_sealed_array(durations.numpy())
    rows = SharedDict({"u1": {"dur": 1.0}, "u2": {"dur": 2.0}}, columns=["dur"])
    assert rows.column("dur").tolist() == [1.0, 2.0] and rows.columns == ("dur",)
    with pytest.raises(TypeError, match=r"values are Python objects, not a typed array"):
        rows.numpy()
    with pytest.raises(KeyError, match=r"no column 'len'"):
        rows.column("len")


# ---------------------------------------------------------------- handles


def test_pickles_to_a_small_handle_whatever_the_size():
    small, big = SharedList(["x"] * 10), SharedList([f"record {i}" for i in range(200_000)])
    assert len(pickle.dumps(big)) < 400
    assert abs(len(pickle.dumps(big)) - len(pickle.dumps(small))) < 16
    assert len(pickle.dumps(SharedDict({f"k{i}": i for i in range(50_000)}))) < 400
    assert pickle.loads(pickle.dumps(big))[-1] == "record 199999"


def test_unpickling_in_the_same_process_reuses_the_mapping():
    shared = SharedList(range(100))
    copies = [pickle.loads(pickle.dumps(shared)) for _ in range(5)]
    assert all(c._records.segment is shared._records.segment for c in copies)
    assert len(mappers(segment_of(shared))) == 1


def test_pinning_keeps_what_a_snapshot_pickled_openable():
    dataset = {"rows": SharedList(["a", "b"]), "other": [SharedDict({"k": 1})]}
    with pinning() as pinned:
        snapshot = pickle.dumps(dataset)
        with pinning() as inner:
            pickle.dumps(dataset["rows"])
    assert inner == [dataset["rows"]._records.segment]
    assert {s.name for s in pinned} == {
        segment_of(dataset["rows"]),
        segment_of(dataset["other"][0]),
    }
    dataset["rows"] = SharedList(["c"])  # the snapshot's container is dropped here...
    gc.collect()
    assert pickle.loads(snapshot)["rows"] == ["a", "b"]  # ...but stays openable
    assert pickle.dumps(dataset) and not inner[1:]  # outside the blocks nothing is collected
    unpinned = pickle.dumps(dataset)
    dataset["rows"] = SharedList(["d"])
    gc.collect()
    with pytest.raises(FileNotFoundError, match=r"released the container|now names another"):
        pickle.loads(unpinned)


def test_a_handle_to_another_file_is_refused_not_misread():
    shared = SharedList(range(10))
    handle = shared._records.segment.handle()
    assert handle.pid == os.getpid()
    forged = dataclasses.replace(handle, ino=handle.ino + 1)  # as if the fd had been reused
    with pytest.raises(FileNotFoundError, match=r"now names another file"):
        open_segment(forged)
    fd = os.memfd_create("unsealed")
    try:
        os.write(fd, b"x" * 64)
        status = os.fstat(fd)
        loose = SegmentHandle("unsealed", 64, status.st_dev, status.st_ino, os.getpid(), fd)
        with pytest.raises(ValueError, match=r"not sealed read-only"):
            open_segment(loose)
    finally:
        os.close(fd)


def test_memory_goes_with_the_last_reference_and_views_keep_it():
    shared = SharedList([0.5] * 1000)
    name, fd = segment_of(shared), shared._records.segment.fd
    array = shared.numpy()
    del shared
    gc.collect()
    assert mappers(name) == {os.getpid()}  # the array still maps it
    assert array.sum() == 500.0
    assert not os.path.exists(f"/proc/self/fd/{fd}") or name not in os.readlink(
        f"/proc/self/fd/{fd}"
    )
    del array
    gc.collect()
    assert mappers(name) == set()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SharedList(["text"] * 100),
        lambda: SharedList(RECORDS),
        lambda: SharedList([[1.0, 2.0]] * 100),  # an N-d array of records
        lambda: SharedList(range(100)),
        lambda: SharedDict({f"k{i}": i for i in range(100)}),
    ],
    ids=["strings", "objects", "rows", "numbers", "dict"],
)
def test_memory_goes_with_the_last_reference_without_the_collector(make):
    """No container is part of a reference cycle: with the collector off (as
    training loops often run), ``del`` frees the memory at once."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        shared = make()
        name = segment_of(shared)
        assert mappers(name) == {os.getpid()}
        del shared
        assert mappers(name) == set(), "the memory waited for the garbage collector"
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------- other processes


def _read_in_child(shared, conn):
    """Child: read every record; report what it read and how much private memory grew."""
    maps = Path("/proc/self/maps").read_text()
    before = _anon_kb()
    total = sum(len(record["text"]) for record in shared)
    conn.send(
        {
            "pid": os.getpid(),
            "total": total,
            "last": shared[-1],
            "mapped": segment_of(shared) in Path("/proc/self/maps").read_text(),
            "mapped_before": segment_of(shared) in maps,
            "anon_growth_kb": _anon_kb() - before,
            "handle_pid": shared._records.segment.handle().pid,
        }
    )


def _anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_children_map_the_records_instead_of_copying_them(method):
    rows = [{"id": f"u{i}", "text": f"{i:08d}" * 12} for i in range(200_000)]
    shared = SharedList(rows)
    size = shared._records.segment.size
    context = mp.get_context(method)
    ours, theirs = context.Pipe()
    child = context.Process(target=_read_in_child, args=(shared, theirs))
    child.start()
    try:
        assert ours.poll(DEADLINE), "the child did not report"
        report = ours.recv()
    finally:
        child.join(DEADLINE)
    assert report["total"] == sum(len(r["text"]) for r in rows) and report["last"] == rows[-1]
    assert report["mapped"] and report["handle_pid"] == report["pid"] != os.getpid()
    assert report["anon_growth_kb"] * 1024 < size / 4, (report, size)
    assert child.exitcode == 0


def _relay(blob, conn, release):
    """Child: load a container, hand it on pickled by this process, hold it until released."""
    shared = pickle.loads(blob)
    conn.send_bytes(pickle.dumps(shared))
    release.wait(DEADLINE)


def _load_and_read(blob, conn):
    try:
        conn.send(("ok", list(pickle.loads(blob))))
    except OSError as exc:
        conn.send((type(exc).__name__, str(exc)))


def test_a_container_travels_on_after_its_creator_let_go():
    context = mp.get_context("forkserver")
    shared = SharedDict({"a": 1, "b": 2})
    name, first = segment_of(shared), pickle.dumps(shared)
    ours, theirs = context.Pipe()
    release = context.Event()
    relay = context.Process(target=_relay, args=(first, theirs, release))
    relay.start()
    try:
        assert ours.poll(DEADLINE)
        second = ours.recv_bytes()
        del shared
        gc.collect()
        assert mappers(name) == {relay.pid}  # the creator let go; the relay holds it
        results = []
        for blob in (second, first):
            reader = context.Process(target=_load_and_read, args=(blob, theirs))
            reader.start()
            assert ours.poll(DEADLINE)
            results.append(ours.recv())
            reader.join(DEADLINE)
    finally:
        release.set()
        relay.join(DEADLINE)
    assert results[0] == ("ok", ["a", "b"])
    kind, message = results[1]
    assert kind == "FileNotFoundError"
    assert f"process {os.getpid()}, which pickled it" in message
    # The descriptor number is free again, or already names another file of ours.
    assert "released the container" in message or "now names another file" in message
    assert mappers(name) == set()


def test_os_fork_child_reads_inherited_memory_and_pickles_with_its_own_pid():
    shared = SharedList([f"r{i}" for i in range(1000)], columns=())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        try:
            handle = pickle.loads(pickle.dumps(shared))._records.segment.handle()
            os.write(write, json.dumps([shared[-1], handle.pid == os.getpid()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as report:
        assert json.loads(report.read()) == ["r999", True]
    assert os.waitpid(pid, 0)[1] == 0


class Rows(torch.utils.data.Dataset):
    """A manifest in shared containers, the way a user's dataset would hold one."""

    def __init__(self, rows):
        self.rows = SharedList(rows, columns=["dur"])
        self.index = SharedDict((row["id"], position) for position, row in enumerate(rows))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"position": self.index[row["id"]], "dur": row["dur"], "text": row["text"]}


def test_torch_and_poolloader_loaders_read_the_same_batches():
    rows = [{"id": f"u{i}", "dur": 0.5 + i % 7, "text": f"words {i}"} for i in range(300)]
    dataset = Rows(rows)
    stock = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2)  # fork
    ours = poolloader.DataLoader(
        dataset, batch_size=16, num_workers=2, multiprocessing_context="forkserver"
    )
    with ours:
        expected, got = list(stock), list(ours)
    assert len(got) == len(expected) == 19
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["position"], b["position"]) and a["text"] == b["text"]
        assert torch.equal(a["dur"], b["dur"])
    assert torch.cat([b["position"] for b in got]).tolist() == list(range(300))


class WithShared(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = SharedList([{"id": f"u{i}", "dur": float(i)} for i in range(6)],
                               columns=["dur"])  # fmt: skip
        self.index = SharedDict({"u1": 1})

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return i


def test_reading_shared_containers_through_the_loaders_view(tmp_path):
    """``loader.dataset`` is a view; the containers in it are read-only, so it hands
    them out as they are, and their methods work on their own memory."""
    from poolloader.datasets import ManifestDataset, select

    with poolloader.DataLoader(WithShared(), num_workers=0) as loader:
        rows = loader.dataset.rows
        assert type(rows) is SharedList
        assert rows.column("dur").tolist() == [float(i) for i in range(6)]
        assert list(rows.take([2, 0])) == [{"id": "u2", "dur": 2.0}, {"id": "u0", "dur": 0.0}]
        assert dict(SharedDict(loader.dataset.index)) == {"u1": 1}
    table = tmp_path / "table.csv"
    table.write_text("id,dur,text\n" + "".join(f"u{i},{i}.0,t{i}\n" for i in range(1, 5)))
    manifest = ManifestDataset.from_table(table, lengths="dur", loaders={"text": "text"})
    with poolloader.DataLoader(manifest, num_workers=0) as loader:
        subset = loader.dataset.subset(["u2", "u1"])
        assert type(subset) is ManifestDataset and len(subset) == 2
        assert type(select(loader.dataset, "max", "2")) is ManifestDataset
        assert repr(loader.dataset).startswith("ManifestDataset(")


CURRICULUM_ROWS = [{"id": i, "dur": 1.0 + i % 5} for i in range(40)]


class Curriculum(torch.utils.data.Dataset):
    ROWS = CURRICULUM_ROWS

    def __init__(self) -> None:
        self.rows = SharedList(self.ROWS)

    def reset(self) -> None:
        self.rows = SharedList(self.ROWS)

    def set_epoch(self, max_dur: float) -> None:
        self.rows = SharedList(r for r in self.ROWS if r["dur"] <= max_dur)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.rows[i % len(self.rows)]["id"]


@pytest.mark.parametrize("how", ["assignments", "methods"])
def test_a_shared_list_replaced_twice_between_batches(how):
    """Both replacements fall in one group of changes; the first list is gone in
    the main process by the time the workers would unpickle it. Only the second
    is sent (the first could not have been seen by any batch)."""
    with poolloader.DataLoader(Curriculum(), batch_size=4, num_workers=2,
                               persistent_workers=True,
                               multiprocessing_context="forkserver") as loader:  # fmt: skip
        assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        if how == "methods":
            loader.dataset.reset()
            loader.dataset.set_epoch(3.0)
        else:
            loader.dataset.rows = SharedList(CURRICULUM_ROWS[::-1])
            loader.dataset.rows = SharedList(CURRICULUM_ROWS[::2])
        gc.collect()
        expected = [loader._dataset_target[i] for i in range(8)]
        assert [x for b in loader for x in b.tolist()] == expected


def _read_shared(shared, conn):
    conn.send(list(shared))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_without_proc_the_descriptor_travels_with_the_handle(monkeypatch, method):
    monkeypatch.setattr(poolloader._segment, "_proc_shows_fds", False)
    shared = SharedList(["a", "b", "c"])
    blob = pickle.dumps(shared)  # through this process's resource sharer, once
    assert pickle.loads(blob)._records.segment is shared._records.segment
    context = mp.get_context(method)
    ours, theirs = context.Pipe()
    results = []
    for target, payload in ((_read_shared, shared), (_load_and_read, pickle.dumps(shared))):
        child = context.Process(target=target, args=(payload, theirs))  # passed at start
        child.start()
        assert ours.poll(DEADLINE)
        results.append(ours.recv())
        child.join(DEADLINE)
    assert results == [["a", "b", "c"], ("ok", ["a", "b", "c"])]


CRASH_SCRIPT = """
import json, sys
import multiprocessing as mp
import torch
from poolloader import DataLoader, SharedDict, SharedList


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows, index):
        self.rows, self.index = rows, index

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]["n"] + self.index[self.rows[i]["id"]]


def hold(rows, index, parent_alive, parent_end):
    # A plain fork child: touch the records, then exit when the main process is gone.
    parent_end.close()  # inherited: only the main process may hold the writing end
    sum(row["n"] for row in rows)
    try:
        parent_alive.recv()
    except EOFError:
        pass


if __name__ == "__main__":
    method = sys.argv[1]
    rows = SharedList({"id": f"u{i}", "n": i} for i in range(1000))
    index = SharedDict((f"u{i}", i) for i in range(1000))
    if method == "fork":
        alive_r, alive_w = mp.get_context("fork").Pipe(duplex=False)
        worker = mp.get_context("fork").Process(target=hold, args=(rows, index, alive_r, alive_w))
        worker.start()
        alive_r.close()
        first = [row["n"] for row in rows[:3]]
    else:
        loader = DataLoader(Rows(rows, index), batch_size=3, num_workers=1,
                            multiprocessing_context=method, persistent_workers=True)
        first = next(iter(loader)).tolist()
    names = [rows._records.segment.name, index._keys.segment.name]
    print(json.dumps({"names": names, "first": first}), flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_a_sigkilled_main_process_leaves_no_memory_behind(tmp_path, method):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    shm_before = set(os.listdir("/dev/shm"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    main = subprocess.Popen(
        [sys.executable, str(script), method],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        report = json.loads(main.stdout.readline())
        holders = set().union(*(mappers(name) for name in report["names"]))
    finally:
        main.send_signal(signal.SIGKILL)
        main.wait(DEADLINE)
        main.stdout.close()
        main.stdin.close()
    assert report["first"] == [0, 2, 4] if method != "fork" else [0, 1, 2]
    workers = holders - {main.pid}
    assert main.pid in holders and workers, holders  # a worker mapped it too
    _, alive = psutil.wait_procs(handles(workers), timeout=DEADLINE)
    assert not alive, "workers of a dead main process should exit on their own"
    for name in report["names"]:
        assert mappers(name) == set(), f"{name} is still mapped"
    assert not [n for n in set(os.listdir("/dev/shm")) - shm_before if "poolloader" in n]


def test_public_names_are_exported():
    assert {"SharedDict", "SharedList"} <= set(poolloader.__all__)
