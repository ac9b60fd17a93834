"""The tokenizer of the CQL subset the server understands."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.support.cql.protocol import ERR_SYNTAX, CqlError

# ---------------------------------------------------------------- CQL tokenizer
TOKEN_RE = re.compile(
    r"""\s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<uuid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
    | (?P<blob>0[xX][0-9a-fA-F]*)
    | (?P<float>-?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|-?\d+[eE][+-]?\d+|NaN|-?Infinity)
    | (?P<integer>-?\d+)
    | (?P<qident>"(?:[^"]|"")+")
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<symbol>[(),;=*.?<>{}:\[\]+-])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


class Tokens:
    def __init__(self, query: str) -> None:
        self.items: list[Token] = []
        pos, query = 0, query.strip().rstrip(";").strip()
        while pos < len(query):
            match = TOKEN_RE.match(query, pos)
            if not match or match.end() == pos:
                raise CqlError(ERR_SYNTAX, f"line 1:{pos} no viable alternative at input {query[pos : pos + 10]!r}")
            kind = match.lastgroup or "symbol"
            text = match.group(kind)
            if kind == "string":
                text = text[1:-1].replace("''", "'")
            elif kind == "qident":
                kind, text = "ident", text[1:-1].replace('""', '"')
            self.items.append(Token(kind, text))
            pos = match.end()
        self.pos = 0
        self.markers = 0

    def peek(self, offset: int = 0) -> Token | None:
        index = self.pos + offset
        return self.items[index] if index < len(self.items) else None

    def next(self) -> Token:
        token = self.peek()
        if token is None:
            raise CqlError(ERR_SYNTAX, "unexpected end of statement")
        self.pos += 1
        return token

    def accept(self, *words: str) -> bool:
        for offset, word in enumerate(words):
            token = self.peek(offset)
            if token is None or token.text.lower() != word.lower() or token.kind not in ("ident", "symbol"):
                return False
        self.pos += len(words)
        return True

    def expect(self, *words: str) -> None:
        if not self.accept(*words):
            found = self.peek()
            raise CqlError(ERR_SYNTAX, f"expected {' '.join(words)!r}, found {found.text if found else 'end'!r}")

    def ident(self) -> str:
        token = self.next()
        if token.kind != "ident":
            raise CqlError(ERR_SYNTAX, f"expected a name, found {token.text!r}")
        return token.text

    def done(self) -> bool:
        return self.pos >= len(self.items)

    def skip_rest(self) -> None:
        self.pos = len(self.items)
