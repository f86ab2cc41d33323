"""Shared fixtures: the Japanese locale check."""

from __future__ import annotations

import subprocess

import pytest


def _installed_locales() -> set[str]:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return set()
    return {line.strip() for line in out.splitlines()}


@pytest.fixture(scope="session")
def ja_locale() -> str:
    """The name of an installed Japanese UTF-8 locale, or skip with the way to make one."""
    for name in sorted(_installed_locales()):
        if name.lower().replace("-", "") in ("ja_jp.utf8",):
            return "ja_JP.UTF-8"
    pytest.skip(
        "the ja_JP.UTF-8 locale is not installed; scripts/setup.sh generates it as root "
        "(sed -i 's/^# *ja_JP.UTF-8/ja_JP.UTF-8/' /etc/locale.gen && locale-gen)"
    )


def _live_server_processes() -> set[int]:
    """Live (not zombie) processes running a PostgreSQL server binary."""
    import os

    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        state = stat.rsplit(")", 1)[-1].split()[0]
        if state not in ("Z", "X") and os.path.basename(exe) in ("postgres", "postmaster"):
            found.add(int(entry))
    return found


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> object:
    """After the whole suite, no server process that the tests started may remain."""
    before = _live_server_processes()
    yield
    # Every fixture that started a server has been torn down by now.
    left = _live_server_processes() - before
    assert not left, f"server processes left behind: {sorted(left)}"
