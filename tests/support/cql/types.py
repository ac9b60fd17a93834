"""CQL column types: how each is declared, decoded, validated and written as a literal."""

from __future__ import annotations

import ipaddress
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from tests.support.cql.parser import Token, Tokens
from tests.support.cql.protocol import ERR_SYNTAX, CqlError, Reader, _short, invalid

# type name -> (option id, fixed width or None)
SIMPLE_TYPES: dict[str, tuple[int, int | None]] = {
    "ascii": (0x0001, None), "bigint": (0x0002, 8), "blob": (0x0003, None), "boolean": (0x0004, 1),
    "decimal": (0x0006, None), "double": (0x0007, 8), "float": (0x0008, 4), "int": (0x0009, 4),
    "timestamp": (0x000B, 8), "uuid": (0x000C, 16), "text": (0x000D, None), "varchar": (0x000D, None),
    "varint": (0x000E, None), "timeuuid": (0x000F, 16), "inet": (None, None), "date": (0x0011, 4),
    "time": (0x0012, 8), "smallint": (0x0013, 2), "tinyint": (0x0014, 1),
}  # fmt: skip
SIMPLE_TYPES["inet"] = (0x0010, None)
COLLECTIONS = {"list": 0x0020, "map": 0x0021, "set": 0x0022}


# ---------------------------------------------------------------- CQL types
@dataclass(frozen=True)
class CqlType:
    name: str
    params: tuple[CqlType, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}<{', '.join(map(str, self.params))}>" if self.params else self.name

    def option(self) -> bytes:
        if self.name in COLLECTIONS:
            return _short(COLLECTIONS[self.name]) + b"".join(p.option() for p in self.params)
        option_id = SIMPLE_TYPES[self.name][0]
        assert option_id is not None
        return _short(option_id)

    def validate(self, raw: bytes, column: str) -> Any:
        """Decode ``raw`` as this type, raising InvalidRequest the way a server does."""
        if self.name in COLLECTIONS:
            reader = Reader(raw)
            try:
                count = reader.int()
                items = []
                for _ in range(count * (2 if self.name == "map" else 1)):
                    items.append(reader.value())
            except CqlError:
                raise invalid(f"Invalid {self.name} value for column {column}") from None
            if reader.pos != len(raw) or any(not isinstance(i, bytes) for i in items):
                raise invalid(f"Invalid {self.name} value for column {column}")
            kinds = self.params * len(items) if self.name != "map" else self.params * count
            return [kind.validate(item, column) for kind, item in zip(kinds, items, strict=False)]
        width = SIMPLE_TYPES[self.name][1]
        if width is not None and len(raw) != width:
            raise invalid(f"Expected {width} or 0 byte {self.name} for column {column} ({len(raw)})")
        if self.name in ("text", "varchar"):
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise invalid(f"Invalid UTF-8 bytes for column {column}") from None
        if self.name == "ascii":
            if not raw.isascii():
                raise invalid(f"Invalid byte for ascii for column {column}")
            return raw.decode()
        if self.name in ("int", "bigint", "smallint", "tinyint", "timestamp", "time", "varint"):
            return int.from_bytes(raw, "big", signed=True)
        if self.name == "date":
            return int.from_bytes(raw, "big", signed=False)
        if self.name in ("double", "float"):
            return struct.unpack(">d" if width == 8 else ">f", raw)[0]
        if self.name == "boolean":
            return raw != b"\x00"
        if self.name in ("uuid", "timeuuid"):
            return uuid.UUID(bytes=raw)
        if self.name == "inet":
            if len(raw) not in (4, 16):
                raise invalid(f"Invalid inet value for column {column}")
            return ipaddress.ip_address(raw)
        return raw  # blob, decimal: any bytes

    def encode_literal(self, token: Token, column: str) -> bytes:
        """Turn a CQL literal into the value bytes, rejecting a literal of the wrong kind."""
        kind, text = token.kind, token.text
        ints = {"bigint": ">q", "int": ">i", "smallint": ">h", "tinyint": ">b", "timestamp": ">q"}

        def reject() -> CqlError:
            return invalid(f'Invalid {kind.upper()} constant ({text}) for "{column}" of type {self}')

        if self.name in ints and kind == "integer":
            try:
                return struct.pack(ints[self.name], int(text))
            except struct.error:
                raise reject() from None
        if self.name in ("double", "float") and kind in ("integer", "float"):
            return struct.pack(">d" if self.name == "double" else ">f", float(text))
        if self.name == "varint" and kind == "integer":
            n = int(text)
            return n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True)
        if self.name in ("text", "varchar", "ascii") and kind == "string":
            raw = text.encode()
            if self.name == "ascii" and not raw.isascii():
                raise reject()
            return raw
        if self.name == "boolean" and kind == "ident" and text.lower() in ("true", "false"):
            return b"\x01" if text.lower() == "true" else b"\x00"
        if self.name in ("uuid", "timeuuid") and kind in ("uuid",):
            return uuid.UUID(text).bytes
        if self.name == "timestamp" and kind == "string":
            try:
                from datetime import datetime

                stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
                return struct.pack(">q", int(stamp.timestamp() * 1000))
            except ValueError:
                raise reject() from None
        if self.name == "blob" and kind == "blob":
            return bytes.fromhex(text[2:])
        raise reject()


def parse_type(tokens: Tokens) -> CqlType:
    name = tokens.ident().lower()
    if name == "frozen":
        tokens.expect("<")
        inner = parse_type(tokens)
        tokens.expect(">")
        return inner
    if name in COLLECTIONS:
        tokens.expect("<")
        params = [parse_type(tokens)]
        while tokens.accept(","):
            params.append(parse_type(tokens))
        tokens.expect(">")
        if len(params) != (2 if name == "map" else 1):
            raise CqlError(ERR_SYNTAX, f"bad number of type parameters for {name}")
        return CqlType(name, tuple(params))
    if name not in SIMPLE_TYPES:
        raise CqlError(ERR_SYNTAX, f"Unknown type {name}")
    return CqlType("text" if name == "varchar" else name)
