"""A real partition: packets to the access point dropped in the kernel (iptables)."""

from __future__ import annotations

import time

import psycopg
import pytest

from symfo_failover import Kind, classify
from symfo_failover import _conformance as conformance
from symfo_failover.harness import BaseCluster, Partition, leftover_rules, probe
from symfo_failover.harness._partition import unacked_segments

pytestmark = [pytest.mark.server, pytest.mark.partition]

# Tuned keepalives, as in the DESIGN measurement: idle 1 s, interval 1 s, 2 probes.
KEEPALIVES = {"keepalives": "1", "keepalives_idle": "1", "keepalives_interval": "1",
              "keepalives_count": "2"}


def test_keepalives_notice_a_partition_during_a_query(
    symfo_cluster: BaseCluster, symfo_partition: Partition
) -> None:
    conn = psycopg.connect(symfo_cluster.conninfo(**KEEPALIVES), autocommit=True)
    pid = conn.info.backend_pid

    def cut() -> None:
        # Keepalives only run on a connection with nothing unacknowledged; the query's
        # ACK may still be on its way (delayed ACK), so wait for it before cutting.
        deadline = time.monotonic() + 5
        while unacked_segments(conn.pgconn.socket) and time.monotonic() < deadline:
            time.sleep(0.01)
        symfo_partition.start()

    # A 30 s query is running when the network goes; only keepalives can tell.
    raised = conformance.during_call(conn, symfo_cluster, cut)
    assert symfo_partition.active, "the call ended before the partition began"
    assert isinstance(raised, psycopg.OperationalError), raised
    assert classify(raised, connection=conn).kind is Kind.CONNECTION_LOST
    conn.close()
    assert leftover_rules(), "the DROP rules should still be in place"

    # New connections hang (SYN dropped) instead of being refused.
    assert probe(symfo_cluster.host, symfo_cluster.port, timeout=0.5).state == "timeout"

    symfo_partition.heal()
    assert not leftover_rules()
    with psycopg.connect(symfo_cluster.conninfo(), autocommit=True) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
        # The server still runs the query the client gave up on: the error came from the
        # keepalives, not from the query finishing.
        row = again.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        assert row == ("active", "SELECT pg_sleep(30)")
        again.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_user_timeout_notices_a_query_sent_into_a_partition(
    symfo_cluster: BaseCluster, symfo_partition: Partition
) -> None:
    # Data waiting for an acknowledgement is not covered by keepalives (TCP retransmits
    # for many minutes); tcp_user_timeout bounds it.
    conn = psycopg.connect(
        symfo_cluster.conninfo(**KEEPALIVES, tcp_user_timeout="2000"), autocommit=True
    )
    symfo_partition.start()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    assert leftover_rules(), "the error came while the partition was in place"
    assert classify(info.value, connection=conn).kind is Kind.CONNECTION_LOST
    conn.close()


def test_partition_is_idempotent_and_scoped(symfo_cluster: BaseCluster) -> None:
    other = Partition(symfo_cluster.host, symfo_cluster.port + 1)
    with Partition(symfo_cluster.host, symfo_cluster.port) as partition:
        partition.start()  # twice: still two rules, not four
        assert len(leftover_rules()) == 2
        # Another port is not affected by this partition.
        assert other.active is False
    assert not leftover_rules()


def test_partition_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Partition("10.0.0.1", 5432)
