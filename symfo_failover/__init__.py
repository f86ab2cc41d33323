"""symfo_failover: keep applications working through a PostgreSQL-family failover.

The public API is listed in ``__all__``; every other module is private.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._aconnection import AsyncResilientConnection, connect_async
from ._classify import classify, sqlstate_of
from ._connection import ResilientConnection, connect
from ._errors import CommitOutcomeUnknown, FailoverError, RetriesExhausted, UnitContractError
from ._events import (
    CommitResolved,
    Event,
    FailureDetected,
    GaveUp,
    PoolConnectionReplaced,
    PoolFailover,
    PoolRefilled,
    ReconnectAttempt,
    Reconnected,
    UnitInterrupted,
    UnitReplayed,
)
from ._kind import Failure, Kind
from ._policy import RetryPolicy
from ._pool_state import FailoverStats
from ._target import SessionInfo

if _TYPE_CHECKING:
    from ._apool import AsyncFailoverPool
    from ._odbc_pool import OdbcFailoverPool
    from ._pool import FailoverPool

__version__ = "0.1.0"

#: The pools need psycopg_pool (or pyodbc): imported when first used.
_LAZY = {
    "FailoverPool": "._pool",
    "AsyncFailoverPool": "._apool",
    "OdbcFailoverPool": "._odbc_pool",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'symfo_failover' has no attribute {name!r}")
    import importlib

    try:
        mod = importlib.import_module(module, __name__)
    except ImportError as exc:
        extra = "odbc" if name.startswith("Odbc") else "pool"
        raise ImportError(f"{name} needs symfo-failover[{extra}]: "
                          f"pip install 'symfo-failover[{extra}]' ({exc})") from exc
    value = getattr(mod, name)
    globals()[name] = value
    return value


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
    "sqlstate_of",
]
