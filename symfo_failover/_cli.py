"""The ``symfo-failover`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from ._classify import _SQLSTATE, classify


def _cmd_classify(args: argparse.Namespace) -> int:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
