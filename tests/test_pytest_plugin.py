"""The pytest plugin, as a user meets it: a test file of theirs, run by pytest."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.server

USER_TEST = '''
import psycopg
import pytest
from symfo_failover import Kind, classify


def test_my_app_survives_a_failover(symfo_cluster):
    conn = psycopg.connect(symfo_cluster.conninfo(), autocommit=True)
    conn.execute("CREATE TABLE orders (id int)")
    symfo_cluster.failover()
    with pytest.raises(psycopg.Error) as info:
        conn.execute("INSERT INTO orders VALUES (1)")
    assert classify(info.value, connection=conn).kind is Kind.CONNECTION_LOST
    with psycopg.connect(symfo_cluster.conninfo(), autocommit=True) as again:
        again.execute("INSERT INTO orders VALUES (1)")
        assert again.execute("SHOW cluster_name").fetchone() == ("node-b",)


def test_proxy_cuts(symfo_cluster, symfo_proxy):
    conn = psycopg.connect(
        symfo_cluster.conninfo(host=symfo_proxy.host, port=str(symfo_proxy.port)),
        autocommit=True,
    )
    assert symfo_proxy.cut() == 1
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_server(symfo_server):
    with psycopg.connect(symfo_server.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
'''


def test_a_user_test_file_uses_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_unknown_backend_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_x(symfo_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess("--symfo-backend=vm")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*invalid choice*"])
