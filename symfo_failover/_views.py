"""Views of a `Report`: text for people, JSON, and one self-contained HTML file.

``render_text`` prints with rich: colours only on a terminal (rich decides), plain text
with no escape codes when piped. ``render_json`` is `Report.to_dict()`, described by
``schemas/report.schema.json``. ``render_html`` is one file with inline CSS and a static
SVG timeline per run (no JavaScript needed to see it, nothing fetched from anywhere); a
small script at the end only checks that the document rendered and says so in
``document.body.dataset.rendered`` ("ok" or "failed: ...").
Nothing here does I/O beyond printing to the console it is given.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ._report import (
    ErrorSeen,
    Finding,
    Marker,
    Report,
    Run,
    Sample,
    ServerIdentity,
    ServerOutage,
    Status,
    Window,
    WriteCheck,
)

__all__ = ["render_html", "render_json", "render_text"]

#: Shown for a value that is not there (not measured, not applicable).
NONE = "\u2014"  # an em dash
#: Between the start and the end of a span of seconds ("4.02" DASH "6.33").
DASH = "\u2013"  # an en dash
_TIMES = "\u00d7"  # a multiplication sign: "57P01", _TIMES, "3" = three errors with 57P01
_LABEL: dict[str, str] = {"ok": "OK", "warn": "WARN", "fail": "FAIL", "info": "INFO"}
#: A cell's tone -> rich style (the HTML view uses the tone as a CSS class).
_STYLE: dict[str, str] = {
    "ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan", "dim": "dim", "": "",
}
#: An error without a SQLSTATE, in a summary: by its kind.
_NO_CODE: dict[str, str] = {
    "CONNECTION_LOST": "(lost)", "CONNECT_FAILED": "(conn)", "SESSION_STATE_LOST": "(state)",
    "TRANSACTION_CONFLICT": "(confl)", "NOT_RETRYABLE": "(other)",
}
_MAX_SEQ = 8  # sequence numbers listed for lost / doubled writes


# --- figures shared by the views ----------------------------------------------------------

@dataclass(frozen=True)
class _Cell:
    """One table cell: its text and a tone ("ok", "warn", "fail", "info", "dim" or "")."""

    text: str
    tone: str = ""
    num: bool = False


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    return f"{value:.{digits}f}"


def _n(value: int | None) -> _Cell:
    return _Cell(NONE if value is None else str(value), num=True)


def _secs(value: float | None, digits: int = 2) -> _Cell:
    return _Cell(_f(value, digits), "dim" if value is None else "", num=True)


def _span(start: float | None, end: float | None) -> str:
    return f"{_f(start)}{DASH}{'never' if end is None else _f(end)}"


def _status(status: str) -> _Cell:
    return _Cell(_LABEL.get(status, status.upper()), status)


def _run_status(run: Run) -> Status:
    statuses = {f.status for f in run.findings}
    if "fail" in statuses:
        return "fail"
    return "warn" if "warn" in statuses else "ok"


def _report_tone(report: Report) -> str:
    if report.ok:
        return "ok"
    return "warn" if report.interrupted and not _has_fail(report) else "fail"


def _has_fail(report: Report) -> bool:
    return any(f.status == "fail" for f in report.findings) or not all(r.ok for r in report.runs)


def _error_label(error: ErrorSeen | None) -> str:
    if error is None:
        return NONE
    return f"{error.sqlstate or 'no SQLSTATE'} {error.kind}"


def _window_seconds(window: Window) -> _Cell:
    if window.end is None:
        return _Cell("never", "fail", num=True)
    return _secs(window.seconds)


def _longest_window(run: Run, kind: str) -> _Cell:
    """The run's longest outage of one kind of request, as the client saw it."""
    windows = [w for w in run.windows if w.kind == kind]
    if not windows:
        return _Cell(NONE, "dim", num=True)
    if any(w.end is None for w in windows):
        return _Cell("never", "fail", num=True)
    return _secs(max(w.seconds or 0.0 for w in windows))


def _outage_seconds(outage: ServerOutage) -> float | None:
    if outage.down_at is None or outage.accepting_at is None:
        return None
    return outage.accepting_at - outage.down_at


def _server_outage(run: Run) -> _Cell:
    """How long the server refused sessions, over all its outages in the run."""
    if not run.server_outages:
        return _Cell(NONE, "dim", num=True)
    if any(o.down_at is not None and o.accepting_at is None for o in run.server_outages):
        return _Cell("never", "fail", num=True)
    return _secs(sum(_outage_seconds(o) or 0.0 for o in run.server_outages))


def _errors_brief(errors: Sequence[ErrorSeen], most: int = 3) -> str:
    if not errors:
        return NONE
    ordered = sorted(errors, key=lambda e: (e.sqlstate is None, -e.count))
    parts = [f"{e.sqlstate or _NO_CODE.get(e.kind, '(none)')}{_TIMES}{e.count}"
             for e in ordered[:most]]
    if len(ordered) > most:
        parts.append(f"+{len(ordered) - most}")
    return " ".join(parts)


def _commits(commits: dict[str, int]) -> str:
    if not commits:
        return NONE
    return ", ".join(f"{count} {outcome}" for outcome, count in commits.items())


def _identity(server: ServerIdentity | None) -> str:
    if server is None:
        return "unknown"
    where = ""
    if server.address is not None or server.port is not None:
        where = f"{server.address or '?'}:{server.port if server.port is not None else '?'}"
    parts = [p for p in (server.name, where) if p]
    head = " ".join(parts) or "server"
    role = "standby (in recovery)" if server.in_recovery else "primary"
    bits = [role]
    if server.timeline is not None:
        bits.append(f"timeline {server.timeline}")
    if server.started:
        bits.append(f"started {server.started}")
    if server.system_identifier:
        bits.append(f"system {server.system_identifier}")
    return f"{head} — {', '.join(bits)}"


