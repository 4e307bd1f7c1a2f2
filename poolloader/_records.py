"""How a shared container's records are laid out in a segment: chosen, written, read back.

The records of a container occupy the sections of one *prefix* of a segment (a
``SharedList`` uses ``""``, a ``SharedDict`` ``"keys."`` and ``"values."``). Their layout,
the *kind*, is chosen once when the container is built (:func:`write_records`)::

    kind    records                                 sections; record i
    ──────  ──────────────────────────────────────  ─────────────────────────────────────────
    array   all int, all float or all bool; a       values: one typed array; values[i], a
            numeric NumPy array; anything with      Python number (or a read-only row of an
            dtype=                                  N-d array)
    str     all str                                 data (UTF-8, back to back) and offsets
                                                    (n+1 int64); data[offsets[i]:offsets[i+1]]
    pickle  anything else that pickles              the same, each record pickled on its own
                                                    (without the PROTO and FRAME opcodes)
    key     SharedDict keys: str, bytes or int      the same, each key tagged with its type

Types are kept exactly: a list mixing ints and floats is pickled (so ``1`` stays ``1``)
unless ``dtype=`` asks for an array. ``columns=`` adds one typed array per name for
records that are mappings (``column.<name>``), so a sampler reads every item's duration
as one NumPy array without decoding a record.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._segment import Segment, SegmentWriter, pinning

__all__ = ["Records", "encode_key", "key_index", "lookup_key", "write_keys", "write_records"]

#: Records encoded per write: writes of a few MB, while the encoded bytes held at once
#: stay small next to the segment being built.
CHUNK_RECORDS = 1 << 14
#: Pickle protocol for records: the newest, the fastest to load.
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: NumPy dtype kinds kept as typed arrays: bool, signed and unsigned int, float, complex.
NUMERIC_KINDS = "biufc"
#: Scalars a 1-D typed array hands out as Python numbers through a memoryview (fast);
#: other dtypes go through NumPy's ``item()``.
_MEMORYVIEW_FORMATS = frozenset("?bBhHiIlLqQfd")
_UTF8 = {"encoding": "utf-8", "errors": "surrogatepass"}  # lone surrogates round-trip
_KEY_STR, _KEY_BYTES, _KEY_INT = ord("s"), ord("b"), ord("i")

Meta = dict[str, Any]
Encoder = Callable[[Any], bytes]

_PROTO_HEADER = pickle.PROTO + bytes([PICKLE_PROTOCOL])
#: Bytes of a pickle's FRAME opcode and its 8-byte length.
_FRAME_BYTES = 9


def _pickled(record: Any) -> bytes:
    """Pickle one record without the PROTO and FRAME opcodes that open every pickle.

    Both are optional to the unpickler, and at 11 bytes they would add about a tenth to
    a manifest row of ~100 bytes, in every segment of such records.
    """
    data = pickle.dumps(record, protocol=PICKLE_PROTOCOL)
    start = len(_PROTO_HEADER) if data.startswith(_PROTO_HEADER) else 0
    if data[start : start + 1] == pickle.FRAME:
        start += _FRAME_BYTES
    return data[start:]


_PICKLE: Encoder = _pickled
_STR: Encoder = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")


# ------------------------------------------------------------------ writing


def write_records(
    writer: SegmentWriter,
    prefix: str,
    records: Iterable[Any],
    dtype: npt.DTypeLike | None,
    columns: Sequence[str],
) -> Meta:
    """Write ``records`` (and their ``columns``) under ``prefix``; return their metadata.

    An iterator is read once, a chunk at a time, and never held whole: only the
    encoded bytes (strings), the numbers (typed records) and the column values wait
    for the kind to be certain.

    Raises:
        TypeError: a record does not pickle, or ``dtype``/``columns`` do not fit the records.
        ValueError: a record lacks a column.
    """
    if isinstance(records, np.ndarray) and records.ndim == 0:
        raise TypeError("records should be an iterable, but got a 0-dimensional array")
    numeric = isinstance(records, np.ndarray) and records.dtype.kind in NUMERIC_KINDS
    if dtype is not None or numeric:
        items = records if isinstance(records, (np.ndarray, Sequence)) else _listed(records)
        writer.add_array(f"{prefix}values", _to_array(items, dtype))
        for name in columns:
            writer.add_array(f"{prefix}column.{name}", _column_array(name, _column(items, name, 0)))
        return {"kind": "array", "count": len(items), "columns": list(columns)}
    stream = _Stream(columns)
    writer.add_bytes(f"{prefix}data", stream.encode(_chunks(records)))
    if stream.kind in _ARRAY_DTYPES:
        writer.add_array(f"{prefix}values", stream.numbers())
    else:
        writer.add_array(f"{prefix}offsets", _offsets(np.asarray(stream.lengths, dtype=np.int64)))
    for name, values in stream.columns.items():
        writer.add_array(f"{prefix}column.{name}", _column_array(name, values))
    kind = "array" if stream.kind in _ARRAY_DTYPES else stream.kind
    return {"kind": kind, "count": stream.count, "columns": list(columns)}


def _listed(records: Iterable[Any]) -> list[Any]:
    try:
        return list(records)
    except TypeError:
        raise TypeError(
            f"records should be an iterable of records, but got {type(records).__name__}: "
            f"{records!r:.80}"
        ) from None


def _chunks(records: Iterable[Any]) -> Iterator[Sequence[Any]]:
    """The records a chunk at a time: slices of a sequence, or an iterator read in turn."""
    if isinstance(records, np.ndarray) and records.dtype.kind in "mMV":
        # Dates, durations and structured records stay NumPy's: tolist() turns
        # datetime64[ns] into ints and records into tuples.
        records = list(records)
    elif isinstance(records, np.ndarray):
        records = records.tolist()  # text or object arrays: their records as Python objects
    if isinstance(records, (list, tuple)):
        for start in range(0, len(records), CHUNK_RECORDS):
            yield records[start : start + CHUNK_RECORDS]
        return
    iterator = iter(_listed(records) if not isinstance(records, Iterable) else records)
    while chunk := list(itertools.islice(iterator, CHUNK_RECORDS)):
        yield chunk


#: Record types stored as typed arrays, and their dtypes; other kinds are "str" and "pickle".
_ARRAY_DTYPES: dict[str, type] = {"int": np.int64, "float": np.float64, "bool": np.bool_}
_KIND_OF_TYPE = {str: "str", int: "int", float: "float", bool: "bool"}


class _Stream:
    """Chooses the records' kind from their types and encodes them, a chunk at a time.

    The first chunk proposes a kind; a later record of another type turns the records
    read so far into pickles (``_fall_back``), so that the choice matches what a list of
    the same records would get (all str, all int, all float, all bool, else pickle).
    """

    def __init__(self, columns: Sequence[str]) -> None:
        self.kind: str | None = None
        self.count = 0
        self.lengths: list[int] = []
        self.columns: dict[str, list[Any]] = {name: [] for name in columns}
        self._held: list[Any] = []  # str: encoded chunks; numbers: the numbers

    def encode(self, chunks: Iterator[Sequence[Any]]) -> Iterator[bytes]:
        """Yield the bytes of the ``data`` section: pickles as they come, strings at the end."""
        for chunk in chunks:
            for name, values in self.columns.items():
                values.extend(_column(chunk, name, self.count))
            kinds = {_KIND_OF_TYPE.get(kind, "pickle") for kind in set(map(type, chunk))}
            if self.kind is None:
                self.kind = kinds.pop() if len(kinds) == 1 else "pickle"
            elif self.kind != "pickle" and kinds != {self.kind}:
                yield from self._fall_back()
            if self.kind == "pickle":
                yield self._encode(chunk, _PICKLE, self.count)
            elif self.kind == "str":
                self._held.append(self._encode(chunk, _STR, self.count))
            else:
                self._held.extend(chunk)
            self.count += len(chunk)
        if self.kind == "int" and not _fits_int64(self._held):
            yield from self._fall_back()
        if self.kind == "str":
            yield from self._held
        self.kind = self.kind or "pickle"

    def numbers(self) -> np.ndarray:
        """The held numbers as a typed array (for the number kinds)."""
        return np.asarray(self._held, dtype=_ARRAY_DTYPES[self.kind or "float"])

    def _encode(self, chunk: Sequence[Any], encode: Encoder, start: int) -> bytes:
        with pinning() as inside:  # a SharedList or SharedDict inside a record
            try:
                encoded = [encode(record) for record in chunk]
            except Exception:
                encoded = _encode_one_by_one(encode, chunk, start)
        if inside:
            _refuse_containers(encode, chunk, start)
        self.lengths.extend(map(len, encoded))
        return b"".join(encoded)

    def _fall_back(self) -> Iterator[bytes]:
        """Turn the records held so far into pickles, and pickle from now on."""
        if self.kind == "str":
            data, ends = b"".join(self._held), itertools.accumulate(self.lengths)
            starts = itertools.chain((0,), itertools.accumulate(self.lengths))
            pairs = zip(starts, ends, strict=False)  # starts has one more: the end of the data
            records: list[Any] = [_decode_str(memoryview(data)[a:b]) for a, b in pairs]
        else:
            records = self._held
        self.kind, self._held, self.lengths = "pickle", [], []
        for start in range(0, len(records), CHUNK_RECORDS):
            yield self._encode(records[start : start + CHUNK_RECORDS], _PICKLE, start)


def _fits_int64(records: Sequence[int]) -> bool:
    info = np.iinfo(np.int64)
    return not records or (info.min <= min(records) and max(records) <= info.max)


def _to_array(records: Sequence[Any] | np.ndarray, dtype: npt.DTypeLike | None) -> np.ndarray:
    """The records as a native-order numeric array, or a TypeError saying why not."""
    try:
        array = np.asarray(records, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"records cannot be stored as an array of dtype {np.dtype(dtype)} ({exc}); "
            "pass numbers of one kind, or leave dtype=None to keep them as objects"
        ) from exc
    if array.dtype.kind not in NUMERIC_KINDS:
        raise TypeError(
            f"dtype should be a numeric NumPy dtype (bool, int, uint, float, complex), but got "
            f"dtype={array.dtype}; leave dtype=None to keep records as objects"
        )
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _refuse_containers(encode: Encoder, chunk: Sequence[Any], start: int) -> None:
    """Raise for the first record that holds a SharedList or SharedDict: pickled,
    it would name memory of its own, which goes when that container does."""
    for offset, record in enumerate(chunk):
        with pinning() as inside:
            encode(record)
        if inside:
            raise TypeError(
                f"record {start + offset} cannot be stored in shared memory: it holds a "
                "SharedList or SharedDict, whose records live in memory of their own that "
                "goes when it does; store its contents instead (list(x), dict(x))"
            )


def _encode_one_by_one(encode: Encoder, chunk: Sequence[Any], start: int) -> list[bytes]:
    encoded = []
    for offset, record in enumerate(chunk):
        try:
            encoded.append(encode(record))
        except Exception as exc:
            raise TypeError(
                f"record {start + offset} cannot be stored in shared memory: "
                f"{type(exc).__name__}: {exc}; records must pickle (no open files, locks, "
                "lambdas or local classes)"
            ) from exc
    return encoded


def _offsets(lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _column(chunk: Sequence[Any] | np.ndarray, name: str, start: int) -> list[Any]:
    """Every record's ``record[name]``, or a ValueError naming the first that lacks it."""
    try:
        return [record[name] for record in chunk]
    except (KeyError, TypeError, IndexError):
        pass
    for index, record in enumerate(chunk):
        try:
            record[name]
        except (KeyError, TypeError, IndexError):
            raise ValueError(
                f"record {start + index} has no {name!r} for column {name!r}: {record!r:.80}; "
                "every record must be a mapping with a number under each name in columns="
            ) from None
    raise AssertionError("unreachable: some record lacked the column")


