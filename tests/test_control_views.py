"""Tracking views, in one process: every kind of change made through a view,
replayed on a copy of the dataset the way a worker replays it, leaves the copy
equal to the main process's dataset (the worker side runs the same code as
``_worker.py``; ``test_control_changes.py`` runs real workers)."""

from __future__ import annotations

import collections
import heapq
import pickle
import random
import threading

import numpy as np
import pytest
import torch

from poolloader._control import Channel
from poolloader._messages import Call, Changes, SetAttr
from poolloader._replay import apply_update
from poolloader._tracking import _VIEWS, root_view
from poolloader.errors import NotPicklableError


class Sub:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


class Child(Sub):
    def set(self, value: float) -> None:
        super().set(value * 2)  # zero-argument super() with the view as self
        self.calls = getattr(self, "calls", 0) + 1


class State:
    def __init__(self) -> None:
        self.sub = Child()
        self.items = [3, 1, 2]
        self.cfg = {"crop": 1.0}
        self.queue = collections.deque([1, 2, 3])
        self.seen = {1}
        self.raw = bytearray(b"ab")
        self.ordered = collections.OrderedDict(a=1, b=2)
        self.counts = collections.defaultdict(list)
        self.w = np.arange(6, dtype=np.float64)
        self.t = torch.zeros(4)
        self.big = torch.zeros(4096)
        self.long = list(range(10_000))
        self.lock = threading.Lock()  # must not be touched by the copy


