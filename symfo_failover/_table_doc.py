"""The classification table rendered for people (docs and the CLI), from the one table."""

from __future__ import annotations

from . import _sqlstates as table

BEGIN = "<!-- BEGIN GENERATED TABLE: python tools/gen_classification_doc.py -->"
END = "<!-- END GENERATED TABLE -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(rules: tuple[table.Rule, ...]) -> list[str]:
    lines = []
    for r in rules:
        lines.append(
            f"| `{r.code}` | {r.condition} | {r.kind.name} | {'yes' if r.retryable else 'no'} "
            f"| {'yes' if r.reconnect else 'no'} | {_cell(r.source)} | {_cell(r.why)} |"
        )
    return lines


def render_table() -> str:
    """The whole table in Markdown, one section per kind of row (what the CLI prints)."""
    head = [
        "| code | condition | kind | retryable | new session | source | why |",
        "|---|---|---|---|---|---|---|",
    ]
    parts = [
        "### Exact codes",
        "",
        *head,
        *_rows(table.EXACT),
        "",
        "### Classes (the first two characters), when no exact row matches",
        "",
        *head,
        *_rows(table.CLASSES),
        "",
        "### When the driver gives no SQLSTATE",
        "",
        *head,
        *_rows(table.NO_SQLSTATE),
        "",
        "### When a driver's catch-all code comes from a dead session",
        "",
        *head,
        *_rows(table.ON_BROKEN_SESSION),
        "",
        "### Anything else",
        "",
        *head,
        *_rows((table.DEFAULT,)),
    ]
    return "\n".join(parts)


def render_markdown() -> str:
    """The generated block of docs/classification.md: the table between its markers.

    The markers are for ``tools/gen_classification_doc.py`` to find the block again;
    they belong in the document only, not in what the CLI prints.
    """
    return "\n".join([BEGIN, "", render_table(), "", END])


def replace_block(document: str) -> str:
    """``document`` with its generated block replaced by the current table."""
    start = document.index(BEGIN)
    end = document.index(END) + len(END)
    return document[:start] + render_markdown() + document[end:]
