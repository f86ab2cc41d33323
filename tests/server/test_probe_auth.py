"""probe() with a password: the server's real SQLSTATE for a refused login, on real servers.

What PostgreSQL 15 answered, measured with these tests:

- SCRAM and MD5 alike: a wrong password, a role without a password and an *unknown
  role* all fail authentication with 28P01 (the server runs a doomed exchange for a role
  that does not exist, so that nobody can probe role names); only then does it check the
  role's LOGIN (28000), the connection limit (53300), the database (3D000).
- trust: AuthenticationOk at once, then 3D000 / 28000 as without a password.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from symfo_failover import _probe
from symfo_failover._probe import ProbeResult, ScramClient, ScramError, probe
from symfo_failover.harness import LocalServer

pytestmark = pytest.mark.server

PASSWORD = "s3cret-pw"
ALICE_PASSWORD = "alice's pw"
LOCAL_TRUST = "local all all trust\n"


@pytest.fixture(autouse=True)
def _no_sslmode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # probe(sslmode=None) reads PGSSLMODE, as libpq does.
    monkeypatch.delenv("PGSSLMODE", raising=False)


def _sockdir(srv: LocalServer) -> str:
    return str(srv._sockdir)  # the server's Unix socket directory (local lines: trust)


def _admin(srv: LocalServer) -> psycopg.Connection[tuple[object, ...]]:
    """A superuser session over the Unix socket, whatever the host lines say."""
    return psycopg.connect(srv.conninfo(host=_sockdir(srv), connect_timeout="5"), autocommit=True)


def _set_hba(srv: LocalServer, text: str) -> None:
    """Write pg_hba.conf; on a running server, reload it and wait until it is in use."""
    # Rewriting in place keeps the file's owner (the server's OS user).
    (srv.data_dir / "pg_hba.conf").write_text(text, encoding="utf-8")
    if not srv.running:
        return
    with _admin(srv) as conn:
        before = conn.execute("SELECT clock_timestamp()").fetchone()
        conn.execute("SELECT pg_reload_conf()")
    assert before is not None
    # The postmaster rereads the file on SIGHUP, asynchronously; a new session inherits
    # its reload time, so a new session says when the postmaster has done it.
    deadline = time.monotonic() + 10
    while True:
        with _admin(srv) as conn:
            row = conn.execute("SELECT pg_conf_load_time() >= %s", (before[0],)).fetchone()
        if row == (True,):
            return
        assert time.monotonic() < deadline, "the server did not reload pg_hba.conf"
        time.sleep(0.02)


def _make_roles(srv: LocalServer) -> None:
    with _admin(srv) as conn:
        conn.execute(sql.SQL("CREATE ROLE alice LOGIN PASSWORD {}").format(ALICE_PASSWORD))
        conn.execute("CREATE ROLE nologin NOLOGIN PASSWORD 'nologin-pw'")
        conn.execute("CREATE ROLE limited LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 0")
        conn.execute("CREATE DATABASE appdb")


def _ask(srv: LocalServer, **kwargs: object) -> ProbeResult:
    return probe(srv.host, srv.port, timeout=5.0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scram_server() -> Iterator[LocalServer]:
    """Password authentication as the harness sets it up: scram-sha-256 host lines."""
    with LocalServer(password=PASSWORD) as srv:
        srv.start()
        _make_roles(srv)
        yield srv


@pytest.fixture(scope="module")
def md5_server() -> Iterator[LocalServer]:
    """MD5: passwords stored as md5 hashes and md5 host lines, so the server asks for MD5."""
    with LocalServer(password=PASSWORD, settings={"password_encryption": "md5"}) as srv:
        _set_hba(srv, LOCAL_TRUST + "host all all 127.0.0.1/32 md5\n")
        srv.start()
        with _admin(srv) as conn:
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(PASSWORD))
            stored = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'"
            ).fetchone()
        assert stored is not None
        assert str(stored[0]).startswith("md5")
        _make_roles(srv)
        yield srv


@pytest.fixture(scope="module")
def trust_server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        srv.start()
        yield srv


@pytest.fixture
def methods(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which password method the probe really answered (spies, the protocol is real)."""
    used: list[str] = []
    real_md5 = _probe._md5_response

    def md5_spy(*args: object) -> bytes | None:
        used.append("md5")
        return real_md5(*args)  # type: ignore[arg-type]

    class ScramSpy(ScramClient):
        __slots__ = ()

        def client_first(self) -> bytes:
            used.append("scram")
            return super().client_first()

    monkeypatch.setattr(_probe, "_md5_response", md5_spy)
    monkeypatch.setattr(_probe, "ScramClient", ScramSpy)
    return used


