"""Threshold alerts with hysteresis, evaluated on closed event-time windows, exact under replay.

A rule watches one metric at one window size: a window is *beyond* when its maximum is above
``above`` (or its minimum below ``below``), or, for an ``anomaly`` rule, when its mean lies more
than ``z`` standard deviations from an exponentially weighted moving average of the means of the
device's windows before it (after ``warmup`` windows; the score is the alert's value). After
``for_windows`` consecutive beyond windows the rule raises; it clears at the first window whose
maximum is at or under ``clear`` (or whose minimum is at or over it; the score at or under
``clear_z``). Between the two levels nothing changes, so a value hovering
at the threshold raises one alert, not hundreds. A window without the metric changes nothing.

Rules are evaluated when a window *closes* (its end plus the grace period is behind the
device's watermark), so a closed window's aggregates are final: readings out of order within
the grace period give exactly the alerts the same readings in order give. The per-device state
of each rule (raised or not, the run of beyond windows, the last window evaluated) lives in the
device's state, in its changelog, and moves only when the device's offset does: a replayed
message moves nothing twice. An alert is kept in the state with the offset that raised it until
its batch is written, and is emitted again when that offset is replayed after a crash; its id is
derived from what it says (device, rule, window, raised or cleared), so the second write is the
same alert, not another one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.windows import COUNT, MAX, MIN, SUM, DeviceState, WindowKey

RULE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
RULE_FIELDS = {"name", "metric", "above", "below", "clear", "for_windows", "window_s", "devices", "factories",
               "lines", "description", "anomaly"}  # fmt: skip
ANOMALY_FIELDS = {"z", "clear_z", "alpha", "warmup"}
RAISED, CLEARED = "raised", "cleared"
PENDING_KEPT = 64  # alerts a device state holds until written, at most


class RulesError(ValueError):
    """A rules file that cannot be used; ``str()`` is one line naming the file and the rule."""


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    threshold: float
    above: bool  # True: max > threshold is beyond; False: min < threshold
    clear: float
    for_windows: int
    window_s: int
    devices: tuple[str, ...] = ()
    factories: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()
    # Anomaly rules: (alpha, warmup windows); threshold and clear are then z-scores.
    anomaly: tuple[float, int] | None = None

    def applies(self, device: str, factory: str, line: str) -> bool:
        return (
            (not self.devices or any(fnmatch.fnmatchcase(device, p) for p in self.devices))
            and (not self.factories or any(fnmatch.fnmatchcase(factory, p) for p in self.factories))
            and (not self.lines or any(fnmatch.fnmatchcase(line, p) for p in self.lines))
        )

    def beyond(self, agg: list[Any], entry: list[Any]) -> tuple[bool, bool, float]:
        """(beyond the threshold, back at or past the clear level, the value that decided)."""
        if self.anomaly is not None:
            return self._score(agg[SUM] / agg[COUNT], entry)
        if self.above:
            value = agg[MAX]
            return value > self.threshold, value <= self.clear, value
        value = agg[MIN]
        return value < self.threshold, value >= self.clear, value

    def _score(self, mean: float, entry: list[Any]) -> tuple[bool, bool, float]:
        """The window mean's z-score against the EWMA of the means before it, then the EWMA
        updated with it. During warm-up (and while the variance is 0) nothing is beyond."""
        assert self.anomaly is not None
        alpha, warmup = self.anomaly
        seen, average, variance = entry[3], entry[4], entry[5]
        score = abs(mean - average) / math.sqrt(variance) if seen >= warmup and variance > 0 else 0.0
        if seen == 0:
            average = mean
        else:
            step = mean - average
            average += alpha * step
            variance = (1 - alpha) * (variance + alpha * step * step)
        entry[3], entry[4], entry[5] = seen + 1, average, variance
        return score > self.threshold, score <= self.clear, round(score, 6)


# (alert id, device, rule, metric, raised|cleared, value, threshold, window start ms, window end ms, offset)
AlertRow = tuple[str, str, str, str, str, float, float, int, int, int]


def alert_id(device: str, rule: str, window_start_ms: int, kind: str) -> str:
    digest = hashlib.sha256(f"{device}\x00{rule}\x00{window_start_ms}\x00{kind}".encode()).hexdigest()
    return digest[:32]


def _number(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RulesError(f"{where}: {name} must be a finite number, not {value!r}")
    return float(value)


def _patterns(where: str, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise RulesError(f"{where}: {name} must be a non-empty list of patterns (fnmatch, e.g. press-*)")
    return tuple(value)


def parse_rule(where: str, doc: Any, sizes_s: list[int]) -> Rule:
    if not isinstance(doc, dict):
        raise RulesError(f"{where}: a rule is a mapping (name, metric, above or below, ...)")
    unknown = sorted(set(doc) - RULE_FIELDS)
    if unknown:
        raise RulesError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(RULE_FIELDS))})")
    name = doc.get("name")
    if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
        raise RulesError(f"{where}: name must be 1-64 of A-Z a-z 0-9 _ . - (it names the alerts)")
    where = f"{where} {name!r}"
    metric = doc.get("metric")
    if not isinstance(metric, str) or not metric:
        raise RulesError(f"{where}: metric is required")
    if "anomaly" in doc:
        return _anomaly_rule(where, name, metric, doc, sizes_s)
    if ("above" in doc) == ("below" in doc):
        raise RulesError(f"{where}: give exactly one of above, below or anomaly")
    above = "above" in doc
    threshold = _number(where, "above" if above else "below", doc["above" if above else "below"])
    clear = _number(where, "clear", doc.get("clear", threshold))
    if (above and clear > threshold) or (not above and clear < threshold):
        side = "at or below above" if above else "at or above below"
        raise RulesError(f"{where}: clear ({clear:g}) must be {side} ({threshold:g})")
    count = doc.get("for_windows", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
        raise RulesError(f"{where}: for_windows must be a whole number from 1 to 1000")
    size = doc.get("window_s", sizes_s[0])
    if size not in sizes_s:
        raise RulesError(f"{where}: window_s {size!r} is not one of MILLSTREAM_WINDOWS__SIZES_S {sizes_s}")
    return Rule(
        name, metric, threshold, above, clear, count, int(size),
        _patterns(where, "devices", doc.get("devices")), _patterns(where, "factories", doc.get("factories")),
        _patterns(where, "lines", doc.get("lines")),
    )  # fmt: skip


def _anomaly_rule(where: str, name: str, metric: str, doc: dict[str, Any], sizes_s: list[int]) -> Rule:
    spec = doc["anomaly"]
    if "above" in doc or "below" in doc or "clear" in doc:
        raise RulesError(f"{where}: an anomaly rule takes no above, below or clear (its levels are z and clear_z)")
    if not isinstance(spec, dict) or set(spec) - ANOMALY_FIELDS:
        raise RulesError(f"{where}: anomaly is a mapping of {', '.join(sorted(ANOMALY_FIELDS))}")
    z = _number(where, "anomaly.z", spec.get("z", 4.0))
    clear_z = _number(where, "anomaly.clear_z", spec.get("clear_z", z / 2))
    alpha = _number(where, "anomaly.alpha", spec.get("alpha", 0.1))
    warmup = spec.get("warmup", 30)
    if not z > 0 or not 0 <= clear_z <= z:
        raise RulesError(f"{where}: anomaly needs z > 0 and 0 <= clear_z <= z")
    if not 0 < alpha < 1:
        raise RulesError(f"{where}: anomaly.alpha must lie between 0 and 1 (the weight of the newest window)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 2 <= warmup <= 100_000:
        raise RulesError(f"{where}: anomaly.warmup must be a whole number of windows from 2 to 100000")
    base = {k: v for k, v in doc.items() if k != "anomaly"}
    plain = parse_rule(where.rsplit(" ", 1)[0], {**base, "above": 0.0}, sizes_s)
    return Rule(name, metric, z, True, clear_z, plain.for_windows, plain.window_s, plain.devices, plain.factories,
                plain.lines, (alpha, warmup))  # fmt: skip


def load_rules(path: Path, sizes_s: list[int]) -> list[Rule]:
    """The rules of a YAML file (``rules:`` a list); raises RulesError with one line."""
    return parse_rules(read_rules_file(path), path, sizes_s)


def read_rules_file(path: Path) -> bytes:
    """The rules file's bytes; raises RulesError with one line naming the setting and the file."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RulesError(f"{rules_file_name(path)}: {exc.strerror or exc}") from None


