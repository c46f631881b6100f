"""Fixtures every test directory may use: one real PostgreSQL server for the whole session.

The server starts on first use only (SQLite-only runs never pay for it). Where none can be
started, every test that asks for it is skipped with the reason, and the run's summary says so.
"""

from __future__ import annotations

import pytest

from zerorun.testing.postgres import PostgresServer, PostgresUnavailable

_postgres_status: list[str] = []


@pytest.fixture(scope="session")
def postgres_server():
    """A running ``PostgresServer`` (role and database ``zerorun``; ``password_file`` 0600)."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as exc:
        _postgres_status.append(f"PostgreSQL tests SKIPPED: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    _postgres_status.append(f"PostgreSQL tests ran against a server from {server.bindir} on port {server.port}")
    yield server
    server.close()


def pytest_terminal_summary(terminalreporter):
    for line in _postgres_status:
        terminalreporter.write_line(line, yellow="SKIPPED" in line)