# --- the SCRAM arithmetic, no I/O ----------------------------------------------------------

# RFC 7677, section 3.
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_rfc7677_test_vector() -> None:
    client = ScramClient(b"pencil", nonce=RFC_NONCE, user="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.verify_server_final(RFC_SERVER_FINAL)
    assert client.verified


def test_scram_refuses_a_wrong_server_signature() -> None:
    client = ScramClient(b"pencil", nonce=RFC_NONCE, user="user")
    client.client_final(RFC_SERVER_FIRST)
    forged = b"v=" + b"A" * 43 + b"="
    assert not client.verify_server_final(forged)
    assert not client.verify_server_final(b"e=invalid-proof")
    assert not client.verified


def test_scram_as_postgresql_sends_it() -> None:
    client = ScramClient(b"pw")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")  # no channel binding, user name from the startup
    nonce = first[len(b"n,,n=,r="):]
    assert len(nonce) == 24  # 18 random bytes, base64, as libpq
    assert ScramClient(b"pw").client_first() != first


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someone-elses-nonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extended
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing added
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=not base64!,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=999999999",  # CPU bomb
        b"m=mandatory-extension,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
        b"\xff\xfe",
    ],
)
def test_scram_refuses_a_bad_server_first_message(server_first: bytes) -> None:
    with pytest.raises(ScramError) as info:
        ScramClient(b"pencil", nonce=RFC_NONCE).client_final(server_first)
    assert "pencil" not in str(info.value)


def test_saslprep_as_postgresql() -> None:
    # ASCII as it is (control characters too); non-ASCII spaces mapped, NFKC applied;
    # what SASLprep prohibits is used raw, as libpq and the server do.
    assert _probe._saslprep(b"pencil\x07") == b"pencil\x07"
    assert _probe._saslprep("a\u00a0b".encode()) == b"a b"
    assert _probe._saslprep("\u2168".encode()) == b"IX"
    assert _probe._saslprep("a\u00adb".encode()) == b"ab"  # soft hyphen: mapped to nothing
    assert _probe._saslprep("\u0627a".encode()) == "\u0627a".encode()  # bidi: raw
    assert _probe._saslprep(b"\xff\xfe") == b"\xff\xfe"  # not UTF-8: raw


def test_the_password_never_shows() -> None:
    credentials = _probe._Credentials.make("postgres", PASSWORD)
    assert credentials is not None
    assert PASSWORD not in repr(credentials)
    assert "pencil" not in repr(ScramClient(b"pencil"))
    # A password that cannot be encoded is not used, and raises nothing that would carry it.
    assert _probe._Credentials.make("postgres", "x\ud800y") is None


# --- SCRAM-SHA-256 on a real server ------------------------------------------------------


def test_scram_right_password_opens_a_session(
    scram_server: LocalServer, methods: list[str]
) -> None:
    result = _ask(scram_server, password=PASSWORD)
    assert result == ProbeResult("accepting", None, authenticated=True, standby=False)
    assert methods == ["scram"]
    assert _ask(scram_server, user="alice", password=ALICE_PASSWORD, database="appdb") == (
        ProbeResult("accepting", None, authenticated=True, standby=False)
    )


