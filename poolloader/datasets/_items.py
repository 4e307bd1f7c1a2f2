"""A manifest's items in shared memory: what a ``ManifestDataset`` reads in every worker.

A :class:`~._manifest.Table` as read from the manifests is a few Python lists per field,
which every spawned worker would unpickle whole and every forked one would copy as it
reads them (copy-on-read). :class:`ItemTable` moves it, once, into three shared
containers that pickle to small handles and are mapped, not copied, by each worker::

    ids        SharedList[str]         position -> id
    positions  SharedDict[str, int]    id -> position
    rows       SharedList[tuple]       position -> (id, value of each field ...,
                                                    path index, line of each field ...)

A row repeats the id, so that loading an item decodes one record, and keeps where each
value was read (the manifest file's index and the line), so that an error raised in a
worker still names the line that caused it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .._shared import SharedDict, SharedList
from ._manifest import Table

Row = tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Ids, the id index and one row per item, all in shared memory.

    Attributes:
        ids: each position's id.
        positions: each id's position.
        rows: each position's row: the id, the field values, then ``(path index, line)``
            per field.
        fields: the field names, in row order.
        paths: each field's manifest files (the path index of a row indexes these).
    """

    ids: SharedList[str]
    positions: SharedDict[str, int]
    rows: SharedList[Row]
    fields: tuple[str, ...]
    paths: dict[str, tuple[str, ...]]

    @classmethod
    def from_table(cls, table: Table) -> ItemTable:
        """Move a read table into shared memory."""
        return cls(
            ids=SharedList(table.ids),
            positions=_positions(table.ids),
            rows=SharedList(_rows(table)),
            fields=tuple(table.columns),
            paths={name: column.paths for name, column in table.columns.items()},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, key: str) -> int:
        """The position of id ``key``.

        Raises:
            KeyError: no such id.
        """
        return self.positions[key]

    def value(self, row: Row, name: str) -> Any:
        """The manifest value of field ``name`` in ``row``."""
        return row[1 + self.fields.index(name)]

    def path_index(self, row: Row, name: str) -> int:
        """The index into ``paths[name]`` of the file field ``name`` of ``row`` came from."""
        index: int = row[self._where(name)]
        return index

    def origin(self, row: Row, name: str) -> str:
        """Say where field ``name`` of ``row`` was read: ``"data/wav.scp line 3"``."""
        where = self._where(name)
        return f"{self.paths[name][row[where]]} line {row[where + 1]}"

    def _where(self, name: str) -> int:
        return 1 + len(self.fields) + 2 * self.fields.index(name)

    def take(self, positions: Sequence[int]) -> ItemTable:
        """The table restricted to ``positions`` (valid, non-negative), in that order."""
        ids = self.ids.take(positions)
        rows = self.rows.take(positions)
        return ItemTable(ids, _positions(list(ids)), rows, self.fields, self.paths)


def _positions(ids: Sequence[str]) -> SharedDict[str, int]:
    return SharedDict(zip(ids, range(len(ids)), strict=True))


def _rows(table: Table) -> Iterator[Row]:
    """Each item's row: the id, the values of every field, then where each was read."""
    values = [table.ids] + [column.values for column in table.columns.values()]
    wheres = []
    for column in table.columns.values():
        wheres += [column.where[:, 0].tolist(), column.where[:, 1].tolist()]
    return zip(*values, *wheres, strict=True)
