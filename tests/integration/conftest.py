"""Fixtures shared by the job-database tests: one PostgreSQL server per module, and a `JobDB` on SQLite and on
PostgreSQL (emptied before each test, so tests in one module do not see each other's rows)."""

from __future__ import annotations

import pytest
from serve_services import postgres_server


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    from pipelines.serve.db import JobDB

    if request.param == "sqlite":
        d = JobDB(f"sqlite:///{tmp_path}/jobs.db")
    else:
        d = JobDB(request.getfixturevalue("pg_url"))
        with d.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM sora_jobs")
            conn.exec_driver_sql("DELETE FROM sora_usage")
    yield d
    d.close()
