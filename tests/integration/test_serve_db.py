"""The job database and the video store against real services, no Ray: SQLite and a PostgreSQL server
this module starts (and stops), S3 through moto's server on loopback. Leases, fencing, retention,
deadlines, keyset pages, and that every query the service makes walks an index."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from serve_services import s3_server

from pipelines.serve.db import JobDB
from pipelines.serve.store import ContentStore


def new_job(created_ns: int | None = None, **kw) -> dict:
    return {
        "id": f"video_{uuid.uuid4().hex}",
        "object": "video",
        "model": "m",
        "status": "queued",
        "progress": 0,
        "created_at": int(time.time()),
        "size": "16x16",
        "seconds": "1",
        "prompt": "p",
        "num_frames": 4,
        "steps": 2,
        "guidance_scale": 1.0,
        "seed": 0,
        "sampler": "euler",
        "_created_ns": created_ns or time.time_ns(),
        "_params": {"a": 1},
        **kw,
    }


def add(
    db: JobDB, owner: str = "", priority: int = 0, deadline_ns: int | None = None, cache_key: str | None = None, **kw
) -> dict:
    job = new_job(**kw)
    db.insert(job, owner, "default", priority, deadline_ns, cache_key)
    return job


def test_jobs_roundtrip_pages_and_owners(db):
    ids = [add(db, owner="a", created_ns=1000 + i)["id"] for i in range(5)]
    add(db, owner="b")
    job = db.get(ids[2])
    assert job["id"] == ids[2] and job["_params"] == {"a": 1} and job["status"] == "queued" and job["_owner"] == "a"
    assert db.get("video_" + "0" * 32) is None
    page, more = db.list("a", 2)
    assert [j["id"] for j in page] == [ids[4], ids[3]] and more
    page, more = db.list("a", 2, after=ids[3])
    assert [j["id"] for j in page] == [ids[2], ids[1]] and more
    assert [j["id"] for j in db.list("a", 10, after=ids[1])[0]] == [ids[0]]
    assert [j["id"] for j in db.list("a", 2, order="asc")[0]] == ids[:2]
    assert db.list("b", 10, after=ids[0]) == ([], False)  # another owner's id is no anchor
    assert len(db.list("b", 10)[0]) == 1 and db.list("", 10) == ([], False)
    assert db.count_unfinished() == 6 and db.count_unfinished(owner="a") == 5 and db.count_created_since("a", 1003) == 2
    assert db.delete(ids[0]) is None and db.get(ids[0]) is None


def test_claims_follow_priority_and_leases_fence_stale_holders(db):
    low = add(db, priority=0, created_ns=1)
    high = add(db, priority=10, created_ns=2)
    (first,) = db.claim("w1", 1, ttl_s=0.5)
    assert first["id"] == high["id"] and first["_attempts"] == 1
    (second,) = db.claim("w2", 5, ttl_s=30)
    assert second["id"] == low["id"]
    assert db.claim("w3", 5, ttl_s=30) == []  # both leased
    stale = first["_lease_token"]
    assert db.start(high["id"], stale, "gen-1", ttl_s=0.5)["_runs"] == 1
    time.sleep(0.6)  # the lease lapses (the holder died)
    (again,) = db.claim("w3", 5, ttl_s=30)
    assert again["id"] == high["id"] and again["_attempts"] == 2 and again["_lease_token"] != stale
    # The stale holder's writes land nowhere; the new holder's do.
    assert db.progress({high["id"]: stale}, 50, None, 30) == set()
    assert not db.complete(high["id"], stale, 60, {})
    assert db.start(high["id"], again["_lease_token"], "gen-2", 30)["_runs"] == 2
    assert db.progress({high["id"]: again["_lease_token"]}, 50, None, 30) == {high["id"]}
    assert db.renew([again["_lease_token"], stale], 30) == {again["_lease_token"]}
    assert db.complete(high["id"], again["_lease_token"], 60, {"replica": "gen-2"})
    done = db.get(high["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["_content_ref"] == again["_lease_token"]
    assert done["expires_at"] == done["completed_at"] + 60
    assert db.renew([again["_lease_token"]], 30) == set()  # finished jobs keep no lease
    db.release(low["id"], second["_lease_token"])
    assert [j["id"] for j in db.claim("w4", 5, 30)] == [low["id"]]  # released: claimable at once


def test_concurrent_claims_never_share_a_job(db):
    jobs = {add(db, created_ns=i + 1)["id"] for i in range(120)}
    got: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            claimed = db.claim(name, 3, ttl_s=60)
            if not claimed:
                return
            with lock:
                got.extend(j["id"] for j in claimed)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(jobs)  # every job claimed, none twice


def test_retention_deadlines_and_the_result_cache(db):
    old = add(db, cache_key="k" * 64)
    (c,) = db.claim("w", 1, 30)
    assert db.complete(old["id"], c["_lease_token"], retention_s=1, extra={})
    assert db.cache_lookup("k" * 64) is None  # expiring within a minute: not worth copying
    late = add(db, deadline_ns=time.time_ns() - 1)
    assert db.fail_past_deadline(retention_s=3600) == [late["id"]]
    failed = db.get(late["id"])
    assert (
        failed["status"] == "failed"
        and failed["error"]["code"] == "deadline_exceeded"
        and failed["expires_at"] > time.time()
    )
    time.sleep(1.1)
    assert db.get(old["id"]) is None and old["id"] not in [j["id"] for j in db.list("", 10)[0]]
    assert db.expired() == [(old["id"], c["_lease_token"])] and db.purge([old["id"]]) == 1 and db.expired() == []
    fresh = add(db, cache_key="z" * 64)
    (c,) = db.claim("w", 1, 30)
    db.complete(fresh["id"], c["_lease_token"], retention_s=None, extra={})
    assert db.cache_lookup("z" * 64)["id"] == fresh["id"] and db.get(fresh["id"])["expires_at"] is None


def test_every_query_walks_an_index(tmp_path):
    """EXPLAIN QUERY PLAN of each statement the service runs (captured as it runs them on SQLite): none
    scans the jobs table."""
    from sqlalchemy import event

    db = JobDB(f"sqlite:///{tmp_path}/plan.db")
    statements: list[tuple[str, tuple]] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            statements.append((statement, parameters))

    a, b = add(db, owner="o", cache_key="c" * 64), add(db, owner="o")
    db.get(a["id"])
    db.list("o", 20)
    db.list("o", 20, after=b["id"])
    db.count_unfinished()
    db.count_unfinished(owner="o")
    db.count_unfinished(tier="default")
    db.count_created_since("o", 0)
    db.cache_lookup("c" * 64)
    (c,) = db.claim("w", 1, 30)
    db.start(c["id"], c["_lease_token"], "g", 30)
    db.progress({c["id"]: c["_lease_token"]}, 5, None, 30)
    db.renew([c["_lease_token"]], 30)
    db.complete(c["id"], c["_lease_token"], 60, {})
    db.fail_past_deadline(60)
    db.expired()
    db.delete(b["id"])
    event.remove(db.engine, "before_cursor_execute", capture)
    assert len(statements) >= 15
    with db.engine.connect() as conn:
        for sql, params in statements:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            scans = [p for p in plan if p.startswith("SCAN sora_jobs")]
            assert not scans, (sql, plan)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_content_store_writes_whole_files_and_reads_ranges(backend, tmp_path):
    def check(store: ContentStore) -> None:
        src = tmp_path / "clip.mp4"
        data = bytes(range(256)) * 4096  # 1 MiB
        src.write_bytes(data)
        store.put_file(str(src), "video_1", "tok", "video")
        store.put_bytes(b"png", "video_1", "tok", "thumbnail")
        assert store.size("video_1", "tok", "video") == len(data) and store.size("video_1", "other", "video") is None
        with store.open_range("video_1", "tok", "video", 1000) as f:
            assert f.read(10) == data[1000:1010]
        assert (
            store.copy(("video_1", "tok"), ("video_2", "t2")) and store.read_all("video_2", "t2", "thumbnail") == b"png"
        )
        assert (
            not store.copy(("video_9", "none"), ("video_3", "t3")) and store.size("video_3", "t3", "thumbnail") is None
        )
        signed = store.sign("video_1", "tok", "video", 60)
        if backend == "local":
            assert signed is None  # a folder cannot presign: downloads stream through the ingress
        else:
            import httpx

            part = httpx.get(signed, headers={"Range": "bytes=10-19"})
            assert part.status_code == 206 and part.content == data[10:20]
        store.remove("video_1", "tok")
        assert store.size("video_1", "tok", "video") is None and store.read_all("video_2", "t2", "video") == data
        store.ping()
        with pytest.raises(KeyError):
            store.path("../x", "t", "video")

    if backend == "local":
        check(ContentStore(str(tmp_path / "store")))
    else:
        with s3_server() as options:
            check(ContentStore("s3://sora/videos", options))
