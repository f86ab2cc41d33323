"""What the harness's scenarios cost, and what the fault proxy adds, measured in one run.

Run: .venv/bin/python benchmarks/bench_harness.py [--rounds N] [--partition-rounds N]
         [--containers]

- downtime: from the old server being gone to the access point accepting again, as the
  `Transition` timestamps say, for each cluster scenario.
- failover windows: ``failover(switch_delay=D, startup_delay=D)``; how long the access
  point refused (``listening_at - down_at``) and answered 57P03 (``accepting_at -
  listening_at``), next to the D asked for. ``--containers`` also runs it on
  `ContainerCluster` (needs a Docker engine and ``$SYMFO_CONTAINER_IMAGE``).
- fault proxy: the same round trips direct and through the proxy side by side; the delay
  ``set_latency(L)`` adds to a ``SELECT 1`` round trip (one chunk each way: 2 L expected),
  each delayed round trip next to an undelayed one; from ``cut()`` to the client's error
  on a session waiting in a query.
- raw partition detection (iptables DROP; needs root, else skipped): a plain psycopg
  session, no library: keepalives (idle 1 s, interval 1 s, 2 probes) noticing a partition
  under a running query, and ``tcp_user_timeout=2000`` ending a query sent into one. The
  resilient connection's own detection is in ``bench_resilient.py --only partition``.

The figures are a report; the tests assert only order, events and outcomes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from symfo_failover.harness import (
    BaseCluster,
    ContainerCluster,
    FaultProxy,
    LocalCluster,
    Partition,
    Transition,
    container_available,
    partition_available,
)
from symfo_failover.harness._partition import unacked_segments

try:
    import pyodbc
except ImportError:  # pragma: no cover - the ODBC lines are skipped
    pyodbc = None

LONG_SLEEP = "SELECT pg_sleep(60)"
KEEPALIVES = {"keepalives": "1", "keepalives_idle": "1", "keepalives_interval": "1",
              "keepalives_count": "2"}


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def _ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1e3:7.1f} ms   "
            f"p95 {_p95(values) * 1e3:7.1f} ms")


def _s(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s   max {max(values):6.2f} s"


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


# --- cluster scenarios --------------------------------------------------------------------


def _scenario(cluster: BaseCluster, rounds: int, op: Callable[[], Transition]) -> list[float]:
    downtimes = []
    for _ in range(rounds):
        t = op()
        if t.accepting_at is None:  # left down: bring it back and count that too
            t2 = cluster.start()
            assert t.down_at is not None
            assert t2.accepting_at is not None
            downtimes.append(t2.accepting_at - t.down_at)
        else:
            assert t.downtime is not None
            downtimes.append(t.downtime)
    return downtimes


def _windows(cluster: BaseCluster, rounds: int, delay: float) -> None:
    refused, starting = [], []
    for _ in range(rounds):
        t = cluster.failover(switch_delay=delay, startup_delay=delay)
        assert t.down_at is not None
        assert t.listening_at is not None
        assert t.accepting_at is not None
        refused.append(t.listening_at - t.down_at)
        starting.append(t.accepting_at - t.listening_at)
    asked = delay * 1e3
    print(f"  failover windows, switch_delay = startup_delay = {asked:.0f} ms, {rounds} rounds")
    print(f"    refused (down -> listening)       {_ms(refused)}   "
          f"over the delay: min {(min(refused) - delay) * 1e3:+.1f} ms")
    print(f"    57P03 (listening -> accepting)    {_ms(starting)}   "
          f"over the delay: min {(min(starting) - delay) * 1e3:+.1f} ms")


def _cluster_figures(cluster: BaseCluster, n: int, delay: float) -> None:
    print(f"  switchover             {_ms(_scenario(cluster, n, cluster.switchover))}")
    print(f"  failover (no delays)   {_ms(_scenario(cluster, n, cluster.failover))}")
    print(f"  node_down, then start  {_ms(_scenario(cluster, n, cluster.node_down))}")
    print(f"  crash, then start      {_ms(_scenario(cluster, n, cluster.crash))}")
    _windows(cluster, n, delay)


# --- fault proxy ----------------------------------------------------------------------------


def _round_trips(conninfo: str, n: int) -> float:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        began = time.perf_counter()
        for _ in range(n):
            conn.execute("SELECT 1").fetchone()
        return (time.perf_counter() - began) / n


def _connects(conninfo: str, n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        psycopg.connect(conninfo).close()
    return (time.perf_counter() - began) / n


def _latency(proxy: FaultProxy, via: str, rounds: int) -> None:
    print(f"  set_latency(L): added to a SELECT 1 round trip (expected 2 L), {rounds} rounds, "
          "each next to one without")
    with psycopg.connect(via, autocommit=True) as conn:

        def round_trip() -> float:
            began = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            return time.perf_counter() - began

        for latency in (0.01, 0.05, 0.2):
            added = []
            for _ in range(rounds):
                proxy.set_latency(0)
                plain = round_trip()
                proxy.set_latency(latency)
                added.append(round_trip() - plain)
            proxy.set_latency(0)
            expected = 2 * latency
            med = statistics.median(added)
            print(f"    L {latency * 1e3:5.0f} ms   added {_ms(added)}   "
                  f"median - 2 L {(med - expected) * 1e3:+6.1f} ms   "
                  f"min {min(added) * 1e3:6.1f} ms")


def _cut_round(proxy: FaultProxy, admin: psycopg.Connection[Any], connect: Callable[[], Any],
               pid_of: Callable[[Any], int], execute: Callable[[Any], object]) -> float:
    conn = connect()
    pid = pid_of(conn)
    failed: list[float] = []

    def call() -> None:
        try:
            execute(conn)
        except Exception:
            failed.append(time.perf_counter())

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    query = "SELECT state = 'active' FROM pg_stat_activity WHERE pid = %s AND query ~ 'pg_sleep'"
    _wait_for(lambda: admin.execute(query, (pid,)).fetchone() == (True,), 10, "query running")
    began = time.perf_counter()
    proxy.cut()
    worker.join(70)
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with contextlib.suppress(Exception):  # the ODBC connection may be unusable already
        conn.close()
    if not failed:
        raise RuntimeError("the call survived the cut")
    return failed[0] - began


def _cut(proxy: FaultProxy, direct: str, via_port: int, via: str, rounds: int) -> None:
    print(f"  cut() of a session waiting in pg_sleep: from the call to the client's error, "
          f"{rounds} rounds")
    with psycopg.connect(direct, autocommit=True) as admin:
        pg = [_cut_round(proxy, admin, lambda: psycopg.connect(via, autocommit=True),
                         lambda c: c.info.backend_pid, lambda c: c.execute(LONG_SLEEP))
              for _ in range(rounds)]
        print(f"    psycopg   {_ms(pg)}")
        if pyodbc is None:
            return
        odbc = (f"Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port={via_port};"
                "Database=postgres;Uid=postgres;Pwd=;")

        def pid_of(conn: Any) -> int:
            return int(conn.cursor().execute("SELECT pg_backend_pid()").fetchone()[0])

        od = [_cut_round(proxy, admin, lambda: pyodbc.connect(odbc, autocommit=True, timeout=5),
                         pid_of, lambda c: c.cursor().execute(LONG_SLEEP))
              for _ in range(rounds)]
        print(f"    pyodbc    {_ms(od)}")


# --- raw partition detection --------------------------------------------------------------


def _keepalive_round(cluster: BaseCluster) -> float:
    conn = psycopg.connect(cluster.conninfo(**KEEPALIVES), autocommit=True)
    pid = conn.info.backend_pid
    failed: list[float] = []

    def call() -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
        except psycopg.OperationalError:
            failed.append(time.monotonic())

    worker = threading.Thread(target=call, daemon=True)
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        worker.start()
        query = "SELECT state FROM pg_stat_activity WHERE pid = %s"
        _wait_for(lambda: admin.execute(query, (pid,)).fetchone() == ("active",), 10, "running")
    _wait_for(lambda: unacked_segments(conn.pgconn.socket) == 0, 5, "the query's ACK")
    partition = Partition(cluster.host, cluster.port)
    try:
        partition.start()
        began = time.monotonic()
        worker.join(40)
    finally:
        partition.heal()
    conn.close()
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    if not failed:
        raise RuntimeError("keepalives never noticed the partition")
    return failed[0] - began


def _user_timeout_round(cluster: BaseCluster) -> float:
    conn = psycopg.connect(cluster.conninfo(**KEEPALIVES, tcp_user_timeout="2000"),
                           autocommit=True)
    partition = Partition(cluster.host, cluster.port)
    try:
        partition.start()
        began = time.monotonic()
        try:
            conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return time.monotonic() - began
        raise RuntimeError("a query went through the partition")
    finally:
        partition.heal()
        conn.close()


def _partition(cluster: BaseCluster, rounds: int) -> None:
    ok, why = partition_available()
    if not ok:
        print(f"raw partition detection: skipped ({why})")
        return
    print(f"raw partition detection (psycopg, iptables DROP), {rounds} rounds each")
    keep = [_keepalive_round(cluster) for _ in range(rounds)]
    print(f"  keepalives idle 1 s, interval 1 s, count 2, under a running query   {_s(keep)}")
    user = [_user_timeout_round(cluster) for _ in range(rounds)]
    print(f"  tcp_user_timeout 2000 ms, a query sent into the partition          {_s(user)}")


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partition-rounds", type=int, default=2)
    parser.add_argument("--containers", action="store_true",
                        help="also the scenarios and windows on ContainerCluster")
    args = parser.parse_args()
    n = args.rounds
    with LocalCluster() as cluster:
        cluster.start()
        print(f"scenario downtime on LocalCluster, {n} rounds each")
        _cluster_figures(cluster, n, 0.4)

        direct = cluster.conninfo()
        with FaultProxy(cluster.host, cluster.port) as proxy:
            via = cluster.conninfo(host=proxy.host, port=str(proxy.port))
            rt_direct, rt_proxy = _round_trips(direct, 2000), _round_trips(via, 2000)
            c_direct, c_proxy = _connects(direct, 200), _connects(via, 200)
            print("fault proxy (same run, side by side)")
            print(f"  SELECT 1 round trip    direct {rt_direct * 1e6:7.1f} us   "
                  f"proxy {rt_proxy * 1e6:7.1f} us   x{rt_proxy / rt_direct:.2f}")
            print(f"  connect + close        direct {c_direct * 1e3:7.2f} ms   "
                  f"proxy {c_proxy * 1e3:7.2f} ms   x{c_proxy / c_direct:.2f}")
            _latency(proxy, via, n)
            _cut(proxy, direct, proxy.port, via, n)

        _partition(cluster, args.partition_rounds)

    if args.containers:
        ok, why = container_available()
        if not ok:
            print(f"ContainerCluster: skipped ({why})")
            return
        rounds = min(n, 5)
        with ContainerCluster() as containers:
            containers.start()
            print(f"scenario downtime on ContainerCluster ({containers.image}), "
                  f"{rounds} rounds each")
            _cluster_figures(containers, rounds, 0.5)


if __name__ == "__main__":
    main()
