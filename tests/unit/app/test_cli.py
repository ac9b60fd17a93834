"""The console script as a user runs it: a subprocess, its output and exit code."""

from __future__ import annotations

from tests.support.helpers import run_cli as _run


def test_help_lists_the_subcommands() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("worker", "settings"):
        assert command in result.stdout


def test_bad_setting_stops_the_worker_with_one_line() -> None:
    result = _run("worker", MILLSTREAM_KAFKA__PARTITIONS="-1", MILLSTREAM_KAFKA__SASL_PASSWORD="s3cr3t-value")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "millstream: invalid setting MILLSTREAM_KAFKA__PARTITIONS: Input should be greater than or equal to 1"
    ]
    assert "s3cr3t-value" not in result.stderr + result.stdout


def test_settings_prints_effective_values_with_secrets_masked() -> None:
    result = _run("settings", MILLSTREAM_CLICKHOUSE__PASSWORD="s3cr3t-value", MILLSTREAM_WEB_PORT="7000")
    assert result.returncode == 0, result.stderr
    assert '"web_port": 7000' in result.stdout
    assert "s3cr3t-value" not in result.stdout
    assert "**********" in result.stdout