def _outage_line(outage: ServerOutage) -> str:
    parts = [f"down {_f(outage.down_at)}"]
    if outage.listening_at is not None:
        parts.append(f"listening {_f(outage.listening_at)}")
    parts.append("accepting " + ("never" if outage.accepting_at is None
                                 else _f(outage.accepting_at)))
    seconds = _outage_seconds(outage)
    tail = f" ({_f(seconds)} s)" if seconds is not None else ""
    return f"{outage.scenario}: {' · '.join(parts)}{tail}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _seq(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_SEQ])
    return shown + (f", … ({len(numbers)} in all)" if len(numbers) > _MAX_SEQ else "")


def _writes_parts(writes: WriteCheck) -> list[tuple[str, str]]:
    """The write check as (text, tone) pieces."""
    parts = [
        (f"{writes.acknowledged} acknowledged", ""),
        (f"{writes.present_once} present once",
         "" if writes.present_once == writes.acknowledged else "fail"),
        (f"{len(writes.lost)} lost" + (f" ({_seq(writes.lost)})" if writes.lost else ""),
         "fail" if writes.lost else ""),
        (f"{len(writes.doubled)} doubled"
         + (f" ({_seq(writes.doubled)})" if writes.doubled else ""),
         "fail" if writes.doubled else ""),
    ]
    if writes.unacknowledged:
        parts.append((f"{writes.unacknowledged} unacknowledged "
                      f"({writes.unacknowledged_committed} committed anyway)", ""))
    return parts


def _settings(run: Run) -> str:
    items = [f"{name}={value}" for name, value in run.client_settings.items()]
    return " · ".join(items) if items else NONE


def _markers(markers: Iterable[Marker]) -> list[Marker]:
    return sorted(markers, key=lambda m: m.at)


def _elapsed(started: str, finished: str) -> str | None:
    try:
        seconds = (_dt.datetime.fromisoformat(finished)
                   - _dt.datetime.fromisoformat(started)).total_seconds()
    except (ValueError, TypeError):
        return None
    if seconds < 0:
        return None
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _scenario_groups(runs: Sequence[Run]) -> list[tuple[str, list[tuple[int, Run]]]]:
    """The runs by scenario, in the order the scenarios first appear (index from 1)."""
    groups: dict[str, list[tuple[int, Run]]] = {}
    for index, run in enumerate(runs, 1):
        groups.setdefault(run.scenario or "probe", []).append((index, run))
    return list(groups.items())


# --- the tables, once for both views ------------------------------------------------------

_Rows = list[list[_Cell]]


def _summary_rows(report: Report) -> tuple[list[str], _Rows]:
    head = ["#", "scenario", "driver", "access", "write s", "read s", "server s", "errors",
            "replayed", "commits", "result"]
    rows: _Rows = []
    for _scenario, members in _scenario_groups(report.runs):
        for number, (index, run) in enumerate(members):
            scenario = run.scenario or NONE
            rows.append([
                _Cell(str(index), "dim", num=True),
                _Cell(scenario if number == 0 else "", "info"),
                _Cell(run.driver), _Cell(run.access),
                _longest_window(run, "write"), _longest_window(run, "read"),
                _server_outage(run),
                _Cell(_errors_brief(run.errors)),
                _n(run.units_replayed),
                _Cell(_commits(run.commits)),
                _status(_run_status(run)),
            ])
    return head, rows


def _window_rows(windows: Sequence[Window]) -> tuple[list[str], _Rows]:
    head = ["kind", f"start{DASH}end", "s", "first error", "error at", "detect s", "reconnect s",
            "failed", "retried"]
    rows = [[
        _Cell(w.kind), _Cell(_span(w.start, w.end)), _window_seconds(w),
        _Cell(_error_label(w.first_error), "" if w.first_error else "dim"),
        _secs(w.first_error_at), _secs(w.detect_seconds), _secs(w.reconnect_seconds),
        _n(w.failed), _n(w.retried),
    ] for w in windows]
    return head, rows


def _phase_rows(run: Run) -> tuple[list[str], _Rows]:
    head = ["phase", "s", "requests", "req/s", "p50 ms", "p99 ms"]
    rows = [[
        _Cell(p.name), _secs(p.seconds, 1), _n(p.requests), _secs(p.per_second, 1),
        _secs(p.p50_ms, 1), _secs(p.p99_ms, 1),
    ] for p in run.phases]
    return head, rows


def _error_rows(errors: Sequence[ErrorSeen]) -> tuple[list[str], _Rows]:
    head = ["SQLSTATE", "kind", "count", "in guide", "first message"]
    rows: _Rows = []
    for e in errors:
        guide = (_Cell(NONE, "dim") if e.in_guide is None
                 else _Cell("yes", "ok") if e.in_guide else _Cell("no", "warn"))
        rows.append([_Cell(e.sqlstate or "none", "" if e.sqlstate else "dim"), _Cell(e.kind),
                     _n(e.count), guide, _Cell(e.message)])
    return head, rows


def _finding_rows(findings: Sequence[Finding]) -> tuple[list[str], _Rows]:
    head = ["status", "name", "value", "expected", "why", "guide"]
    rows = [[
        _status(f.status), _Cell(f.name), _Cell(f.value), _Cell(f.expected or NONE),
        _Cell(f.why), _Cell(f.guide or NONE, "" if f.guide else "dim"),
    ] for f in findings]
    return head, rows


