"""What enforcing the unit-of-work contract costs per unit, and per statement in a unit.

Run: .venv/bin/python benchmarks/bench_contract.py [--units N] [--rounds N]

- per unit: the library's own contract work around one unit (the guard, lending the
  connection and taking it back, the coroutine checks, reading the transaction's state
  locally), timed alone with no I/O, next to one whole unit (one INSERT, fsync on)
  through ``run()``: the share of a unit the contract costs.
- per statement: ``SELECT 1`` inside a unit through the cursor class ``conn.execute()``
  uses there (it checks for transaction control) against psycopg's own ``Cursor`` on the
  same connection in the same transaction, in alternating batches.

Figures, not assertions; the machine is shared, so the ratios matter, not the times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg

import symfo_failover as sf
from symfo_failover._contract import UnitGuard, refuse_awaitable_result, refuse_coroutine_function
from symfo_failover._driver_psycopg import PsycopgDriver
from symfo_failover._errors import UnitContractError, flavoured
from symfo_failover.harness import LocalServer


def contract_work(driver: PsycopgDriver, raw: Any, fn: Any, n: int) -> float:
    """Seconds per unit of exactly what run() adds for the contract (no I/O)."""
    error_class = flavoured(UnitContractError, driver.programming_error)
    started = time.perf_counter()
    for _ in range(n):
        refuse_coroutine_function(fn)
        guard = UnitGuard(error_class)
        lent = driver.lend(raw, guard)
        guard.active = False
        driver.reclaim(raw, guard)
        refuse_awaitable_result(lent, fn)
        driver.unit_left(raw)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with LocalServer(settings={"fsync": "on"}) as srv:
        srv.start()
        with sf.connect(srv.conninfo(), autocommit=True) as setup:
            setup.execute("CREATE TABLE bench (n int)")
        with sf.connect(srv.conninfo()) as rc:
            raw = rc.connection
            driver = PsycopgDriver()

            def unit(conn: Any) -> None:
                conn.execute("INSERT INTO bench VALUES (1)")

            per_unit, contract, inside, outside = [], [], [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                for _ in range(args.units):
                    rc.run(unit)
                per_unit.append((time.perf_counter() - started) / args.units)
                contract.append(contract_work(driver, raw, unit, args.units * 10))

                def statements(conn: Any) -> tuple[float, float]:
                    # Alternating batches in one transaction: the unit's guarded cursor
                    # class, and psycopg's own Cursor on the same connection.
                    guarded = plain = 0.0
                    checked = conn.cursor_factory  # what conn.execute() uses in a unit
                    for _ in range(10):
                        t = time.perf_counter()
                        for _ in range(args.units // 10):
                            checked(conn).execute("SELECT 1")
                        guarded += time.perf_counter() - t
                        t = time.perf_counter()
                        for _ in range(args.units // 10):
                            psycopg.Cursor(conn).execute("SELECT 1")
                        plain += time.perf_counter() - t
                    return guarded / args.units, plain / args.units

                g, p = rc.run(statements)
                inside.append(g)
                outside.append(p)
    unit_us = statistics.median(per_unit) * 1e6
    contract_us = statistics.median(contract) * 1e6
    in_us, out_us = statistics.median(inside) * 1e6, statistics.median(outside) * 1e6
    print(f"{args.rounds} rounds x {args.units} units, psycopg, fsync on")
    print(f"  one unit through run() (INSERT + COMMIT)     {unit_us:8.1f} us")
    print(f"  of which the contract's own work (no I/O)    {contract_us:8.2f} us "
          f"({contract_us / unit_us:.1%} of a unit)")
    print(f"  SELECT 1 in a unit, the unit's cursor class  {in_us:8.1f} us")
    print(f"  SELECT 1 in a unit, psycopg.Cursor (plain)   {out_us:8.1f} us "
          f"(checked/plain x{in_us / out_us:.3f})")


if __name__ == "__main__":
    main()
