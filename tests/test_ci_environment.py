"""In CI every tier must really run: a skipped tier there would hide a missing install step."""

from __future__ import annotations

import os
import subprocess

import pytest

from symfo_failover.harness import container_available, find_bindir, partition_available

pytestmark = pytest.mark.skipif(
    os.environ.get("CI") != "true", reason="checks what CI (CI=true) must have installed"
)


def test_ci_can_run_every_tier() -> None:
    import pyodbc

    find_bindir()  # raises with the way to fix it
    assert "PostgreSQL Unicode" in pyodbc.drivers(), "psqlODBC is not registered"
    ok, why = partition_available()
    assert ok, why
    ok, why = container_available()
    assert ok, why
    locales = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=True).stdout
    assert "ja_jp.utf8" in locales.lower().replace("-", ""), "the ja_JP.UTF-8 locale is missing"