def _incident_lines(run: Run) -> list[list[tuple[str, str]]]:
    lines: list[list[tuple[str, str]]] = []
    for i in run.incidents:
        parts: list[tuple[str, str]] = [
            (f"{_span(i.start, i.end)} s", ""),
            ("never recovered" if i.end is None else f"{_f(i.seconds)} s",
             "fail" if i.end is None else ""),
            (i.server_change, "info"),
        ]
        if i.within_rto is not None:
            parts.append(("within RTO", "ok") if i.within_rto else ("over RTO", "fail"))
        if i.errors:
            parts.append((f"errors {_errors_brief(i.errors)}", ""))
        if i.units_replayed:
            parts.append((f"{i.units_replayed} replayed", ""))
        if i.commits:
            parts.append((f"commits {_commits(i.commits)}", ""))
        lines.append(parts)
    return lines


_Parts = list[tuple[str, str]]


def _run_facts(run: Run) -> list[tuple[str, _Parts]]:
    """The run's figures that are not tables, as (label, pieces of (text, tone))."""
    rows: list[tuple[str, _Parts]] = []
    if not run.windows:
        rows.append(("windows", [("none: every request of the run succeeded" if run.requests
                                  else "none (no requests)", "dim")]))
    rows.extend(("incident", parts) for parts in _incident_lines(run))
    if run.timeline:
        rows.append(("timeline", [(f"{_f(m.at)} {m.name}", "") for m in _markers(run.timeline)]))
    rows.extend(("outage", [(_outage_line(o), "")]) for o in run.server_outages)
    if run.server_before or run.server_after:
        rows.append(("before", [(_identity(run.server_before), "")]))
        after: _Parts = [(_identity(run.server_after), "")]
        if run.server_change != "unknown":
            after.append((run.server_change, "info"))
        rows.append(("after", after))
    elif run.server_change != "unknown":
        rows.append(("server", [(run.server_change, "info")]))
    if run.writes is not None:
        parts = _writes_parts(run.writes)
        parts.append(("OK", "ok") if run.writes.ok else ("FAIL", "fail"))
        rows.append(("writes", parts))
    if run.client_settings or run.detection_seconds is not None:
        rows.append(("client", [(_settings(run), ""),
                                (f"detection {_f(run.detection_seconds)} s", "")]))
    if run.units_replayed or run.commits:
        rows.append(("replayed", [(_plural(run.units_replayed, "unit"), ""),
                                  (f"commits: {_commits(run.commits)}", "")]))
    rows.extend(("note", [(note, "dim")]) for note in run.notes)
    return rows


# --- text ---------------------------------------------------------------------------------

def _text(cell: _Cell) -> Text:
    return Text(cell.text, style=_STYLE.get(cell.tone, ""))


#: Columns of free text, and their share of the width the others leave.
_RATIOS = {"why": 4, "value": 2, "expected": 2, "first message": 1}


def _rich_table(head: Sequence[str], rows: _Rows, *, title: str | None = None,
                widths: dict[str, int] | None = None, tight: bool = False) -> Table:
    # Too wide even tight: the free-text columns share what the others leave (rich applies
    # ratios only to a table that expands).
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
                  title=title, title_justify="left", title_style="bold",
                  padding=(0, 0) if tight else (0, 1), collapse_padding=True,
                  expand=tight and any(name in _RATIOS for name in head))
    numeric = [bool(rows) and rows[0][i].num for i in range(len(head))]
    for i, name in enumerate(head):
        table.add_column(name, justify="right" if numeric[i] else "left", overflow="fold",
                         max_width=(widths or {}).get(name), ratio=_RATIOS.get(name))
    for row in rows:
        table.add_row(*(_text(c) for c in row))
    return table


def _fits(console: Console, table: Table) -> bool:
    options = console.options.update_width(10_000)
    return Measurement.get(console, options, table).maximum <= console.width


def _fit(console: Console, head: Sequence[str], rows: _Rows, *, title: str | None = None,
         widths: dict[str, int] | None = None) -> Table:
    """The table, with one space between columns if two do not fit (rich wraps the rest)."""
    table = _rich_table(head, rows, title=title, widths=widths)
    if _fits(console, table):
        return table
    return _rich_table(head, rows, title=title, widths=widths, tight=True)


def _rich_parts(parts: Sequence[tuple[str, str]], sep: str = " · ") -> Text:
    text = Text()
    for i, (piece, tone) in enumerate(parts):
        if i:
            text.append(sep, style="dim")
        text.append(piece, style=_STYLE.get(tone, ""))
    return text


def _rich_facts(rows: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True, min_width=8)
    grid.add_column(overflow="fold")
    for label, parts in rows:
        grid.add_row(Text(label), _rich_parts(parts))
    return grid


def _when(report: Report) -> list[str]:
    """Started, finished, how long, which version: the header's second line."""
    when = [f"started {report.started_at}", f"finished {report.finished_at}"]
    took = _elapsed(report.started_at, report.finished_at)
    if took:
        when.append(f"took {took}")
    if report.tool_version:
        when.append(f"symfo-failover {report.tool_version}")
    return when


def _text_header(report: Report, console: Console) -> None:
    console.print(Text.assemble(("symfo-failover ", "bold"), (report.command, "bold cyan"),
                                ("  ", ""), ("target ", "dim"), (report.target, "bold")))
    console.print(Text(" · ".join(_when(report)), style="dim"))
    if report.interrupted:
        console.print(Text("interrupted (Ctrl-C): this is what was seen until then",
                           style="bold yellow"))
    console.print(_verdict(report))


def _verdict(report: Report) -> Text:
    style = {"ok": "bold green", "warn": "bold yellow"}.get(_report_tone(report), "bold red")
    return Text(report.summary, style=style)


