"""Headless Chromium for the HTML report's test: find it, render a file, read a PNG.

`render_in_browser` runs Chromium twice on a local file: once for a screenshot and once
for the DOM after the page's scripts ran (``--dump-dom``). Each run gets a throwaway
profile and its own session (process group), so that on a timeout exactly the processes
this module started are killed, and nothing of theirs outlives the call. `read_png` is a
small pure-Python PNG decoder (Pillow is not a dependency), enough for the screenshot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

#: Commands tried in this order (Debian's package is ``chromium``).
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 2000)
TIMEOUT = 90.0


class BrowserError(Exception):
    """Chromium failed, or did not finish in time."""


def find_chromium() -> str | None:
    """The Chromium to use: ``$SYMFO_CHROMIUM``, else the first of `CANDIDATES` on PATH."""
    chosen = os.environ.get("SYMFO_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _run(argv: Sequence[str], *, env: dict[str, str], timeout: float) -> str:
    """Run Chromium in a session of its own; its stdout. Kills that session afterwards."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise BrowserError(
            f"{argv[0]} did not finish in {timeout:.0f} s: {' '.join(argv)}") from None
    finally:
        # Helpers (crashpad, zygote) of the browser we started, if any are left.
        _kill_group(proc.pid)
    if proc.returncode != 0:
        tail = "\n".join(err.splitlines()[-15:])
        raise BrowserError(f"{argv[0]} exited with status {proc.returncode}:\n{tail}")
    return out


def render_in_browser(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str],
                      *, chromium: str | None = None, timeout: float = TIMEOUT,
                      budget_ms: int = 5000) -> str:
    """Screenshot ``html_path`` to ``png_path``; the DOM after its scripts ran.

    ``budget_ms``: the page's (virtual) time to settle; ``timeout``: each of the two
    Chromium runs must end within that many real seconds.
    """
    browser = chromium or find_chromium()
    if browser is None:
        raise BrowserError("no Chromium found (install Debian's chromium package)")
    url = Path(html_path).resolve().as_uri()
    png = Path(png_path).resolve()
    with tempfile.TemporaryDirectory(prefix="symfo-chromium-") as tmp:
        env = dict(os.environ, HOME=tmp, XDG_CONFIG_HOME=f"{tmp}/config",
                   XDG_CACHE_HOME=f"{tmp}/cache")
        common = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--hide-scrollbars", "--mute-audio", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        ]
        png.unlink(missing_ok=True)
        _run([*common, f"--user-data-dir={tmp}/shot", "--run-all-compositor-stages-before-draw",
              f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url],
             env=env, timeout=timeout)
        if not png.exists():
            raise BrowserError(f"{browser} wrote no screenshot to {png}")
        return _run([*common, f"--user-data-dir={tmp}/dom", f"--virtual-time-budget={budget_ms}",
                     "--dump-dom", url], env=env, timeout=timeout)


# --- PNG ------------------------------------------------------------------------------------

_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(path: str | os.PathLike[str], *, max_rows: int | None = None,
             ) -> tuple[int, int, list[list[tuple[int, ...]]]]:
    """(width, height, rows of pixels) of an 8-bit, non-interlaced PNG.

    Pixels are tuples of the image's channels (RGB, RGBA, grey, ...); a palette image
    gives its palette entries. ``max_rows``: decode only the first rows (faster).
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, palette = 8, bytearray(), None
    width = height = depth = ctype = interlace = -1
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = [tuple(body[i:i + 3]) for i in range(0, len(body), 3)]
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if depth != 8 or interlace != 0 or ctype not in _CHANNELS:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}, "
                         f"interlace {interlace}")
    bpp = _CHANNELS[ctype]
    stride = width * bpp
    raw = zlib.decompress(bytes(idat))
    rows: list[list[tuple[int, ...]]] = []
    prev = bytearray(stride)
    for y in range(height if max_rows is None else min(height, max_rows)):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=False))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                if i >= bpp:
                    line[i] = (line[i] + _paeth(line[i - bpp], prev[i], prev[i - bpp])) & 0xFF
                else:
                    line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype != 0:
            raise ValueError(f"bad PNG filter type {ftype} in row {y}")
        pixels = [tuple(line[i:i + bpp]) for i in range(0, stride, bpp)]
        if palette is not None:
            pixels = [palette[p[0]] for p in pixels]
        rows.append(pixels)
        prev = line
    return width, height, rows
