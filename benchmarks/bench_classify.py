"""How long classify() takes, next to a bare dict lookup of the same code, in one run."""

from __future__ import annotations

import timeit

import psycopg
import pyodbc

from symfo_failover import classify
from symfo_failover._sqlstates import EXACT_BY_CODE


def main() -> None:
    n = 100_000
    admin = psycopg.errors.AdminShutdown("terminating connection")
    lost = psycopg.OperationalError("consuming input failed")
    odbc = pyodbc.OperationalError("08S01", "[08S01] communication link failure")
    cases = {
        "dict lookup (baseline)": lambda: EXACT_BY_CODE.get("57P01"),
        "classify('57P01')": lambda: classify("57P01"),
        "classify(psycopg AdminShutdown)": lambda: classify(admin),
        "classify(psycopg lost, no SQLSTATE)": lambda: classify(lost),
        "classify(pyodbc 08S01)": lambda: classify(odbc),
    }
    base = None
    for name, fn in cases.items():
        per_call = min(timeit.repeat(fn, number=n, repeat=5)) / n
        base = base or per_call
        print(f"{name:40} {per_call * 1e6:8.2f} us/call  x{per_call / base:6.1f}")


if __name__ == "__main__":
    main()
