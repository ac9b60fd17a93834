"""Small helpers the tests share: the repository root, the CLI as a user runs it, PromQL."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from app.tools.local import without_settings

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60, **settings: str) -> subprocess.CompletedProcess[str]:
    """``python -m app.cli ARGS`` from the repository, with only the ``MILLSTREAM_*`` given."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=timeout,
        env=without_settings(settings), cwd=ROOT,
    )  # fmt: skip


def promql(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])
