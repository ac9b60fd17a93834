"""Alert rules reloaded when their file changes (MILLSTREAM_ALERTS__RELOAD_INTERVAL_S).

A worker checks the rules file every interval: its stat first (cheap), then its bytes; a
changed file is parsed and checked as at start. Rules that pass replace the ones in force from
the next batch on; a file that does not is logged with the same one line that would stop a
start, counted, and changes nothing. Kubernetes updates a mounted ConfigMap by swapping a
symlink, which the stat (it follows links) sees.

What a reload means for exactness: rules are judged when a batch is applied, so each worker
starts judging by the new rules at its next check (workers change over within one interval of
each other), and a batch replayed after a crash is judged by the rules in force at the replay.
An alert raised by a rule that is then removed is never cleared.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from agents.alerts import AlertPolicy, Rule, RulesError, parse_rules, read_rules_file
from app import metrics

log = logging.getLogger(__name__)


class RulesFile:
    """A rules file read once per change: its stat, then its bytes, whose digest and rules come
    from that one read (a change between a check and a parse cannot go unseen). The stat is
    taken before the read, so a write after it changes the next stat."""

    def __init__(self, path: Path, sizes_s: list[int]) -> None:
        self.path, self.sizes_s = path, sizes_s
        self._stat: tuple[int, int, int] | None = None
        self._digest: bytes | None = None

    def load(self) -> list[Rule]:
        """The rules as the file holds them now; raises RulesError with one line."""
        self._stat = self._stat_of()
        return self._parse(*self._read())

    def changed(self) -> list[Rule] | None:
        """The file's rules if its bytes changed since the last read, else None; raises
        RulesError (once per change) for a file that does not pass."""
        stat = self._stat_of()
        if stat == self._stat:
            return None
        self._stat = stat
        data, digest = self._read()
        if digest == self._digest:
            return None  # touched, or rewritten with the same rules
        return self._parse(data, digest)

    def _stat_of(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> tuple[bytes, bytes]:
        """The file's bytes and their digest, from one read."""
        try:
            data = read_rules_file(self.path)
        except RulesError:
            self._digest = None  # its return, even unchanged, is read again
            raise
        return data, hashlib.sha256(data).digest()

    def _parse(self, data: bytes, digest: bytes) -> list[Rule]:
        self._digest = digest  # before parsing: a file that does not pass is refused once per change
        return parse_rules(data, self.path, self.sizes_s)


class RulesReloader:
    def __init__(self, rules_file: RulesFile, policy: AlertPolicy) -> None:
        self.rules_file, self.policy = rules_file, policy
        metrics.ALERT_RULES.set(len(policy.rules))

    def check(self) -> str | None:
        """Reload if the file changed: "applied", "refused", or None (unchanged)."""
        try:
            rules = self.rules_file.changed()
        except RulesError as exc:
            metrics.ALERT_RULES_RELOADS.labels(outcome="refused").inc()
            log.error("alert rules not reloaded, the %d in force stay: %s", len(self.policy.rules), exc)
            return "refused"
        if rules is None:
            return None
        before = {rule.name: rule for rule in self.policy.rules}
        self.policy.replace(rules)
        metrics.ALERT_RULES.set(len(rules))
        metrics.ALERT_RULES_RELOADS.labels(outcome="applied").inc()
        after = {rule.name: rule for rule in rules}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(n for n in after.keys() & before.keys() if after[n] != before[n])
        path = self.rules_file.path
        log.warning("alert rules reloaded from %s: %d in force (added %s, changed %s, removed %s)", path,
                    len(rules), added or "none", changed or "none", removed or "none")  # fmt: skip
        return "applied"