def _text_run(run: Run, console: Console) -> None:
    status = _run_status(run)
    console.print()
    console.print(Rule(Text.assemble((f" {run.name} ", "bold"),
                                     (f" {_LABEL[status]} ", _STYLE[status])),
                       align="left", style="dim"))
    facts: list[tuple[str, _Parts]] = [("run", [
        (f"{_f(run.seconds, 1)} s", ""), (f"{run.requests} requests", ""),
        (f"{run.failed} failed", "fail" if run.failed else ""),
        (f"{run.retried} retried", "")])]
    console.print(_rich_facts(facts))
    if run.windows:
        console.print(_fit(console, *_window_rows(run.windows)))
    console.print(_rich_facts(_run_facts(run)))
    if run.phases:
        console.print(_fit(console, *_phase_rows(run)))
    if run.errors:
        console.print(_fit(console, *_error_rows(run.errors)))
    if run.findings:
        console.print(_fit(console, *_finding_rows(run.findings)))


#: Left out of the text summary, in this order, when the console is too narrow for it.
_DROPPABLE = ("commits", "replayed", "errors")


def _text_summary(report: Report, console: Console) -> Table:
    """The drill's one row per run, as wide as the console allows."""
    head, rows = _summary_rows(report)
    keep = list(range(1, len(head)))  # not "#": that is for the HTML's links
    dropped: list[str] = []
    while True:
        title = "runs" + (f" (left out for width: {', '.join(dropped)})" if dropped else "")
        table = _fit(console, [head[i] for i in keep], [[row[i] for i in keep] for row in rows],
                     title=title, widths={"scenario": 16, "commits": 16})
        name = next((n for n in _DROPPABLE if head.index(n) in keep), None)
        if _fits(console, table) or name is None:
            return table  # (rich wraps what still does not fit)
        keep.remove(head.index(name))
        dropped.append(name)


def render_text(report: Report, console: Console, *, verbose: bool = False) -> None:
    """Print the report for people.

    A report with many runs (a drill) gets a summary table with one row per run, then
    the details of the runs that failed only (all of them with ``verbose``).
    """
    _text_header(report, console)
    many = len(report.runs) > 1
    if many:
        console.print()
        console.print(_text_summary(report, console))
    shown = [run for run in report.runs if verbose or not many or not run.ok]
    for run in shown:
        _text_run(run, console)
    if many and len(shown) < len(report.runs):
        held = len(report.runs) - len(shown)
        console.print(Text(f"\n(details of the {held} runs that held: verbose text, or the "
                           "HTML / JSON report)", style="dim"))
    if report.findings:
        console.print()
        title = "settings" if report.command == "check" else "findings"
        console.print(_fit(console, *_finding_rows(report.findings), title=title))
    if report.notes:
        console.print()
        console.print(_rich_facts([("note", [(note, "")]) for note in report.notes]))
    if report.runs or report.findings:
        console.print()
        console.print(_verdict(report))


# --- JSON ---------------------------------------------------------------------------------

def render_json(report: Report) -> str:
    """The JSON report: `Report.to_dict()` (``schemas/report.schema.json``)."""
    return json.dumps(report.to_dict(), ensure_ascii=False, indent=2)


# --- HTML: the timeline chart -------------------------------------------------------------

_W = 1000.0
_LEFT = 58.0
_RIGHT = 16.0
_PLOT = _W - _LEFT - _RIGHT

_C_UP = "#bfe5c8"
_C_DOWN = "#e5534b"
_C_START = "#e8b339"
_C_NONE = "#e6e8eb"
_C_OK_TICK = "#1a7f37"
_C_FAIL_TICK = "#6e0b0b"
_C_RETRY = "#f0a020"


@dataclass(frozen=True)
class _Geom:
    lane_h: float
    gap: float
    label_rows: int
    label_h: float
    font: float
    axis_h: float
    retry_r: float
    max_ticks: int
    #: Write the seconds in marker labels and the figures on the windows.
    detailed: bool


_BIG = _Geom(lane_h=26, gap=7, label_rows=4, label_h=14, font=11, axis_h=22, retry_r=3.2,
             max_ticks=12, detailed=True)
_SMALL = _Geom(lane_h=11, gap=3, label_rows=2, label_h=10, font=8.5, axis_h=13, retry_r=2.0,
               max_ticks=12, detailed=False)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _nice_step(span: float, most: int) -> float:
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600):
        if span / step <= most:
            return float(step)
    return float(math.ceil(span / most / 3600) * 3600)


