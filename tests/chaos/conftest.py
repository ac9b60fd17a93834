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

RESULTS: list[dict[str, Any]] = []


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
