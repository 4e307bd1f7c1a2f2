"""``ManifestDataset``: items keyed by id, fields read lazily from manifests.

The dataset holds only what the manifests say (ids, one string or number per
field and item, where each came from) plus plain settings; files are opened in
``__getitem__`` and closed before it returns. What the manifests say is moved once
into shared memory (an :class:`~._items.ItemTable` of ``SharedList``/``SharedDict``),
so the dataset pickles to a few kilobytes however many items it has, and every worker
maps the same memory instead of holding a copy. Settings such as ``duration`` are
plain attributes that poolloader's control channel can change in every worker.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from .._shared import SharedList
from .._tracking import unwrap
from ..errors import _append_to_message
from ._collate import pad_collate
from ._items import ItemTable, Row
from ._loaders import (
    PATH_LOADERS,
    CropStarts,
    Loader,
    audio_seconds,
    check_picklable,
    choose_loaders,
    load_value,
    read_audio,
)
from ._manifest import (
    PathLike,
    PathOrPaths,
    Table,
    as_paths,
    describe_ids,
    read_fields,
    read_numbers,
    read_tables,
    to_number,
)

CollateFn = Callable[[list[dict[str, Any]]], Any]
"""A function from a list of items to a batch."""

if TYPE_CHECKING:
    from typing_extensions import Self

ResultT = TypeVar("ResultT")

SAMPLE_RATE_SUFFIX = "_sample_rate"
"""An audio field ``audio`` puts its sample rate under ``audio_sample_rate``."""


class ManifestDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Items keyed by id, with fields read lazily from Kaldi-style or tabular manifests.

    Build it from Kaldi-style ``id value`` files, one or several per field (several
    files mix several corpora, as SpeeChain's ``main_data`` does), or with
    :meth:`from_table` from CSV/TSV/JSON-lines tables whose columns are the fields.

    An item is a dict: ``"id"``, then one key per field, loaded by that field's loader
    (see ``loaders``); an audio field ``f`` also puts its sample rate under
    ``f_sample_rate``. Audio is a float32 tensor, time first: ``(samples,)`` for mono,
    ``(samples, channels)`` otherwise, so :func:`pad_collate` pads its default axis.

    Indexing: ``ds["utt1"]`` (id), ``ds[3]`` / ``ds[-1]`` (position) give one item;
    ``ds[["utt1", "utt2"]]`` (or positions) gives a list of items, or
    ``collate_fn(items)`` when a ``collate_fn`` was given.

    Args:
        fields: field name -> an ``id value`` file or a list of them (one per corpus).
            Every field must have the same ids; positions follow the first field's files.
        loaders: field name -> ``"audio"``, ``"npy"``, ``"text"`` (the value itself),
            ``"text_file"``, ``"int"``, ``"float"``, or a module-level function
            ``load(value)`` receiving the value as written (it must pickle: spawned
            workers receive it by name, so no lambdas). Unlisted fields are guessed from
            their first value's suffix (``.wav``/``.flac``/... audio, ``.npy``,
            ``.txt`` text_file), else ``"text"``; the lengths field defaults to ``"float"``.
        lengths: where :attr:`lengths` come from: the name of a numeric field (a
            ``duration`` column), of an audio field (durations in seconds, read from the
            file headers now), or ``id number`` file(s) such as ``utt2dur`` or
            ``utt2num_samples`` (extra ids in them are ignored). Units are the source's.
        duration: seconds to random-crop audio fields to, ``None`` for whole files; see
            :attr:`duration`.
        collate_fn: the collate of :attr:`collate` and of list indexing; must pickle.
            ``None``: :attr:`collate` is :func:`pad_collate` and a list index returns a list.
        root: directory that relative file paths in the manifests are relative to; by
            default each manifest file's own directory (``root="."`` for Kaldi recipes,
            whose paths are relative to the recipe directory).

    Attributes:
        duration: seconds to random-crop every audio field to, or ``None``. A plain
            attribute, read in each ``__getitem__``: a curriculum may change it during
            training (``loader.dataset.duration = 2 * loader.dataset.duration``). The crop
            start comes from torch's global generator (``torch.randint``), which the
            loader seeds per batch, so seeded runs crop the same windows. Files no longer
            than ``duration`` are read whole; audio fields of one item with equally long
            files share one window.
        collate_fn: the function given as ``collate_fn``, or ``None``.

    Raises:
        ValueError: a malformed manifest line, a duplicate id within a field (naming both
            lines), fields whose ids differ (listing a few), or a bad argument.
        FileNotFoundError: a manifest file does not exist.
        TypeError: a loader or ``collate_fn`` that worker processes could not receive.

    Example:
        >>> ds = ManifestDataset(
        ...     {"audio": ["a/wav.scp", "b/wav.scp"], "text": ["a/text", "b/text"]},
        ...     lengths=["a/utt2dur", "b/utt2dur"],
        ...     duration=2.0,
        ... )  # doctest: +SKIP
        >>> ds["utt1"]["audio"].shape, ds["utt1"]["audio_sample_rate"]  # doctest: +SKIP
        (torch.Size([32000]), 16000)
    """

    duration: float | None
    collate_fn: CollateFn | None

    def __init__(
        self,
        fields: Mapping[str, PathOrPaths],
        *,
        loaders: Mapping[str, Loader] | None = None,
        lengths: PathOrPaths | None = None,
        duration: float | None = None,
        collate_fn: CollateFn | None = None,
        root: PathLike | None = None,
    ) -> None:
        self._setup(read_fields(fields), loaders, lengths, duration, collate_fn, root)

    @classmethod
    def from_table(
        cls,
        tables: PathOrPaths,
        *,
        id_column: str = "id",
        fields: Sequence[str] | None = None,
        format: str | None = None,
        loaders: Mapping[str, Loader] | None = None,
        lengths: PathOrPaths | None = None,
        duration: float | None = None,
        collate_fn: CollateFn | None = None,
        root: PathLike | None = None,
    ) -> Self:
        """Build a dataset from CSV/TSV/JSON-lines tables: one row per item, columns as fields.

        Args:
            tables: a table or a list of tables (one per corpus); rows are concatenated.
            id_column: the column that holds each row's id.
            fields: the columns to keep as fields; by default all but ``id_column``.
            format: ``"csv"``, ``"tsv"`` (unquoted) or ``"jsonl"``; by default from each
                file's suffix (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``).
            loaders: as for the constructor.
            lengths: as for the constructor; usually a column name such as ``"duration"``.
            duration: as for the constructor.
            collate_fn: as for the constructor.
            root: as for the constructor (default: each table's own directory).

        Returns:
            The dataset, items in row order.

        Raises:
            ValueError: a malformed row (naming path, line and id), a missing column, a
                duplicate id (naming both lines), no rows, or an unknown format.

        Example:
            >>> ds = ManifestDataset.from_table("train.csv", lengths="duration")  # doctest: +SKIP
        """
        dataset = cls.__new__(cls)
        table = read_tables(tables, id_column=id_column, fields=fields, format=format)
        dataset._setup(table, loaders, lengths, duration, collate_fn, root)
        return dataset

    def _setup(
        self,
        table: Table,
        loaders: Mapping[str, Loader] | None,
        lengths: PathOrPaths | None,
        duration: float | None,
        collate_fn: CollateFn | None,
        root: PathLike | None,
    ) -> None:
        """Move a read table into shared memory and hold the settings; for the constructors."""
        numeric = lengths if isinstance(lengths, str) and lengths in table.columns else None
        first_values = {name: column.values[0] for name, column in table.columns.items()}
        self._loaders = choose_loaders(first_values, loaders or {}, numeric)
        self._check_audio_keys(tuple(table.columns))
        self._root = None if root is None else os.path.abspath(os.fspath(root))
        self._bases = {
            name: tuple(os.path.dirname(os.path.abspath(p)) for p in column.paths)
            for name, column in table.columns.items()
        }
        self.duration = check_duration(duration)
        if collate_fn is not None:
            check_picklable(collate_fn, "collate_fn")
        self.collate_fn = collate_fn
        self._items = ItemTable.from_table(table)
        values = self._read_lengths(lengths, table)
        self._lengths = None if values is None else SharedList(values)

    def _check_audio_keys(self, fields: tuple[str, ...]) -> None:
        """Refuse a field whose name an audio field's sample rate would overwrite."""
        for name, loader in self._loaders.items():
            rate_key = f"{name}{SAMPLE_RATE_SUFFIX}"
            if loader == "audio" and rate_key in fields:
                raise ValueError(
                    f"audio field {name!r} puts its sample rate under {rate_key!r}, which is "
                    "also a field; rename that field"
                )

    # ------------------------------------------------------------------ lengths

    def _read_lengths(self, lengths: PathOrPaths | None, table: Table) -> np.ndarray | None:
        """Read the lengths from a field, an audio field's headers, or ``id number`` files."""
        if lengths is None:
            return None
        if isinstance(lengths, str) and lengths in table.columns:
            if self._loaders[lengths] == "audio":
                return self._audio_lengths(lengths)
            return _field_lengths(table, lengths)
        if isinstance(lengths, str) and not os.path.exists(lengths):
            raise ValueError(
                f"lengths={lengths!r} names neither a field of the dataset "
                f"({sorted(table.columns)}) nor an existing file; give a numeric or audio "
                "field, or utt2dur-style 'id number' file(s)"
            )
        return self._file_lengths(lengths)

    def _audio_lengths(self, name: str) -> np.ndarray:
        """Durations in seconds of an audio field, from the file headers."""
        seconds = np.empty(len(self), dtype=np.float64)
        for position, row in enumerate(self._items.rows):
            path = self._path(name, position, row)
            seconds[position] = self._guarded(name, position, row, path, audio_seconds, path)
        return seconds

    def _file_lengths(self, paths: PathOrPaths) -> np.ndarray:
        """Lengths from ``id number`` files, which must cover every id."""
        numbers_by_id = read_numbers(paths, "lengths")
        missing = [key for key in self._items.ids if key not in numbers_by_id]
        if missing:
            raise ValueError(
                f"lengths file(s) {', '.join(as_paths(paths, 'lengths'))} have no entry for "
                f"{len(missing)} of the {len(self)} ids: {describe_ids(missing)}; give a "
                "length for every id"
            )
        return np.asarray([numbers_by_id[key] for key in self._items.ids], dtype=np.float64)

    # ------------------------------------------------------------------ public surface

    @property
    def ids(self) -> SharedList[str]:
        """The ids, in position order: a read-only sequence in shared memory.

        It compares equal to a tuple or list of the same ids (``ds.ids == ("u1", "u2")``);
        ``list(ds.ids)`` copies it.
        """
        return self._items.ids

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names, in the order items hold them."""
        return self._items.fields

    @property
    def loaders(self) -> dict[str, Loader]:
        """Each field's loader: a built-in's name or the function given."""
        return dict(self._loaders)

    @property
    def lengths(self) -> np.ndarray:
        """Each position's length (float64, read-only), for length-aware samplers and selection.

        The array is a view of shared memory: samplers built on it keep no copy, and
        workers that receive the dataset map it instead of unpickling it.

        Raises:
            AttributeError: the dataset was built without ``lengths=`` (so
                ``hasattr(ds, "lengths")`` is False).
        """
        if self._lengths is None:
            raise AttributeError(
                "this ManifestDataset has no lengths: pass lengths= (a numeric or audio "
                "field, or utt2dur-style files) when you build it"
            )
        return self._lengths.numpy()

    def __len__(self) -> int:
        """Return the number of items."""
        return len(self._items)

    def __getitem__(self, key: Any) -> Any:
        """Return one item by id or position, or a list of items (or a batch) by a list.

        Args:
            key: an id (``str``), a position (``int``, negative counts from the end), or a
                list/tuple/array/range of them.

        Returns:
            One item (a dict); for a list key, the list of items, or
            ``collate_fn(items)`` if a ``collate_fn`` was given.

        Raises:
            KeyError: an unknown id.
            IndexError: a position out of range.
            TypeError: a key of another type.
            FileNotFoundError: a file of the item is missing (naming id, field and line).
        """
        if isinstance(key, (np.ndarray, torch.Tensor)) and key.ndim == 0:
            key = key.item()  # a position held in a 0-dim array or tensor
        if isinstance(key, (str, numbers.Integral)):
            return self._item(self._position(key))
        items = [self._item(self._position(k)) for k in self._keys(key)]
        return items if self.collate_fn is None else self.collate_fn(items)

    @property
    def collate(self) -> CollateFn:
        """The function that collates items into a batch: ``collate_fn``, else :func:`pad_collate`.

        Pass it to a loader as ``collate_fn=dataset.collate``, or call it:
        ``dataset.collate(items)``. It is the function itself, not a method bound to the
        dataset, so a spawned worker receives it by name instead of a second pickled
        copy of the whole dataset.
        """
        return pad_collate if self.collate_fn is None else self.collate_fn

    def subset(self, keys: Iterable[Any]) -> Self:
        """Return a dataset restricted to ``keys`` (ids or positions), in that order.

        Nothing is read again; settings (``duration``, ``collate_fn``, ...) are kept.

        Raises:
            ValueError: no keys, or a key given twice.
            KeyError, IndexError: an unknown id or position.
        """
        self = unwrap(self)  # called through loader.dataset: copy the dataset, not its view
        positions = [self._position(k) for k in self._keys(keys)]
        if not positions:
            raise ValueError("subset needs at least one id; got none")
        if len(set(positions)) != len(positions):
            ids = self._items.ids
            twice = sorted(ids[p] for p, n in Counter(positions).items() if n > 1)
            raise ValueError(f"subset got id(s) more than once: {describe_ids(twice)}")
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)  # a shallow copy: settings and loaders kept
        new._items = self._items.take(positions)
        new._lengths = None if self._lengths is None else self._lengths.take(positions)
        return new

    def __repr__(self) -> str:
        """Summarise: size, loader of each field, duration."""
        loaders = {
            name: loader if isinstance(loader, str) else getattr(loader, "__qualname__", loader)
            for name, loader in self._loaders.items()
        }
        name = type(unwrap(self)).__name__
        return f"{name}({len(self)} items, loaders={loaders}, duration={self.duration})"

    # ------------------------------------------------------------------ item loading

    def _keys(self, keys: Any) -> list[Any]:
        """Turn a list-like index into a list of keys, refusing other types."""
        if isinstance(keys, (np.ndarray, torch.Tensor)):
            return list(keys.tolist())
        if isinstance(keys, Iterable) and not isinstance(keys, (str, bytes, Mapping)):
            return list(keys)
        raise _index_type_error(keys)

    def _position(self, key: Any) -> int:
        """Return the position of an id or a (possibly negative) position."""
        if isinstance(key, str):
            try:
                return self._items.position(key)
            except KeyError:
                raise KeyError(
                    f"no item with id {key!r} in this dataset ({len(self)} items)"
                ) from None
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, numbers.Integral):
            raise _index_type_error(key)
        position, size = operator.index(key), len(self)
        if not -size <= position < size:
            raise IndexError(f"position {position} is out of range for a dataset of {size} items")
        return position % size

    def _item(self, position: int) -> dict[str, Any]:
        """Load every field of the item at ``position``."""
        duration = check_duration(self.duration)
        starts: CropStarts = {}
        row = self._items.rows[position]
        item: dict[str, Any] = {"id": row[0]}
        for name, value in zip(self._items.fields, row[1:], strict=False):  # id, values, ...
            item.update(self._load(name, value, position, row, duration, starts))
        return item

    def _load(
        self,
        name: str,
        value: Any,
        position: int,
        row: Row,
        duration: float | None,
        starts: CropStarts,
    ) -> dict[str, Any]:
        """Load one field of one item; audio adds its sample rate."""
        loader = self._loaders[name]
        if not isinstance(loader, str):
            return {name: self._guarded(name, position, row, None, loader, value)}
        if loader not in PATH_LOADERS:
            return {name: self._guarded(name, position, row, None, load_value, loader, value)}
        path = self._path(name, position, row)
        if loader != "audio":
            return {name: self._guarded(name, position, row, path, load_value, loader, path)}
        audio, rate = self._guarded(name, position, row, path, read_audio, path, duration, starts)
        return {name: audio, f"{name}{SAMPLE_RATE_SUFFIX}": rate}

    def _path(self, name: str, position: int, row: Row) -> str:
        """Resolve a path value against ``root`` or the directory of its manifest."""
        value = self._items.value(row, name)
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"{self._items.origin(row, name)}: field {name!r} of id "
                f"{self._items.ids[position]!r} should be a file path for its loader "
                f"{self._loaders[name]!r}, got {value!r}"
            )
        base = self._root or self._bases[name][self._items.path_index(row, name)]
        return os.path.join(base, value)

    def _guarded(
        self,
        name: str,
        position: int,
        row: Row,
        path: str | None,
        function: Callable[..., ResultT],
        *args: Any,
    ) -> ResultT:
        """Run ``function(*args)`` for one field of one item, explaining a failure.

        If ``path`` (the file being read, if any) is missing, the error becomes a
        ``FileNotFoundError`` naming the path, id, field and manifest line; any other
        error keeps its type and gains a note saying the same (on Python 3.10, which
        has no notes, a line of its message where only the message changes).
        """
        try:
            return function(*args)
        except ImportError:
            raise
        except Exception as exc:
            where = (
                f"for id {self._items.ids[position]!r} (field {name!r}, from "
                f"{self._items.origin(row, name)})"
            )
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file {where}") from exc
            if hasattr(exc, "add_note"):
                exc.add_note(f"while loading {where}")
            else:  # Python 3.10: no notes; the message says it where it can
                _append_to_message(exc, f"(while loading {where})")
            raise


def _field_lengths(table: Table, name: str) -> np.ndarray:
    """Lengths from a numeric field (a ``duration`` column), as written in the manifest."""
    column, ids = table.columns[name], table.ids
    values = [to_number(v, column.origin(p), ids[p]) for p, v in enumerate(column.values)]
    return np.asarray(values, dtype=np.float64)


def _index_type_error(key: object) -> TypeError:
    """The error for an index that is neither an id, a position nor a list of them."""
    return TypeError(
        "ManifestDataset indices should be an id (str), a position (int) or a list of "
        f"them, but got {type(key).__name__}: {key!r}"
    )


def check_duration(duration: Any) -> float | None:
    """Return ``duration`` if it is ``None`` or a positive number of seconds.

    Raises:
        ValueError: anything else.
    """
    if duration is None:
        return None
    if (
        isinstance(duration, bool)
        or not isinstance(duration, numbers.Real)
        or not 0 < float(duration) < math.inf
    ):
        raise ValueError(
            "duration should be a positive number of seconds or None (whole files), "
            f"but got duration={duration!r}"
        )
    return float(duration)
