"""The fault proxy's protocol logic without sockets: COMMIT recognition and message framing.

`FaultProxy` on real sessions is tested in ``tests/server/test_proxy.py``; these need no
server and run with ``-m "not server"``.
"""

from __future__ import annotations

import pytest

from symfo_failover.harness._proxy import (
    _BackendScanner,
    _FrontendParser,
    _Phase,
    is_commit_sql,
)


@pytest.mark.parametrize(
    ("sql", "commits"),
    [
        ("COMMIT", True),
        ("commit;", True),
        ("  Commit Work ; ", True),
        ("COMMIT TRANSACTION", True),
        ("END", True),
        ("end transaction;", True),
        ("COMMIT AND CHAIN", True),
        ("COMMIT PREPARED 'gid'", False),
        ("COMMITTED", False),
        ("ROLLBACK", False),
        ("SELECT 'COMMIT'", False),
        ("COMMIT; COMMIT", False),
    ],
)
def test_commit_sql_is_recognised(sql: str, commits: bool) -> None:
    assert is_commit_sql(sql) is commits


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def test_frontend_parser_finds_messages_at_any_split() -> None:
    startup = b"\x00\x03\x00\x00user\x00postgres\x00\x00"
    stream = (
        (len(startup) + 4).to_bytes(4, "big")
        + startup
        + _msg(b"Q", b"COMMIT\x00")
        + _msg(b"d", b"x" * 300)
        + _msg(b"P", b"\x00COMMIT\x00\x00\x00")
        + _msg(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
        + _msg(b"E", b"\x00\x00\x00\x00\x00")
        + _msg(b"S", b"")
    )
    expected = [b"", b"Q", b"P", b"B", b"E", b"S"]
    for cut_at in range(len(stream) + 1):
        parser = _FrontendParser()
        segments = parser.feed(stream[:cut_at]) + parser.feed(stream[cut_at:])
        assert b"".join(s.data for s in segments) == stream
        assert [s.message.type for s in segments if s.message] == expected
        assert parser.phase is _Phase.TYPED
    # One byte at a time: CopyData is streamed, never held back whole.
    parser = _FrontendParser()
    pieces = [parser.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert sum(1 for p in pieces if p and p[0].message is None) >= 300


def test_backend_scanner_finds_ready_for_query_and_ssl_answers() -> None:
    stream = b"N" + _msg(b"R", b"\x00\x00\x00\x00") + _msg(b"Z", b"I") + _msg(b"C", b"x\x00")
    stream += _msg(b"Z", b"T")
    for cut_at in range(len(stream) + 1):
        scanner = _BackendScanner()
        scanner.expect_answer()
        first = scanner.feed(stream[:cut_at])
        ends = first + [cut_at + e for e in scanner.feed(stream[cut_at:])]
        assert ends == [16, 29]
        assert not scanner.blind
    scanner = _BackendScanner()
    scanner.expect_answer()
    assert scanner.feed(b"S\x16\x03\x01") == []
    assert scanner.blind  # TLS follows: nothing more can be parsed