def test_scram_wrong_password_is_28p01(scram_server: LocalServer) -> None:
    result = _ask(scram_server, password="wrong")
    assert result == ProbeResult("error", "28P01", authenticated=False)
    assert "wrong" not in repr(result)
    assert "wrong" not in str(result)


def test_scram_missing_database_is_3d000(scram_server: LocalServer) -> None:
    assert _ask(scram_server, password=PASSWORD, database="no_such_db") == (
        ProbeResult("error", "3D000", authenticated=True)
    )
    # With a wrong password the server never says whether the database exists.
    assert _ask(scram_server, password="wrong", database="no_such_db").sqlstate == "28P01"


def test_scram_unknown_role_fails_authentication_28p01(scram_server: LocalServer) -> None:
    # PostgreSQL runs a doomed SCRAM exchange for a role that does not exist: 28P01, as
    # for a wrong password (not 28000), so that role names cannot be probed.
    assert _ask(scram_server, user="ghost", password="anything") == (
        ProbeResult("error", "28P01", authenticated=False)
    )


def test_scram_role_without_login_is_28000(scram_server: LocalServer) -> None:
    # 28000 comes after authentication: the password was right, the role may not log in.
    assert _ask(scram_server, user="nologin", password="nologin-pw") == (
        ProbeResult("error", "28000", authenticated=True)
    )
    assert _ask(scram_server, user="nologin", password="wrong").sqlstate == "28P01"


def test_scram_connection_limit_is_53300(scram_server: LocalServer) -> None:
    assert _ask(scram_server, user="limited", password="limited-pw") == (
        ProbeResult("error", "53300", authenticated=True)
    )


def test_without_a_password_nothing_changes(scram_server: LocalServer) -> None:
    for database in ("postgres", "no_such_db"):
        assert _ask(scram_server, database=database) == ProbeResult("accepting")
    assert str(_ask(scram_server)) == "accepting"


@pytest.mark.parametrize(
    # Unknown values too (libpq would refuse them, and its sslmode is case-sensitive).
    "sslmode", ["require", "verify-ca", "verify-full", "VERIFY-FULL", "DISABLE", "bogus"]
)
def test_sslmode_requiring_ssl_never_authenticates(
    scram_server: LocalServer, methods: list[str], sslmode: str
) -> None:
    # The probe speaks no TLS; libpq would encrypt: the password is not used at all.
    # (A wrong password would be 28P01, a missing database 3D000, had it been sent.)
    for password in (PASSWORD, "wrong"):
        for database in ("postgres", "no_such_db"):
            result = _ask(scram_server, password=password, database=database, sslmode=sslmode)
            assert result == ProbeResult("accepting", None, authenticated=False)
    assert methods == []


