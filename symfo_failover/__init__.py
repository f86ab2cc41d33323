"""symfo_failover: keep applications working through a PostgreSQL-family failover.

The public API is listed in ``__all__``; every other module is private.
"""


from ._classify import classify, sqlstate_of
from ._kind import Failure, Kind

__version__ = "0.1.0"

__all__ = [
    "Failure",
    "Kind",
    "__version__",
    "classify",
    "sqlstate_of",
]
