"""Tables in memory: columns, primary keys, rows with a write timestamp per cell; prepared statements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.support.cql.protocol import invalid
from tests.support.cql.types import CqlType


# ---------------------------------------------------------------- schema and data
@dataclass
class Table:
    keyspace: str
    name: str
    columns: dict[str, CqlType]
    partition_key: list[str]
    clustering: list[str]
    descending: set[str] = field(default_factory=set)
    rows: dict[tuple[bytes, ...], dict[str, bytes]] = field(default_factory=dict)
    stamps: dict[tuple[bytes, ...], dict[str, int]] = field(default_factory=dict)  # write time per cell
    # rows by partition key: a single-partition read finds its rows as Scylla does, without a
    # scan of the table (the stand-in shares the bench's cores with the worker)
    partitions: dict[tuple[bytes, ...], dict[tuple[bytes, ...], dict[str, bytes]]] = field(default_factory=dict)

    def upsert(self, row_key: tuple[bytes, ...], primary: dict[str, bytes]) -> dict[str, bytes]:
        """The row of ``row_key`` (its primary key values in order), made if new."""
        row = self.rows.get(row_key)
        if row is None:
            row = self.rows[row_key] = dict(primary)
            self.partitions.setdefault(row_key[: len(self.partition_key)], {})[row_key] = row
        return row

    def drop(self, row_key: tuple[bytes, ...]) -> None:
        del self.rows[row_key]
        self.stamps.pop(row_key, None)
        partition = row_key[: len(self.partition_key)]
        rows = self.partitions[partition]
        del rows[row_key]
        if not rows:
            del self.partitions[partition]

    def clear(self) -> None:
        self.rows.clear()
        self.stamps.clear()
        self.partitions.clear()

    def candidates(self, conditions: dict[str, Any]) -> list[tuple[tuple[bytes, ...], dict[str, bytes]]]:
        """Rows that may meet equality ``conditions``: one partition's when they name its key."""
        if all(c in conditions for c in self.partition_key):
            partition = tuple(conditions[c] for c in self.partition_key)
            return list(self.partitions.get(partition, {}).items())
        return list(self.rows.items())

    @property
    def primary_key(self) -> list[str]:
        return self.partition_key + self.clustering

    def column(self, name: str) -> CqlType:
        key = name if name in self.columns else name.lower()
        if key not in self.columns:
            raise invalid(f"Undefined column name {name} in table {self.keyspace}.{self.name}")
        return self.columns[key]

    def sort_key(self, row: dict[str, bytes]) -> tuple[Any, ...]:
        key: list[Any] = [tuple(row[c] for c in self.partition_key)]
        for name in self.clustering:
            value = self.columns[name].validate(row[name], name)
            key.append(_Reverse(value) if name in self.descending else value)
        return tuple(key)


class _Reverse:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Reverse) -> bool:
        return bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reverse) and other.value == self.value


@dataclass
class Prepared:
    query: str
    markers: list[tuple[str, CqlType]]  # (column, type) per bind marker, in order
    table: Table | None
    result_columns: list[tuple[str, CqlType]]