def test_pgsslmode_from_the_environment_counts(
    scram_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLMODE", "require")
    assert _ask(scram_server, password="wrong") == ProbeResult("accepting")
    # An explicit sslmode wins over the environment, as in libpq.
    assert _ask(scram_server, password="wrong", sslmode="prefer").sqlstate == "28P01"


@pytest.mark.parametrize("sslmode", [None, "prefer", "allow", "disable"])
def test_server_without_ssl_plaintext_modes_authenticate(
    scram_server: LocalServer, sslmode: str | None
) -> None:
    # The harness servers run with ssl = off: they answer an SSLRequest with 'N', and
    # libpq would then go on in plaintext (disable: it sends no SSLRequest at all).
    assert _ask(scram_server, password=PASSWORD, database="no_such_db", sslmode=sslmode) == (
        ProbeResult("error", "3D000", authenticated=True)
    )


def test_scram_over_a_unix_socket_ignores_sslmode(scram_server: LocalServer) -> None:
    # libpq ignores sslmode on Unix-domain sockets (never SSL there): so does the probe.
    srv = scram_server
    _set_hba(srv, "local all alice scram-sha-256\n" + LOCAL_TRUST
             + "host all all 127.0.0.1/32 scram-sha-256\n")
    try:
        sock = _sockdir(srv)
        for sslmode in (None, "require"):
            assert probe(sock, srv.port, user="alice", password=ALICE_PASSWORD,
                         database="no_such_db", sslmode=sslmode) == (
                ProbeResult("error", "3D000", authenticated=True)
            )
        assert probe(sock, srv.port, user="alice", password="wrong") == (
            ProbeResult("error", "28P01", authenticated=False)
        )
        assert probe(sock, srv.port, user="alice") == ProbeResult("accepting")
    finally:
        _set_hba(srv, LOCAL_TRUST + "host all all 127.0.0.1/32 scram-sha-256\n")


def test_a_starting_server_is_57p03_with_a_password() -> None:
    with LocalServer(password=PASSWORD) as srv:
        srv.start(hold_in_recovery=True)
        assert _ask(srv, password=PASSWORD) == ProbeResult("error", "57P03")
        assert _ask(srv, password="wrong") == ProbeResult("error", "57P03")
        srv.promote()
        assert _ask(srv, password=PASSWORD).authenticated
        srv.stop()
        assert _ask(srv, password=PASSWORD) == ProbeResult("refused")


@pytest.mark.japanese
def test_a_japanese_server_gives_the_same_sqlstates(ja_locale: str) -> None:
    with LocalServer(password=PASSWORD, lc_messages=ja_locale) as srv:
        srv.start()
        with psycopg.connect(srv.conninfo(), autocommit=True) as conn:
            said = conn.execute("SELECT current_setting('lc_messages')").fetchone()
        assert said == (ja_locale,)
        assert _ask(srv, password="wrong") == ProbeResult("error", "28P01")
        assert _ask(srv, password=PASSWORD, database="no_such_db") == (
            ProbeResult("error", "3D000", authenticated=True)
        )
        # The server really told them in Japanese (its log speaks as it does).
        fatal = [line for line in srv.log_path.read_text(encoding="utf-8").splitlines()
                 if "FATAL" in line]
        assert fatal
        assert all(not line.isascii() for line in fatal)


# --- MD5 -----------------------------------------------------------------------------------


def test_md5_right_password_opens_a_session(md5_server: LocalServer, methods: list[str]) -> None:
    assert _ask(md5_server, password=PASSWORD) == ProbeResult(
        "accepting", authenticated=True, standby=False)
    assert _ask(md5_server, user="alice", password=ALICE_PASSWORD) == (
        ProbeResult("accepting", authenticated=True, standby=False)
    )
    assert methods == ["md5", "md5"]


def test_md5_wrong_password_is_28p01(md5_server: LocalServer, methods: list[str]) -> None:
    assert _ask(md5_server, password="wrong") == ProbeResult("error", "28P01")
    assert methods == ["md5"]


def test_md5_missing_database_is_3d000(md5_server: LocalServer) -> None:
    assert _ask(md5_server, password=PASSWORD, database="no_such_db") == (
        ProbeResult("error", "3D000", authenticated=True)
    )


def test_md5_unknown_role_fails_authentication_28p01(
    md5_server: LocalServer, methods: list[str]
) -> None:
    # As with SCRAM: the server asks for MD5 with a made-up salt, then says 28P01.
    assert _ask(md5_server, user="ghost", password="anything") == ProbeResult("error", "28P01")
    assert methods == ["md5"]


def test_md5_role_without_login_is_28000(md5_server: LocalServer) -> None:
    assert _ask(md5_server, user="nologin", password="nologin-pw") == (
        ProbeResult("error", "28000", authenticated=True)
    )


# --- trust and cleartext -------------------------------------------------------------------


def test_trust_missing_database_is_3d000_as_before(
    trust_server: LocalServer, methods: list[str]
) -> None:
    for password in (None, "whatever"):
        assert _ask(trust_server, password=password, database="no_such_db") == (
            ProbeResult("error", "3D000", authenticated=True)
        )
        assert _ask(trust_server, password=password, user="ghost") == (
            ProbeResult("error", "28000", authenticated=True)
        )
        assert _ask(trust_server, password=password) == ProbeResult(
            "accepting", None, True, standby=False)
    assert methods == []


def test_a_cleartext_password_is_never_sent() -> None:
    with LocalServer(password=PASSWORD) as srv:
        _set_hba(srv, LOCAL_TRUST + "host all all 127.0.0.1/32 password\n")
        srv.start()
        # Had the password gone out, the missing database would say 3D000.
        for sslmode in (None, "disable"):
            assert _ask(srv, password=PASSWORD, database="no_such_db", sslmode=sslmode) == (
                ProbeResult("accepting", None, authenticated=False)
            )
        log = srv.log_path.read_text(encoding="utf-8", errors="replace")
    assert "no_such_db" not in log
    assert "authentication failed" not in log


# --- a server with SSL on ------------------------------------------------------------------


def _self_signed(directory: Path, owner: tuple[int, int]) -> tuple[Path, Path]:
    cert, key = directory / "probe-test.crt", directory / "probe-test.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    for path in (cert, key):
        path.chmod(0o600)
        os.chown(path, *owner)
    return cert, key


@pytest.fixture(scope="module")
def ssl_server() -> Iterator[LocalServer]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test server's certificate")
    with LocalServer(password=PASSWORD) as srv:
        st = srv.data_dir.stat()
        cert, key = _self_signed(srv.data_dir, (st.st_uid, st.st_gid))
        srv.settings.update(ssl="on", ssl_cert_file=str(cert), ssl_key_file=str(key))
        # A trusted role too, to see that the plain startup after 'S' still tells 3D000.
        _set_hba(srv, LOCAL_TRUST + "host all trusted 127.0.0.1/32 trust\n"
                 "host all all 127.0.0.1/32 scram-sha-256\n")
        srv.start()
        with _admin(srv) as conn:
            conn.execute("CREATE ROLE trusted LOGIN")
        with psycopg.connect(srv.conninfo(sslmode="require"), autocommit=True) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                ).fetchone() == (True,)
        yield srv


