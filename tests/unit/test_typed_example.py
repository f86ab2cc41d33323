"""User code typed against symfo_failover passes `mypy --strict`; misuse is caught."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.11",
         "--no-incremental", "--cache-dir", "/dev/null", str(path)],
        capture_output=True, text=True, check=False, timeout=300,
    )


def test_typed_user_code_passes_mypy_strict() -> None:
    got = _mypy(EXAMPLES / "typed_usage.py")
    assert got.returncode == 0, got.stdout + got.stderr


def test_misuse_is_a_type_error_on_each_marked_line() -> None:
    path = EXAMPLES / "typed_misuse.py"
    marked = {i for i, line in enumerate(path.read_text().splitlines(), 1)
              if "# error:" in line}
    got = _mypy(path)
    flagged = {int(m.group(1)) for m in re.finditer(r"typed_misuse\.py:(\d+): error", got.stdout)}
    assert got.returncode == 1
    assert flagged == marked, got.stdout
