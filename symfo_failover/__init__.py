"""symfo_failover: keep applications working through a PostgreSQL-family failover.

The public API is listed in ``__all__``; every other module is private.
"""


from ._aconnection import AsyncResilientConnection, connect_async
from ._classify import classify, sqlstate_of
from ._connection import ResilientConnection, connect
from ._errors import CommitOutcomeUnknown, FailoverError, RetriesExhausted, UnitContractError
from ._events import (
    CommitResolved,
    Event,
    FailureDetected,
    GaveUp,
    ReconnectAttempt,
    Reconnected,
    UnitInterrupted,
    UnitReplayed,
)
from ._kind import Failure, Kind
from ._policy import RetryPolicy
from ._target import SessionInfo

__version__ = "0.1.0"

__all__ = [
    "AsyncResilientConnection",
    "CommitOutcomeUnknown",
    "CommitResolved",
    "Event",
    "FailoverError",
    "Failure",
    "FailureDetected",
    "GaveUp",
    "Kind",
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
