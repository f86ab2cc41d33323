"""symfo_failover: keep applications working through a PostgreSQL-family failover.

The public API is listed in ``__all__``; every other module is private.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from ._aconnection import AsyncResilientConnection, connect_async
    from ._apool import AsyncFailoverPool
    from ._classify import classify, sqlstate_of
    from ._connection import ResilientConnection, connect
    from ._errors import (
        CommitOutcomeUnknown,
        FailoverError,
        LedgerUnavailable,
        RetriesExhausted,
        UnitContractError,
    )
    from ._events import (
        CommitResolved,
        Event,
        FailureDetected,
        GaveUp,
        LedgerNotUsed,
        LedgerPruned,
        PoolConnectionReplaced,
        PoolFailover,
        PoolRefilled,
        ReconnectAttempt,
        Reconnected,
        UnitInterrupted,
        UnitReplayed,
    )
    from ._kind import Failure, Kind
    from ._ledger_admin import (
        LedgerInstall,
        LedgerStatus,
        install_ledger,
        ledger_status,
        prune_ledger,
    )
    from ._odbc_pool import OdbcFailoverPool
    from ._policy import RetryPolicy
    from ._pool import FailoverPool
    from ._pool_state import FailoverStats
    from ._target import SessionInfo

__version__ = "0.1.0"

#: Every public name, from the module that defines it, imported when first used: the
#: pools need psycopg_pool (or pyodbc), and the ``symfo-failover`` command starts (and
#: can take a Ctrl-C cleanly) before the library is loaded.
_LAZY = {
    "AsyncResilientConnection": "._aconnection",
    "connect_async": "._aconnection",
    "classify": "._classify",
    "sqlstate_of": "._classify",
    "ResilientConnection": "._connection",
    "connect": "._connection",
    "CommitOutcomeUnknown": "._errors",
    "FailoverError": "._errors",
    "LedgerUnavailable": "._errors",
    **{name: "._ledger_admin" for name in (
        "LedgerInstall", "LedgerStatus", "install_ledger", "ledger_status", "prune_ledger")},
    "RetriesExhausted": "._errors",
    "UnitContractError": "._errors",
    **{name: "._events" for name in (
        "CommitResolved", "Event", "FailureDetected", "GaveUp", "LedgerNotUsed",
        "LedgerPruned", "PoolConnectionReplaced",
        "PoolFailover", "PoolRefilled", "ReconnectAttempt", "Reconnected",
        "UnitInterrupted", "UnitReplayed")},
    "Failure": "._kind",
    "Kind": "._kind",
    "RetryPolicy": "._policy",
    "FailoverStats": "._pool_state",
    "SessionInfo": "._target",
    "FailoverPool": "._pool",
    "AsyncFailoverPool": "._apool",
    "OdbcFailoverPool": "._odbc_pool",
}
_NEEDS_EXTRA = {"FailoverPool": "pool", "AsyncFailoverPool": "pool", "OdbcFailoverPool": "odbc"}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'symfo_failover' has no attribute {name!r}")
    import importlib

    try:
        mod = importlib.import_module(module, __name__)
    except ImportError as exc:
        extra = _NEEDS_EXTRA.get(name)
        if extra is None:
            raise
        raise ImportError(f"{name} needs symfo-failover[{extra}]: "
                          f"pip install 'symfo-failover[{extra}]' ({exc})") from exc
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AsyncFailoverPool",
    "AsyncResilientConnection",
    "CommitOutcomeUnknown",
    "CommitResolved",
    "Event",
    "FailoverError",
    "FailoverPool",
    "FailoverStats",
    "Failure",
    "FailureDetected",
    "GaveUp",
    "Kind",
    "LedgerInstall",
    "LedgerNotUsed",
    "LedgerPruned",
    "LedgerStatus",
    "LedgerUnavailable",
    "OdbcFailoverPool",
    "PoolConnectionReplaced",
    "PoolFailover",
    "PoolRefilled",
    "ReconnectAttempt",
    "Reconnected",
    "ResilientConnection",
    "RetriesExhausted",
    "RetryPolicy",
    "SessionInfo",
    "UnitContractError",
    "UnitInterrupted",
    "UnitReplayed",
    "__version__",
    "classify",
    "connect",
    "connect_async",
    "install_ledger",
    "ledger_status",
    "prune_ledger",
    "sqlstate_of",
]