def _column_array(name: str, values: list[Any]) -> np.ndarray:
    """A column's values as a numeric array, or a TypeError naming a record that is not a number."""
    array = np.asarray(values) if values else np.zeros(0, dtype=np.float64)
    if array.dtype.kind not in "biuf" or array.ndim != 1:
        bad = next((i for i, v in enumerate(values) if not _is_number(v)), None)
        if bad is None:  # numbers all, but some int does not fit in 64 bits
            bad = next(i for i, v in enumerate(values) if not _fits_int64([v]))
            raise TypeError(
                f"column {name!r} should hold numbers that fit a 64-bit integer or a float, "
                f"but record {bad} has {values[bad]!r:.80}; leave {name!r} out of columns="
            )
        raise TypeError(
            f"column {name!r} should hold one number per record, but record {bad} has "
            f"{values[bad]!r:.80}; leave {name!r} out of columns="
        )
    return array


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, complex)


# ------------------------------------------------------------------ keys


def encode_key(key: Any, position: int) -> bytes:
    """A SharedDict key as tagged bytes: equal keys (as dict keys) give equal bytes.

    Raises:
        TypeError: the key is not a str, bytes or int (bools are refused: ``True == 1``).
    """
    if type(key) is str:  # the common case, first
        return b"s" + key.encode("utf-8", "surrogatepass")
    encoded = lookup_key(key)
    if encoded is None or isinstance(key, (bool, np.bool_, float)):
        raise TypeError(
            f"SharedDict keys should be str, bytes or int, but key {position} is "
            f"{type(key).__name__}: {key!r:.80}; convert the keys (e.g. str(key))"
        )
    return encoded


