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

from agents.alerts import AlertPolicy, RulesError, load_rules
from app import metrics

log = logging.getLogger(__name__)


class RulesReloader:
    def __init__(self, path: Path, sizes_s: list[int], policy: AlertPolicy) -> None:
        self.path, self.sizes_s, self.policy = path, sizes_s, policy
        self._stat = self._stat_of()
        self._digest = self._digest_of()
        metrics.ALERT_RULES.set(len(policy.rules))

    def _stat_of(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _digest_of(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def check(self) -> str | None:
        """Reload if the file changed: "applied", "refused", or None (unchanged)."""
        stat = self._stat_of()
        if stat == self._stat:
            return None
        self._stat = stat
        digest = self._digest_of()
        if digest == self._digest:
            return None  # touched, or rewritten with the same rules
        self._digest = digest
        try:
            rules = load_rules(self.path, self.sizes_s)
        except RulesError as exc:
            metrics.ALERT_RULES_RELOADS.labels(outcome="refused").inc()
            log.error("alert rules not reloaded, the %d in force stay: %s", len(self.policy.rules), exc)
            return "refused"
        before = {rule.name: rule for rule in self.policy.rules}
        self.policy.replace(rules)
        metrics.ALERT_RULES.set(len(rules))
        metrics.ALERT_RULES_RELOADS.labels(outcome="applied").inc()
        after = {rule.name: rule for rule in rules}
        added = sorted(after.keys() - before.keys())
        removed = sorted(before.keys() - after.keys())
        changed = sorted(n for n in after.keys() & before.keys() if after[n] != before[n])
        log.warning("alert rules reloaded from %s: %d in force (added %s, changed %s, removed %s)", self.path,
                    len(rules), added or "none", changed or "none", removed or "none")  # fmt: skip
        return "applied"
