"""Fault injection: what the server answers instead of the truth, for a count or a time span."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Faults:
    """Switchable fault injection. ``kind`` is one of KINDS; ``scope`` 'writes' or 'all'."""

    KINDS = ("write_timeout", "read_timeout", "unavailable", "overloaded", "drop", "delay")
    kind: str | None = None
    remaining: int | None = None  # requests still to fail; None = no count limit
    until: float | None = None  # monotonic deadline; None = no time limit
    delay_s: float = 0.0
    scope: str = "writes"
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(
        self, kind: str, *, count: int | None = None, seconds: float | None = None,
        delay_s: float = 0.0, scope: str = "writes",
    ) -> None:  # fmt: skip
        if kind not in self.KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {self.KINDS}")
        with self.lock:
            self.kind, self.remaining, self.delay_s, self.scope = kind, count, delay_s, scope
            self.until = None if seconds is None else time.monotonic() + seconds

    def clear(self) -> None:
        with self.lock:
            self.kind, self.remaining, self.until = None, None, None

    def take(self, is_write: bool) -> tuple[str, float] | None:
        """The fault to apply to this request, if any (and count it)."""
        with self.lock:
            if self.kind is None or (self.scope == "writes" and not is_write):
                return None
            if self.until is not None and time.monotonic() >= self.until:
                self.kind = None
                return None
            if self.remaining is not None:
                if self.remaining <= 0:
                    self.kind = None
                    return None
                self.remaining -= 1
            self.injected += 1
            return self.kind, self.delay_s