class _Panel:
    """One run's availability from ``t_from`` to ``t_to`` seconds, as SVG elements.

    Three lanes (server, writes, reads) with the markers above them and an axis below,
    drawn from ``top`` down; `height` says how far.
    """

    def __init__(self, run: Run, t_from: float, t_to: float, geom: _Geom, top: float = 0.0,
                 ) -> None:
        self.run = run
        self.t_from = t_from
        self.t_to = max(t_to, t_from + 1e-6)
        self.g = geom
        self.lanes_top = top + 4 + geom.label_rows * geom.label_h + 2
        self.parts: list[str] = []

    def x(self, t: float) -> float:
        t = min(max(t, self.t_from), self.t_to)
        return _LEFT + (t - self.t_from) / (self.t_to - self.t_from) * _PLOT

    def shown(self, t0: float, t1: float) -> bool:
        return t1 >= self.t_from and t0 <= self.t_to

    def lane_y(self, lane: int) -> float:
        return self.lanes_top + lane * (self.g.lane_h + self.g.gap)

    @property
    def lanes_bottom(self) -> float:
        return self.lane_y(3) - self.g.gap

    @property
    def bottom(self) -> float:
        return self.lanes_bottom + self.g.axis_h

    def rect(self, t0: float, t1: float, lane: int, fill: str, title: str = "",
             css: str = "") -> None:
        if not self.shown(t0, t1):
            return
        x0, x1 = self.x(t0), self.x(t1)
        width = max(x1 - x0, 1.5)
        cls = f' class="{css}"' if css else ""
        tip = f"<title>{_e(title)}</title>" if title else ""
        self.parts.append(
            f'<rect{cls} x="{x0:.1f}" y="{self.lane_y(lane):.1f}" width="{width:.1f}" '
            f'height="{self.g.lane_h:.1f}" fill="{fill}">{tip}</rect>')

    def lane_text(self, t0: float, t1: float, lane: int, text: str, *, on_red: bool) -> None:
        """A figure in the middle of a span of a lane, if it fits there."""
        if not self.shown(t0, t1):
            return
        x0, x1 = self.x(t0), self.x(t1)
        if (x1 - x0) < len(text) * self.g.font * 0.6 + 6:
            return
        y = self.lane_y(lane) + self.g.lane_h / 2 + self.g.font * 0.36
        paint = ('fill="#fff" stroke="#7a0d0d" stroke-width="2.4" paint-order="stroke" '
                 'stroke-linejoin="round"' if on_red else 'fill="#57606a"')
        self.parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y:.1f}" text-anchor="middle" '
                          f'font-size="{self.g.font}" font-weight="600" {paint}>'
                          f"{_e(text)}</text>")

    def render(self) -> list[str]:
        run, g = self.run, self.g
        end = max(run.seconds, 0.0)
        self.axis(labels=False)
        for lane, name in enumerate(("server", "writes", "reads")):
            y = self.lane_y(lane) + g.lane_h / 2 + g.font * 0.36
            self.parts.append(f'<text x="{_LEFT - 6:.1f}" y="{y:.1f}" text-anchor="end" '
                              f'font-size="{g.font}" fill="#444">{name}</text>')
        if end < self.t_to:  # after the run's end (a shorter run of the group): grey
            for lane in range(3):
                self.rect(end, self.t_to, lane, _C_NONE, "not observed (after the run)")
        self.server_lane(end)
        for lane, kind in ((1, "write"), (2, "read")):
            self.request_lane(lane, kind, end)
        self.markers()
        self.axis(labels=True)
        return self.parts

    def axis(self, *, labels: bool) -> None:
        step = _nice_step(self.t_to - self.t_from, self.g.max_ticks)
        first = math.ceil(self.t_from / step - 1e-9)
        ticks = [i * step for i in range(first, int(self.t_to / step + 1e-9) + 1)]
        if not labels:
            top, bottom = self.lanes_top - 2, self.lanes_bottom + 3
            path = "".join(f"M{self.x(t):.1f} {top:.1f}V{bottom:.1f}" for t in ticks)
            self.parts.append(f'<path d="{path}" stroke="#d0d4d9" stroke-width="0.6" '
                              'fill="none"/>')
            return
        y = self.lanes_bottom + 3 + self.g.font
        for t in ticks:
            x = self.x(t)
            anchor = "end" if x > _W - 20 else "start" if x < _LEFT + 8 else "middle"
            self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" '
                              f'font-size="{self.g.font * 0.92:.1f}" fill="#666">'
                              f"{round(t, 6):g} s</text>")

    def server_lane(self, end: float) -> None:
        outages = self.run.server_outages
        if not outages:
            self.rect(self.t_from, self.t_to, 0, _C_NONE,
                      "the server's side was not observed by this command")
            self.lane_text(self.t_from, self.t_to, 0, "not observed", on_red=False)
            return
        self.rect(0, end, 0, _C_UP, "accepting sessions")
        for o in outages:
            down = o.down_at if o.down_at is not None else 0.0
            back = o.accepting_at if o.accepting_at is not None else end
            starting = o.listening_at if o.listening_at is not None else back
            seconds = _outage_seconds(o)
            self.rect(down, starting, 0, _C_DOWN, _outage_line(o), "down")
            if starting < back:
                self.rect(starting, back, 0, _C_START, f"{o.scenario}: listening, starting "
                          f"(57P03) {_span(starting, back)} s", "starting")
            if seconds is not None:
                self.lane_text(down, back, 0, f"{seconds:.2f} s", on_red=True)
            elif o.accepting_at is None:
                self.lane_text(down, back, 0, "down", on_red=True)

    def request_lane(self, lane: int, kind: str, end: float) -> None:
        run, g = self.run, self.g
        windows = [w for w in run.windows if w.kind == kind]
        samples = [s for s in run.samples if s.kind == kind]
        used = windows or samples or (kind == "write" and run.writes is not None)
        if not used:
            self.rect(self.t_from, self.t_to, lane, _C_NONE, f"no {kind}s in this run")
            self.lane_text(self.t_from, self.t_to, lane, f"no {kind}s", on_red=False)
            return
        self.rect(0, end, lane, _C_UP, f"{kind}s succeeding")
        y = self.lane_y(lane)
        for w in windows:
            stop = w.end if w.end is not None else end
            what = (f"{kind}s unavailable {_span(w.start, w.end)} s"
                    + (f" ({_f(w.seconds)} s)" if w.end is not None else " (never recovered)")
                    + f"; first error at {_f(w.first_error_at)} s: {_error_label(w.first_error)}"
                    + f"; {w.failed} failed, {w.retried} retried")
            self.rect(w.start, stop, lane, _C_DOWN, what, "window")
            if self.shown(w.first_error_at, w.first_error_at):
                xe = self.x(w.first_error_at)
                self.parts.append(f'<path d="M{xe:.1f} {y:.1f}v{g.lane_h:.1f}" '
                                  'stroke="#7a0000" stroke-width="1.6"/>')
            if w.end is None and self.shown(stop, stop):  # an arrow: still down at the end
                xs, mid, h = self.x(stop), y + g.lane_h / 2, g.lane_h / 2
                self.parts.append(f'<path class="unrecovered" d="M{xs:.1f} {y:.1f}'
                                  f'L{xs + h:.1f} {mid:.1f}L{xs:.1f} {y + g.lane_h:.1f}Z" '
                                  f'fill="{_C_FAIL_TICK}"><title>never recovered</title></path>')
        self.ticks(lane, samples)
        for w in windows:
            stop = w.end if w.end is not None else end
            self.lane_text(max(w.start, self.t_from), min(stop, self.t_to), lane,
                           "never recovered" if w.end is None else f"{_f(w.seconds)} s",
                           on_red=True)

    def ticks(self, lane: int, samples: Sequence[Sample]) -> None:
        """The requests, binned to 2 units of width so that a long run stays small."""
        g = self.g
        y = self.lane_y(lane)
        ok: set[int] = set()
        bad: set[int] = set()
        retried: set[int] = set()
        for s in samples:
            if not self.shown(s.t, s.t):
                continue
            b = round((self.x(s.t) - _LEFT) / 2)
            (ok if s.ok else bad).add(b)
            if s.retried:
                retried.add(b)
        if ok:
            y0, h = y + g.lane_h * 0.3, g.lane_h * 0.4
            d = "".join(f"M{_LEFT + b * 2:.0f} {y0:.1f}v{h:.1f}" for b in sorted(ok))
            self.parts.append(f'<path class="ok" d="{d}" stroke="{_C_OK_TICK}" '
                              f'stroke-width="0.9" stroke-opacity="{0.5 if g.detailed else 0.35}"'
                              ' fill="none"/>')
        if bad:
            d = "".join(f"M{_LEFT + b * 2:.0f} {y:.1f}v{g.lane_h:.1f}" for b in sorted(bad))
            self.parts.append(f'<path class="failed" d="{d}" stroke="{_C_FAIL_TICK}" '
                              'stroke-width="1.2" fill="none"><title>failed requests</title>'
                              "</path>")
        cy = y + g.lane_h / 2
        for b in sorted(retried):
            self.parts.append(f'<circle class="retried" cx="{_LEFT + b * 2:.0f}" cy="{cy:.1f}" '
                              f'r="{g.retry_r}" fill="{_C_RETRY}" stroke="#6b4300" '
                              'stroke-width="0.6"><title>retried request</title></circle>')

    def markers(self) -> None:
        g = self.g
        rows: list[list[tuple[float, float]]] = [[] for _ in range(g.label_rows)]
        for m in _markers(self.run.timeline):
            if not self.shown(m.at, m.at):
                continue
            x = self.x(m.at)
            text = f"{m.name} {m.at:.2f} s" if g.detailed else m.name
            width = len(text) * g.font * 0.56 + 4
            if x + 3 + width <= _W - 2:
                span, anchor, tx = (x, x + width + 3), "start", x + 3
            else:
                span, anchor, tx = (x - width - 3, x), "end", x - 3
            row = next((i for i, taken in enumerate(rows)
                        if all(span[1] < a or span[0] > b for a, b in taken)), None)
            bottom = self.lanes_bottom + 2
            tip = f"<title>{_e(m.name)} at {m.at:.2f} s</title>"
            if row is None:
                top = self.lanes_top - 3
            else:
                rows[row].append(span)
                base = self.lanes_top - 4 - row * g.label_h
                top = base - g.font
                self.parts.append(f'<text class="marker" x="{tx:.1f}" y="{base:.1f}" '
                                  f'text-anchor="{anchor}" font-size="{g.font}" '
                                  f'fill="#24292f">{_e(text)}{tip}</text>')
            self.parts.append(f'<path class="marker" d="M{x:.1f} {top:.1f}V{bottom:.1f}" '
                              'stroke="#24292f" stroke-width="0.9" stroke-dasharray="3 2">'
                              f"{tip}</path>")


