"""The HTML report in a real browser (headless Chromium): every sample renders, the
page's own check says so, and the screenshot shows the charts.

Skipped when no Chromium is installed (scripts/setup.sh installs Debian's ``chromium``),
except in CI (``CI=true``), where a missing browser is a failure: CI must install it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
from browser import WINDOW, BrowserError, find_chromium, read_png, render_in_browser
from report_samples import SAMPLES, sample_probe

from symfo_failover import _views
from symfo_failover._views import render_html

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        why = ("no Chromium found (chromium / chromium-browser on PATH, or SYMFO_CHROMIUM): "
               "scripts/setup.sh installs Debian's chromium package")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {why}")
        pytest.skip(why)
    return path


def _rendered(dom: str) -> str | None:
    body = re.search(r"<body\b[^>]*>", dom)
    state = re.search(r'\bdata-rendered="([^"]*)"', body.group(0)) if body else None
    return state.group(1) if state else None


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def _near(colours: Counter[tuple[int, ...]], hex_colour: str, tolerance: int = 6) -> int:
    """How many pixels have (about) this colour."""
    want = _rgb(hex_colour)
    return sum(n for c, n in colours.items()
               if all(abs(a - b) <= tolerance for a, b in zip(c[:3], want, strict=False)))


def _screenshot_colours(png: Path) -> Counter[tuple[int, ...]]:
    width, height, rows = read_png(png)
    assert (width, height) == WINDOW
    return Counter(pixel[:3] for row in rows for pixel in row)


#: In the browser: one report of each command, and the one with hostile text. The other
#: samples (empty, unrecovered, interrupted) differ in content only, checked on the HTML
#: itself by tests/unit/test_views.py; a Chromium start costs seconds.
IN_BROWSER = ["check", "drill", "hostile", "probe"]


@pytest.mark.parametrize("name", IN_BROWSER)
def test_the_sample_renders_in_chromium(name: str, chromium: str, tmp_path: Path) -> None:
    report = SAMPLES[name]()
    page = tmp_path / f"{name}.html"
    page.write_text(render_html(report), encoding="utf-8")
    png = tmp_path / f"{name}.png"
    dom = render_in_browser(page, png, chromium=chromium)
    assert _rendered(dom) == "ok"
    assert dom.count('<svg class="timeline"') == len(report.runs)
    colours = _screenshot_colours(png)
    # A real picture: many colours (text is anti-aliased), no one colour nearly everywhere.
    assert len(colours) > 40
    assert colours.most_common(1)[0][1] < 0.97 * sum(colours.values())
    if report.runs:  # the charts drew their lanes (green or grey), red for the outages
        assert _near(colours, _views._C_UP) + _near(colours, _views._C_NONE) > 2000
    if any(run.windows for run in report.runs):
        assert _near(colours, _views._C_DOWN) > 200


def test_the_chart_needs_no_javascript(chromium: str, tmp_path: Path) -> None:
    html, scripts = re.subn(r"<script>.*?</script>", "", render_html(sample_probe()),
                            flags=re.DOTALL)
    assert scripts == 2
    page = tmp_path / "probe.html"
    page.write_text(html, encoding="utf-8")
    png = tmp_path / "probe.png"
    dom = render_in_browser(page, png, chromium=chromium)
    assert _rendered(dom) == "pending"  # no script ran ...
    colours = _screenshot_colours(png)
    assert _near(colours, _views._C_UP) > 2000  # ... and the chart is there all the same
    assert _near(colours, _views._C_DOWN) > 200


@pytest.mark.parametrize("breakage", ["a chart missing", "a script error"])
def test_the_page_check_can_fail(breakage: str, chromium: str, tmp_path: Path) -> None:
    html = render_html(sample_probe())
    if breakage == "a chart missing":
        html = html.replace('data-runs="1"', 'data-runs="2"')
    else:
        html = html.replace("</main>", "</main><script>undefinedFunction();</script>")
    page = tmp_path / "broken.html"
    page.write_text(html, encoding="utf-8")
    state = _rendered(render_in_browser(page, tmp_path / "broken.png", chromium=chromium))
    assert state is not None
    assert state.startswith("failed: ")
    assert ("expected 2 timeline charts" if breakage == "a chart missing"
            else "undefinedFunction") in state


def test_a_browser_that_fails_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "x.html"
    page.write_text("<!DOCTYPE html><title>x</title>", encoding="utf-8")
    with pytest.raises(BrowserError, match="exited with status 3"):
        render_in_browser(page, tmp_path / "x.png", chromium=_script(tmp_path, "exit 3"))
    with pytest.raises(BrowserError, match="did not finish in 1 s"):
        render_in_browser(page, tmp_path / "x.png", chromium=_script(tmp_path, "sleep 30"),
                          timeout=1)


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / f"fake-{abs(hash(body))}"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)