@pytest.mark.parametrize("sslmode", [None, "prefer", "allow"])
def test_ssl_server_prefer_does_not_authenticate_in_plaintext(
    ssl_server: LocalServer, methods: list[str], sslmode: str | None
) -> None:
    # The server answers the SSLRequest with 'S': libpq would encrypt, the probe cannot,
    # so it asks again in plaintext without the password, as without one.
    for password in (PASSWORD, "wrong"):
        assert _ask(ssl_server, password=password, database="no_such_db", sslmode=sslmode) == (
            ProbeResult("accepting", None, authenticated=False)
        )
    assert methods == []
    # The fresh plain startup still tells what it can without a password.
    assert _ask(ssl_server, user="trusted", password="x", database="no_such_db",
                sslmode=sslmode) == ProbeResult("error", "3D000", authenticated=True)


def test_ssl_server_disable_authenticates_in_plaintext(ssl_server: LocalServer) -> None:
    # sslmode=disable: libpq itself would send the password in plaintext.
    assert _ask(ssl_server, password=PASSWORD, database="no_such_db", sslmode="disable") == (
        ProbeResult("error", "3D000", authenticated=True)
    )
    assert _ask(ssl_server, password="wrong", sslmode="disable") == ProbeResult("error", "28P01")


def test_ssl_server_require_does_not_authenticate(ssl_server: LocalServer) -> None:
    assert _ask(ssl_server, password="wrong", sslmode="require") == ProbeResult("accepting")


# --- the states that do not depend on the password ----------------------------------------


@pytest.mark.parametrize("password", [None, PASSWORD])
def test_nothing_listening_is_refused(password: str | None) -> None:
    with LocalServer() as srv:
        port = srv.port  # never started
        assert probe("127.0.0.1", port, password=password) == ProbeResult("refused")
        assert probe(_sockdir(srv), port, password=password) == ProbeResult("refused")
