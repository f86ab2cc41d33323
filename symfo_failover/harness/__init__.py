"""A failover test harness: real PostgreSQL servers on loopback, killed on demand."""

from ._binaries import ServerBinariesNotFound, find_bindir
from ._server import LocalServer, ServerError

__all__ = ["LocalServer", "ServerBinariesNotFound", "ServerError", "find_bindir"]
