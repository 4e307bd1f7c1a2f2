"""Reading manifests into a :class:`Table`.

Two shapes of manifest are read here:

* Kaldi-style ``id value`` files (SpeeChain calls them idx2data files: ``wav.scp``,
  ``text``, ``utt2dur``), one or several per field; several files of one field
  mix several corpora.
* Tables with a header: CSV, TSV or JSON lines, one row per item, the columns
  being the fields.

Either way the result is a :class:`Table`: the ids in manifest order and, for
each field, a :class:`Column` of values aligned with those ids that remembers
the file and line each value came from, so that an error raised much later, in
a worker, can still point at the line that caused it. A table lives only while a
dataset is built: ``ManifestDataset`` then moves it into shared memory
(``_items.ItemTable``).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

PathLike = str | os.PathLike[str]
"""A manifest path: a string or any :class:`os.PathLike`."""

PathOrPaths = PathLike | Sequence[PathLike]
"""One manifest path, or several whose rows are concatenated (one corpus each)."""

MAX_IDS_SHOWN = 5
"""How many offending ids an error lists before it says "and N more": enough to
spot a pattern (a whole corpus missing, an id-format mismatch), short enough to read."""

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""Table formats by file suffix; ``format=`` overrides the guess."""

RESERVED_NAMES = frozenset({"id"})
"""Names no field may take: every item carries its id under ``"id"``."""


@dataclass(frozen=True, eq=False)
class Column:
    """One field's values, aligned with the table's ids, and where each came from.

    Attributes:
        values: the raw manifest value of each item (a string, or any JSON value).
        paths: the manifest files the values were read from.
        where: int32 array of shape ``(n, 2)``: index into ``paths`` and 1-based line.
    """

    values: list[Any]
    paths: tuple[str, ...]
    where: np.ndarray

    def origin(self, position: int) -> str:
        """Say where the value at ``position`` was read: ``"data/wav.scp line 3"``."""
        path_index, line = self.where[position]
        return f"{self.paths[path_index]} line {line}"


@dataclass(frozen=True)
class Table:
    """Ids in manifest order and one :class:`Column` per field, aligned with them."""

    ids: list[str]
    columns: dict[str, Column]


