"""Shared fixtures: the Japanese locale, the soak switch, and the end-of-suite leftover check."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from symfo_failover.harness import leftover_rules
from symfo_failover.harness._server import _workspace

pytest_plugins = ["pytester"]


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
    """Live (not zombie) PostgreSQL server processes of this test run.

    Only those whose data directory lies in this process's harness workspace count,
    so that servers of other programs on the machine are never confused with ours.
    """
    root = _workspace._root  # None: no server was ever made in this run
    if root is None:
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
            # Every server process, orphans too, works in its data directory.
            cwd = os.readlink(f"/proc/{entry}/cwd")
            exe = os.path.basename(os.readlink(f"/proc/{entry}/exe"))
        except OSError:
            continue
        if state not in ("Z", "X") and exe in ("postgres", "postmaster") and cwd.startswith(
            str(root)
        ):
            found.add(int(entry))
    return found


def _our_containers() -> set[str]:
    """Containers of this test process (ContainerCluster names them symfo-<pid>-...)."""
    if shutil.which("docker") is None:
        return set()
    proc = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"name=symfo-{os.getpid()}-", "--format", "{{.Names}}"],
        capture_output=True, text=True, check=False, timeout=30,
    )
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """After the whole suite: no server, proxy, container or firewall rule the tests made."""
    yield
    # Every fixture that started something has been torn down by now.
    left = _live_server_processes()
    assert not left, f"server processes left behind: {sorted(left)}"
    rules = [r for r in leftover_rules() if f"symfo-failover:{os.getpid()}:" in r]
    assert not rules, f"firewall rules left behind: {rules}"
    proxies = [t.name for t in threading.enumerate() if t.name == "FaultProxy"]
    assert not proxies, "a FaultProxy is still serving (its listening port is still open)"
    containers = _our_containers()
    assert not containers, f"containers left behind: {sorted(containers)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soaks (marker ``slow``) run only when SYMFO_SOAK=1 asks for them."""
    if os.environ.get("SYMFO_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="a long soak: set SYMFO_SOAK=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _structlog_left_as_found() -> Iterator[None]:
    """A test that configures structlog (``capture_logs()`` does) must not leave it
    configured: the library logs natively through structlog once an application has
    configured it, so the tests after would see a different library."""
    import structlog

    configured = structlog.is_configured()
    yield
    if not configured and structlog.is_configured():
        structlog.reset_defaults()
