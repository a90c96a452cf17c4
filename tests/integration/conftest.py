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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs for one test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke_data(ray_local, tmp_path_factory) -> str:
    """The smoke recipe's prepared training data (written once per module, on the module's local Ray)."""
    from helpers import smoke_training_data

    return smoke_training_data(tmp_path_factory.getbasetemp() / "train-data")