def lookup_key(key: Any) -> bytes | None:
    """The tagged bytes a key is stored under, or ``None`` if no stored key can equal it."""
    if isinstance(key, str):
        return b"s" + key.encode(**_UTF8)
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, float) and key.is_integer():
        key = int(key)  # 2.0 finds 2, as in a dict
    if isinstance(key, (int, np.integer)):
        return b"i" + str(int(key)).encode()
    return None


def _decode_key(data: memoryview) -> Any:
    tag = data[0]
    if tag == _KEY_STR:
        return str(data[1:], **_UTF8)
    if tag == _KEY_BYTES:
        return bytes(data[1:])
    if tag == _KEY_INT:
        return int(bytes(data[1:]))
    raise ValueError(f"unknown SharedDict key tag {tag}")


def key_index(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The lookup index of encoded keys: their CRC-32s sorted, and the order that sorts them.

    A lookup bisects the sorted hashes and compares the keys of equal hash; CRC-32 is
    cheap to compute in every process alike (``hash()`` of a str differs between
    processes), and its rare collisions only cost a second comparison.
    """
    hashes = np.fromiter(map(zlib.crc32, encoded), dtype=np.uint32, count=len(encoded))
    order = np.argsort(hashes, kind="stable")
    return hashes[order], order.astype(np.int64)


def write_keys(writer: SegmentWriter, prefix: str, encoded: Sequence[bytes]) -> Meta:
    """Write already encoded keys under ``prefix``; return their metadata."""
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    writer.add_bytes(f"{prefix}data", [b"".join(encoded)])
    writer.add_array(f"{prefix}offsets", _offsets(lengths))
    return {"kind": "key", "count": len(encoded), "columns": []}


# ------------------------------------------------------------------ reading


def _decode_str(data: memoryview) -> str:
    return str(data, "utf-8", "surrogatepass")  # positional: faster than keywords


_DECODERS: dict[str, Callable[[memoryview], Any]] = {
    "str": _decode_str,
    "pickle": pickle.loads,
    "key": _decode_key,
}


def _item(array: np.ndarray) -> Callable[[int], Any]:
    """Reads item ``index`` of an N-d ``array``: a scalar, or a row."""

    def get(index: int) -> Any:
        row = array[index]
        return row.item() if row.ndim == 0 else row

    return get


def _decoded(data: memoryview, offsets: memoryview, decode: Any) -> Callable[[int], Any]:
    """Decodes record ``index`` of the encoded ``data`` cut at ``offsets``."""

    def get(index: int) -> Any:
        return decode(data[offsets[index] : offsets[index + 1]])

    return get


class Records:
    """The records under one prefix of a segment, decoded on access.

    Positions here are *physical* (``0 <= i < count``, checked by the caller).
    """

    __slots__ = (
        "_array", "_data", "_decode", "_offsets", "_scalars",
        "columns", "count", "get", "kind", "prefix", "segment",
    )  # fmt: skip

    def __init__(self, segment: Segment, prefix: str) -> None:
        meta = segment.meta[prefix]
        self.segment, self.prefix = segment, prefix
        self.kind: str = meta["kind"]
        self.count: int = meta["count"]
        self.columns: tuple[str, ...] = tuple(meta["columns"])
        self._scalars: memoryview | None = None
        self.get: Callable[[int], Any]
        if self.kind == "array":
            self._array = segment.array(f"{prefix}values")
            char = self._array.dtype.char
            if self._array.ndim == 1 and char in _MEMORYVIEW_FORMATS:
                self._scalars = segment.view(f"{prefix}values", char)
            scalars = self._scalars
            self.get = scalars.__getitem__ if scalars is not None else _item(self._array)
        else:
            self._data = segment.view(f"{prefix}data")
            self._offsets = segment.view(f"{prefix}offsets", "q")
            self._decode = _DECODERS[self.kind]
            self.get = _decoded(self._data, self._offsets, self._decode)
        # (``get`` is a closure, not a bound method: a bound method held by its
        # own object is a cycle, and the segment's memory would wait for the
        # garbage collector instead of going with the last reference.)

    def encoded(self, index: int) -> memoryview:
        """The stored bytes of record ``index`` (kinds other than ``array``)."""
        offsets = self._offsets
        return self._data[offsets[index] : offsets[index + 1]]

    def iterate(self, rows: range) -> Iterator[Any]:
        """Yield the records at ``rows``, in that order."""
        if self._scalars is not None:
            for start in range(0, len(rows), CHUNK_RECORDS):
                part = rows[start : start + CHUNK_RECORDS]
                yield from self._array[as_slice(part)].tolist()
        elif self.kind == "array":
            yield from map(self.get, rows)
        else:
            data, offsets, decode = self._data, self._offsets, self._decode
            for index in rows:
                yield decode(data[offsets[index] : offsets[index + 1]])

    def array(self, rows: range) -> np.ndarray:
        """The typed array of an ``array`` kind at ``rows`` (a read-only view)."""
        return self._array[as_slice(rows)]

    def column(self, name: str, rows: range) -> np.ndarray:
        """Column ``name`` at ``rows`` (a read-only view)."""
        return self.segment.array(f"{self.prefix}column.{name}")[as_slice(rows)]

    def take(self, writer: SegmentWriter, positions: npt.NDArray[np.int64]) -> Meta:
        """Write the records at ``positions`` (and their columns), copying stored bytes."""
        if self.kind == "array":
            writer.add_array(f"{self.prefix}values", self._array[positions])
        else:
            offsets = self.segment.array(f"{self.prefix}offsets")
            starts, stops = offsets[positions], offsets[positions + 1]
            writer.add_bytes(f"{self.prefix}data", self._gather(starts, stops))
            writer.add_array(f"{self.prefix}offsets", _offsets(stops - starts))
        for name in self.columns:
            whole = self.segment.array(f"{self.prefix}column.{name}")
            writer.add_array(f"{self.prefix}column.{name}", whole[positions])
        return {"kind": self.kind, "count": int(positions.size), "columns": list(self.columns)}

    def _gather(self, starts: np.ndarray, stops: np.ndarray) -> Iterator[bytes]:
        data = self._data
        for begin in range(0, starts.size, CHUNK_RECORDS):
            ends = slice(begin, begin + CHUNK_RECORDS)
            pairs = zip(starts[ends].tolist(), stops[ends].tolist(), strict=True)
            yield b"".join([data[a:b] for a, b in pairs])


def as_slice(rows: range) -> slice:
    """The slice that selects ``rows`` from a sequence as long as the container.

    A range counting down to 0 stops at -1, which a slice would read as "the last".
    """
    if not rows:
        return slice(0, 0)
    return slice(rows.start, rows.stop if rows.stop >= 0 else None, rows.step)
