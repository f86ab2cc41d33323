"""The report's views (text, JSON, HTML) and the JSON schema, on the sample reports."""

from __future__ import annotations

import copy
import io
import json
import re
from html.parser import HTMLParser
from importlib.resources import files
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from report_samples import (
    HOSTILE,
    SAMPLES,
    sample_check,
    sample_drill,
    sample_empty_probe,
    sample_hostile,
    sample_interrupted_drill,
    sample_probe,
    sample_unrecovered_probe,
)
from rich.console import Console

from symfo_failover._kind import Kind
from symfo_failover._report import STATUSES, Report
from symfo_failover._views import DASH, render_html, render_json, render_text


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = files("symfo_failover").joinpath("schemas/report.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema)


def _text(report: Report, *, verbose: bool = False, **console: Any) -> str:
    out = io.StringIO()
    render_text(report, Console(file=out, width=console.pop("width", 120), **console),
                verbose=verbose)
    return out.getvalue()


def _errors(validator: Draft202012Validator, data: Any) -> list[str]:
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message
            for e in validator.iter_errors(data)]


# --- the schema ------------------------------------------------------------------------------

def test_the_schema_is_a_valid_draft_2020_12_schema(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_the_schema_knows_every_kind_and_status(schema: dict[str, Any]) -> None:
    assert schema["$defs"]["kind"]["enum"] == [k.name for k in Kind]
    assert schema["$defs"]["status"]["enum"] == list(STATUSES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_sample_validates_against_the_schema(
    name: str, validator: Draft202012Validator
) -> None:
    report = SAMPLES[name]()
    data = json.loads(render_json(report))  # what a reader of the file gets
    assert _errors(validator, data) == []
    assert data == json.loads(json.dumps(report.to_dict()))


def _every_object_closed(node: Any, where: str = "#") -> list[str]:
    """Paths of object schemas with properties that do not say additionalProperties."""
    open_ = []
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            open_.append(where)
        for key, value in node.items():
            open_ += _every_object_closed(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            open_ += _every_object_closed(value, f"{where}/{i}")
    return open_


def test_the_schema_catches_drift(schema: dict[str, Any]) -> None:
    assert _every_object_closed(schema) == []


def test_the_schema_lists_every_field_the_model_writes(schema: dict[str, Any]) -> None:
    data = sample_drill().to_dict()
    defs = schema["$defs"]
    assert set(schema["required"]) == set(data)
    run = data["runs"][0]
    assert set(defs["run"]["required"]) == set(run)
    assert set(defs["window"]["required"]) == set(run["windows"][0])
    assert set(defs["incident"]["required"]) == set(run["incidents"][0])
    assert set(defs["writes"]["required"]) == set(run["writes"])
    assert set(defs["server"]["required"]) == set(run["server_before"])
    assert set(defs["error"]["required"]) == set(run["errors"][0])
    assert set(defs["finding"]["required"]) == set(run["findings"][0])


def _broken(mutate: str) -> dict[str, Any]:
    data = copy.deepcopy(sample_probe().to_dict())
    run = data["runs"][0]
    if mutate == "missing summary":
        del data["summary"]
    elif mutate == "unknown command":
        data["command"] = "deploy"
    elif mutate == "unknown status":
        run["findings"][0]["status"] = "maybe"
    elif mutate == "unknown window kind":
        run["windows"][0]["kind"] = "ddl"
    elif mutate == "a field nobody described":
        run["windows"][0]["colour"] = "red"
    elif mutate == "seconds missing":
        del run["windows"][0]["seconds"]
    elif mutate == "count as text":
        run["requests"] = "960"
    elif mutate == "lower-case SQLSTATE":
        run["errors"][0]["sqlstate"] = "57p01"
    elif mutate == "unknown server change":
        run["server_change"] = "moved"
    return data


@pytest.mark.parametrize("mutate", [
    "missing summary", "unknown command", "unknown status", "unknown window kind",
    "a field nobody described", "seconds missing", "count as text", "lower-case SQLSTATE",
    "unknown server change",
])
def test_a_broken_report_fails_validation(mutate: str, validator: Draft202012Validator) -> None:
    assert _errors(validator, sample_probe().to_dict()) == []
    assert _errors(validator, _broken(mutate)) != []


# --- text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("width", [120, 80])
def test_piped_text_has_no_escape_codes(name: str, width: int) -> None:
    report = SAMPLES[name]()
    out = _text(report, width=width)
    assert "\x1b" not in out
    assert report.summary in out
    assert out.rstrip().endswith(report.summary) or not (report.runs or report.findings)


def test_a_terminal_gets_colours() -> None:
    report = sample_drill()
    out = _text(report, force_terminal=True, color_system="standard")
    assert "\x1b[" in out
    # The verdict in red; a run that held in green.
    assert re.search(r"\x1b\[[0-9;]*31m" + re.escape(report.summary), out)
    assert re.search(r"\x1b\[[0-9;]*32mOK", out)
    ok = _text(sample_probe(), force_terminal=True, color_system="standard")
    assert re.search(r"\x1b\[[0-9;]*32m" + re.escape(sample_probe().summary), ok)


def test_drill_text_summarises_every_run_and_details_the_failed_one() -> None:
    report = sample_drill()
    out = _text(report)
    failed = [run for run in report.runs if not run.ok]
    assert len(failed) == 1
    for scenario in {run.scenario for run in report.runs}:
        assert str(scenario).split(",")[0] in out
    assert out.count("psycopg async") >= 12  # one summary row per run
    assert failed[0].name in out  # its details ...
    assert "1 doubled (131)" in out
    assert "FAIL" in out
    assert "57P02 CONNECTION_LOST" in out  # ... its windows
    window = failed[0].windows[0]
    assert f"{window.start:.2f}{DASH}{window.end:.2f}" in out
    assert f"{window.seconds:.2f}" in out
    held = next(run for run in report.runs if run.ok)
    assert held.name not in out  # only in verbose text
    assert "details of the 35 runs that held" in out
    verbose = _text(report, verbose=True)
    assert all(run.name in verbose for run in report.runs)


def test_narrow_text_leaves_columns_out_and_says_so() -> None:
    out = _text(sample_drill(), width=80)
    assert "left out for width" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_probe_text_has_every_part_of_the_run() -> None:
    report = sample_probe()
    out = _text(report)
    run = report.runs[0]
    for piece in (f"42.11{DASH}47.90", "5.79", "57P01 CONNECTION_LOST", "last good write",
                  "db-tokyo-1 10.20.0.11:5432", "db-tokyo-2", "different server",
                  f"{run.writes.acknowledged if run.writes else 0} acknowledged",
                  "0 lost", "0 doubled", "keepalives_idle=5", "detection 0.01 s",
                  "CONNECT_FAILED", "3 units", "1 committed, 1 not committed",
                  "within RTO", "before", "during", "after", "p99 ms", "2380.0",
                  "writes exactly once", "symfo_probe"):
        assert piece in out, piece


def test_check_text_is_the_settings_table() -> None:
    report = sample_check()
    out = _text(report)
    assert "settings" in out
    for finding in report.findings:
        assert finding.name in out
    for label in ("OK", "WARN", "FAIL", "INFO", "3.4.2"):
        assert label in out


def test_empty_and_unrecovered_runs() -> None:
    assert "none (no requests)" in _text(sample_empty_probe())
    out = _text(sample_unrecovered_probe())
    assert f"42.11{DASH}never" in out
    assert "never recovered" in out
    assert "over RTO" in out
    interrupted = _text(sample_interrupted_drill(), verbose=True)
    assert "interrupted (Ctrl-C)" in interrupted
    assert "accepting never" in interrupted


def test_text_from_servers_is_not_rich_markup() -> None:
    out = _text(sample_hostile())
    assert "[bold red]psycopg[/]" in out
    assert "[link=file:///etc/passwd]markup[/link]" in out
    assert HOSTILE in out  # plain text: nothing to escape
    assert "サーバが予期せず接続を閉じました" in out


# --- JSON ------------------------------------------------------------------------------------

def test_json_is_the_model() -> None:
    report = sample_hostile()
    text = render_json(report)
    assert text == json.dumps(report.to_dict(), ensure_ascii=False, indent=2)
    assert "サーバ" in text  # not \\u escaped
    assert json.loads(text)["summary"] == report.summary


# --- HTML ------------------------------------------------------------------------------------

_VOID = {"meta", "br", "img", "input", "link", "hr", "col", "wbr"}


class _Balance(HTMLParser):
    """Every element closed, in order; and every URL-bearing attribute collected."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action")]
        self.urls += re.findall(r"url\(([^)]*)\)", " ".join(v or "" for _k, v in attrs))
        self.scripts += tag == "script"
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def _parse(page: str) -> _Balance:
    parser = _Balance()
    parser.feed(page)
    parser.close()
    return parser


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_html_is_one_self_contained_well_formed_file(name: str) -> None:
    report = SAMPLES[name]()
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    parsed = _parse(page)
    assert parsed.problems == []
    assert parsed.stack == []
    assert all(url.startswith("#") for url in parsed.urls), parsed.urls
    assert "http://" not in page
    assert "https://" not in page
    assert not re.search(r"url\(|@import|@font-face|<link\b|<img\b|<iframe\b", page)
    assert re.search(r'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'',
                     page)
    assert page.count('<svg class="timeline"') == len(report.runs)
    assert f'data-runs="{len(report.runs)}"' in page
    assert _e(report.summary) in page


def _e(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_html_has_the_same_content_as_the_text() -> None:
    report = sample_drill()
    page = render_html(report)
    failed = next(run for run in report.runs if not run.ok)
    assert '<td class="fail st">FAIL</td>' in page
    assert '<td class="ok st">OK</td>' in page
    assert '<td class="warn st">WARN</td>' in page
    assert _e(failed.name) in page
    assert "1 doubled (131)" in page
    assert page.count('<details class="run"') == len(report.runs)
    assert page.count("<details class=\"run\" id=\"run-29\" open>") == 1  # the failed one
    for scenario in {run.scenario or "" for run in report.runs}:
        assert f"<h3>{_e(scenario)}</h3>" in page
    check = render_html(sample_check())
    assert "<h2>Settings</h2>" in check
    assert '<td class="fail st">FAIL</td>' in check
    assert "keepalives_idle" in check
    assert "3.4.2" in check


def test_html_charts_draw_the_outages() -> None:
    page = render_html(sample_probe())
    assert page.count('class="window"') >= 2  # a red span per window (and per zoom panel)
    assert 'class="retried"' in page
    assert 'class="failed"' in page
    assert "around the outage" in page  # a 120 s run with a 6 s outage: zoomed
    drill = render_html(sample_drill())
    assert 'class="starting"' in drill  # the 57P03 scenario's amber
    assert drill.count('class="down"') == len(sample_drill().runs)
    unrecovered = render_html(sample_unrecovered_probe())
    assert 'class="unrecovered"' in unrecovered
    assert "never recovered" in unrecovered
    assert 'class="window"' not in render_html(sample_empty_probe())


def test_html_escapes_what_it_is_given() -> None:
    page = render_html(sample_hostile())
    assert HOSTILE not in page
    assert "alert(" not in page.replace("alert(&quot;x&quot;)", "")
    assert _e(HOSTILE) in page
    assert _parse(page).scripts == 2  # only the page's own two
    assert "&lt;i&gt;value&lt;/i&gt;" in page
    assert "&amp;amp;" in page
    assert "サーバが予期せず接続を閉じました" in page
