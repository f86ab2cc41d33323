"""The public API is what __all__ says, and the docs show the current table."""

from __future__ import annotations

import pathlib

import symfo_failover
from symfo_failover._table_doc import render_markdown

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_exported_members_exist_and_are_public() -> None:
    for name in symfo_failover.__all__:
        assert hasattr(symfo_failover, name), name
    public = {n for n in dir(symfo_failover) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(symfo_failover, n)).__name__ == "module"}
    assert public - modules == set(symfo_failover.__all__) - {"__version__"}


def test_classification_doc_is_generated_from_the_table() -> None:
    doc = (ROOT / "docs" / "classification.md").read_text(encoding="utf-8")
    assert render_markdown() in doc, "run: python tools/gen_classification_doc.py"


def test_every_code_of_the_guide_is_in_the_doc() -> None:
    doc = (ROOT / "docs" / "classification.md").read_text(encoding="utf-8")
    for code in ("57P01", "57P02", "08006", "08S01", "08001", "YE000", "26000", "40001"):
        assert f"| `{code}` |" in doc


def test_harness_exports_are_exactly_its_public_names() -> None:
    import symfo_failover.harness as harness

    for name in harness.__all__:
        assert hasattr(harness, name), name
    public = {n for n in dir(harness) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(harness, n)).__name__ == "module"}
    assert public - modules == set(harness.__all__)


def test_connection_strings_take_overrides() -> None:
    from symfo_failover.harness._server import make_conninfo, make_odbc_connection_string

    ci = make_conninfo("127.0.0.1", 5432, "postgres", "pw", "db", host="127.0.0.2", port="6")
    assert ci == "host=127.0.0.2 port=6 user=postgres dbname=db password=pw"
    odbc = make_odbc_connection_string("127.0.0.1", 5432, "postgres", None, "db", Port="7")
    assert odbc == "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=7;Database=db;Uid=postgres;"
