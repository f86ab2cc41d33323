"""The ``symfo-failover`` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from ._report import Report


def _cmd_classify(args: argparse.Namespace) -> int:
    from ._classify import _SQLSTATE, classify

    if args.table:
        from ._table_doc import render_table

        print(render_table())
        return 0
    if not args.codes:
        print("symfo-failover classify: give one or more SQLSTATE codes, or --table",
              file=sys.stderr)
        return 2
    # One argument that is not a SQLSTATE refuses the whole call: a typo must not pass
    # as "an unknown code, not retryable". Upper case only, as servers and drivers
    # report them (so that `hello` is refused, not read as HELLO); `57p01` gets a hint.
    bad = [code for code in args.codes if not _SQLSTATE.fullmatch(code)]
    for code in bad:
        hint = ""
        if _SQLSTATE.fullmatch(code.upper()) and any(c.isdigit() for c in code):
            hint = f"; did you mean {code.upper()}?"
        print(f"symfo-failover classify: {code!r} is not a SQLSTATE (five characters, each "
              f"a digit or an upper-case letter, e.g. 57P01){hint}", file=sys.stderr)
    if bad:
        return 2
    results = [(code, classify(code)) for code in args.codes]
    if args.json:
        print(json.dumps([
            {"input": code, "sqlstate": f.sqlstate, "kind": f.kind.name,
             "retryable": f.retryable, "reconnect": f.reconnect, "rule": f.rule,
             "condition": f.condition, "message": f.message}
            for code, f in results
        ], ensure_ascii=False, indent=2))
        return 0
    for code, f in results:
        retry = "yes" if f.retryable else "no"
        new = "yes" if f.reconnect else "no"
        flags = f"retryable={retry} new-session={new}"
        print(f"{code:8} {f.kind.name:20} {flags:32} [{f.rule}] {f.condition}")
        if args.verbose:
            print(f"         {f.message}")
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from . import _conformance as conformance
    from .harness import ServerBinariesNotFound, ServerError

    drivers = conformance.DRIVERS if args.driver == "all" else (args.driver,)
    try:
        observations = conformance.run(drivers, lc_messages=args.lc_messages)
    except (ServerBinariesNotFound, ServerError) as exc:
        print(f"symfo-failover conformance: {exc}", file=sys.stderr)
        if args.lc_messages:
            print(f"(is the locale {args.lc_messages} installed? `locale -a` lists them; "
                  "scripts/setup.sh generates ja_JP.UTF-8)", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"symfo-failover conformance: a driver is missing ({exc}); install "
              "symfo-failover[all]", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([o.to_dict() for o in observations], ensure_ascii=False, indent=2))
    else:
        print(conformance.format_report(observations, lc_messages=args.lc_messages))
    return 0 if all(o.ok for o in observations) else 1


# --- drill, probe, check: one report, three views ----------------------------------------


def _consoles() -> tuple[Console, Console]:
    """The report's console (stdout) and the progress console (stderr)."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(width=132)  # piped: rich would wrap at 80
    return out, Console(stderr=True)


def _fail(command: str, message: str) -> int:
    print(f"symfo-failover {command}: {message}", file=sys.stderr)
    return 2


def _interrupted(command: str, message: str = "interrupted by Ctrl-C") -> int:
    """After the first Ctrl-C the command only finishes: a second one (or one delivered
    late) must not turn into a traceback on the way out."""
    _ignore_interrupts()
    return _fail(command, message)


def _ignore_interrupts() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _forget_unhandled_interrupt()


def _forget_unhandled_interrupt() -> None:
    """CPython 3.11 and older mark a KeyboardInterrupt raised inside ``exec()`` of a
    string (the dataclasses module does that while a module is imported) as unhandled,
    even when it is caught later, and then end the process by SIGINT instead of with its
    exit status. The Ctrl-C was handled: clear the mark (best effort)."""
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return
    try:
        import ctypes

        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ImportError, AttributeError, ValueError, OSError):
        pass


def _emit(report: Report, args: argparse.Namespace, out: Console) -> int:
    """Print (and write) the report as asked; the exit status."""
    from ._views import render_html, render_json, render_text

    if args.html:
        path = Path(args.html)
        try:
            path.write_text(render_html(report), encoding="utf-8")
        except OSError as exc:
            _fail(report.command, f"cannot write {path}: {exc.strerror or exc}")
            return 2
    if args.json:
        print(render_json(report))
    else:
        render_text(report, out, verbose=args.verbose)
        if args.html:
            out.print(f"HTML report: {args.html}")
    if report.interrupted:
        _ignore_interrupts()
        return 2
    return 0 if report.ok else 1