class Replica:
    """A worker's copy of ``dataset``, kept up to date from the channel."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.channel = Channel()
        self.view = root_view(dataset, self.channel)
        self.channel.start(pickle.dumps({k: v for k, v in vars(dataset).items() if k != "lock"}))
        self.copy = State.__new__(State)
        self.copy.__dict__.update(pickle.loads(self.channel.base[1]))
        self.generation = 0

    def sync(self) -> list:
        """Apply what the channel recorded since the last sync; the messages sent."""
        generation = self.channel.stamp()
        sent = [
            pickle.loads(pickle.dumps(u)) for u in self.channel.updates(self.generation, generation)
        ]
        for update in sent:
            apply_update(self.copy, update)
        self.generation = generation
        return sent

    def agrees(self) -> bool:
        for name, value in vars(self.dataset).items():
            other = getattr(self.copy, name, None)
            if name == "lock":
                continue
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, other), name
            elif isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            elif isinstance(value, Sub):
                assert vars(value) == vars(other), name
            elif name == "pair":
                assert vars(value[0]) == vars(other[0]) and value[1] == other[1]
            else:
                assert value == other and type(value) is type(other), name
        return True


@pytest.fixture
def replica():
    return Replica(State())


CONTAINER_CHANGES = [
    lambda ds: ds.sub.set(0.5),
    lambda ds: ds.items.append(4),
    lambda ds: ds.items.extend(x for x in range(3)),  # an iterator, consumed here
    lambda ds: ds.items.sort(key=lambda x: -x),  # a lambda: the contents travel
    lambda ds: ds.items.__setitem__(slice(0, 2), [9, 9, 9]),
    lambda ds: ds.cfg.update({"a": 1}.items()),
    lambda ds: ds.cfg.setdefault("aug", {}).__setitem__("p", 0.3),
    lambda ds: ds.queue.rotate(1),
    lambda ds: ds.queue.appendleft(0),
    lambda ds: ds.seen.update({4, 5}),
    lambda ds: ds.raw.extend(b"cd"),
    lambda ds: ds.ordered.move_to_end("a"),
    lambda ds: ds.counts["new"].append(1),  # the defaultdict makes the item first
    lambda ds: ds.__setattr__("items", ds.items.__iadd__([7])),  # items += [7]
    lambda ds: ds.items.__setitem__(0, ds.cfg),  # the dict itself, not its view, goes in
    lambda ds: ds.__setattr__("pair", [ds.sub, ds.cfg]),
]


@pytest.mark.parametrize("change", range(len(CONTAINER_CHANGES)))
def test_container_changes_replay_exactly(replica, change):
    CONTAINER_CHANGES[change](replica.view)
    sent = replica.sync()
    assert len(sent) == 1
    assert replica.agrees()
    held = [*vars(replica.dataset).values(), *replica.dataset.items]
    assert not any(isinstance(v, _VIEWS) for v in [*held, *getattr(replica.dataset, "pair", [])])


ARRAY_CHANGES = [
    lambda ds: ds.w.__setitem__(slice(1, 3), 5),
    lambda ds: ds.w.reshape(2, 3).__setitem__((1, 1), 42),  # a view NumPy returned
    lambda ds: ds.w.T.__setitem__(0, -1),
    lambda ds: ds.w[::2].__iadd__(10),
    lambda ds: np.add(ds.w, 1, out=ds.w),
    lambda ds: np.copyto(ds.w, np.ones(6)),
    lambda ds: np.add.at(ds.w, [0, 0, 1], 1),
    lambda ds: ds.w.fill(2),
    lambda ds: ds.w[::-1].sort(),
    lambda ds: ds.w.flat.__setitem__(2, 9.0),
    lambda ds: ds.w.reshape(2, 3).T.flat.__setitem__(slice(1, 4), [7.0, 8.0]),
    lambda ds: ds.t.fill_(3),
    lambda ds: ds.t.view(2, 2)[1].add_(1),
    lambda ds: ds.t.chunk(2)[1].fill_(5),
    lambda ds: ds.t.view(2, 2).T.__setitem__(0, 8),
    lambda ds: ds.t.numpy().__setitem__(0, 9),
    lambda ds: torch.nn.init.uniform_(ds.big),  # random: the values drawn travel
    lambda ds: ds.big[:10].normal_(),
    lambda ds: torch.add(ds.t, 1, out=ds.t),
    # A new shape: the copy takes it (writing the values in would broadcast them).
    lambda ds: ds.t.resize_(1),
    lambda ds: ds.t.unsqueeze_(0),
    lambda ds: ds.t.resize_(6).fill_(2),
]


@pytest.mark.parametrize("change", range(len(ARRAY_CHANGES)))
def test_array_and_tensor_changes_replay_exactly(replica, change):
    before = (replica.dataset.w.copy(), replica.dataset.t.clone(), replica.dataset.big.clone())
    ARRAY_CHANGES[change](replica.view)
    after = (replica.dataset.w, replica.dataset.t, replica.dataset.big)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "it changed something"
    replica.sync()
    assert replica.agrees()


def test_augmented_assignment_sends_the_operation_only(replica):
    replica.view.w += 1
    replica.view.t += 1
    replica.view.items += [4]
    (sent,) = replica.sync()
    assert isinstance(sent, Changes) and len(sent.updates) == 3
    assert all(isinstance(u, Call) for u in sent.updates), "no SetAttr pickling the whole value"
    assert replica.agrees()


def test_results_that_share_no_memory_stay_writable(replica):
    joined = np.concatenate([replica.view.w, replica.view.w])
    joined[0] = 5  # a new array: nothing to carry, nothing to refuse
    assert replica.sync() == []


def test_reads_record_nothing(replica):
    view = replica.view
    len(view.items), view.items[0], view.cfg.get("crop"), view.cfg.pop("missing", None)
    list(view.items), sorted(view.seen), view.w.sum(), view.w.reshape(3, 2), view.t.sum()
    view.t.view(2, 2), view.sub.value, view.ordered.get("a"), view.queue[0], view.long[5]
    view.items.extend([]), view.seen.discard(99), str(view), repr(view.cfg)
    assert replica.sync() == []


def test_many_writes_into_one_container_become_its_contents(replica):
    random.Random(0).shuffle(replica.view.long)
    (sent,) = replica.sync()
    size = len(pickle.dumps(sent))
    assert size < 3 * len(pickle.dumps(replica.dataset.long)), size
    assert replica.agrees()


def test_an_unpicklable_value_fails_before_the_change(replica):
    """It names the value and why it must pickle: not the start method (fork's
    workers need the change pickled as much as spawn's)."""
    with pytest.raises(NotPicklableError, match=r"dataset\.sub\.value") as info:
        replica.view.sub.value = threading.Lock()
    assert "made through loader.dataset reaches running workers by pickling" in str(info.value)
    assert "spawn or forkserver" not in str(info.value)
    assert replica.dataset.sub.value == 0.0
    with pytest.raises(NotPicklableError, match=r"dataset\.cfg\['x'\]"):
        replica.view.cfg["x"] = threading.Lock()
    assert "x" not in replica.dataset.cfg


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v.items.append(threading.Lock()),
        lambda v: v.items.extend([4, threading.Lock()]),
        lambda v: v.items.insert(0, threading.Lock()),
        lambda v: v.cfg.update(f=threading.Lock()),
        lambda v: v.ordered.update(c=threading.Lock()),
        lambda v: v.queue.appendleft(threading.Lock()),
        lambda v: v.seen.add(threading.Lock()),
        lambda v: v.seen.update([2, threading.Lock()]),
    ],
    ids=[
        "list.append",
        "list.extend",
        "list.insert",
        "dict.update",
        "OrderedDict.update",
        "deque.appendleft",
        "set.add",
        "set.update",
    ],
)
def test_a_refused_call_leaves_the_container_as_it_was(replica, mutate):
    """A container method whose argument does not pickle is refused as assigning it
    is: the container is as it was, here as in the workers (appended here, it left
    the main process and the workers with lists of different lengths)."""
    names = ("items", "cfg", "ordered", "queue", "seen")
    before = {name: pickle.dumps(getattr(replica.dataset, name)) for name in names}
    with pytest.raises(NotPicklableError):
        mutate(replica.view)
    for name in names:
        assert pickle.dumps(getattr(replica.dataset, name)) == before[name], name
    replica.view.items.append(7)  # and changes go on as before
    replica.sync()
    assert replica.agrees()


