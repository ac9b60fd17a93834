"""The chaos report: every scenario's count, as JSON (``CHAOS_REPORT_PATH``, default
``.chaos/report.json``) and as a table at the end of the pytest run."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.report import DEFAULT_PATH, text_table
from tests.support.audit import Audit
from tests.support.world import World

RESULTS: list[dict[str, Any]] = []

# Every chaos scenario runs with alert rules that the simulator's traffic sets off dozens of
# times (temperature hovers around 28.6, humidity dips below 45), so that the audit checks that
# no failure loses, repeats or invents an alert (tests/support/oracle.py expected_alerts).
CHAOS_RULES = """
rules:
  - name: warm
    metric: temperature
    above: 28.7
    clear: 28.5
  - name: dry
    metric: humidity
    below: 45
    clear: 46
    for_windows: 2
"""


@pytest.fixture(autouse=True)
def _alert_rules(world: World) -> None:
    world.rules = CHAOS_RULES


@pytest.fixture
def record() -> Callable[[Audit], Audit]:
    """Add a scenario's audit to the report (call it before asserting, so failures show too)."""

    def add(result: Audit) -> Audit:
        RESULTS.append(result.as_dict())
        return result

    return add


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not RESULTS:
        return
    path = Path(os.environ.get("CHAOS_REPORT_PATH", config.rootpath / DEFAULT_PATH))
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "scenarios": RESULTS,
    }
    path.write_text(json.dumps(report, indent=2))
    terminalreporter.write_sep("=", f"chaos report ({path})")
    for line in text_table(RESULTS):
        terminalreporter.write_line(line)