@contextmanager
def _progress(err: Console, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A live status line on a terminal; one line per step when stderr is piped."""
    if not enabled:
        yield lambda _text: None
        return
    if not err.is_terminal:
        yield lambda text: print(text, file=sys.stderr, flush=True)
        return
    with err.status("starting") as status:
        yield lambda text: status.update(text)


def _check_html_path(args: argparse.Namespace) -> str | None:
    if not args.html:
        return None
    parent = Path(args.html).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"cannot write the HTML report to {args.html}: {parent} is not a writable folder"
    return None


def _reporting(command: str, args: argparse.Namespace,
               build: Callable[[Callable[[str], None], Console], Report]) -> int:
    """What drill, probe and check share: the checks before anything runs, the live
    progress, bad input and Ctrl-C as exit status 2, the views of the report."""
    from ._report import InputError, from_ctrl_c

    out, err = _consoles()
    problem = _check_html_path(args)
    if problem:
        return _fail(command, problem)
    try:
        with _progress(err, not args.no_progress) as step:
            report = build(step, err)
    except InputError as exc:
        return _fail(command, str(exc))
    except (KeyboardInterrupt, SystemError) as exc:
        if not from_ctrl_c(exc):
            raise
        return _interrupted(command, _INTERRUPTED.get(command, "interrupted by Ctrl-C"))
    return _emit(report, args, out)


_INTERRUPTED = {
    "drill": "interrupted by Ctrl-C before the first scenario finished",
    "probe": "interrupted by Ctrl-C; nothing was left behind",
}


def _cmd_drill(args: argparse.Namespace) -> int:
    from . import _drill as drill

    def build(step: Callable[[str], None], _err: Console) -> Report:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()] \
            if args.scenarios else None
        chosen = drill.select_scenarios(names, quick=args.quick)
        return drill.Drill(chosen, rounds=args.rounds, on_step=step).run()

    return _reporting("drill", args, build)


def _cmd_probe(args: argparse.Namespace) -> int:
    from ._probe_command import ProbeOptions, Status, probe

    options = ProbeOptions(
        args.conninfo, driver=args.driver, access="pool" if args.pool else "connection",
        duration=args.duration, interval=args.interval, read_only=args.read_only,
        concurrency=args.concurrency, rto=args.rto, until_failovers=args.until_failovers)

    def build(step: Callable[[str], None], err: Console) -> Report:
        last: list[str] = []

        def on_status(status: Status) -> None:
            def state(up: bool | None) -> str:
                return "-" if up is None else ("up" if up else "DOWN")

            brief = (f"writes {state(status.writes_up)} · reads {state(status.reads_up)} · "
                     f"outages {status.outages_ended}"
                     + (f" (+{status.outages_open} open)" if status.outages_open else ""))
            # On a terminal the status line is redrawn; piped, a line per change.
            if err.is_terminal or not last or last[-1] != brief:
                last.append(brief)
                step(f"probe {status.elapsed:5.1f} s · {status.requests} requests, "
                     f"{status.failed} failed · {brief} · Ctrl-C stops")

        return probe(options, on_status=on_status)

    return _reporting("probe", args, build)


def _cmd_check(args: argparse.Namespace) -> int:
    from ._check import run_check

    return _reporting("check", args, lambda _step, _err: run_check(args.conninfo))


def _cmd_ledger(args: argparse.Namespace) -> int:
    import psycopg

    from . import _ledger_admin as admin
    from ._report import InputError

    command = f"ledger {args.action}"
    try:
        if args.action == "install":
            done = admin.install_ledger(args.conninfo, grant_to=args.grant or None)
            result: dict[str, object] = {
                "created": done.created, "schema_created": done.schema_created,
                "granted": done.granted, "grants": done.grants}
            lines = [("installed the commit ledger symfo_failover.ledger" if done.created
                      else "the commit ledger symfo_failover.ledger was already installed; "
                           "nothing changed")]
            if done.granted:
                lines += ["granted:", *(f"  {g};" for g in done.granted)]
            else:
                lines += ["the application's role needs (replace ROLE; DELETE is for "
                          "pruning):", *(f"  {g};" for g in done.grants)]
        elif args.action == "status":
            status = admin.ledger_status(args.conninfo, retention=args.retention)
            result = status.to_dict()
            if not status.installed:
                lines = ["the commit ledger is not installed: symfo-failover ledger "
                         "install CONNINFO (as a role with CREATE on the database)"]
            else:
                lines = [f"installed; this role may {'use' if status.usable else 'NOT use'}"
                         f" it (privileges: {status.access or 'none'})",
                         f"rows: {status.rows} ({status.size_bytes // 1024} KiB), oldest "
                         f"{status.oldest or '-'}, newest {status.newest or '-'}",
                         f"older than the retention ({status.retention:g} s): "
                         f"{status.prunable}",
                         f"roles that may insert: {', '.join(status.roles) or 'none'}"]
        else:
            deleted = admin.prune_ledger(args.conninfo, retention=args.retention)
            result = {"deleted": deleted, "retention": args.retention}
            lines = [f"deleted {deleted} tokens older than {args.retention:g} s"]
    except (InputError, ValueError) as exc:
        return _fail(command, str(exc))
    except psycopg.Error as exc:
        from ._check import _redact

        text = _redact(" ".join(str(exc).split()), args.conninfo)
        hint = (" (the install needs CREATE on the database: run it as the database's "
                "owner)" if getattr(exc, "sqlstate", None) == "42501" else "")
        return _fail(command, f"{getattr(exc, 'sqlstate', None) or 'error'}: {text}{hint}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
    return 0


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
        return value

    return parse


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (schemas/report.schema.json)")
    p.add_argument("--html", metavar="FILE",
                   help="also write the report as one self-contained HTML file")
    p.add_argument("-v", "--verbose", action="store_true", help="every run in detail")
    p.add_argument("--no-progress", action="store_true", help="no live progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symfo-failover",
        description="Failover tools for PostgreSQL / Fujitsu Symfoware active-standby clusters.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="print the classification of SQLSTATE codes")
    p.add_argument("codes", nargs="*", metavar="CODE",
                   help="SQLSTATE codes: five digits or upper-case letters, e.g. 57P01 08S01")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--table", action="store_true", help="print the whole table (Markdown)")
    p.add_argument("-v", "--verbose", action="store_true", help="explain each code")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser(
        "conformance",
        help="reproduce the guide's section 3.4.1 error tables on a local server",
    )
    p.add_argument("--driver", choices=["all", "psycopg", "pyodbc"], default="all")
    p.add_argument("--lc-messages", metavar="LOCALE", default=None,
                   help="server message language, e.g. ja_JP.UTF-8")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_conformance)

    p = sub.add_parser(
        "drill",
        help="fail a local two-node cluster in every scenario of the guide, "
             "with every client, and check that no acknowledged write was lost or doubled",
    )
    p.add_argument("--scenarios", metavar="NAME,...",
                   help="only these (switchover, node_down, server_crash, stop_both, "
                        "while_switching, while_starting, lost_commit, commit_held, "
                        "partition)")
    p.add_argument("--rounds", type=_positive(int), default=1, metavar="N",
                   help="run every scenario N times (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="three scenarios: switchover, node_down, lost_commit")
    _report_options(p)
    p.set_defaults(func=_cmd_drill)

    p = sub.add_parser(
        "probe",
        help="run a canary against a real cluster while an operator fails it over",
    )
    p.add_argument("conninfo", metavar="CONNINFO",
                   help="libpq connection string or URI (a password is better in "
                        "PGPASSWORD or ~/.pgpass than on the command line)")
    p.add_argument("--driver", choices=["psycopg", "pyodbc"], default="psycopg",
                   help="psycopg (libpq), or pyodbc through psqlODBC (default psycopg)")
    p.add_argument("--pool", action="store_true",
                   help="through a FailoverPool (OdbcFailoverPool for pyodbc) instead of "
                        "a ResilientConnection")
    p.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                   help="stop after this long (default 600)")
    p.add_argument("--interval", type=float, default=0.1, metavar="SECONDS",
                   help="pause between a worker's requests (default 0.1)")
    p.add_argument("--read-only", action="store_true",
                   help="only read (no canary table): for a standby or a read-only role")
    p.add_argument("--concurrency", type=_positive(int), default=1, metavar="N",
                   help="writers, and as many readers (default 1)")
    p.add_argument("--rto", type=_positive(float), metavar="SECONDS",
                   help="judge every outage against this recovery time objective")
    p.add_argument("--until-failovers", type=_positive(int), metavar="N",
                   help="stop once N outages have ended (and 2 s after)")
    _report_options(p)
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser(
        "check",
        help="check a server's settings against the guide and what exactly-once needs",
    )
    p.add_argument("conninfo", metavar="CONNINFO", help="libpq connection string or URI")
    _report_options(p)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "ledger",
        help="install, inspect or prune the commit ledger (exactly once after crashes)",
    )
    ledger = p.add_subparsers(dest="action", required=True)
    q = ledger.add_parser("install", help="create symfo_failover.ledger (idempotent) and "
                                          "print the GRANTs the application's role needs")
    q.add_argument("conninfo", metavar="CONNINFO",
                   help="libpq connection string of a role with CREATE on the database")
    q.add_argument("--grant", metavar="ROLE", action="append",
                   help="also grant ROLE what it needs (repeatable)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (("status", "is it installed, may this role use it, how big is it"),
                       ("prune", "delete tokens older than the retention now")):
        q = ledger.add_parser(name, help=text)
        q.add_argument("conninfo", metavar="CONNINFO", help="libpq connection string")
        q.add_argument("--retention", type=_positive(float), default=3600.0,
                       metavar="SECONDS", help="keep tokens this long (default 3600)")
        q.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_ledger)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command. Exit status: 0 all held, 1 something failed, 2 it could not run (bad
    input, an unreachable server, Ctrl-C): then a message on stderr, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        code: int = args.func(args)
    except (KeyboardInterrupt, SystemError) as exc:
        from ._report import from_ctrl_c

        if not from_ctrl_c(exc):
            raise
        _ignore_interrupts()
        print("symfo-failover: interrupted by Ctrl-C", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # A driver (an extra) that is not installed: psycopg, psycopg_pool, pyodbc.
        print(f"symfo-failover: {exc.name or exc} is not installed; "
              "pip install 'symfo-failover[all]' (or the extra for your driver: psycopg, "
              "pool, odbc)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `symfo-failover ... | head`: the reader went away; say nothing more.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
