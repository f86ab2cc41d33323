"""Regenerate the table in docs/classification.md from symfo_failover/_sqlstates.py."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from symfo_failover._table_doc import replace_block  # noqa: E402


def main() -> None:
    path = ROOT / "docs" / "classification.md"
    path.write_text(replace_block(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