class _FieldReader:
    """Collects one field's ``id -> (value, path index, line)``, refusing duplicate ids."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paths: list[str] = []
        self.entries: dict[str, tuple[Any, int, int]] = {}

    def add_path(self, path: str) -> int:
        """Register a manifest file and return its index."""
        self.paths.append(path)
        return len(self.paths) - 1

    def add(self, key: str, value: Any, path_index: int, line: int) -> None:
        """Record ``value`` for id ``key``; raise naming both lines if the id repeats."""
        previous = self.entries.get(key)
        if previous is not None:
            raise ValueError(
                f"{self.paths[path_index]} line {line}: duplicate id {key!r} in field "
                f"{self.name!r}, first given at {self.paths[previous[1]]} line {previous[2]}; "
                "each id may appear once per field (if two corpora share ids, prefix them)"
            )
        self.entries[key] = (value, path_index, line)

    def origin(self, key: str) -> str:
        """Say where id ``key`` was read."""
        _, path_index, line = self.entries[key]
        return f"{self.paths[path_index]} line {line}"

    def column(self, ids: Sequence[str]) -> Column:
        """Return the values aligned with ``ids`` (all of which must be present)."""
        rows = [self.entries[key] for key in ids]
        where = np.array([(row[1], row[2]) for row in rows], dtype=np.int32).reshape(-1, 2)
        return Column([row[0] for row in rows], tuple(self.paths), where)


def as_paths(paths: object, what: str) -> list[str]:
    """Normalise one path or a sequence of paths to a non-empty list of strings.

    Args:
        paths: a string, an :class:`os.PathLike`, or a sequence of them.
        what: how to name the argument in an error, e.g. ``"field 'audio'"``.

    Returns:
        The paths as strings, as given (relative paths stay relative).

    Raises:
        TypeError: ``paths`` is neither a path nor a sequence of paths.
        ValueError: ``paths`` is an empty sequence.
    """
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    if not isinstance(paths, Sequence) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise TypeError(
            f"{what} should be a path or a list of paths, but got {type(paths).__name__}: {paths!r}"
        )
    if not paths:
        raise ValueError(f"{what} is an empty list; give at least one manifest path")
    return [os.fspath(p) for p in paths]


def _open_manifest(path: str, what: str) -> Any:
    """Open a manifest for reading, naming the argument it was given for if it is missing.

    ``utf-8-sig`` reads UTF-8 and drops the byte-order mark that spreadsheet programs
    write at the start of a CSV (which would otherwise become part of the first
    column's name, so that ``id`` was not found).
    """
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no such manifest file (given for {what})") from exc


_Row = TypeVar("_Row")

#: Characters one CSV/TSV value may hold: the csv module's default (131,072)
#: refuses long transcripts that it writes itself.
FIELD_LIMIT = 2**31 - 1


def _not_utf8(path: str, exc: UnicodeDecodeError) -> ValueError:
    """The error for a manifest that is not UTF-8, naming the line of its first
    undecodable byte (the decoder's own position is inside a read buffer)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as found:
                line += chunk.count(b"\n", 0, max(found.start, 0))
                offset += found.start
                break
            line += chunk.count(b"\n")
            offset += len(chunk)
    return ValueError(
        f"{path} line {line}: not UTF-8 (byte {offset} of the file: {exc.reason}); "
        "manifests are read as UTF-8: convert the file (iconv -f latin1 -t utf-8, say)"
    )


def _decoded(path: str, rows: Iterator[_Row]) -> Iterator[_Row]:
    """``rows``, read from ``path``, with a file that is not UTF-8 reported as such."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def iter_idx2data(path: str, what: str) -> Iterator[tuple[str, str, int]]:
    """Yield ``(id, value, line)`` from a Kaldi-style ``id value`` file.

    The id is the first whitespace-separated token; the value is the rest of the
    line with surrounding whitespace removed (a transcript keeps its inner spaces).
    Blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line has an id but no value.
    """
    with _open_manifest(path, what) as file:
        yield from _decoded(path, _idx2data_lines(path, file))


def _idx2data_lines(path: str, file: Any) -> Iterator[tuple[str, str, int]]:
    for line_number, line in enumerate(file, start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path} line {line_number}: expected 'id value', got {text!r}")
        yield parts[0], parts[1], line_number


def _check_field_name(name: object) -> str:
    """Refuse field names that are not strings or that clash with the item's own keys."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"field names should be non-empty strings, but got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(
            f"a field may not be called {name!r}: every item already carries its id under "
            "'id'; rename the field"
        )
    return name


def read_fields(fields: Mapping[str, PathOrPaths]) -> Table:
    """Read Kaldi-style ``id value`` files, one or several per field.

    Args:
        fields: field name -> manifest path, or a list of paths (one per corpus).

    Returns:
        The ids in the order of the first field's files, and every field aligned.

    Raises:
        ValueError: a malformed line, a duplicate id, fields whose ids differ,
            or no ids at all.
    """
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(
            "fields should be a non-empty mapping from field name to manifest path(s), "
            f"e.g. {{'audio': 'data/wav.scp', 'text': 'data/text'}}, but got {fields!r}"
        )
    readers = {}
    for name, paths in fields.items():
        reader = _FieldReader(_check_field_name(name))
        for path in as_paths(paths, f"field {name!r}"):
            index = reader.add_path(path)
            for key, value, line in iter_idx2data(path, f"field {name!r}"):
                reader.add(key, value, index, line)
        readers[name] = reader
    return _align(readers)


def _align(readers: Mapping[str, _FieldReader]) -> Table:
    """Check that every field has the same ids, and align the fields on the first one's order."""
    first = next(iter(readers.values()))
    ids = list(first.entries)
    if not ids:
        raise ValueError(
            f"no items in {', '.join(first.paths)} (field {first.name!r}); "
            "the manifest files are empty"
        )
    for reader in readers.values():
        _check_same_ids(first, reader)
    return Table(ids, {name: reader.column(ids) for name, reader in readers.items()})


def _check_same_ids(first: _FieldReader, other: _FieldReader) -> None:
    """Raise if ``other`` lacks ids of ``first`` or has ids ``first`` lacks."""
    missing = [key for key in first.entries if key not in other.entries]
    if missing:
        raise ValueError(_mismatch_message(other, first, missing))
    extra = [key for key in other.entries if key not in first.entries]
    if extra:
        raise ValueError(_mismatch_message(first, other, extra))


def describe_ids(keys: Sequence[Any], origin: Callable[[Any], str] | None = None) -> str:
    """List the first few ids for an error, with where each was read if ``origin`` says.

    Returns:
        ``"'u1', 'u2' and 3 more"``, or with ``origin`` ``"'u1' (data/text line 1), ..."``.
    """
    shown = ", ".join(
        repr(key) if origin is None else f"{key!r} ({origin(key)})" for key in keys[:MAX_IDS_SHOWN]
    )
    more = len(keys) - MAX_IDS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _mismatch_message(lacking: _FieldReader, having: _FieldReader, keys: list[str]) -> str:
    """Describe ids that one field has and another lacks, with where they were found."""
    return (
        f"field {lacking.name!r} has no entry for {len(keys)} id(s) of field "
        f"{having.name!r}: {describe_ids(keys, having.origin)}; every field needs the same "
        "ids: add them to "
        f"{', '.join(lacking.paths)} or remove them from {', '.join(having.paths)}"
    )


def table_format(path: str, format: str | None) -> str:
    """Return ``"csv"``, ``"tsv"`` or ``"jsonl"`` for ``path``, from ``format`` or its suffix.

    Raises:
        ValueError: ``format`` is unknown, or the suffix says nothing and no format was given.
    """
    known = sorted(set(TABLE_FORMATS.values()))
    if format is not None:
        if format not in known:
            raise ValueError(f"format should be one of {known}, but got format={format!r}")
        return format
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix {suffix!r}; name it "
            f"{', '.join(sorted(TABLE_FORMATS))}, or pass format= (one of {known})"
        )
    return TABLE_FORMATS[suffix]


