"""The rules of ``symfo-failover check`` (`evaluate`), as tables and properties. No I/O."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symfo_failover._check import (
    SETTINGS,
    ServerFacts,
    describe,
    evaluate,
    is_fujitsu,
)
from symfo_failover._driver_psycopg import PsycopgDriver
from symfo_failover._report import STATUSES, Finding

LINUX = "PostgreSQL 15.18 (Debian 15.18-0+deb12u1) on x86_64-pc-linux-gnu, compiled by gcc"
WINDOWS = "PostgreSQL 15.4, compiled by Visual C++ build 1929, 64-bit"

#: A server that passes every rule.
GOOD_SETTINGS = {
    "restart_after_crash": "off",
    "port": "5432",
    "data_directory": "/shared/data",
    "synchronous_commit": "on",
    "synchronous_standby_names": "",
    "fsync": "on",
    "full_page_writes": "on",
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
    "idle_session_timeout": "0",
    "default_transaction_read_only": "off",
}
GOOD = ServerFacts(
    settings=GOOD_SETTINGS,
    version=LINUX,
    version_num=150018,
    in_recovery=False,
    wal_senders=0,
    superuser=False,
    may_xact_status=True,
    may_terminate_backend=True,
    wal_directory="/shared/data/pg_wal",
    ledger_access="UISD",
    ledger_read=True,
)


def facts(settings: dict[str, str | None] | None = None, **changes: Any) -> ServerFacts:
    """GOOD with some settings (None: not visible) and fields changed."""
    merged = {**GOOD_SETTINGS, **(settings or {})}
    return dataclasses.replace(GOOD, settings=merged, **changes)


def finding(f: ServerFacts, name: str) -> Finding:
    found = [x for x in evaluate(f) if x.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_a_good_server_has_no_failure_and_no_warning() -> None:
    statuses = {f.name: f.status for f in evaluate(GOOD)}
    assert set(statuses.values()) <= {"ok", "info"}, statuses
    assert statuses["restart_after_crash"] == "ok"
    assert statuses["synchronous_commit"] == "ok"
    assert statuses["tcp_keepalives"] == "ok"


def test_the_findings_and_their_order_are_fixed() -> None:
    assert [f.name for f in evaluate(GOOD)] == [
        "restart_after_crash", "port", "data_directory", "wal_directory",
        "keystore_location", "synchronous_commit", "fsync", "full_page_writes",
        "tcp_keepalives", "idle_session_timeout", "pg_xact_status", "pg_terminate_backend",
        "read_only", "commit_ledger",
    ]


@pytest.mark.parametrize(("access", "status", "says"), [
    ("UISD", "ok", "usable and pruned"),
    ("UIS", "warn", "may not prune"),
    ("U", "warn", "INSERT on symfo_failover.ledger"),
    ("", "warn", "USAGE on schema symfo_failover"),
    (None, "warn", "ledger install"),
])
def test_the_commit_ledger_is_checked_for_this_role(access: str | None, status: str,
                                                    says: str) -> None:
    found = finding(facts(ledger_access=access), "commit_ledger")
    assert found.status == status
    assert says in f"{found.value} {found.why}"
    assert found.guide is None  # not the vendor guide's


def test_without_pg_xact_status_the_ledger_still_decides() -> None:
    assert finding(facts(may_xact_status=False, ledger_access=None),
                   "pg_xact_status").status == "fail"
    assert finding(facts(may_xact_status=False, ledger_access="UISD"),
                   "pg_xact_status").status == "info"


def test_an_unreadable_ledger_is_not_guessed() -> None:
    assert finding(facts(ledger_read=False), "commit_ledger").status == "info"


@pytest.mark.parametrize(
    ("name", "value", "status"),
    [
        ("restart_after_crash", "off", "ok"),
        ("restart_after_crash", "on", "fail"),
        ("restart_after_crash", "banana", "info"),
        ("restart_after_crash", None, "info"),
        ("fsync", "on", "ok"),
        ("fsync", "off", "fail"),
        ("fsync", None, "info"),
        ("full_page_writes", "on", "ok"),
        ("full_page_writes", "off", "fail"),
        ("idle_session_timeout", "0", "ok"),
        ("idle_session_timeout", "60000", "warn"),
        ("idle_session_timeout", "1min", "info"),
        ("idle_session_timeout", None, "info"),
        ("port", "5432", "info"),
        ("port", "26500", "info"),
        ("data_directory", "/shared/data", "info"),
        ("data_directory", None, "info"),
    ],
)
def test_single_setting_rules(name: str, value: str | None, status: str) -> None:
    assert finding(facts({name: value}), name).status == status


@pytest.mark.parametrize(("name", "section"), [
    ("restart_after_crash", "3.2.3"),
    ("port", "3.2.3"),
    ("data_directory", "3.2.2"),
    ("wal_directory", "3.2.2"),
    ("keystore_location", "3.3"),
])
def test_the_guide_sections(name: str, section: str) -> None:
    assert finding(GOOD, name).guide == section


def test_restart_after_crash_on_says_why() -> None:
    f = finding(facts({"restart_after_crash": "on"}), "restart_after_crash")
    assert f.expected == "off"
    assert "cluster manager" in f.why


def test_idle_session_timeout_says_the_cost() -> None:
    f = finding(facts({"idle_session_timeout": "60000"}), "idle_session_timeout")
    assert f.value == "60000 ms"
    assert "57P05" in f.why
    assert "reconnect" in f.why


def test_idle_session_timeout_missing_on_an_old_server_is_explained() -> None:
    f = finding(facts({"idle_session_timeout": None}, version_num=130011),
                "idle_session_timeout")
    assert f.status == "info"
    assert "13 or older" in f.value


# --- synchronous_commit --------------------------------------------------------------

ALONE: dict[str, Any] = {"wal_senders": 0}
ASYNC: dict[str, Any] = {"wal_senders": 1}
SYNC: dict[str, Any] = {"wal_senders": 1, "sync_names": "standby1"}
STANDBY: dict[str, Any] = {"wal_senders": 0, "in_recovery": True}


@pytest.mark.parametrize(
    ("value", "topology", "status"),
    [
        ("off", ALONE, "fail"),
        ("off", SYNC, "fail"),
        ("false", ALONE, "fail"),
        ("local", ALONE, "ok"),
        ("local", ASYNC, "fail"),
        ("local", SYNC, "fail"),
        ("local", STANDBY, "fail"),
        ("remote_write", ALONE, "ok"),
        ("remote_write", SYNC, "warn"),
        ("remote_write", ASYNC, "warn"),
        ("on", ALONE, "ok"),
        ("on", SYNC, "ok"),
        ("on", ASYNC, "warn"),
        ("remote_apply", SYNC, "ok"),
        ("remote_apply", ALONE, "ok"),
        ("sometimes", ALONE, "info"),
        (None, ALONE, "info"),
    ],
)
def test_synchronous_commit(value: str | None, topology: dict[str, Any], status: str) -> None:
    topology = dict(topology)
    names = topology.pop("sync_names", "")
    f = facts({"synchronous_commit": value, "synchronous_standby_names": names}, **topology)
    assert finding(f, "synchronous_commit").status == status


def test_synchronous_standby_names_alone_makes_a_replica_cluster() -> None:
    f = facts({"synchronous_commit": "local", "synchronous_standby_names": "ANY 1 (s1)"})
    got = finding(f, "synchronous_commit")
    assert got.status == "fail"
    assert "promoted" in got.why


def test_asynchronous_replication_is_named_in_the_warning() -> None:
    got = finding(facts(wal_senders=2), "synchronous_commit")
    assert "synchronous_standby_names" in got.why


# --- tcp_keepalives ------------------------------------------------------------------

def keepalives(idle: str, interval: str, count: str) -> dict[str, str | None]:
    return {"tcp_keepalives_idle": idle, "tcp_keepalives_interval": interval,
            "tcp_keepalives_count": count}


@pytest.mark.parametrize(
    ("idle", "interval", "count", "version", "status"),
    [
        ("60", "10", "6", LINUX, "ok"),  # 2 min
        ("5", "2", "3", LINUX, "ok"),
        ("0", "0", "0", LINUX, "warn"),  # system default: about two hours
        ("60", "0", "0", LINUX, "warn"),
        ("60", "10", "0", LINUX, "warn"),
        ("7200", "75", "9", LINUX, "warn"),  # set, but no shorter than the default
        ("600", "10", "6", LINUX, "warn"),
        ("x", "10", "6", LINUX, "info"),
        ("-1", "10", "6", LINUX, "info"),
        # Windows: the count is fixed (10) and an interval of 0 is one second.
        ("60", "0", "0", WINDOWS, "ok"),
        ("0", "0", "0", WINDOWS, "warn"),
    ],
)
def test_tcp_keepalives(idle: str, interval: str, count: str, version: str, status: str) -> None:
    f = facts(keepalives(idle, interval, count), version=version)
    assert finding(f, "tcp_keepalives").status == status


def test_default_keepalives_say_hours_and_give_advice() -> None:
    got = finding(facts(keepalives("0", "0", "0")), "tcp_keepalives")
    assert "2 h" in got.value
    assert "tcp_keepalives_idle = 60" in got.why
    assert "locks" in got.why


def test_keepalives_read_from_the_socket_are_used_for_the_estimate() -> None:
    f = facts(keepalives("0", "0", "0"), socket_keepalives={
        "tcp_keepalives_idle": "30", "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "2"})
    got = finding(f, "tcp_keepalives")
    assert got.status == "warn"  # still the system's default: another OS may differ
    assert "40 s" in got.value


def test_keepalives_not_visible() -> None:
    got = finding(facts({"tcp_keepalives_idle": None}), "tcp_keepalives")
    assert got.status == "info"
    assert "not visible" in got.value


# --- Fujitsu -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("keystore", "data", "status"),
    [
        ("C:\\keystore", "D:\\database\\inst1", "ok"),
        ("/local/keystore", "/shared/data", "ok"),
        ("/shared/data/keystore", "/shared/data", "fail"),
        ("d:\\Database\\inst1\\keystore", "D:/database/inst1", "fail"),
        ("keystore", "/shared/data", "fail"),  # relative: the server runs in the data dir
        ("/shared/data2/keystore", "/shared/data", "ok"),
        ("/shared/data/keystore", None, "ok"),  # data directory not visible
        ("", "/shared/data", "info"),
        (None, "/shared/data", "info"),
    ],
)
def test_keystore_location(keystore: str | None, data: str | None, status: str) -> None:
    f = facts({"keystore_location": keystore, "data_directory": data}, fujitsu=True)
    assert finding(f, "keystore_location").status == status


def test_keystore_location_on_a_community_server() -> None:
    got = finding(GOOD, "keystore_location")
    assert got.status == "info"
    assert got.value == "not a Fujitsu server"


@pytest.mark.parametrize(
    ("settings", "version", "expected"),
    [
        ({}, LINUX, False),
        ({"keystore_location": ""}, LINUX, True),
        ({}, "PostgreSQL 15.5 (FUJITSU Enterprise Postgres 15 SP1)", True),
        ({}, "Symfoware Server V12.6.0", True),
        ({}, None, False),
    ],
)
def test_is_fujitsu(settings: dict[str, str | None], version: str | None,
                    expected: bool) -> None:
    assert is_fujitsu(settings, version) is expected


# --- privileges and role -------------------------------------------------------------

@pytest.mark.parametrize(
    ("may", "superuser", "status"),
    [(True, False, "ok"), (True, True, "ok"), (False, False, "fail"), (None, False, "info")],
)
def test_pg_xact_status_privilege(may: bool | None, superuser: bool, status: str) -> None:
    got = finding(facts(may_xact_status=may, superuser=superuser, ledger_access=None),
                  "pg_xact_status")
    assert got.status == status
    if status == "fail":
        assert "CommitOutcomeUnknown" in got.why
        assert "GRANT EXECUTE" in got.why


@pytest.mark.parametrize(
    ("may", "superuser", "status"),
    [(True, False, "ok"), (False, True, "ok"), (False, False, "warn"), (None, False, "info")],
)
def test_pg_terminate_backend_privilege(may: bool | None, superuser: bool,
                                        status: str) -> None:
    got = finding(facts(may_terminate_backend=may, superuser=superuser),
                  "pg_terminate_backend")
    assert got.status == status


@pytest.mark.parametrize(
    ("in_recovery", "dtro", "status", "says"),
    [
        (False, "off", "ok", "read-write"),
        (True, "off", "info", "standby"),
        (False, "on", "info", "default_transaction_read_only"),
        (None, None, "info", "not visible"),
    ],
)
def test_read_only(in_recovery: bool | None, dtro: str | None, status: str, says: str) -> None:
    got = finding(facts({"default_transaction_read_only": dtro}, in_recovery=in_recovery),
                  "read_only")
    assert got.status == status
    assert says in got.value


def test_what_is_not_visible_is_info_and_says_so() -> None:
    got = evaluate(facts({"data_directory": None}, wal_directory=None))
    by_name = {f.name: f for f in got}
    for name in ("data_directory", "wal_directory"):
        assert by_name[name].status == "info"
        assert by_name[name].value == "not visible to this role"


def test_an_empty_fact_sheet_gives_only_info() -> None:
    assert {f.status for f in evaluate(ServerFacts())} == {"info"}


# --- the target description ----------------------------------------------------------

@pytest.mark.parametrize(
    ("conninfo", "shown"),
    [
        ("host=db.example port=26500 user=app dbname=sales password=hunter2",
         "app@db.example:26500/sales"),
        ("postgresql://app:hunter2@a:5432,b:5433/sales", "app@a:5432,b:5433/sales"),
    ],
)
def test_describe_names_the_target_without_its_password(conninfo: str, shown: str) -> None:
    text = describe(PsycopgDriver().target(conninfo, {}))
    assert text == shown
    assert "hunter2" not in text


# --- properties ----------------------------------------------------------------------

values = st.one_of(
    st.none(),
    st.sampled_from(["on", "off", "0", "1", "-1", "", "local", "remote_write", "remote_apply",
                     "60", "7200", "C:\\ks", "/data", "ks"]),
    st.text(max_size=12),
)
fact_sheets = st.builds(
    ServerFacts,
    settings=st.dictionaries(st.sampled_from((*SETTINGS, "keystore_location")), values),
    socket_keepalives=st.dictionaries(
        st.sampled_from(("tcp_keepalives_idle", "tcp_keepalives_interval",
                         "tcp_keepalives_count")), values),
    version=st.one_of(st.none(), st.sampled_from([LINUX, WINDOWS]), st.text(max_size=20)),
    version_num=st.one_of(st.none(), st.integers(90000, 190000)),
    fujitsu=st.booleans(),
    in_recovery=st.one_of(st.none(), st.booleans()),
    wal_senders=st.one_of(st.none(), st.integers(0, 5)),
    superuser=st.one_of(st.none(), st.booleans()),
    may_xact_status=st.one_of(st.none(), st.booleans()),
    may_terminate_backend=st.one_of(st.none(), st.booleans()),
    wal_directory=st.one_of(st.none(), st.text(max_size=20)),
)


@given(fact_sheets)
def test_any_facts_give_one_well_formed_finding_per_check(f: ServerFacts) -> None:
    got = evaluate(f)
    assert [x.name for x in got] == [x.name for x in evaluate(GOOD)]
    for x in got:
        assert x.status in STATUSES
        assert isinstance(x.value, str)
        assert x.value
        assert x.status in ("ok", "info") or x.why, x


@given(fact_sheets)
def test_nothing_unseen_is_failed(f: ServerFacts) -> None:
    """A fact that could not be read is never a failure (only what was seen is judged)."""
    blind = dataclasses.replace(f, settings={}, may_xact_status=None,
                                may_terminate_backend=None, superuser=None)
    assert {x.status for x in evaluate(blind)} == {"info"}
