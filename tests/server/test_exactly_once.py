"""The bank workload: transfers through run() while the cluster fails over and over.

Several threads, each with its own ResilientConnection through a fault proxy in front of
the cluster's access point, make transfers while the test injects faults: node down,
crash, switchover, failover, lost COMMIT replies (committed and not), held COMMITs with
the old session alive, and cuts. At the end the books must balance and every transfer
that run() returned must be in the ledger exactly once.

Some units misbehave (a nested run(), a commit() inside, a COMMIT statement, close(), a
swallowed database error): each must raise UnitContractError, and none of them may have
committed anything, faults or not.

The commit ledger is installed (``symfo_failover.install_ledger``), as the docs advise:
every lost COMMIT is then decided by the unit's token, and no call may end in
CommitOutcomeUnknown. A shorter bank without it runs the transaction-id path, where a
crash while COMMIT was in flight can leave the outcome unknown (docs/exactly-once.md).

CI runs 100 faults per driver with the ledger and 30 without; ``SYMFO_SOAK=1`` runs the
soak (1000 faults per driver, with the ledger).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

import symfo_failover as sf
from symfo_failover.harness import FaultProxy, LocalCluster

pytestmark = pytest.mark.server

ACCOUNTS = 10
OPENING_BALANCE = 1000
THREADS = 4
#: One unit in this many misbehaves.
MISBEHAVE_EVERY = 7
PASSWORD = "bank-secret"
POLICY = sf.RetryPolicy(deadline=60)


@pytest.fixture(params=["psycopg", pytest.param("pyodbc", marks=pytest.mark.odbc)])
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def open_bank(accounts: int, password: str, *, ledger: bool = True
              ) -> Iterator[tuple[LocalCluster, FaultProxy]]:
    """A cluster with the bank's tables (and the commit ledger unless ``ledger`` is
    False), and a fault proxy in front of it."""
    # With a password: a server going down in the middle of the handshake must not look
    # like a wrong password.
    with LocalCluster(password=password) as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute(
                "INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                (OPENING_BALANCE, accounts),
            )
            # No unique constraint: a transfer stored twice must show as two rows.
            conn.execute("CREATE TABLE ledger (transfer_id text, src int, dst int, amount int)")
        if ledger:
            sf.install_ledger(cluster.conninfo())
        with FaultProxy(cluster.host, cluster.port) as proxy:
            yield cluster, proxy


@pytest.fixture
def bank() -> Iterator[tuple[LocalCluster, FaultProxy]]:
    with open_bank(ACCOUNTS, PASSWORD) as opened:
        yield opened


@pytest.fixture
def bank_without_ledger() -> Iterator[tuple[LocalCluster, FaultProxy]]:
    with open_bank(ACCOUNTS, PASSWORD, ledger=False) as opened:
        yield opened


def transfer(raw: Any, transfer_id: str, src: int, dst: int, amount: int) -> str:
    """One unit of work; the update order is random, so deadlocks (40P01) happen too."""
    if isinstance(raw, psycopg.Connection):
        def exe(sql: str, *params: Any) -> None:
            raw.execute(sql, params)
    else:
        def exe(sql: str, *params: Any) -> None:
            raw.execute(sql.replace("%s", "?"), *params)
    exe("UPDATE accounts SET balance = balance - %s WHERE id = %s", amount, src)
    exe("UPDATE accounts SET balance = balance + %s WHERE id = %s", amount, dst)
    exe("INSERT INTO ledger VALUES (%s, %s, %s, %s)", transfer_id, src, dst, amount)
    return transfer_id


#: How a misbehaving unit breaks the contract, and the rule it must be told it broke.
MISBEHAVIOURS = {
    "nested": "nested-run",
    "commit": "ended-transaction",
    "sql_commit": "ended-transaction",
    "close": "closed-connection",
    "swallow": "swallowed-error",  # psycopg only: psqlODBC rolls back just the statement
}


def misbehaving(rc: sf.ResilientConnection, how: str) -> Callable[..., str]:
    """A transfer that breaks the contract after it wrote everything a transfer writes."""
    def unit(raw: Any, transfer_id: str, src: int, dst: int, amount: int) -> str:
        transfer(raw, transfer_id, src, dst, amount)
        try:
            if how == "nested":
                rc.run(transfer, transfer_id + "-inner", dst, src, amount)
            elif how == "commit":
                raw.commit()
            elif how == "sql_commit":
                raw.execute("COMMIT")
            elif how == "close":
                raw.close()
            elif how == "swallow":
                raw.execute("SELECT 1/0")
        except (sf.UnitContractError, psycopg.errors.DivisionByZero):
            pass  # the unit swallows the refusal (or its own error) and returns
        return transfer_id

    return unit


@dataclass
class Results:
    returned: list[str] = field(default_factory=list)
    raised: dict[str, BaseException] = field(default_factory=dict)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    resolutions: collections.Counter[str] = field(default_factory=collections.Counter)
    #: What decided each lost COMMIT: ``ledger`` or ``xid``.
    via: collections.Counter[str] = field(default_factory=collections.Counter)
    failovers: int = 0
    #: Misbehaving transfers: the rule each must be refused for.
    bad: dict[str, str] = field(default_factory=dict)
    #: Events in which the password showed (checked after the run: a hook's own
    #: assertion would be swallowed by the library).
    leaks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The events of each transfer, to explain a failure.
    trail: dict[str, list[sf.Event]] = field(default_factory=dict)
    current: threading.local = field(default_factory=threading.local)

    def on_event(self, event: sf.Event) -> None:
        with self.lock:
            if PASSWORD in repr(event):
                self.leaks.append(repr(event))
            key = getattr(self.current, "transfer", None)
            if key is not None:
                self.trail.setdefault(key, []).append(event)
            self.events[type(event).__name__] += 1
            if isinstance(event, sf.CommitResolved):
                self.resolutions[event.status] += 1
                self.via[event.via] += 1
            if isinstance(event, sf.Reconnected) and event.failover:
                self.failovers += 1

    def committed(self) -> int:
        with self.lock:
            return len(self.returned)


def worker(conninfo: str, driver: str, seed: int, stop: threading.Event, out: Results) -> None:
    rng = random.Random(seed)
    try:
        rc = sf.connect(conninfo, driver=driver, policy=POLICY, on_event=out.on_event)
    except BaseException as exc:  # recorded; the test fails on it
        out.raised[f"connect-{seed}"] = exc
        return
    hows = [h for h in MISBEHAVIOURS if driver == "psycopg" or h != "swallow"]
    with rc:
        while not stop.is_set():
            transfer_id = str(uuid.uuid4())
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            unit: Callable[..., str] = transfer
            if rng.randrange(MISBEHAVE_EVERY) == 0:
                how = rng.choice(hows)
                transfer_id = f"bad-{how}-{transfer_id}"
                unit = misbehaving(rc, how)
                with out.lock:
                    out.bad[transfer_id] = MISBEHAVIOURS[how]
            out.current.transfer = transfer_id
            try:
                got = rc.run(unit, transfer_id, src, dst, rng.randint(1, 50))
            except Exception as exc:
                with out.lock:
                    out.raised[transfer_id] = exc
                continue
            assert got == transfer_id
            with out.lock:
                out.returned.append(transfer_id)


class Injector:
    """Injects faults of every kind, in a shuffled cycle, between committed transfers."""

    def __init__(self, cluster: LocalCluster, proxy: FaultProxy, out: Results) -> None:
        self.cluster, self.proxy, self.out = cluster, proxy, out
        self.counts: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(7)
        self.kinds: dict[str, Callable[[], bool]] = {
            "switchover": self.switchover,
            "node_down": self.node_down,
            "crash": self.crash,
            "failover": self.failover,
            "commit_drop": self.commit_drop,
            "commit_hold": self.commit_hold,
            "cut": self.cut,
        }

    def run(self, faults: int) -> None:
        order: list[str] = []
        while sum(self.counts.values()) < faults:
            if not order:
                order = list(self.kinds)
                self.rng.shuffle(order)
            self.wait_for_traffic()
            kind = order.pop()
            if self.kinds[kind]():
                self.counts[kind] += 1

    def wait_for_traffic(self, transfers: int = 3, timeout: float = 5.0) -> None:
        """Let a few transfers commit, so that each fault hits live traffic."""
        target = self.out.committed() + transfers
        deadline = time.monotonic() + timeout
        while self.out.committed() < target and time.monotonic() < deadline:
            time.sleep(0.005)

    def switchover(self) -> bool:
        self.cluster.switchover()
        return True

    def node_down(self) -> bool:
        self.cluster.node_down()
        time.sleep(self.rng.uniform(0.0, 0.2))
        self.cluster.start()
        return True

    def crash(self) -> bool:
        self.cluster.crash()
        time.sleep(self.rng.uniform(0.0, 0.2))
        self.cluster.start()
        return True

    def failover(self) -> bool:
        self.cluster.failover(switch_delay=self.rng.uniform(0.0, 0.1),
                              startup_delay=self.rng.uniform(0.0, 0.1))
        return True

    def commit_drop(self) -> bool:
        self.proxy.arm_commit_drop()
        return self.proxy.wait_commit_faults(10)

    def commit_hold(self) -> bool:
        self.proxy.arm_commit_hold()
        fired = self.proxy.wait_commit_faults(10)
        time.sleep(self.rng.uniform(0.0, 0.2))
        self.proxy.release_held()  # the COMMIT arrives late, or never: both must be safe
        return fired

    def cut(self) -> bool:
        return self.proxy.cut() > 0


def run_bank(driver: str, cluster: LocalCluster, proxy: FaultProxy, faults: int,
             *, ledger: bool = True) -> None:
    if driver == "psycopg":
        conninfo = cluster.conninfo(host=proxy.host, port=str(proxy.port))
    else:
        conninfo = cluster.odbc_connection_string(Server=proxy.host, Port=str(proxy.port))
    out = Results()
    stop = threading.Event()
    threads = [
        threading.Thread(target=worker, args=(conninfo, driver, seed, stop, out),
                         name=f"bank-{seed}", daemon=True)
        for seed in range(THREADS)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    injector = Injector(cluster, proxy, out)
    with capture_logs() as logged:
        try:
            injector.run(faults)
            injector.wait_for_traffic(transfers=THREADS * 5)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"workers did not finish: {hung}"
    spent = time.monotonic() - started
    books = read_books(cluster)

    print(f"\n{driver}: {sum(injector.counts.values())} faults {dict(injector.counts)} in "
          f"{spent:.1f} s; {len(out.returned)} transfers returned, {len(out.raised)} raised "
          f"({len(out.bad)} misbehaving units refused); "
          f"events {dict(out.events)}; commit resolutions {dict(out.resolutions)} "
          f"decided by {dict(out.via)}; failovers seen {out.failovers}")

    assert sum(injector.counts.values()) >= faults
    check_books(out, books, logged, accounts=ACCOUNTS, password=PASSWORD, unknown_bound=2,
                ledger=ledger)


@dataclass(frozen=True)
class Books:
    """What the server holds after a bank run."""

    total: tuple[int, ...] | None
    #: transfer id -> how many rows it has in the ledger
    in_ledger: dict[str, int]
    #: (account, balance, what its ledger rows add up to)
    flows: list[tuple[int, int, int]]


def read_books(cluster: LocalCluster) -> Books:
    with psycopg.connect(cluster.conninfo()) as conn:
        total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
        rows = conn.execute("SELECT transfer_id, count(*) FROM ledger GROUP BY 1").fetchall()
        flows = conn.execute(
            "SELECT a.id, a.balance, "
            "  coalesce((SELECT sum(amount) FROM ledger WHERE dst = a.id), 0) - "
            "  coalesce((SELECT sum(amount) FROM ledger WHERE src = a.id), 0) "
            "FROM accounts a ORDER BY a.id"
        ).fetchall()
    return Books(total, dict(rows), flows)


def check_books(out: Any, books: Books, logged: LogCapture, *, accounts: int, password: str,
                unknown_bound: int, also_asked: Iterable[str] = (),
                ledger: bool = True) -> dict[str, BaseException]:
    """The bank's invariants, for the sync bank and the async one alike (``out``: what
    the workers saw; ``also_asked``: transfers whose calls ended otherwise, e.g. timed
    out). With the commit ledger installed (``ledger``) no outcome may be unknown and
    every lost COMMIT was decided by it. Returns the well-behaved transfers that
    raised."""
    in_ledger = books.in_ledger
    # No secret in any event or log line.
    assert not out.leaks, out.leaks[:3]
    assert logged.lines, "the events were logged"
    assert not [line for line in logged.lines if password in line]
    # Every misbehaving unit was refused for the rule it broke, and committed nothing.
    assert out.bad, "some units misbehaved"
    wrong = {t: (rule, out.raised.get(t)) for t, rule in out.bad.items()
             if not (isinstance(out.raised.get(t), sf.UnitContractError)
                     and getattr(out.raised[t], "rule", None) == rule)}
    assert not wrong, f"misbehaving units not refused as such: {list(wrong.items())[:3]}"
    assert not [t for t in in_ledger if t.startswith("bad-")], "a misbehaving unit committed"
    good_raised: dict[str, BaseException] = {
        t: exc for t, exc in out.raised.items() if t not in out.bad}
    # The books balance, and every account's balance is exactly what its ledger says.
    assert books.total == (accounts * OPENING_BALANCE,)
    for account, balance, net in books.flows:
        assert balance == OPENING_BALANCE + net, f"account {account}"
    # Every transfer that returned is in the ledger exactly once.
    duplicated = {k: n for k, n in in_ledger.items() if n != 1}
    assert not duplicated, f"stored more than once: {duplicated}"
    missing = [t for t in out.returned if t not in in_ledger]
    assert not missing, f"returned but not stored: {explain(out, missing)}"
    # Nothing that raised is in the ledger, unless its COMMIT's outcome was unknown.
    stray = [t for t, exc in good_raised.items()
             if t in in_ledger and not isinstance(exc, sf.CommitOutcomeUnknown)]
    assert not stray, f"raised but stored: {explain(out, stray)}"
    # Nothing in the ledger that nobody asked for.
    assert set(in_ledger) <= set(out.returned) | set(good_raised) | set(also_asked)
    # Every failover was outlived: the only errors are COMMITs whose outcome the server
    # could not vouch for (a restart while COMMIT was in flight, docs/resilient.md).
    others = [t for t, exc in good_raised.items() if not isinstance(exc, sf.CommitOutcomeUnknown)]
    assert not others, explain(out, others)
    if ledger:
        # The ledger decides every lost COMMIT, across crashes: nothing is unknown.
        assert not good_raised, explain(out, list(good_raised))
        assert out.via["ledger"] > 0
        assert out.via["xid"] == 0, out.via
    else:
        # Rare: at most ``unknown_bound`` in a run, or 2% of the transfers in a long one.
        assert len(good_raised) <= max(unknown_bound, len(out.returned) // 50), \
            explain(out, list(good_raised))
        assert out.via["ledger"] == 0, out.via
    # Both branches of a lost COMMIT were exercised, and failovers were seen as such.
    assert out.resolutions["committed"] > 0
    assert out.resolutions["aborted"] > 0
    assert out.failovers > 0
    assert out.events["UnitReplayed"] > 0
    return good_raised


class LogCapture(logging.Handler):
    """Every line a logger logs during the run, at any level: the records, and each
    formatted with all its fields (to look for a secret in)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record) + " " + repr(record.__dict__))