def iter_table(
    path: str, format: str, id_column: str = "id"
) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield ``(row, line)`` from a CSV/TSV file with a header or a JSON-lines file.

    TSV is read without quoting, so transcripts may hold quote characters as they are.
    CSV is read strictly: a quote that is never closed is an error, not a value that
    swallows the rest of the file. ``line`` is where the row starts (a quoted CSV
    value may span lines). ``id_column`` only names the row in errors.

    Raises:
        ValueError: no header, a repeated column name, a row with the wrong number
            of columns, bad CSV quoting, a line that is not one JSON object.
    """
    if format == "jsonl":
        yield from _iter_jsonl(path)
    else:
        yield from _iter_delimited(path, format, id_column)


def _iter_delimited(path: str, format: str, id_column: str) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield rows of a CSV (quoted) or TSV (unquoted) file, keyed by its header."""
    options: dict[str, Any] = {"delimiter": ",", "strict": True}
    if format == "tsv":
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    previous = csv.field_size_limit(FIELD_LIMIT)
    try:
        with _open_manifest(path, "tables") as file:
            yield from _decoded(path, _delimited_rows(path, csv.reader(file, **options), id_column))
    finally:
        csv.field_size_limit(previous)


def _delimited_rows(path: str, reader: Any, id_column: str) -> Iterator[tuple[dict[str, Any], int]]:
    header = _read_header(path, reader)
    start = reader.line_num + 1
    while (record := _next_record(path, reader, start)) is not None:
        line, start = start, reader.line_num + 1
        if not record or record == [""]:
            continue
        if len(record) != len(header):
            raise ValueError(_width_message(path, line, header, record, id_column))
        yield dict(zip(header, record, strict=True)), line


def _next_record(path: str, reader: Iterator[list[str]], start: int) -> list[str] | None:
    """Read one CSV/TSV record (``None`` at the end), naming its first line on bad quoting."""
    try:
        return next(reader, None)
    except csv.Error as exc:
        raise ValueError(
            f"{path} line {start}: malformed CSV ({exc}); a value that holds the delimiter, "
            'a quote or a line break must be quoted, with inner quotes doubled: "say ""hi"""'
        ) from exc


def _width_message(
    path: str, line: int, header: list[str], record: list[str], id_column: str
) -> str:
    """Describe a row with the wrong number of columns, naming its id when it has one."""
    which = "a row"
    if id_column in header and header.index(id_column) < len(record):
        which = f"the row of id {record[header.index(id_column)]!r}"
    return (
        f"{path} line {line}: {which} has {len(record)} columns, but the header names "
        f"{len(header)} ({', '.join(header)}): {record!r}; quote values that hold the "
        "delimiter (CSV), or check for a missing or extra delimiter"
    )


def _read_header(path: str, reader: Iterator[list[str]]) -> list[str]:
    """Read and check the header line of a CSV/TSV file."""
    header = next(reader, None)
    if not header or header == [""]:
        raise ValueError(f"{path} line 1: expected a header line naming the columns, got none")
    if "" in header:
        raise ValueError(
            f"{path} line 1: column {header.index('') + 1} of the header has no name "
            f"({header!r}); name every column, or remove the delimiter at the end of the lines"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"{path} line 1: the header repeats column(s) {repeated}; rename them")
    return header


