"""``SharedList`` and ``SharedDict``: big read-only data built once, shared by every worker.

A dataset that holds a manifest as a Python list of dicts costs every worker a copy: a
spawned worker unpickles its own, and a forked one copies the pages it touches, since
reading a Python object writes its reference count (pytorch#13246). These containers
keep the records serialized in one sealed shared-memory segment (detectron2's
serialized list, moved to shared memory); each record is decoded when it is read::

    main process                                  each worker
    ┌──────────────────────────────────┐          ┌───────────────────────────────────┐
    │ SharedList(records)              │ pickle:  │ SharedList: the same segment,     │
    │  records pickled back to back,   ├─────────►│ mapped read-only; shared[i]       │
    │  n+1 offsets (or one typed array │ a handle │ decodes record i                  │
    │  for numbers) in a sealed memfd  │ (~200 B) │ (no copy of the other records)    │
    └──────────────────────────────────┘          └───────────────────────────────────┘

The segment is freed by the kernel when the last process holding it lets go of it,
however it ends (NOTE [ Shared segments ] in ``_segment.py``); nothing is ever created in
``/dev/shm``. The record layouts are in ``_records.py``.
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    ValuesView,
)
from typing import Any, NoReturn, TypeVar, overload

import numpy as np
import numpy.typing as npt

from ._records import Records, encode_key, key_index, lookup_key, write_keys, write_records
from ._segment import Segment, SegmentWriter

__all__ = ["SharedDict", "SharedList"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

#: Records a repr shows before it says how many there are.
REPR_RECORDS = 5
#: Characters of one record's repr that a container's repr shows.
REPR_WIDTH = 60


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= REPR_WIDTH else f"{text[: REPR_WIDTH - 3]}..."


def _refuse(name: str, instead: str) -> Callable[..., NoReturn]:
    """A mutating method of a read-only container: it raises, saying what to do instead."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        kind = type(self).__name__
        raise TypeError(
            f"{kind} is read-only: its records live in shared memory that other processes "
            f"read, so {name} is not supported. {instead}"
        )

    refuse.__name__ = name
    refuse.__doc__ = f"Not supported: the container is read-only. {instead}"
    return refuse


def _check_columns(columns: Iterable[str]) -> tuple[str, ...]:
    if isinstance(columns, str):
        raise TypeError(f"columns should be a list of names, but got a string: {columns!r}")
    names = tuple(columns)
    wrong = [name for name in names if not isinstance(name, str) or not name]
    if wrong or len(set(names)) != len(names):
        raise ValueError(f"columns should be distinct, non-empty strings, but got {names!r}")
    return names


