"""Find the PostgreSQL server binaries (``postgres`` and ``initdb``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["ENV_VAR", "ServerBinariesNotFound", "find_bindir"]

ENV_VAR = "SYMFO_PG_BINDIR"
_REQUIRED = ("postgres", "initdb")
_DEBIAN_GLOB_ROOT = Path("/usr/lib/postgresql")


class ServerBinariesNotFound(RuntimeError):
    """No directory holding the PostgreSQL server programs was found."""


def _missing(bindir: Path) -> list[str]:
    """The required programs that ``bindir`` lacks (empty: usable)."""
    return [
        name
        for name in _REQUIRED
        if not ((bindir / name).is_file() and os.access(bindir / name, os.X_OK))
    ]


def _reason(bindir: Path) -> str:
    if not bindir.is_dir():
        return "not a directory"
    return "no executable " + " or ".join(_missing(bindir))


def _fix_hint() -> str:
    return (
        "Install the server (Debian/Ubuntu: `apt-get install postgresql`), or set "
        f"{ENV_VAR} to the directory that holds `postgres` and `initdb` "
        "(for example /usr/lib/postgresql/15/bin)."
    )


def _from_pg_config(tried: list[str]) -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        tried.append("pg_config --bindir: pg_config is not on PATH")
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        tried.append(f"pg_config --bindir ({pg_config}): failed: {exc}")
        return None
    candidate = Path(out)
    if out and not _missing(candidate):
        return candidate
    # libpq-dev ships pg_config without the server, so this is common and not an error.
    tried.append(f"pg_config --bindir ({pg_config}) -> {out or '(empty)'}: {_reason(candidate)}")
    return None


def _from_path(tried: list[str]) -> Path | None:
    postgres = shutil.which("postgres")
    if postgres is None:
        tried.append("`postgres` on PATH: not found")
        return None
    # /usr/local/bin may hold a lone symlink to postgres; its real directory also has initdb.
    for candidate in (Path(postgres).parent, Path(postgres).resolve().parent):
        if not _missing(candidate):
            return candidate
    tried.append(f"`postgres` on PATH ({postgres}): {_reason(Path(postgres).parent)}")
    return None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def _from_debian_layout(tried: list[str]) -> Path | None:
    candidates = sorted(_DEBIAN_GLOB_ROOT.glob("*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if not _missing(candidate):
            return candidate
    tried.append(
        f"{_DEBIAN_GLOB_ROOT}/*/bin: "
        + (", ".join(f"{c}: {_reason(c)}" for c in candidates) or "no such directory")
    )
    return None


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The PostgreSQL server bin directory, holding ``postgres`` and ``initdb``.

    Looked up in order: ``explicit``; the ``SYMFO_PG_BINDIR`` environment variable;
    ``pg_config --bindir``; the directory of ``postgres`` on ``PATH``; the highest
    ``/usr/lib/postgresql/<version>/bin``. An explicit argument or a set environment
    variable that does not hold the programs is an error, not a reason to look further:
    a setting that is silently ignored is worse than one that fails.

    Raises:
        ServerBinariesNotFound: nothing usable was found; the message lists what was tried.
    """
    if explicit is not None:
        candidate = Path(explicit)
        if _missing(candidate):
            raise ServerBinariesNotFound(
                f"PostgreSQL server binaries not found in the given bindir {candidate}: "
                f"{_reason(candidate)}. {_fix_hint()}"
            )
        return candidate
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        candidate = Path(from_env)
        if _missing(candidate):
            raise ServerBinariesNotFound(
                f"PostgreSQL server binaries not found in {ENV_VAR}={from_env}: "
                f"{_reason(candidate)}. {_fix_hint()}"
            )
        return candidate
    tried = [f"{ENV_VAR}: not set"]
    for lookup in (_from_pg_config, _from_path, _from_debian_layout):
        found = lookup(tried)
        if found is not None:
            return found
    raise ServerBinariesNotFound(
        "PostgreSQL server binaries (postgres, initdb) not found. Tried:\n  - "
        + "\n  - ".join(tried)
        + "\n"
        + _fix_hint()
    )