def _trouble(run: Run) -> tuple[float, float] | None:
    """From the first outage (client or server) to the last recovery, if any."""
    end = max(run.seconds, 0.0)
    spans = [(w.start, w.end if w.end is not None else end) for w in run.windows]
    spans += [(o.down_at, o.accepting_at if o.accepting_at is not None else end)
              for o in run.server_outages if o.down_at is not None]
    if not spans:
        return None
    return min(a for a, _b in spans), max(b for _a, b in spans)


def _svg(run: Run, t_max: float, *, big: bool) -> str:
    """One run's chart: the whole run; for a big chart whose outages take little of the
    run, a second panel below zooms in on them."""
    geom = _BIG if big else _SMALL
    whole = _Panel(run, 0.0, t_max, geom)
    parts = whole.render()
    height = whole.bottom
    trouble = _trouble(run) if big else None
    if trouble is not None and (trouble[1] - trouble[0]) < 0.2 * t_max:
        lo, hi = trouble
        pad = max(1.0, 0.3 * (hi - lo))
        z_from, z_to = max(0.0, lo - pad), min(t_max, hi + pad)
        # Where the zoom is, on the whole run's axis: a bracket under the lanes.
        x0, x1, yb = whole.x(z_from), whole.x(z_to), whole.lanes_bottom + 1.5
        parts.append(f'<path class="zoom" d="M{x0:.1f} {yb - 3:.1f}V{yb:.1f}H{x1:.1f}'
                     f'V{yb - 3:.1f}" stroke="#0a5796" stroke-width="1.4" fill="none"/>')
        caption_y = height + geom.font + 6
        parts.append(f'<text x="{_LEFT:.1f}" y="{caption_y:.1f}" font-size="{geom.font}" '
                     f'fill="#0a5796" font-weight="600">around the outage: '
                     f"{_f(z_from, 1)}{DASH}{_f(z_to, 1)} s</text>")
        zoom = _Panel(run, z_from, z_to, geom, top=caption_y)
        parts += zoom.render()
        height = zoom.bottom
    label = f"availability timeline of {run.name}"
    return (f'<svg class="timeline" viewBox="0 0 {_W:.0f} {height:.0f}" role="img" '
            f'aria-label="{_e(label)}" data-run="{_e(run.name)}">'
            f"<title>{_e(label)}</title>{''.join(parts)}</svg>")


