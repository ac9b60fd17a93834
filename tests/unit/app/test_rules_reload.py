"""The rules file reloaded while a worker runs (app/rules.py): a good change applies from the
next evaluation, a bad one changes nothing, an unchanged file is not parsed again; a removed
rule's state leaves the device state."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agents.alerts import RAISED, AlertPolicy
from agents.windows import ApplyResult, DeviceState, WindowPolicy
from app import metrics
from app.rules import RulesFile, RulesReloader
from models.records import Reading

SIZES = [60, 3600]
T0 = 1_796_270_400_000
HOT = "rules:\n  - name: hot\n    metric: t\n    above: 80\n"
HOT_AND_COLD = HOT + "  - name: cold\n    metric: t\n    below: 5\n"


def reloads(outcome: str) -> float:
    return metrics.ALERT_RULES_RELOADS.labels(outcome=outcome)._value.get()


def loaded(tmp_path: Path, text: str) -> tuple[Path, AlertPolicy, RulesReloader]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    rules_file = RulesFile(path, SIZES)
    policy = AlertPolicy(rules_file.load(), 60.0)
    return path, policy, RulesReloader(rules_file, policy)


def rewrite(path: Path, text: str) -> None:
    """A new file in place of the old, as an editor or a ConfigMap update leaves it."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    fresh.replace(path)


def test_a_good_change_applies_and_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, policy, reloader = loaded(tmp_path, HOT)
    assert reloader.check() is None  # nothing changed
    applied = reloads("applied")
    rewrite(path, HOT_AND_COLD)
    with caplog.at_level(logging.WARNING, logger="app.rules"):
        assert reloader.check() == "applied"
    assert [r.name for r in policy.rules] == ["hot", "cold"]
    assert reloads("applied") == applied + 1
    assert metrics.ALERT_RULES._value.get() == 2
    assert "added ['cold']" in caplog.text
    assert reloader.check() is None  # seen once


def test_a_bad_change_keeps_the_rules_in_force(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, policy, reloader = loaded(tmp_path, HOT)
    refused = reloads("refused")
    rewrite(path, "rules:\n  - name: hot\n    metric: t\n    above: 80\n    clear: 90\n")
    with caplog.at_level(logging.ERROR, logger="app.rules"):
        assert reloader.check() == "refused"
    assert [(r.name, r.clear) for r in policy.rules] == [("hot", 80.0)]
    assert reloads("refused") == refused + 1
    assert "rule 1 'hot': clear (90) must be at or below above (80)" in caplog.text
    assert reloader.check() is None  # the same bad file is not reported again
    rewrite(path, HOT_AND_COLD)  # fixed
    assert reloader.check() == "applied"
    assert len(policy.rules) == 2


def test_a_deleted_file_is_refused_and_its_return_applies(tmp_path: Path) -> None:
    path, policy, reloader = loaded(tmp_path, HOT)
    path.unlink()
    assert reloader.check() == "refused"
    assert len(policy.rules) == 1
    path.write_text(HOT_AND_COLD)
    assert reloader.check() == "applied"


def test_a_change_between_the_start_and_the_first_check_applies(tmp_path: Path) -> None:
    """Regression: the reloader took the file's digest when it was built, after the rules in
    force had been read; a change in between was never applied. Now both come from one read."""
    path = tmp_path / "rules.yaml"
    path.write_text(HOT)
    rules_file = RulesFile(path, SIZES)
    policy = AlertPolicy(rules_file.load(), 60.0)
    rewrite(path, HOT_AND_COLD)  # while the worker composes its app
    reloader = RulesReloader(rules_file, policy)
    assert reloader.check() == "applied"
    assert [r.name for r in policy.rules] == ["hot", "cold"]


def test_touching_the_file_does_not_reload(tmp_path: Path) -> None:
    path, _, reloader = loaded(tmp_path, HOT)
    rewrite(path, HOT)  # new inode and mtime, same bytes
    assert reloader.check() is None


def test_a_removed_rules_state_leaves_the_device_and_a_kept_rule_keeps_its_own(tmp_path: Path) -> None:
    path, policy, reloader = loaded(tmp_path, HOT_AND_COLD)
    windows, state = WindowPolicy(SIZES, 60.0, 3, 300), DeviceState()
    state.labels = ["f1", "l1"]

    def reading(minute: int, value: float, offset: int) -> list[tuple[str, str]]:
        at = T0 + minute * 60_000 + 30_000
        windows.apply(state, [Reading("press-1", at, {"t": value}, 0, "f1", "l1")], offset, ApplyResult())
        return [(a[2], a[4]) for a in policy.evaluate("press-1", state, offset)]

    reading(0, 90.0, 0)
    assert reading(5, 91.0, 1) == [("hot", RAISED)]  # minute 0 closed: above 80
    assert set(state.alerts) == {"hot", "cold"}
    rewrite(path, HOT)
    assert reloader.check() == "applied"
    assert reading(10, 95.0, 2) == []  # minute 5 closed, above 80 again: still raised, no second alert
    assert set(state.alerts) == {"hot"}  # cold's state gone
    assert state.alerts["hot"][0] == 1