def rules_file_name(path: Path) -> str:
    return f"MILLSTREAM_ALERTS__RULES_FILE ({path})"


def parse_rules(data: bytes, path: Path, sizes_s: list[int]) -> list[Rule]:
    """The rules of a rules file's bytes, read from ``path``; raises RulesError with one line."""
    import yaml

    where = rules_file_name(path)
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RulesError(f"{where}: not YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise RulesError(f"{where}: expected a mapping with a list under 'rules'")
    rules = [parse_rule(f"{where}: rule {n}", item, sizes_s) for n, item in enumerate(doc["rules"], 1)]
    names = [rule.name for rule in rules]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise RulesError(f"{where}: rule name {duplicate!r} is used twice")
    return rules


class AlertPolicy:
    """Evaluates the rules on a device's newly closed windows; keeps their state in the device's."""

    def __init__(self, rules: list[Rule], grace_s: float) -> None:
        self.replace(rules)
        self.grace_ms = int(grace_s * 1000)

    def replace(self, rules: list[Rule]) -> None:
        """New rules from the next batch on (app/rules.py reloads the file). A rule that keeps
        its name keeps its state per device (raised or not, the run, the EWMA); the state of a
        rule that is gone is dropped from a device's state when the device is next evaluated."""
        self.rules: list[Rule] = rules
        self.names = frozenset(rule.name for rule in rules)

    def evaluate(self, device: str, state: DeviceState, offset: int) -> list[AlertRow]:
        """New alerts from windows that closed since the last evaluation, oldest first. The
        caller passes the newest offset applied; the alerts are kept pending under it."""
        out: list[AlertRow] = []
        factory, line = state.labels or ("", "")
        if not self.names.issuperset(state.alerts):  # rules removed since this device was evaluated
            for name in [n for n in state.alerts if n not in self.names]:
                del state.alerts[name]
        for rule in self.rules:
            if not rule.applies(device, factory, line):
                continue
            size_ms = rule.window_s * 1000
            # raised, run of beyond windows, last window evaluated (anomaly rules: windows seen, EWMA, variance)
            entry = state.alerts.setdefault(rule.name, [0, 0, -1] if rule.anomaly is None else [0, 0, -1, 0, 0.0, 0.0])
            closed_before = state.watermark_ms - self.grace_ms - size_ms  # windows starting at or before are closed
            newest_closed = closed_before - closed_before % size_ms
            if newest_closed <= entry[2]:
                continue  # no window closed since the last evaluation: no scan
            metric, size_s, after = rule.metric, rule.window_s, entry[2]
            starts = sorted(
                key.start_ms for key in state.windows
                if key.metric == metric and key.size_s == size_s and after < key.start_ms <= closed_before
            )  # fmt: skip
            for start in starts:
                agg = state.windows[WindowKey(rule.metric, rule.window_s, start)]
                beyond, back, value = rule.beyond(agg, entry)
                kind = None
                if beyond:
                    entry[1] += 1
                    if not entry[0] and entry[1] >= rule.for_windows:
                        entry[0], kind = 1, RAISED
                else:
                    entry[1] = 0
                    if entry[0] and back:
                        entry[0], kind = 0, CLEARED
                if kind is not None:
                    alert = (alert_id(device, rule.name, start, kind), device, rule.name, rule.metric, kind, value,
                             rule.threshold, start, start + size_ms, offset)  # fmt: skip
                    out.append(alert)
                    state.pending_alerts.append(list(alert))
            entry[2] = newest_closed
        del state.pending_alerts[:-PENDING_KEPT]
        return out

    @staticmethod
    def replayed(state: DeviceState, offset: int, written_through: int) -> list[AlertRow]:
        """The alerts a replayed message raised the first time, unless this worker knows their
        batch was written (after a restart it knows nothing, and sends them again)."""
        if offset <= written_through:
            return []
        return [tuple(alert) for alert in state.pending_alerts if alert[9] == offset]

    @staticmethod
    def written(state: DeviceState, written_through: int) -> None:
        """Forget alerts whose batch is written."""
        state.pending_alerts[:] = [a for a in state.pending_alerts if a[9] > written_through]
