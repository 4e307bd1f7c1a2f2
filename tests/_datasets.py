"""Datasets and functions the tests send to workers (importable by spawn workers)."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

import poolloader


class Squares(Dataset):
    """Item i is {"x": tensor([i, i*i]), "i": i, "name": f"item{i}"}."""

    def __init__(self, n: int = 23) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"x": torch.tensor([i, i * i]), "i": i, "name": f"item{i}"}


class Plain(Dataset):
    """Item i is the integer i times ``scale``."""

    def __init__(self, n: int = 20, scale: int = 1) -> None:
        self.n, self.scale = n, scale

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i * self.scale


class WhoLoaded(Dataset):
    """Item i: (i, worker id, the dataset's ``value``) — records what each worker saw."""

    def __init__(self, n: int = 40, value: float = 1.0, delay: float = 0.0) -> None:
        self.n, self.value, self.delay = n, value, delay
        self.transform = Scale(1.0)
        self.cfg = {"crop": 1.0}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        info = get_worker_info()
        worker = info.id if info is not None else -1
        return (i, worker, self.value, self.transform.p, self.cfg.get("crop"))


class Scale:
    def __init__(self, p: float) -> None:
        self.p = p


class Counted(IterableDataset):
    """Each worker yields its shard of range(n) (by worker id), like torch's docs."""

    def __init__(self, n: int = 25) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return iter(range(self.n))
        return iter(range(info.id, self.n, info.num_workers))


class Uneven(IterableDataset):
    """Worker k yields 3 * (k + 1) items: shards end at different times."""

    def __iter__(self):
        info = get_worker_info()
        k = info.id if info is not None else 0
        return iter(range(100 * k, 100 * k + 3 * (k + 1)))


class Random(Dataset):
    """Items drawn from python, numpy and torch generators."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        import random

        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(()).item()])


class Failing(Dataset):
    """Raises ValueError for item ``bad``; KeyError for ``missing``."""

    def __init__(self, n: int = 12, bad: int = 5, missing: int = -1) -> None:
        self.n, self.bad, self.missing = n, bad, missing

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"item {i} is corrupt")
        if i == self.missing:
            raise KeyError(f"utt{i}")
        return i


class StopsAt(Dataset):
    """Item ``stop`` raises StopIteration (a ``next()`` on an empty iterator, say)."""

    def __init__(self, n: int = 12, stop: int = 5) -> None:
        self.n, self.stop = n, stop

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.stop:
            return next(iter(()))
        return i


class Sleepy(Dataset):
    """Item ``slow`` sleeps ``seconds``."""

    def __init__(self, n: int = 8, slow: int = 2, seconds: float = 30.0) -> None:
        self.n, self.slow, self.seconds = n, slow, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.slow:
            time.sleep(self.seconds)
        return i


class SlowToUnpickle(Plain):
    """:class:`Plain` whose unpickling takes ``seconds`` (an index built on load)."""

    def __init__(self, n: int = 8, seconds: float = 4.0) -> None:
        super().__init__(n)
        self.seconds = seconds

    def __setstate__(self, state: dict[str, Any]) -> None:
        time.sleep(state["seconds"])
        self.__dict__.update(state)


def sleep_in_init(worker_id: int) -> None:
    """A ``worker_init_fn`` that takes 4 s."""
    time.sleep(4.0)


class WithInnerLoader(Dataset):
    """Item i is ``[i, the sum of an epoch of an inner poolloader over range(12)]``;
    each worker keeps its inner loader (persistent workers) for every item."""

    loader: ClassVar[Any] = None

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if WithInnerLoader.loader is None:
            WithInnerLoader.loader = poolloader.DataLoader(
                list(range(12)), batch_size=3, num_workers=2, persistent_workers=True
            )
        return torch.tensor([i, sum(int(b.sum()) for b in WithInnerLoader.loader)])


class SlowToPickle(Plain):
    """:class:`Plain` whose pickling (in the main process, as a pool starts) takes
    ``seconds``."""

    def __init__(self, n: int = 8, seconds: float = 1.5) -> None:
        super().__init__(n)
        self.seconds = seconds

    def __getstate__(self) -> dict[str, Any]:
        time.sleep(self.seconds)
        return dict(self.__dict__)


class Scaled(Dataset):
    """Item i is ``i * scale`` (``scale`` 1 unless changed), for i in range(40)."""

    def __init__(self) -> None:
        self.scale = 1

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int):
        return torch.tensor(i * self.scale)


class Nested(Dataset):
    """Each item is computed in a process pool the dataset starts in its worker."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if self.kind == "pool":
            with get_context("spawn").Pool(1) as pool:
                return pool.apply(_square, (i,))
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            return pool.submit(_square, i).result()


def _square(i: int) -> int:
    return i * i


class SpawnsSleeper(Dataset):
    """Starts a long-lived grandchild process (a `sleep`) and returns its pid."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import subprocess

        proc = subprocess.Popen(["sleep", "300"])
        return proc.pid


class KeepsForkPool(Dataset):
    """Each worker keeps a fork-context ``multiprocessing.Pool`` of two processes
    (started on first use), which replaces the processes it loses from a thread
    of its own; an item is its index squared in that pool."""

    pool: ClassVar[Any] = None

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        if KeepsForkPool.pool is None:
            KeepsForkPool.pool = get_context("fork").Pool(2)
        return KeepsForkPool.pool.apply(_square, (i,))


class HoldsLock(Dataset):
    def __init__(self) -> None:
        import threading

        self.reader = Reader()
        self.reader.lock = threading.Lock()

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return i


class Reader:
    pass


def add_value(dataset, amount):
    dataset.value += amount


def record_pid(worker_id: int) -> None:
    info = poolloader.get_worker_info()
    assert info is not None and info.id == worker_id
    os.environ["POOLLOADER_TEST_INIT"] = str(worker_id)


def pid_of_worker(_):
    return os.getpid()


def collate_sum(batch):
    return sum(batch)


class Mixed(Dataset):
    """Items with big and small tensors and arrays, strings and nesting."""

    def __init__(self, n: int = 12, side: int = 64) -> None:
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        big = torch.full((self.side, self.side), float(i))
        return {
            "image": big,
            "array": np.full((self.side, self.side), i, dtype=np.int32),
            "small": torch.tensor([i, -i]),
            "name": f"utt{i}",
            "nested": [big[:2].t(), (np.arange(3) + i, torch.tensor(i, dtype=torch.bfloat16))],
        }


def keep_numpy(batch):
    """Collate that keeps NumPy arrays as arrays (torch's would make tensors)."""
    return {
        "arrays": np.stack([item["array"] for item in batch]),
        "names": [item["name"] for item in batch],
        "image": torch.stack([item["image"] for item in batch]),
    }


class Growing(Dataset):
    """Item i is a float tensor of 1000 * (i + 1) * 64 bytes: later batches outgrow slabs."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return torch.full((1000 * (i + 1), 16), float(i))


class ConjugatedSub(torch.Tensor):
    """A tensor subclass (LazyBits holds a conjugated one)."""


class LazyBits(Dataset):
    """Items holding tensors whose conjugation or negation is a lazy bit on a view
    (``.conj()`` of a complex tensor, the ``.imag`` of that), small and large; also
    as a leaf that needs grad, an ``nn.Parameter`` and a subclass."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        found = {}
        for size in (3, 50_000):
            z = (torch.arange(size, dtype=torch.float32) + i).to(torch.complex64) * (1 + 2j)
            found[f"conj{size}"] = z.conj()
            found[f"neg{size}"] = z.conj().imag
            found[f"neg_window{size}"] = z.conj().imag[1:]
        found["needs_grad"] = z.conj().detach().requires_grad_()
        found["parameter"] = torch.nn.Parameter(z.conj(), requires_grad=False)
        found["subclass"] = z.as_subclass(ConjugatedSub).conj()
        return found


class DtypeZoo(Dataset):
    """Tensors of many dtypes and layouts, some big enough for slabs."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        n = 20_000
        base = torch.arange(n, dtype=torch.float32) + i
        return {
            "bf16": base.to(torch.bfloat16),
            "f16": base.to(torch.float16),
            "c64": torch.complex(base, -base),
            "bool": base.to(torch.int64) % 3 == 0,
            "u8": (base.to(torch.int64) % 256).to(torch.uint8),
            "empty": torch.empty(0, 3),
            "strided": base.view(100, 200).t(),
            "grad": torch.ones(3, requires_grad=False),
        }


class NumpyZoo(Dataset):
    """NumPy arrays whose dtype or layout a raw copy must not lose: structured,
    datetime, strings, Fortran order; each small (inline) and big (slab)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        n = 30 if i == 0 else 30_000
        record = np.zeros(n, dtype=[("a", "<i4"), ("b", "<f8"), ("c", "<f4", (2,))])
        record["a"] = np.arange(n)
        record["b"] = np.arange(n) / 3
        grid = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        return {
            "record": record,
            "when": np.arange(n).astype("datetime64[s]"),
            "took": np.arange(n).astype("timedelta64[ms]"),
            "text": np.array([f"utt{k}" for k in range(n)]),
            "raw": np.array([b"ab", b"c"] * (n // 2)),
            "fortran": np.asfortranarray(grid),
            "strided": grid[::2, 1:3],
            "scalar": np.array(3.5),
            "big_endian": np.arange(n, dtype=">f4"),
        }


def as_is(item):
    """collate_fn for ``batch_size=None`` that keeps the item as it is (torch's
    default would turn arrays into tensors)."""
    return item


class Slots:
    """A batch index that splits by slot: slot b is loaded by worker b % num_workers."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def poolloader_split(self, num_workers: int):
        return [(w, SlotPart(self.items[w::num_workers], w)) for w in range(num_workers)]

    def poolloader_merge(self, parts):
        merged = [None] * len(self.items)
        for w, part in enumerate(parts):
            merged[w :: len(parts)] = part
        return merged


class SlotPart:
    def __init__(self, items: list[int], worker: int) -> None:
        self.items, self.worker = items, worker


class SlotReader(Dataset):
    """Reads a whole Slots index (num_workers=0) or one worker's part of it."""

    def __getitem__(self, index):
        info = get_worker_info()
        if isinstance(index, SlotPart):
            assert info is not None and info.id == index.worker, "part ran on the wrong worker"
            return [(i, info.id) for i in index.items]
        return [(i, -1) for i in index.items]


class SlowFirst(Dataset):
    """Item ``i`` is a 64 KiB float tensor full of ``i`` (it travels in a slab); item 0
    takes ``seconds`` first."""

    def __init__(self, n: int = 24, seconds: float = 1.0) -> None:
        self.n, self.seconds = n, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 0:
            time.sleep(self.seconds)
        return torch.full((16384,), float(i))


class SizedParts(Dataset):
    """Item k holds ``parts`` tensors (and one NumPy array) of ``sizes[k]`` floats,
    every element equal to k: a batch that arrives with another batch's memory,
    or with memory nobody wrote, shows it in every element."""

    def __init__(self, sizes: list[int], parts: int = 3) -> None:
        self.sizes, self.parts = sizes, parts

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, k: int):
        n = self.sizes[k]
        tensors = [torch.full((n,), float(k)) for _ in range(self.parts)]
        return {"tensors": tensors, "array": np.full((n // 2,), k, dtype=np.int32), "k": k}


def wrong_parts(batch, k: int) -> list[str]:
    """What in a SizedParts batch (batch_size=1) does not hold item k."""
    wrong = [f"tensors[{i}]" for i, t in enumerate(batch["tensors"]) if not bool((t == k).all())]
    if not bool((batch["array"] == k).all()):
        wrong.append("array")
    if batch["k"].tolist() != [k]:
        wrong.append("k")
    return wrong


class TensorSubclass(torch.Tensor):
    """A tensor subclass, as libraries define them (torchvision's tv_tensors, say)."""


class Exotic(Dataset):
    """Tensors the slab transport cannot lay out as plain bytes: nested (both
    layouts), sparse, quantized, a subclass, a Parameter. Big enough that plain
    tensors of that size would travel through a slab."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        import warnings

        base = torch.arange(20_000, dtype=torch.float32) + i
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
            nested = torch.nested.nested_tensor([base[:100], base[: 7_000 + i]])
        return {
            "nested": nested,
            "jagged": torch.nested.nested_tensor([base[:5], base[: 9 + i]], layout=torch.jagged),
            "sparse": torch.eye(300).mul(i).to_sparse(),
            "quantized": torch.quantize_per_tensor(base, 0.5, 0, torch.quint8),
            "subclass": base.as_subclass(TensorSubclass),
            "parameter": torch.nn.Parameter(base.clone()),
            "plain": base,
        }


def keep_items(batch):
    """A collate_fn that hands the items over as they are (a list)."""
    return batch


def dense(value):
    """``value`` as a plain tensor (or list of them) for comparing exotic layouts."""
    if value.is_nested:
        return [t.clone() for t in value.unbind()]
    if value.layout != torch.strided:
        return value.to_dense()
    if value.is_quantized:
        return value.dequantize()
    return value.detach()


class CountedWithValue(Counted):
    """:class:`Counted`, yielding ``(item, value)``: ``value`` shows which changes an
    item's batch saw."""

    def __init__(self, n: int = 40, value: float = 1.0) -> None:
        super().__init__(n)
        self.value = value

    def __iter__(self):
        for item in super().__iter__():
            yield (item, self.value)


class Views(Dataset):
    """Item i: a tensor and views of it (a slice, a transpose, an offset row), some
    small enough to travel inline, some through a slab."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        side = 8 if i % 2 else 256
        base = torch.arange(side * side, dtype=torch.float32).reshape(side, side) + i
        return {"base": base, "t": base.T, "row": base[3], "cols": base[:, 1:3], "other": base + 1}


class SizeOneStrides(Dataset):
    """Item i: contiguous tensors whose strides are not a new tensor's, through
    dimensions of size 1 or 0 (``is_contiguous()`` overlooks them), and empty slices
    of storages that are not, small and big."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        n = 4 if i % 2 else 10_000
        return {
            "row_of_column": torch.full((n, 1), float(i)).t(),  # (1, n), strides (1, 1)
            "empty_t": torch.zeros(0, 3).t(),  # (3, 0), strides (1, 3)
            "one_t": torch.full((1, 1), float(i)).t(),
            "permuted": torch.arange(2 * n, dtype=torch.int64).reshape(2, 1, n).permute(1, 0, 2),
            "empty_column": torch.zeros(5, 0)[:, None],
            # Empty slices of storages that are not empty (data_ptr() says 0 for them).
            "empty_slice": torch.arange(n, dtype=torch.float32)[3:3],
            "empty_columns": torch.arange(4.0 * n).view(4, n)[:, 2:2],
            "empty_at_start": torch.arange(n)[0:0],
        }


def in_slab(address: int) -> bool:
    """Whether ``address`` of this process lies in a poolloader slab mapping."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "poolloader-slab" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start <= address < end:
                    return True
    return False


def stack_into_batch_buffer(items):
    """A NumPy collate_fn that writes into poolloader.batch_buffer, and says
    whether the memory it got is a slab."""
    import poolloader

    out = poolloader.batch_buffer((len(items), *np.shape(items[0])), np.float32)
    np.stack([np.asarray(i, dtype=np.float32) for i in items], out=out)
    return {"x": out, "in_slab": in_slab(out.ctypes.data)}


class Filled(Dataset):
    """Item i: 20,000 floats of value i (big enough to travel in a slab)."""

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((20_000,), float(i))


def views_of_batch_buffer(items):
    """A collate_fn that stacks into poolloader.batch_buffer and returns views of
    it beside it, as a model's input and its transposed copy might be."""
    import poolloader

    out = poolloader.batch_buffer((len(items), *items[0].shape), items[0].dtype)
    torch.stack(items, out=out)
    return {"head": out[:, :10], "t": out.t(), "whole": out}


class Rows(Dataset):
    """Item i is ``rows[i]["v"]``: a manifest of dict records, changed in place.

    ``cyclic``: the dataset refers to itself. ``shared_blob``: every row holds the
    same 1 MiB bytes object, so a pickle without a memo is as many times bigger
    than the plain one as there are rows."""

    def __init__(self, n: int = 6, cyclic: bool = False, shared_blob: bool = False) -> None:
        blob = bytes(2**20) if shared_blob else b""
        self.rows = [{"v": i, "blob": blob} for i in range(n)]
        self.me = self if cyclic else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]["v"]


class WaitsForTemplate(Dataset):
    """Pickling it waits (up to 30 s) until a template process runs, and records
    whether one came: it does only if the template starts before the dataset is
    pickled (NOTE [ Templates ])."""

    template_seen: ClassVar[list[bool]] = []

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return i

    def __getstate__(self):
        if not WaitsForTemplate.template_seen:
            from _procs import template_pids

            deadline = time.monotonic() + 30
            while not template_pids() and time.monotonic() < deadline:
                time.sleep(0.02)
            WaitsForTemplate.template_seen.append(bool(template_pids()))
        return self.__dict__


class WaitsForOthers(Dataset):
    """Item ``stall`` waits (up to ``patience`` s) until ``ahead`` items after it
    have been loaded and returns how many it saw; every other item takes
    ``seconds`` (the items before the stall ``before`` each), then leaves a note
    in ``where`` and returns 0. Only a loader that loads ahead of a stalled batch
    within 4 s sees them all (the consumer's health check comes every 5 s,
    ``_waiting.WAIT_SLICE``). With ``megabytes``, each item is that many MiB of
    float32 holding its number instead of the bare number."""

    def __init__(self, where: str, n: int = 40, stall: int = 10, ahead: int = 5,
                 seconds: float = 0.005, before: float = 0.005, patience: float = 4.0,
                 megabytes: int = 0) -> None:  # fmt: skip
        self.where, self.n, self.stall, self.ahead = where, n, stall, ahead
        self.seconds, self.before, self.patience = seconds, before, patience
        self.megabytes = megabytes

    def __len__(self) -> int:
        return self.n

    def _seen(self) -> int:
        notes = os.listdir(self.where)
        return sum(1 for name in notes if int(name.split("-")[1]) > self.stall)

    def _item(self, value: int):
        if not self.megabytes:
            return value
        return torch.full((self.megabytes * 2**18,), float(value))

    def __getitem__(self, i: int):
        if i != self.stall:
            time.sleep(self.before if i < self.stall else self.seconds)
            open(os.path.join(self.where, f"loaded-{i}"), "w").close()
            return self._item(0)
        deadline = time.monotonic() + self.patience
        while self._seen() < self.ahead and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._item(self._seen())


class Ballast(Dataset):
    """Item ``i`` is ``i`` after ``delay`` seconds, loaded by a worker that holds
    ``megabytes`` of touched memory: a killed worker takes a while to exit."""

    def __init__(self, n: int, megabytes: int = 128, delay: float = 0.02) -> None:
        self.n, self.megabytes, self.delay = n, megabytes, delay
        self._ballast: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if self._ballast is None:  # in the worker, not pickled with the dataset
            self._ballast = np.ones(self.megabytes * 2**20 // 8)
        time.sleep(self.delay)
        return i

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ballast": None}


class TokenWindows(Dataset):
    """Item ``i``: a window of 1,001 tokens of one 16 MB token tensor (a language
    model's usual dataset), a view of that big storage."""

    def __init__(self, n: int = 24) -> None:
        self.n = n
        self.tokens = torch.arange(4_000_000, dtype=torch.int32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * 1000 : (i + 1) * 1000 + 1]


class OddWav(Dataset):
    """Item ``i``: 16-bit samples viewed in a file's bytes after a 44-byte header;
    the file's length (and so the storage's) is odd."""

    def __init__(self, samples: int = 50_000) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        raw = torch.full((44 + 2 * self.samples + 1,), i, dtype=torch.uint8)
        return raw[44 : 44 + 2 * self.samples].view(torch.int16)


class Ranges(Dataset):
    """Item ``i``: 2,049 int64 values from ``10_000 * i``."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> np.ndarray:
        return np.arange(2049, dtype=np.int64) + 10_000 * i


def overlapping_parts(items: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Items stacked into a poolloader.batch_buffer; two slices of it that overlap."""
    import poolloader

    out = poolloader.batch_buffer((len(items), 2049), np.int64)
    np.stack(items, out=out)
    return {"first": out[:4], "rest": out[2:]}


class MetaTensors(Dataset):
    """Items on torch's "meta" device (shape and dtype, no data): a non-CPU tensor
    the default collate can stack, as torch's loader does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.empty(4, device="meta")


class ImagesWithLabels(Dataset):
    """Item ``i``: a 768 KB image and a small label tensor holding ``i``."""

    def __len__(self) -> int:
        return 16 * 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.ones(3, 256, 256), "label": torch.full((512,), i)}


RECORD_BYTES = 4096


def write_records(path: str, n: int) -> None:
    """A file of ``n`` records of :data:`RECORD_BYTES`; every byte of record i is i."""
    with open(path, "wb") as f:
        for i in range(n):
            f.write(bytes([i]) * RECORD_BYTES)


class OpensOnUnpickle(Dataset):
    """Reads record i of a file it opens again when unpickled (``__setstate__``),
    the usual way to keep an open file out of a pickle: seek, a pause, read. With
    ``on_unpickle=False`` it opens the file on first use, or when told to."""

    def __init__(self, path: str, n: int, on_unpickle: bool = True) -> None:
        self.path, self.n, self.on_unpickle = path, n, on_unpickle
        self.file: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n, "on_unpickle": self.on_unpickle, "file": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.on_unpickle:
            self.open()

    def open(self) -> None:
        """Open the file (kept open for the dataset's life)."""
        self.file = open(self.path, "rb", buffering=0)  # noqa: SIM115

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.file is None:  # (on_unpickle=False: on first use, in each worker)
            self.open()
        self.file.seek(i * RECORD_BYTES)
        time.sleep(0.005)
        return self.file.read(RECORD_BYTES)[0]


class DrawsOnUnpickle(Dataset):
    """Item i is a number from a generator seeded from the system's randomness when
    the dataset is unpickled (``__setstate__``), and the worker's pid."""

    def __init__(self, n: int = 16) -> None:
        self.n = n
        self.rng: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"n": self.n}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(0.01)
        return torch.tensor([int(self.rng.integers(1 << 40)), os.getpid()])


class RandomOnUnpickle(Dataset):
    """Item i is a number from a ``random.Random`` made when the dataset is unpickled
    (``__setstate__``): seeded from the system's randomness (``"system"``), or from
    the one the dataset was pickled with (``"pickled"``, the same state in every
    worker, as with torch). ``"imports"``: it also imports, there, a submodule of an
    imported package that draws the system's randomness when imported."""

    def __init__(self, n: int = 16, how: str = "system") -> None:
        self.n, self.how = n, how
        self.rng = random.Random(7)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.how != "pickled":
            del state["rng"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.how == "imports":
            import _lazy_imports
            from _lazy_imports import draws  # noqa: F401 (its import draws)

            self.rng = random.Random(_lazy_imports.__name__)
        elif self.how == "system":
            self.rng = random.Random()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(0.01)
        return self.rng.getrandbits(40)


class FailsAt(IterableDataset):
    """Yields 0, 1, 2, ... and raises ValueError at ``bad`` (in worker 0 only, when
    there are workers)."""

    def __init__(self, n: int = 12, bad: int = 5) -> None:
        self.n, self.bad = n, bad

    def __iter__(self):
        info = get_worker_info()
        if info is not None and info.id != 0:
            return
        for i in range(self.n):
            if i == self.bad:
                raise ValueError(f"record {i} is corrupt")
            yield i


class Tagged:
    """A value that says how it was pickled: ``reduced`` once a reducer is registered."""

    def __init__(self, value: int, how: str = "plain") -> None:
        self.value, self.how = value, how


def reduce_tagged(tagged: Tagged) -> tuple[Any, tuple[int, str]]:
    return Tagged, (tagged.value, "reduced")


class RegistersReducer(Dataset):
    """Items are :class:`Tagged`; item ``at`` registers a reducer for them with
    multiprocessing's pickler first, as code that adds a reduction late does."""

    def __init__(self, n: int, at: int) -> None:
        self.n, self.at = n, at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tagged:
        if i == self.at:
            from multiprocessing.reduction import ForkingPickler

            ForkingPickler.register(Tagged, reduce_tagged)
        return Tagged(i)


class Table(Dataset):
    """Item i is ``table[i]`` where the table has it, else ``i * scale + extra``
    (``extra`` 0 where unset) plus how many entries ``log`` has, ``weights[i]`` and
    ``offsets[i]``: changed by setting ``scale`` or ``extra``, deleting ``extra``,
    setting or deleting the table's items, appending to the log and adding to the
    weights (a NumPy array) or the offsets (a tensor too big to travel whole)."""

    def __init__(self, n: int = 6) -> None:
        self.n, self.scale, self.table, self.log = n, 1, {}, []
        self.weights = np.zeros(n, dtype=np.int64)
        self.offsets = torch.zeros(2048, dtype=torch.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        made = i * self.scale + getattr(self, "extra", 0) + len(self.log)
        return self.table.get(i, made + int(self.weights[i]) + int(self.offsets[i]))


class SlowEvery(Dataset):
    """Item ``i`` is ``kib`` KiB of float32 holding ``i``, after ``slow`` seconds
    for every ``every``-th item and ``fast`` for the others: the slow items land
    on one worker after another, and the others run ahead of them."""

    def __init__(self, n: int, kib: int = 1024, every: int = 8, slow: float = 0.06,
                 fast: float = 0.002) -> None:  # fmt: skip
        self.n, self.kib, self.every, self.slow, self.fast = n, kib, every, slow, fast

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(self.slow if i % self.every == 0 else self.fast)
        return torch.full((self.kib * 256,), float(i))


class SubclassAndPlain(Dataset):
    """Item i: the same 30,000 floats of value i as a :class:`TensorSubclass` and as a
    plain tensor (which makes the batch travel through a slab), and i."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        values = torch.full((30_000,), float(i))
        return {"sub": values.as_subclass(TensorSubclass), "plain": values.clone(), "i": i}


def into_batch_buffer_as_is(items):
    """A collate_fn that writes into poolloader.batch_buffer and returns what the
    skeleton cannot describe: a tensor that needs grad, and a subclass view with an
    attribute (plus a plain stack, so that the batch travels through a slab)."""
    import poolloader

    values = [item["plain"] for item in items]
    shape = (len(values), *values[0].shape)
    grad = poolloader.batch_buffer(shape, values[0].dtype)
    torch.stack(values, out=grad)
    sub = poolloader.batch_buffer(shape, values[0].dtype)
    torch.stack(values, out=sub)
    sub = sub.as_subclass(TensorSubclass)
    sub.note = [item["i"] for item in items]
    return {"grad": grad.requires_grad_(), "sub": sub, "plain": torch.stack(values)}


def share_by_file_system(worker_id: int) -> None:
    """worker_init_fn: torch's ``file_system`` sharing strategy in the worker."""
    torch.multiprocessing.set_sharing_strategy("file_system")


class OneUnpicklableIndex:
    """A batch sampler of one-index batches over ``range(n)``, except that batch
    ``position`` of epoch ``epoch`` is an index that cannot be pickled."""

    def __init__(self, n: int, epoch: int, position: int) -> None:
        self.n, self.epoch, self.position = n, epoch, position
        self.epochs = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, self.epochs = self.epochs, self.epochs + 1
        for i in range(self.n):
            yield [lambda: i] if (epoch, i) == (self.epoch, self.position) else [i]


class SharingStrategySeen(Dataset):
    """Item i: 30,000 floats of value i, and torch's sharing strategy in the
    process that loaded it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        strategy = torch.multiprocessing.get_sharing_strategy()
        return {"x": torch.full((30_000,), float(i)), "strategy": strategy}


class SlowAt(Dataset):
    """Item i is i; item ``slow`` takes ``seconds``, the others 5 ms."""

    def __init__(self, n: int = 60, slow: int = 12, seconds: float = 1.0) -> None:
        self.n, self.slow, self.seconds = n, slow, seconds

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        time.sleep(self.seconds if i == self.slow else 0.005)
        return i