def _run_end(run: Run) -> float:
    times = [run.seconds]
    times += [m.at for m in run.timeline]
    times += [w.end for w in run.windows if w.end is not None]
    times += [o.accepting_at for o in run.server_outages if o.accepting_at is not None]
    return max([t for t in times if t is not None and math.isfinite(t)] + [0.0]) or 1.0


# --- HTML: the page -----------------------------------------------------------------------

_CSS = """
:root{--ok:#1a7f37;--ok-bg:#dafbe1;--warn:#7d4e00;--warn-bg:#fff1c2;--fail:#b42318;
--fail-bg:#ffe1de;--info:#0a5796;--info-bg:#ddf0ff;--muted:#57606a;--line:#d8dee4}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Helvetica Neue",
Arial,"Noto Sans CJK JP","Hiragino Sans","Yu Gothic",Meiryo,"IPAexGothic",sans-serif;
color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:1340px;margin:0 auto;padding:18px 22px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px}
h3{font-size:14px;margin:14px 0 4px;color:var(--info)}
header{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px}
.muted{color:var(--muted)}.meta{color:var(--muted);font-size:13px}
.verdict{display:inline-block;margin-top:8px;padding:5px 12px;border-radius:6px;
font-weight:700;font-size:15px}
.verdict.ok{background:var(--ok-bg);color:var(--ok)}
.verdict.fail{background:var(--fail-bg);color:var(--fail)}
.verdict.warn{background:var(--warn-bg);color:var(--warn)}
.interrupted{color:var(--warn);font-weight:600}
section.card{background:#fff;border:1px solid var(--line);border-radius:8px;
padding:10px 16px 14px;margin-top:14px}
section.card>h2:first-child{margin-top:4px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.ok{color:var(--ok);font-weight:600}td.fail{color:var(--fail);font-weight:700}
td.warn{color:var(--warn);font-weight:600}td.info{color:var(--info)}td.dim{color:#8c959f}
td.st{border-radius:4px;text-align:center;white-space:nowrap}
td.st.ok{background:var(--ok-bg)}td.st.fail{background:var(--fail-bg)}
td.st.warn{background:var(--warn-bg)}td.st.info{background:var(--info-bg)}
.badge{display:inline-block;padding:0 7px;border-radius:4px;font-size:12px;font-weight:700}
.badge.ok{background:var(--ok-bg);color:var(--ok)}
.badge.fail{background:var(--fail-bg);color:var(--fail)}
.badge.warn{background:var(--warn-bg);color:var(--warn)}
.chart-row{display:flex;align-items:flex-start;gap:10px;border-top:1px solid #f0f2f4;
padding:2px 0}
.chart-row .who{flex:0 0 190px;font-size:12px;padding-top:6px;line-height:1.3}
.chart-row .plot{flex:1 1 auto;min-width:0}
svg.timeline{display:block;width:100%;height:auto;font-family:inherit}
.legend{font-size:12px;color:var(--muted);margin:2px 0 6px}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:18px;height:10px;vertical-align:-1px;margin-right:4px;
border-radius:2px}
details.run{border-top:1px solid var(--line);padding:6px 0}
details.run>summary{cursor:pointer;font-weight:600}
dl.kv{display:grid;grid-template-columns:110px 1fr;gap:2px 12px;margin:8px 0;font-size:13px}
dl.kv dt{color:var(--muted)}dl.kv dd{margin:0}
.t-fail{color:var(--fail);font-weight:700}.t-ok{color:var(--ok);font-weight:600}
.t-warn{color:var(--warn)}.t-info{color:var(--info)}.t-dim{color:#8c959f}
ul.notes{margin:4px 0;padding-left:20px}
"""

_CHECK_SCRIPT = """
(function () {
  var body = document.body;
  function fail(why) { body.dataset.rendered = "failed: " + why; }
  try {
    var charts = document.querySelectorAll("svg.timeline");
    var want = parseInt(body.dataset.runs || "0", 10);
    if (charts.length !== want) {
      return fail("expected " + want + " timeline charts, found " + charts.length);
    }
    for (var i = 0; i < charts.length; i++) {
      var box = charts[i].getBoundingClientRect();
      if (!(box.width > 0 && box.height > 0)) { return fail("chart " + i + " has no size"); }
      if (!charts[i].querySelector("rect")) { return fail("chart " + i + " drew nothing"); }
      var drawn = charts[i].getBBox();
      if (!(drawn.width > 0 && drawn.height > 0)) { return fail("chart " + i + " is empty"); }
    }
    if (!document.querySelector("header .verdict")) { return fail("no verdict"); }
    if (!body.dataset.rendered || body.dataset.rendered === "pending") {
      body.dataset.rendered = "ok";
    }
  } catch (e) {
    fail(String(e && e.message || e));
  }
})();
"""

