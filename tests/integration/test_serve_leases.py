"""Leases that follow progress: a stalled job is given up, retried up to queue.max_attempts with the reason
recorded, and a stale attempt's writes are refused by its token (so it cannot overwrite the newer attempt's
result, nor its stored file). The database part runs on SQLite and a PostgreSQL server this module starts; the
hung generator is a real Serve generator made to block in its last step (SORA_SERVE_TEST_STALL_S, first
attempts only) on a local Ray."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_export, wait_done
from serve_services import serve_app

from pipelines.serve.db import JobDB

PORT = 8316
BASE = f"http://127.0.0.1:{PORT}"


def add(db: JobDB, owner: str = "o") -> str:
    job = {
        "id": f"video_{uuid.uuid4().hex}",
        "object": "video",
        "model": "m",
        "status": "queued",
        "progress": 0,
        "created_at": int(time.time()),
        "size": "16x16",
        "seconds": "1",
        "prompt": "p",
        "_created_ns": time.time_ns(),
        "_params": {"a": 1},
    }
    db.insert(job, owner, "default", 0, None, None, 1.0)
    return job["id"]


def test_a_stalled_job_is_not_renewed_and_is_retried_then_failed_with_its_reasons(db):
    job_id = add(db)
    (a,) = db.claim("w1", 1, ttl_s=30)
    assert db.start(job_id, a["_lease_token"], "gen-1", 30) is not None
    assert db.renew([a["_lease_token"]], 30, stall_s=0.3) == {a["_lease_token"]}  # it just moved
    time.sleep(0.4)  # no step for longer than the stall timeout
    assert db.renew([a["_lease_token"]], 30, stall_s=0.3) == set()  # renewals stop: the hang cannot hold it
    assert db.give_up_stalled(job_id, a["_lease_token"], 0.3, max_attempts=2, retention_s=60) == "queued"
    requeued = db.get(job_id)
    assert (
        requeued["status"] == "queued"
        and requeued["_retries"][0]["code"] == "stalled"
        and requeued["_retries"][0]["attempt"] == 1
    )
    # The hung attempt wakes up: every write it tries is refused.
    assert db.progress({job_id: a["_lease_token"]}, 90, None, 30) == set()
    assert not db.heartbeat(job_id, a["_lease_token"], 30)
    assert not db.complete(job_id, a["_lease_token"], 60, {})
    assert not db.fail(job_id, a["_lease_token"], "x", "y", 60)
    (b,) = db.claim("w2", 1, ttl_s=30)  # claimable at once: the lease was given up
    assert b["_attempts"] == 2 and b["_lease_token"] != a["_lease_token"]
    db.start(job_id, b["_lease_token"], "gen-2", 30)
    time.sleep(0.4)
    assert db.give_up_stalled(job_id, b["_lease_token"], 0.3, max_attempts=2, retention_s=60) == "failed"
    failed = db.get(job_id)
    assert (
        failed["status"] == "failed"
        and failed["error"]["code"] == "stalled"
        and "2 attempts" in failed["error"]["message"]
    )
    assert [r["attempt"] for r in failed["_retries"]] == [1, 2]


def test_a_stale_attempt_cannot_overwrite_a_newer_result(db):
    job_id = add(db)
    (a,) = db.claim("w1", 1, ttl_s=30)
    db.start(job_id, a["_lease_token"], "gen-1", 30)
    time.sleep(0.25)
    assert db.give_up_stalled(job_id, a["_lease_token"], 0.2, 3, 60) == "queued"
    (b,) = db.claim("w2", 1, ttl_s=30)
    db.start(job_id, b["_lease_token"], "gen-2", 30)
    assert db.heartbeat(job_id, b["_lease_token"], 30, pct=95)
    assert db.complete(job_id, b["_lease_token"], 60, {"replica": "gen-2"})
    assert not db.complete(job_id, a["_lease_token"], 60, {"replica": "gen-1"})  # the stale one, late
    assert not db.fail(job_id, None, "deadline_exceeded", "late sweep", 60)  # finished: a sweep does not touch it
    done = db.get(job_id)
    assert (
        done["status"] == "completed"
        and done["_content_ref"] == b["_lease_token"]
        and done["_extra"] == {"replica": "gen-2"}
    )


def test_a_sweep_never_fails_a_job_someone_holds(db):
    job_id = add(db)
    (a,) = db.claim("w1", 1, ttl_s=30)
    assert not db.fail(job_id, None, "deadline_exceeded", "sweep", 60)  # held: only the holder may fail it
    assert db.get(job_id)["status"] == "queued"
    db.release(job_id, a["_lease_token"])
    assert db.fail(job_id, None, "deadline_exceeded", "sweep", 60)


def test_usage_ledger_outlives_deletes(db):
    ids = [add(db, owner="q") for _ in range(3)]
    for job_id in ids:
        db.delete(job_id)
    assert db.count_created_since("q", 0) == 0  # what the old quota counted: nothing left
    assert db.usage_since("q", 0) == 3.0 and db.usage_since("other", 0) == 0.0
    assert db.prune_usage(time.time_ns() + 1) == 3 and db.usage_since("q", 0) == 0.0


def test_lease_times_are_the_databases_clock(db):
    assert abs(db.clock_ns() - time.time_ns()) < 5 * 10**9  # same machine here; one clock for every node in general


def test_the_new_statements_walk_an_index(tmp_path):
    """EXPLAIN QUERY PLAN of the ledger, stall and heartbeat statements (SQLite): none scans a table."""
    from sqlalchemy import event

    db = JobDB(f"sqlite:///{tmp_path}/plan.db")
    job_id = add(db)
    statements: list[tuple[str, tuple]] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            statements.append((statement, parameters))

    db.usage_since("o", 0)
    (a,) = db.claim("w", 1, 30)
    db.start(job_id, a["_lease_token"], "g", 30)
    db.renew([a["_lease_token"]], 30, stall_s=5)
    db.heartbeat(job_id, a["_lease_token"], 30, pct=95)
    db.add_retry(job_id, a["_lease_token"], 1, "lease_lapsed", "m")
    db.give_up_stalled(job_id, a["_lease_token"], 0.0, 3, 60)
    db.fail(job_id, None, "deadline_exceeded", "m", 60)
    db.prune_usage(0)
    event.remove(db.engine, "before_cursor_execute", capture)
    assert len(statements) >= 9
    with db.engine.connect() as conn:
        for sql, params in statements:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert not [p for p in plan if p.startswith(("SCAN sora_jobs", "SCAN sora_usage"))], (sql, plan)
    db.close()


# ---------------------------------------------------------------------------------------------
# A hung generator on Serve
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from pipelines.serve.config import load_settings

    export = make_tiny_export(tmp_path_factory.mktemp("export"))
    store = tmp_path_factory.mktemp("store")
    settings = load_settings(
        {
            "model": str(export),
            "store": str(store),
            "download_port": None,
            "queue": {
                "lease_ttl_s": 1.0,
                "stall_timeout_s": 1.5,
                "claim_interval_s": 0.1,
                "max_attempts": 3,
                "poll_after_ms": 100,
            },
        }
    )
    # The first attempt of a job hangs 6 s in its last step: past the stall timeout (1.5 s), short of the
    # health check's HUNG_FACTOR x 1.5 s, so the same replica lives on and the hung attempt wakes up to write.
    generator = {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"SORA_SERVE_TEST_STALL_S": "6"}}},
        "health_check_period_s": 30,
    }
    with serve_app(settings, PORT, generator):
        yield settings


@pytest.mark.slow
def test_a_hung_generator_job_fails_over_and_the_stale_write_is_refused(service):
    with httpx.Client(base_url=BASE, timeout=60) as http:
        r = http.post("/v1/videos", json={"prompt": "a red circle moving left", "seed": 1})
        assert r.status_code == 200, r.text
        video_id = r.json()["id"]
        job = wait_done(http, video_id, timeout=120)
        assert job["status"] == "completed", job
        # The hung first attempt wakes after the retry was claimed; give it time to try its late writes.
        deadline = time.time() + 30
        stats: dict = {}
        while time.time() < deadline:
            stats = http.get("/healthz").json()
            if stats["generator"].get("completions_fenced", 0) >= 1:
                break
            time.sleep(0.2)
        assert stats["generator"].get("completions_fenced", 0) >= 1, stats["generator"]  # its write was refused
        metrics = http.get("/metrics").text
    db = JobDB(service.db_url)
    row = db.get(video_id)
    db.close()
    assert row["_attempts"] == 2 and row["_runs"] == 2
    assert [r["code"] for r in row["_retries"]] == ["stalled"] and "no sampling progress" in row["_retries"][0][
        "message"
    ]
    assert stats["stats"]["stalled"] == 1
    # Only the newer attempt's clip is stored: the stale one wrote nothing (or removed what it wrote).
    names = sorted(p.name for p in Path(service.store_uri).rglob(f"{video_id}*"))
    assert names and all(row["_content_ref"] in n for n in names), names
    assert sample(metrics, "sora_serve_lease_expiries_total", reason="stalled") >= 1


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a series' samples in a Prometheus exposition whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