@contextlib.contextmanager
def capture_logs(name: str = "symfo_failover") -> Iterator[LogCapture]:
    """The log lines of logger ``name`` (the library's) at every level, for the
    duration of the block."""
    logged = LogCapture()
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(logged)
    logger.setLevel(logging.DEBUG)
    try:
        yield logged
    finally:
        logger.removeHandler(logged)
        logger.setLevel(level)


def explain(out: Any, transfers: list[str]) -> str:
    """The error (or interruption) and the events of a few transfers, for a message."""
    ended_otherwise = getattr(out, "cancelled", {})
    lines = []
    for t in transfers[:5]:
        lines.append(f"{t}: {out.raised.get(t, ended_otherwise.get(t))!r}")
        for e in out.trail.get(t, []):
            fields = {k: v for k, v in e.fields().items() if k != "target"}
            lines.append(f"    {type(e).__name__} {fields}")
    return "\n".join(lines)


def test_bank_transfers_commit_exactly_once_through_100_faults(
    driver: str, bank: tuple[LocalCluster, FaultProxy]
) -> None:
    run_bank(driver, *bank, faults=100)


def test_bank_without_the_ledger_uses_the_transaction_id(
    driver: str, bank_without_ledger: tuple[LocalCluster, FaultProxy]
) -> None:
    run_bank(driver, *bank_without_ledger, faults=30, ledger=False)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_bank_soak(driver: str, bank: tuple[LocalCluster, FaultProxy]) -> None:
    run_bank(driver, *bank, faults=1000)


def test_nothing_is_left_over_after_the_bank(driver: str) -> None:
    """The cluster, the proxy and the workers of a bank run leave nothing behind."""
    before = {t.ident for t in threading.enumerate()}
    with LocalCluster() as cluster:
        cluster.start()
        data_dir = str(cluster.data_dir)
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint)")
            conn.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                         (OPENING_BALANCE, ACCOUNTS))
            conn.execute("CREATE TABLE ledger (transfer_id text, src int, dst int, amount int)")
        with FaultProxy(cluster.host, cluster.port) as proxy:
            run_bank(driver, cluster, proxy, faults=7, ledger=False)
        # The check below sees a running server's processes (it can fail).
        assert len(_processes_using(data_dir)) > 3
    leftover_threads = [t.name for t in threading.enumerate()
                        if t.ident not in before and t.is_alive()]
    assert not leftover_threads
    assert not _processes_using(data_dir)


def _processes_using(path: str) -> list[int]:
    """Live server processes working in ``path`` (every server process, orphaned backends
    too, has its data directory as its working directory)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if state not in ("Z", "X") and cwd.startswith(path):
            found.append(int(entry))
    return found