_ONERROR_SCRIPT = """
window.onerror = function (message) {
  (document.body || document.documentElement).dataset.rendered = "failed: " + message;
};
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _td(cell: _Cell, *, status_col: bool = False) -> str:
    classes = [c for c in (cell.tone, "num" if cell.num else "", "st" if status_col else "") if c]
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{cls}>{_e(cell.text)}</td>"


def _html_table(head: Sequence[str], rows: _Rows, *, css: str = "",
                links: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    numeric = [rows[0][i].num for i in range(len(head))]
    status_cols = {i for i, name in enumerate(head) if name in ("status", "result")}
    ths = "".join(f'<th{" class=num" if numeric[i] else ""}>{_e(h)}</th>'
                  for i, h in enumerate(head))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            if links is not None and i == 0:
                cells.append(f'<td class="num"><a href="#{_e(links[r])}">{_e(cell.text)}</a>'
                             "</td>")
            else:
                cells.append(_td(cell, status_col=i in status_cols))
        body.append(f"<tr>{''.join(cells)}</tr>")
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _pieces(parts: Sequence[tuple[str, str]]) -> str:
    return " · ".join(f'<span class="t-{tone}">{_e(text)}</span>' if tone else _e(text)
                      for text, tone in parts)


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status)}">{_e(_LABEL.get(status, status.upper()))}</span>'


def _run_id(index: int) -> str:
    return f"run-{index}"


def _html_header(report: Report) -> str:
    when = [*_when(report), f"report schema {report.schema_version}"]
    interrupted = ('<div class="interrupted">interrupted (Ctrl-C): this is what was seen '
                   "until then</div>" if report.interrupted else "")
    return (f"<header><h1>symfo-failover {_e(report.command)} "
            f'<span class="muted">· {_e(report.target)}</span></h1>'
            f'<div class="meta">{_e(" · ".join(when))}</div>{interrupted}'
            f'<div class="verdict {_report_tone(report)}">{_e(report.summary)}</div></header>')


_LEGEND = (
    '<div class="legend">'
    f'<span><i style="background:{_C_UP}"></i>available / accepting</span>'
    f'<span><i style="background:{_C_DOWN}"></i>down (client: outage window)</span>'
    f'<span><i style="background:{_C_START}"></i>server starting (57P03)</span>'
    f'<span><i style="background:{_C_NONE}"></i>not observed</span>'
    f'<span><i style="background:{_C_OK_TICK};width:3px"></i>request</span>'
    f'<span><i style="background:{_C_FAIL_TICK};width:3px"></i>failed request</span>'
    f'<span><i style="background:{_C_RETRY};width:10px;border-radius:5px"></i>retried</span>'
    '<span><i style="border-left:2px dashed #24292f;width:2px;border-radius:0"></i>'
    "timeline marker</span>"
    "</div>")


def _html_charts(report: Report) -> str:
    if not report.runs:
        return ""
    out = ['<section class="card charts"><h2>Availability timeline</h2>', _LEGEND]
    if len(report.runs) == 1:
        run = report.runs[0]
        out.append(_svg(run, _run_end(run), big=True))
    else:
        for scenario, members in _scenario_groups(report.runs):
            x_max = max(_run_end(run) for _i, run in members)
            out.append(f"<h3>{_e(scenario)}</h3>")
            for index, run in members:
                status = _run_status(run)
                who = f"{run.driver} · {run.access}"
                out.append(f'<div class="chart-row"><div class="who">{_badge(status)} '
                           f'<a href="#{_run_id(index)}">{_e(who)}</a></div>'
                           f'<div class="plot">{_svg(run, x_max, big=False)}</div></div>')
    out.append("</section>")
    return "".join(out)


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<dl class="kv">{items}</dl>' if items else ""


def _html_run(index: int, run: Run, *, open_: bool) -> str:
    status = _run_status(run)
    facts = (f"{_f(run.seconds, 1)} s · {run.requests} requests · {run.failed} failed · "
             f"{run.retried} retried")
    return "".join([
        f'<details class="run" id="{_run_id(index)}"{" open" if open_ else ""}>',
        f'<summary>{_badge(status)} {_e(run.name)} <span class="muted">· {_e(facts)}</span>'
        "</summary>",
        _html_table(*_window_rows(run.windows)),
        _kv([(label, _pieces(parts)) for label, parts in _run_facts(run)]),
        _html_table(*_phase_rows(run)),
        _html_table(*_error_rows(run.errors)),
        _html_table(*_finding_rows(run.findings)),
        "</details>",
    ])


def render_html(report: Report) -> str:
    """One self-contained HTML page: inline CSS, static SVG charts, no external resources."""
    body = [_html_header(report)]
    many = len(report.runs) > 1
    if many:
        head, rows = _summary_rows(report)
        links = [_run_id(i) for i in range(1, len(report.runs) + 1)]
        body.append('<section class="card"><h2>Runs</h2>'
                    f"{_html_table(head, rows, links=links)}</section>")
    body.append(_html_charts(report))
    if report.runs:
        body.append('<section class="card"><h2>Run details</h2>')
        body.extend(_html_run(i, run, open_=not many or not run.ok)
                    for i, run in enumerate(report.runs, 1))
        body.append("</section>")
    if report.findings:
        title = "Settings" if report.command == "check" else "Findings"
        body.append(f'<section class="card"><h2>{title}</h2>'
                    f"{_html_table(*_finding_rows(report.findings))}</section>")
    if report.notes:
        notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
        body.append(f'<section class="card"><h2>Notes</h2><ul class="notes">{notes}</ul>'
                    "</section>")
    title = f"symfo-failover {report.command}: {report.summary}"
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{_e(title)}</title><style>{_CSS}</style>",
        f"<script>{_ONERROR_SCRIPT}</script></head>\n",
        f'<body data-runs="{len(report.runs)}" data-rendered="pending"><main>\n',
        "\n".join(part for part in body if part),
        f"\n</main><script>{_CHECK_SCRIPT}</script></body></html>\n",
    ])
