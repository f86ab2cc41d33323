"""Bad input to the psycopg pools is refused at once, before anything connects."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

pytest.importorskip("psycopg_pool")

import symfo_failover as sf

POOLS = [sf.FailoverPool, sf.AsyncFailoverPool]
NOWHERE = "host=127.0.0.1 port=1 connect_timeout=1"


@pytest.mark.parametrize("cls", POOLS)
@pytest.mark.parametrize(("kwargs", "says"), [
    ({"policy": "fast"}, "policy must be a RetryPolicy"),
    ({"on_event": 42}, "on_event must be callable"),
    ({"connection_class": dict}, "connection_class must be a psycopg"),
])
def test_bad_arguments_raise_type_error(cls: Any, kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(TypeError, match=says):
        cls(NOWHERE, open=False, **kwargs)


def test_the_wrong_kind_of_unit_is_refused_before_a_connection_is_taken() -> None:
    """A coroutine function for the sync pool's run(); a generator function or no
    function at all for the async pool's: TypeError, even on a pool that is not open
    (nothing was asked of it). (A plain function given to the async run() is refused
    once it returned something that cannot be awaited, as on AsyncResilientConnection.)"""
    async def aunit(conn: Any) -> None:
        return None

    def generator(conn: Any) -> Any:
        yield conn

    pool = sf.FailoverPool(NOWHERE, open=False)
    with pytest.raises(TypeError, match="coroutine"):
        pool.run(aunit)

    async def main() -> None:
        apool = sf.AsyncFailoverPool(NOWHERE, open=False)
        with pytest.raises(TypeError, match="generator function"):
            await apool.run(generator)
        with pytest.raises(TypeError, match="needs a function"):
            await apool.run(42)  # type: ignore[arg-type]

    asyncio.run(main())


def test_the_pools_are_psycopg_pools_of_the_given_class() -> None:
    class Mine(psycopg.Connection[Any]):
        pass

    pool: sf.FailoverPool[Any] = sf.FailoverPool(NOWHERE, open=False, connection_class=Mine)
    assert pool.connection_class is Mine
