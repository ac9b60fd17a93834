"""The CQL native protocol v4 on the wire: opcodes, error codes, the body reader and writers."""

from __future__ import annotations

import struct

# ---------------------------------------------------------------- protocol constants
OP_ERROR, OP_STARTUP, OP_READY, OP_OPTIONS, OP_SUPPORTED = 0x00, 0x01, 0x02, 0x05, 0x06
OP_QUERY, OP_RESULT, OP_PREPARE, OP_EXECUTE, OP_REGISTER, OP_BATCH = 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D

ERR_SERVER, ERR_PROTOCOL, ERR_UNAVAILABLE, ERR_OVERLOADED = 0x0000, 0x000A, 0x1000, 0x1001
ERR_WRITE_TIMEOUT, ERR_READ_TIMEOUT, ERR_SYNTAX, ERR_INVALID = 0x1100, 0x1200, 0x2000, 0x2200
ERR_ALREADY_EXISTS, ERR_UNPREPARED = 0x2400, 0x2500
ERR_BAD_CREDENTIALS = 0x0100
OP_AUTHENTICATE, OP_AUTH_RESPONSE, OP_AUTH_SUCCESS = 0x03, 0x0F, 0x10


class CqlError(Exception):
    """An error the server answers with: code, message and the extra body some codes carry."""

    def __init__(self, code: int, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def invalid(message: str) -> CqlError:
    return CqlError(ERR_INVALID, message)


# ---------------------------------------------------------------- wire encoding
def _short(n: int) -> bytes:
    return struct.pack(">H", n)


def _int(n: int) -> bytes:
    return struct.pack(">i", n)


def _string(s: str) -> bytes:
    raw = s.encode()
    return _short(len(raw)) + raw


def _bytes(b: bytes | None) -> bytes:
    return _int(-1) if b is None else _int(len(b)) + b


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CqlError(ERR_PROTOCOL, "truncated message body")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def short(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def int(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def string(self) -> str:
        return self.take(self.short()).decode()

    def long_string(self) -> str:
        return self.take(self.int()).decode()

    def short_bytes(self) -> bytes:
        return self.take(self.short())

    def value(self) -> bytes | object | None:
        n = self.int()
        if n == -1:
            return None
        if n == -2:
            return UNSET
        return self.take(n)

    def string_map(self) -> dict[str, str]:
        return {self.string(): self.string() for _ in range(self.short())}


UNSET = object()


class DropConnection(Exception):
    """Close the client's connection without answering."""


# ---------------------------------------------------------------- the server