class SharedList(Sequence[T]):
    """A read-only list whose records live once in shared memory, for every worker.

    Build it in the main process from any iterable of picklable records (a manifest's
    rows, file paths, durations). Pickling it, as a DataLoader does to send a dataset to
    spawned or forkserver workers, produces a handle of a few hundred bytes; each worker
    maps the same memory and decodes a record only when it reads it, so a
    million-record manifest costs a worker almost nothing however many there are. Fork
    workers inherit it without pickling, and without the copy-on-read growth of a list.

    Records keep their types: strings are stored as UTF-8, lists of ints, of floats or
    of bools (and numeric NumPy arrays) as one typed array, anything else pickled record
    by record. ``dtype=`` stores the records as a typed array of that dtype instead, so
    that :meth:`numpy` (or ``np.asarray(shared)``) gives them as a zero-copy read-only
    array; ``columns=`` does the same for numbers inside records that are mappings
    (:meth:`column`), e.g. the durations a length-aware sampler needs.

    Supports ``len``, indexing (negative too), iteration, ``in``, ``index``, ``count``,
    ``reversed``, and equality with lists and tuples of equal records. Slicing returns a
    SharedList *view* of the same memory (no copy; it pickles as a handle too);
    :meth:`take` copies chosen records into a new SharedList. Changing it raises
    TypeError: build a new one instead.

    The memory is freed when the last process holding the list (or a view, or an array
    from :meth:`numpy`) drops it or exits, however it exits; nothing is created in
    ``/dev/shm``. A pickled SharedList can be unpickled while the process that pickled it
    still holds it (a DataLoader keeps its dataset for as long as its workers run); the
    pickle is a handle, not the records, so save ``list(shared)`` to keep them in a file.

    Args:
        records: the records; an iterator is read once.
        dtype: store the records as a NumPy array of this numeric dtype (converted).
        columns: names of numbers held by every record (records must be mappings).

    Raises:
        TypeError: a record does not pickle; records that do not fit ``dtype``; a
            non-numeric column.
        ValueError: a record lacks one of ``columns``.

    Example:
        >>> from poolloader import DataLoader, SharedList
        >>> class Manifest(torch.utils.data.Dataset):  # doctest: +SKIP
        ...     def __init__(self, rows):
        ...         self.rows = SharedList(rows, columns=["dur"])
        ...     def __len__(self):
        ...         return len(self.rows)
        ...     def __getitem__(self, i):
        ...         return load(self.rows[i]["path"])
        >>> rows = ({"id": f"u{i}", "path": f"{i}.wav", "dur": 1.0 + i % 7} for i in range(10**6))
        >>> dataset = Manifest(rows)  # read once, never held whole  # doctest: +SKIP
        >>> durations = dataset.rows.column("dur")  # float64, zero-copy  # doctest: +SKIP
        >>> loader = DataLoader(dataset, batch_size=32, num_workers=8)  # doctest: +SKIP
        >>> SharedList([3, 1, 2])[::-1]
        SharedList([2, 1, 3])
    """

    __slots__ = ("_records", "_rows")
    __hash__ = None  # type: ignore[assignment]  # equal to lists, which do not hash
    _records: Records
    _rows: range

    def __init__(
        self,
        records: Iterable[T] = (),
        *,
        dtype: npt.DTypeLike | None = None,
        columns: Iterable[str] = (),
    ) -> None:
        names = _check_columns(columns)
        if isinstance(records, SharedList) and dtype is None and set(names) <= set(records.columns):
            self._records, self._rows = records._records, records._rows  # read-only: share
            return
        with SegmentWriter("list") as writer:
            meta = write_records(writer, "", records, dtype, names)
            segment = writer.finish({"": meta})
        self._records = Records(segment, "")
        self._rows = range(self._records.count)

    @classmethod
    def _view(cls, records: Records, rows: range) -> SharedList[T]:
        view = cls.__new__(cls)
        view._records, view._rows = records, rows
        return view

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> SharedList[T]: ...

    def __getitem__(self, index: int | slice) -> T | SharedList[T]:
        """Return record ``index`` (negative counts from the end), or a view for a slice."""
        if isinstance(index, slice):
            return self._view(self._records, self._rows[index])
        try:
            row = self._rows[index]
        except IndexError:
            raise IndexError(
                f"SharedList index {index} is out of range for {len(self)} records"
            ) from None
        except TypeError:
            raise TypeError(
                f"SharedList indices must be integers or slices, not {type(index).__name__}"
            ) from None
        record: T = self._records.get(row)
        return record

    def __iter__(self) -> Iterator[T]:
        return self._records.iterate(self._rows)

    def __reversed__(self) -> Iterator[T]:
        return self._records.iterate(self._rows[::-1])

    def __contains__(self, value: object) -> bool:
        """Whether a record equals ``value``: a scan (NumPy's for typed records)."""
        records = self._records
        if records.kind == "array" and isinstance(value, (int, float, np.number)):
            return bool(np.any(records.array(self._rows) == value))
        if records.kind == "str":
            if not isinstance(value, str):
                return False
            wanted = value.encode("utf-8", "surrogatepass")
            return any(records.encoded(row) == wanted for row in self._rows)
        return any(record is value or record == value for record in self)

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """The position of the first record equal to ``value`` (``list.index``)."""
        try:
            return super().index(value, start, len(self) if stop is None else stop)
        except ValueError:
            raise ValueError(f"{value!r} is not in SharedList") from None

    def __eq__(self, other: object) -> bool:
        """Equal to a SharedList, list or tuple holding equal records in the same order."""
        if isinstance(other, SharedList):
            if other._records is self._records and other._rows == self._rows:
                return True
        elif not isinstance(other, (list, tuple)):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(a is b or a == b for a, b in zip(self, other, strict=True))

    def __repr__(self) -> str:
        shown = [_short(record) for record in self[:REPR_RECORDS]]
        if len(self) <= REPR_RECORDS:
            return f"SharedList([{', '.join(shown)}])"
        return f"SharedList([{', '.join(shown)}, ...], len={len(self)})"

    # ------------------------------------------------------------ arrays

    def numpy(self) -> np.ndarray:
        """The records as a read-only NumPy array that shares the memory (no copy).

        Raises:
            TypeError: the records are not stored as a typed array (build the list with
                ``dtype=``, from numbers of one type, or use :meth:`column`).
        """
        if self._records.kind != "array":
            raise TypeError(
                "this SharedList holds Python objects, not a typed array; build it with "
                "dtype= (e.g. SharedList(values, dtype=np.float64)), or use column() for "
                "numbers inside records"
            )
        return self._records.array(self._rows)

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        if self._records.kind != "array":
            if copy is False:
                raise ValueError("a SharedList of objects cannot become an array without a copy")
            return np.array(list(self), dtype=dtype)
        array = self.numpy()
        if dtype is not None and np.dtype(dtype) != array.dtype:
            if copy is False:
                raise ValueError(f"converting to dtype {np.dtype(dtype)} needs a copy")
            return array.astype(dtype)
        return array.copy() if copy else array

    def column(self, name: str) -> np.ndarray:
        """Every record's number under ``name``, as a read-only NumPy array (no copy).

        Raises:
            KeyError: the list was not built with ``name`` in ``columns=``.
        """
        if name not in self._records.columns:
            raise KeyError(
                f"this SharedList has no column {name!r} (columns: {list(self._records.columns)});"
                f" build it with columns=[{name!r}, ...] to read {name!r} as an array"
            )
        return self._records.column(name, self._rows)

    @property
    def columns(self) -> tuple[str, ...]:
        """The names :meth:`column` serves."""
        return self._records.columns

    # ------------------------------------------------------------ copies

    def take(self, positions: Iterable[int] | npt.ArrayLike) -> SharedList[T]:
        """Return a new SharedList of the records at ``positions``, in that order.

        The stored bytes are copied as they are (records are not decoded), and columns
        follow. Negative positions count from the end.

        Raises:
            IndexError: a position is out of range.
            TypeError: positions are not integers.
        """
        physical = self._physical(positions)
        with SegmentWriter("list") as writer:
            meta = self._records.take(writer, physical)
            segment = writer.finish({"": meta})
        return self._view(Records(segment, ""), range(meta["count"]))

    def _physical(self, positions: Iterable[int] | npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Map positions in this (view of a) list to positions in the stored records."""
        wanted = np.asarray(positions if not isinstance(positions, range) else list(positions))
        if wanted.size and (wanted.dtype.kind not in "iu" or wanted.ndim != 1):
            raise TypeError(
                f"positions should be a 1-D sequence of integers, but got {wanted!r:.80}"
            )
        wanted = wanted.astype(np.int64, copy=False)
        size = len(self)
        bad = (wanted < -size) | (wanted >= size)
        if bad.any():
            raise IndexError(
                f"position {int(wanted[bad][0])} is out of range for a SharedList of {size} records"
            )
        rows = self._rows
        return rows.start + rows.step * (wanted % size if size else wanted)

    def __copy__(self) -> SharedList[T]:
        return self  # read-only: a copy would be the same

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedList[T]:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        rows = self._rows
        return _rebuild_list, (self._records.segment, rows.start, rows.stop, rows.step)

    __setitem__ = _refuse("item assignment", "Build a new SharedList from changed records.")
    __delitem__ = _refuse("item deletion", "Build a new SharedList, e.g. with take().")
    __iadd__ = _refuse("+=", "Build a new SharedList: SharedList([*shared, *more]).")
    __imul__ = _refuse("*=", "Build a new SharedList from the repeated records.")
    append = _refuse("append()", "Build a new SharedList: SharedList([*shared, record]).")
    extend = _refuse("extend()", "Build a new SharedList: SharedList([*shared, *more]).")
    insert = _refuse("insert()", "Build a new SharedList from changed records.")
    pop = _refuse("pop()", "Copy it first: records = list(shared).")
    remove = _refuse("remove()", "Copy it first: records = list(shared).")
    clear = _refuse("clear()", "Drop the reference instead; the memory goes with the last one.")
    sort = _refuse("sort()", "Use sorted(shared), or take() with the sorted positions.")
    reverse = _refuse("reverse()", "Use shared[::-1], a reversed view.")


def _rebuild_list(segment: Segment, start: int, stop: int, step: int) -> SharedList[Any]:
    return SharedList._view(Records(segment, ""), range(start, stop, step))


class SharedDict(Mapping[K, V]):
    """A read-only dict whose keys and values live once in shared memory, for every worker.

    The mapping counterpart of :class:`SharedList`: build it in the main process, hand it
    to a dataset, and every DataLoader worker (spawn, forkserver or fork) reads the same
    memory; pickling it produces a handle of a few hundred bytes. Keys are ``str``,
    ``bytes`` or ``int``; values any picklable records, stored as :class:`SharedList`
    stores them (so ``dtype=`` and ``columns=`` work alike, in key order). A lookup
    hashes the key (CRC-32, the same in every process) and bisects a sorted index; a
    value is decoded on access.

    Supports ``len``, ``d[key]``, ``in``, ``get``, ``keys()``, ``values()``, ``items()``,
    iteration and ``reversed`` in insertion order, and equality with any mapping of
    equal items. Changing it raises TypeError: build a new one instead.

    Args:
        items: a mapping, or an iterable of ``(key, value)`` pairs (a repeated key keeps
            its last value, as ``dict`` does).
        dtype: store the values as a NumPy array of this numeric dtype.
        columns: names of numbers held by every value (values must be mappings).

    Raises:
        TypeError: a key that is not a str, bytes or int; a value that does not pickle.
        ValueError: a value lacks one of ``columns``.

    Example:
        >>> from poolloader import DataLoader, SharedDict
        >>> durations = SharedDict({"utt1": 2.5, "utt2": 3.0})
        >>> durations["utt2"], "utt3" in durations, durations.numpy().tolist()
        (3.0, False, [2.5, 3.0])
        >>> class ById(torch.utils.data.Dataset):  # doctest: +SKIP
        ...     def __init__(self, rows):
        ...         self.rows = SharedDict((row["id"], row) for row in rows)
        ...         self.ids = SharedList(self.rows.keys())
        ...     def __len__(self):
        ...         return len(self.ids)
        ...     def __getitem__(self, i):
        ...         return load(self.rows[self.ids[i]]["path"])
        >>> loader = DataLoader(ById(rows), batch_size=32, num_workers=8)  # doctest: +SKIP
    """

    __slots__ = ("_hashes", "_keys", "_order", "_values")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        items: Mapping[K, V] | Iterable[tuple[K, V]] = (),
        *,
        dtype: npt.DTypeLike | None = None,
        columns: Iterable[str] = (),
    ) -> None:
        names = _check_columns(columns)
        if isinstance(items, SharedDict) and dtype is None and set(names) <= set(items.columns):
            self._attach(items._keys.segment)  # read-only: share
            return
        mapping = items if isinstance(items, Mapping) else dict(items)
        encoded = [encode_key(key, position) for position, key in enumerate(mapping)]
        hashes, order = key_index(encoded)
        _check_distinct(encoded, hashes, order)
        with SegmentWriter("dict") as writer:
            keys_meta = write_keys(writer, "keys.", encoded)
            del encoded
            try:
                values_meta = write_records(writer, "values.", list(mapping.values()), dtype, names)
            except TypeError as exc:  # "record 3 cannot ...": say whose value it is
                raise _naming_the_key(exc, list(mapping)) from exc.__cause__
            writer.add_array("index.hash", hashes)
            writer.add_array("index.order", order)
            segment = writer.finish({"keys.": keys_meta, "values.": values_meta})
        self._attach(segment)

    def _attach(self, segment: Segment) -> None:
        self._keys = Records(segment, "keys.")
        self._values = Records(segment, "values.")
        self._hashes = segment.view("index.hash", "I")
        self._order = segment.view("index.order", "q")

    # ------------------------------------------------------------ lookups

    def _find(self, key: object) -> int:
        """The position of ``key``, or -1."""
        wanted = lookup_key(key)
        if wanted is None:
            return -1
        code = zlib.crc32(wanted)
        hashes = self._hashes
        slot = bisect.bisect_left(hashes, code)
        while slot < len(hashes) and hashes[slot] == code:
            position = self._order[slot]
            if self._keys.encoded(position) == wanted:
                return position
            slot += 1
        return -1

    def __getitem__(self, key: K) -> V:
        position = self._find(key)
        if position < 0:
            raise KeyError(key)
        value: V = self._values.get(position)
        return value

    def get(self, key: K, default: Any = None) -> Any:
        """Return the value of ``key``, or ``default`` if there is none."""
        position = self._find(key)
        return default if position < 0 else self._values.get(position)

    def __contains__(self, key: object) -> bool:
        return self._find(key) >= 0

    def __len__(self) -> int:
        return self._keys.count

    def __iter__(self) -> Iterator[K]:
        return self._keys.iterate(range(len(self)))

    def __reversed__(self) -> Iterator[K]:
        return self._keys.iterate(range(len(self))[::-1])

    def values(self) -> ValuesView[V]:
        """The values, in key order (decoded one by one, without key lookups)."""
        return _Values(self)

    def items(self) -> ItemsView[K, V]:
        """The ``(key, value)`` pairs, in key order."""
        return _Items(self)

    def __eq__(self, other: object) -> bool:
        """Equal to any mapping with equal keys and values (order aside), as a dict is."""
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        missing = object()
        return all(_same(self.get(key, missing), value) for key, value in other.items())

    def __repr__(self) -> str:
        rows = range(min(len(self), REPR_RECORDS))
        pairs = zip(self._keys.iterate(rows), self._values.iterate(rows), strict=True)
        shown = [f"{_short(key)}: {_short(value)}" for key, value in pairs]
        if len(self) <= REPR_RECORDS:
            return f"SharedDict({{{', '.join(shown)}}})"
        return f"SharedDict({{{', '.join(shown)}, ...}}, len={len(self)})"

    # ------------------------------------------------------------ arrays

    def numpy(self) -> np.ndarray:
        """The values as a read-only NumPy array in key order, sharing the memory.

        Raises:
            TypeError: the values are not stored as a typed array (build with ``dtype=``).
        """
        if self._values.kind != "array":
            raise TypeError(
                "this SharedDict's values are Python objects, not a typed array; build it "
                "with dtype= (e.g. SharedDict(durations, dtype=np.float64)), or use column()"
            )
        return self._values.array(range(len(self)))

    def column(self, name: str) -> np.ndarray:
        """Every value's number under ``name``, in key order, as a read-only array.

        Raises:
            KeyError: the dict was not built with ``name`` in ``columns=``.
        """
        if name not in self._values.columns:
            raise KeyError(
                f"this SharedDict has no column {name!r} (columns: {list(self._values.columns)});"
                f" build it with columns=[{name!r}, ...] to read {name!r} as an array"
            )
        return self._values.column(name, range(len(self)))

    @property
    def columns(self) -> tuple[str, ...]:
        """The names :meth:`column` serves."""
        return self._values.columns

    def __copy__(self) -> SharedDict[K, V]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedDict[K, V]:
        return self

    def __reduce__(self) -> tuple[Any, tuple[Segment]]:
        return _rebuild_dict, (self._keys.segment,)

    __setitem__ = _refuse("item assignment", "Build a new one: SharedDict({**shared, key: v}).")
    __delitem__ = _refuse("item deletion", "Build a new SharedDict without that key.")
    __ior__ = _refuse("|=", "Build a new one: SharedDict({**shared, **more}).")
    pop = _refuse("pop()", "Copy it first: d = dict(shared).")
    popitem = _refuse("popitem()", "Copy it first: d = dict(shared).")
    setdefault = _refuse("setdefault()", "Build a new SharedDict holding the default.")
    update = _refuse("update()", "Build a new one: SharedDict({**shared, **more}).")
    clear = _refuse("clear()", "Drop the reference instead; the memory goes with the last one.")


def _same(a: object, b: object) -> bool:
    return a is b or a == b


def _check_distinct(encoded: Sequence[bytes], hashes: np.ndarray, order: np.ndarray) -> None:
    """Refuse keys a mapping held apart but a dict would merge (``1`` and ``np.int64(1)``)."""
    for slot in np.flatnonzero(hashes[1:] == hashes[:-1]).tolist():
        first, second = int(order[slot]), int(order[slot + 1])
        if encoded[first] == encoded[second]:
            raise ValueError(
                f"keys {first} and {second} are equal as dict keys; a SharedDict holds each "
                "key once: merge them first (dict(mapping))"
            )


def _rebuild_dict(segment: Segment) -> SharedDict[Any, Any]:
    shared: SharedDict[Any, Any] = SharedDict.__new__(SharedDict)
    shared._attach(segment)
    return shared


class _Values(ValuesView[V]):
    """Values of a SharedDict, iterated by position (no key lookups)."""

    _mapping: SharedDict[Any, V]

    def __iter__(self) -> Iterator[V]:
        values = self._mapping._values
        return values.iterate(range(values.count))


class _Items(ItemsView[K, V]):
    """Items of a SharedDict, iterated by position (no key lookups)."""

    _mapping: SharedDict[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        shared = self._mapping
        rows = range(len(shared))
        return zip(shared._keys.iterate(rows), shared._values.iterate(rows), strict=True)


def _naming_the_key(error: TypeError, keys: list[Any]) -> TypeError:
    """``error`` about "record N" of a dict's values, reworded to name N's key."""
    found = re.match(r"record (\d+) (.*)", str(error), re.DOTALL)
    if found is None:
        return error
    return TypeError(f"the value of key {keys[int(found[1])]!r} {found[2]}")