def _iter_jsonl(path: str) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield the objects of a JSON-lines file, one per non-blank line."""
    with _open_manifest(path, "tables") as file:
        yield from _decoded(path, _jsonl_rows(path, file))


def _jsonl_rows(path: str, file: Any) -> Iterator[tuple[dict[str, Any], int]]:
    for line_number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} line {line_number}: not valid JSON ({exc.msg} at column "
                f"{exc.colno}); each line must hold one JSON object"
            ) from exc
        if not isinstance(row, dict):
            # A malformed manifest line, like any other: ValueError, not TypeError.
            raise ValueError(
                f"{path} line {line_number}: expected a JSON object, got "
                f"{type(row).__name__}: {line.strip()!r}"
            )
        yield row, line_number


def read_tables(
    paths: PathOrPaths,
    *,
    id_column: str = "id",
    fields: Sequence[str] | None = None,
    format: str | None = None,
) -> Table:
    """Read one or several tables whose columns are fields and whose rows are items.

    Args:
        paths: a table path or a list of them (one per corpus); rows are concatenated.
        id_column: the column holding each row's id.
        fields: the columns to keep; by default every column of the first row but the id.
        format: ``"csv"``, ``"tsv"`` or ``"jsonl"``; by default guessed from each suffix.

    Returns:
        The ids in row order and one column per field.

    Raises:
        ValueError: a malformed row, a missing column, a duplicate id, or no rows.
    """
    path_list = as_paths(paths, "tables")
    readers: dict[str, _FieldReader] | None = None
    for path in path_list:
        kind = table_format(path, format)
        for row, line in iter_table(path, kind, id_column):
            key = _row_id(row, id_column, path, line)
            if readers is None:
                readers = _table_readers(row, id_column, fields, path, line)
            _add_row(readers, row, key, path, line)
    if readers is None:
        raise ValueError(f"no rows in {', '.join(path_list)}; the tables are empty")
    return _align(readers)


def _row_id(row: Mapping[str, Any], id_column: str, path: str, line: int) -> str:
    """Return the row's id as a string, or raise naming the line."""
    if id_column not in row:
        raise ValueError(
            f"{path} line {line}: no id column {id_column!r}; the columns are {sorted(row)}; "
            "pass id_column= to name the column that holds the ids"
        )
    key = row[id_column]
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key == "":
        raise ValueError(f"{path} line {line}: expected a non-empty id, got {key!r}")
    return str(key)


def _table_readers(
    row: Mapping[str, Any], id_column: str, fields: Sequence[str] | None, path: str, line: int
) -> dict[str, _FieldReader]:
    """Make one reader per field, the fields being given or the first row's columns."""
    if isinstance(fields, str):
        raise TypeError(f"fields should be a list of column names, but got a string: {fields!r}")
    names = [name for name in row if name != id_column] if fields is None else list(fields)
    if not names:
        raise ValueError(f"{path} line {line}: the table has no column besides {id_column!r}")
    clashing = [name for name in names if name in RESERVED_NAMES]
    if fields is None and clashing:
        raise ValueError(
            f"{path} has a column {clashing[0]!r} besides the id column {id_column!r}: every "
            f"item carries its id (from {id_column!r}) under 'id', so no field may be called "
            f"{clashing[0]!r}. Pass fields=[...] naming the columns to keep, without it"
        )
    return {name: _FieldReader(_check_field_name(name)) for name in names}


def _add_row(
    readers: Mapping[str, _FieldReader], row: Mapping[str, Any], key: str, path: str, line: int
) -> None:
    """Add one table row's values to the field readers."""
    for name, reader in readers.items():
        if name not in row:
            raise ValueError(
                f"{path} line {line}: no column {name!r} for id {key!r}; "
                f"the columns are {sorted(row)}"
            )
        if not reader.paths or reader.paths[-1] != path:
            reader.add_path(path)
        reader.add(key, row[name], len(reader.paths) - 1, line)


def read_numbers(paths: PathOrPaths, what: str) -> dict[str, float]:
    """Read Kaldi-style ``id number`` files (``utt2dur``, ``utt2num_samples``) into a dict.

    Args:
        paths: one file or a list of files (one per corpus).
        what: how to name the argument in errors, e.g. ``"lengths"``.

    Raises:
        ValueError: a malformed line, a duplicate id, or a value that is not a number.
    """
    reader = _FieldReader(what)
    for path in as_paths(paths, what):
        index = reader.add_path(path)
        for key, value, line in iter_idx2data(path, what):
            reader.add(key, value, index, line)
    return {
        key: to_number(entry[0], reader.origin(key), key) for key, entry in reader.entries.items()
    }


def to_number(value: Any, origin: str, key: str) -> float:
    """Convert a manifest value to ``float``, or raise naming where it came from.

    Raises:
        ValueError: ``value`` is not a number (nor a string holding one).
    """
    if isinstance(value, bool):
        value = repr(value)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{origin}: expected a number for id {key!r}, got {value!r}") from exc
