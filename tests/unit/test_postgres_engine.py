"""The private PostgreSQL the tests run on (``tests/engines/postgres.py``)."""

from __future__ import annotations

import psycopg


def test_each_test_gets_its_own_empty_database(postgres_server, postgres_dsn):
    """A test's database is empty and private: a table made in it is not in another fresh database."""
    assert postgres_dsn.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        conn.execute("CREATE TABLE mine (x int)")
    other = postgres_server.create_database()
    try:
        with psycopg.connect(other) as conn:
            assert conn.execute("SELECT to_regclass('mine')").fetchone()[0] is None
    finally:
        postgres_server.drop_database(other)
