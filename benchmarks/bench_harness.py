"""What the harness's scenarios cost, and what the fault proxy adds, measured in one run.

Run: .venv/bin/python benchmarks/bench_harness.py [--rounds N]
Downtime is from the old server being gone to the access point accepting again, as the
`Transition` timestamps say. The proxy figures put the same round trips direct and
through the proxy side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import psycopg

from symfo_failover.harness import FaultProxy, LocalCluster, Transition


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"median {statistics.median(values) * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms"


def _scenario(cluster: LocalCluster, rounds: int, op: Callable[[], Transition]) -> list[float]:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    n = args.rounds
    with LocalCluster() as cluster:
        cluster.start()
        print(f"scenario downtime on LocalCluster, {n} rounds each")
        print(f"  switchover             {_ms(_scenario(cluster, n, cluster.switchover))}")
        print(f"  failover (no delays)   {_ms(_scenario(cluster, n, cluster.failover))}")
        print(f"  node_down, then start  {_ms(_scenario(cluster, n, cluster.node_down))}")
        print(f"  crash, then start      {_ms(_scenario(cluster, n, cluster.crash))}")

        direct = cluster.conninfo()
        with FaultProxy(cluster.host, cluster.port) as proxy:
            via = cluster.conninfo(host=proxy.host, port=str(proxy.port))
            rt_direct, rt_proxy = _round_trips(direct, 2000), _round_trips(via, 2000)
            c_direct, c_proxy = _connects(direct, 200), _connects(via, 200)
        print("fault proxy overhead (same run, side by side)")
        print(f"  SELECT 1 round trip    direct {rt_direct * 1e6:7.1f} us   "
              f"proxy {rt_proxy * 1e6:7.1f} us   x{rt_proxy / rt_direct:.2f}")
        print(f"  connect + close        direct {c_direct * 1e3:7.2f} ms   "
              f"proxy {c_proxy * 1e3:7.2f} ms   x{c_proxy / c_direct:.2f}")


if __name__ == "__main__":
    main()