def test_a_call_that_does_not_pickle_still_sends_what_it_made(replica):
    """Where only the call fails to pickle (a lambda sort key), the container's
    contents travel instead: nothing is put back."""
    replica.view.items.sort(key=lambda x: -x)
    assert replica.dataset.items == [3, 2, 1]
    replica.sync()
    assert replica.agrees()


def test_a_method_that_sets_several_attributes_is_one_message(replica):
    replica.view.sub.set(1.5)
    replica.view.sub.set(2.5)
    (sent,) = replica.sync()
    assert isinstance(sent, Changes) and {type(u) for u in sent.updates} == {SetAttr}
    assert replica.dataset.sub.value == 5.0 and replica.dataset.sub.calls == 2
    assert replica.agrees()


# ------------------------------------------------------------ references kept


def test_a_kept_reference_to_an_item_that_moved_changes_it_where_it_is_now(replica):
    """NOTE [ Stale references ]: the change goes to the record itself, at its new
    place, not to whatever now sits where it was read."""
    replica.view.records = [{"id": i, "w": 0} for i in range(4)]
    replica.sync()
    record = replica.view.records[1]
    replica.view.records.insert(0, replica.view.records.pop())  # record 1 is at [2] now
    record["w"] = 99
    replica.sync()
    assert replica.agrees()
    assert [r["w"] for r in replica.copy.records] == [0, 0, 99, 0]


def test_a_change_through_a_reference_to_a_replaced_object_is_refused(replica):
    """The object is no longer in the dataset: replaying the change at its old path
    would change its successor in the workers. Nothing changes, anywhere."""
    sub = replica.view.sub
    replica.view.sub = Child()
    replica.sync()
    with pytest.raises(RuntimeError, match=r"dataset\.sub no longer holds the object"):
        sub.set(0.7)
    with pytest.raises(RuntimeError, match="Take the reference again"):
        sub.value = 0.7
    replica.sync()
    assert replica.agrees()
    assert replica.dataset.sub.value == 0.0 and sub.value == 0.0


C_WRITES = {
    "heappush": (lambda ds: heapq.heappush(ds.items, 0), "items", [0, 3, 2, 1]),
    "heapify": (lambda ds: heapq.heapify(ds.items), "items", [1, 3, 2]),
    "heapreplace": (lambda ds: heapq.heapreplace(ds.items, 7), "items", [1, 7, 2]),
    "list.__setitem__": (lambda ds: list.__setitem__(ds.items, 1, 5), "items", [3, 5, 2]),
    "dict.__setitem__": (lambda ds: dict.__setitem__(ds.cfg, "crop", 2.0), "cfg", {"crop": 2.0}),
    "dict.update": (lambda ds: dict.update(ds.cfg, p=0.5), "cfg", {"crop": 1.0, "p": 0.5}),
}


@pytest.mark.parametrize("write", list(C_WRITES))
def test_a_c_write_into_a_views_own_items_reaches_the_object_and_the_workers(replica, write):
    """NOTE [ Writes into a view's own items ]: the main process's object and the
    workers' copies both end up with what the C code wrote, in one message."""
    change, name, expected = C_WRITES[write]
    change(replica.view)
    assert len(replica.sync()) == 1
    assert getattr(replica.dataset, name) == expected
    assert getattr(replica.copy, name) == expected
    assert replica.agrees()


def test_a_write_into_a_views_own_items_then_a_method_keeps_both(replica):
    """The C write settles before the method's change, in the order they were made."""
    queue = replica.view.items
    heapq.heappush(queue, 0)
    queue.append(9)
    replica.sync()
    assert replica.dataset.items == [0, 3, 2, 1, 9]
    assert replica.agrees()


def test_a_write_into_a_views_own_items_survives_the_next_read(replica):
    """Taking the view again refreshes its items from the object: the write
    settles first, and is neither undone nor lost."""
    heapq.heappush(replica.view.items, 0)
    assert list(replica.view.items) == [0, 3, 2, 1]
    assert replica.dataset.items == [0, 3, 2, 1]
    replica.sync()
    assert replica.agrees()


def test_a_write_into_the_items_of_a_replaced_list_warns(replica):
    """The list left the dataset: its write cannot go anywhere in the workers, and
    the submission that finds it says so instead of failing."""
    queue = replica.view.items
    replica.view.items = [5, 6]
    replica.sync()
    heapq.heappush(queue, 0)
    with pytest.warns(RuntimeWarning, match=r"heapq.*dataset\.items no longer holds"):
        replica.sync()
    assert replica.dataset.items == [5, 6]
    assert replica.agrees()


def test_views_of_arrays_and_tensors_compare_them_by_identity(replica):
    """A list of arrays and a dict of tensors: their ``==`` cannot say whether the
    items changed (it raises), so a reread after the object changed behind the
    view, and a settle after a C write, go by identity."""
    replica.view.arrays = [np.zeros(3), np.ones(3)]
    replica.view.named = {"a": torch.zeros(3)}
    replica.sync()
    arrays, named = replica.view.arrays, replica.view.named
    replica.dataset.arrays[0] = np.full(3, 5.0)  # behind the view: not carried
    replica.dataset.named["a"] = torch.ones(3)
    assert list.__getitem__(replica.view.arrays, 0)[0] == 5.0
    assert dict.__getitem__(replica.view.named, "a")[0] == 1.0
    list.__setitem__(arrays, 1, np.full(3, 7.0))  # C code writing into the view
    dict.__setitem__(named, "b", torch.full((3,), 2.0))
    replica.sync()
    assert replica.dataset.arrays[1][0] == 7.0 and replica.copy.arrays[1][0] == 7.0
    assert replica.dataset.named["b"][0] == 2.0 and replica.copy.named["b"][0] == 2.0


def test_a_kept_reference_whose_place_is_unchanged_records_as_before(replica):
    cfg, w = replica.view.cfg, replica.view.w
    replica.view.items.append(5)
    cfg["crop"] = 2.0
    w[0] = 7.0
    replica.sync()
    assert replica.agrees()
