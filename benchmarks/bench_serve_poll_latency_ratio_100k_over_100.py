"""A status poll and a list page with 100,000 job rows ÷ the same with 100: the job database's queries
walk indexes, so the size of the history does not slow a client down.

What is compared: two SQLite job databases (the embedded default) made by the service's own `JobDB`,
one holding 100 jobs and one 100,000 (completed, failed and a few queued, many owners). In both the
polled owner has the same 40 jobs, so every call returns the same rows. One "poll" is what the ingress
does for `GET /v1/videos/{id}` plus `GET /v1/videos?limit=20` plus the admission count of a create:
`JobDB.get` + `JobDB.list` (first page, then the page after it) + `count_unfinished`, each rendered with
`api.video_object` as the endpoint does. HTTP and Serve are left out on purpose: they cost the same at
any size and would only add noise to a ratio about the database.

Why fair: the same code and the same rows returned on both sides, the two interleaved round by round in
one process, the median of per-round ratios. The details add the old JSON-file store's cost model: it
read every job file per list, so a list at 100k jobs cost ~1000x one at 100.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
import uuid

from benchmarks.common import interleaved, main, median, paired_ratio, summary

FIGURE = "serve_poll_latency_ratio_100k_over_100"
GOAL = ("<=", 1.2)
POLLED_OWNER = "owner-polled"
POLLED_JOBS = 40


def _row(i: int, owner: str, status: str, created_ns: int) -> dict:
    now = int(time.time())
    job_id = f"video_{uuid.UUID(int=random.getrandbits(128)).hex}"
    done = status in ("completed", "failed")
    doc = {
        "id": job_id,
        "object": "video",
        "model": "sora-ray",
        "created_at": created_ns // 10**9,
        "size": "32x32",
        "seconds": "1",
        "prompt": f"a red circle moving left {i}",
        "num_frames": 8,
        "steps": 20,
        "guidance_scale": 4.0,
        "seed": i,
        "sampler": "euler",
        "negative_prompt": None,
        "_params": {
            "prompt": f"a red circle moving left {i}",
            "num_frames": 8,
            "height": 32,
            "width": 32,
            "steps": 20,
            "guidance_scale": 4.0,
            "seed": i,
            "sampler": "euler",
            "negative_prompt": None,
            "fps": 8,
            "model": "sora-ray",
        },
    }
    return {
        "id": job_id,
        "owner": owner,
        "tier": "default",
        "priority": 0,
        "status": status,
        "progress": 100 if done else 0,
        "created_ns": created_ns,
        "completed_at": now if done else None,
        "expires_at": now + 86400 if done else None,
        "deadline_ns": None,
        "cache_key": None,
        "lease_token": None,
        "lease_owner": None,
        "lease_until_ns": 0,
        "attempts": 1 if done else 0,
        "runs": 1 if done else 0,
        "started_ns": None,
        "eta_ns": None,
        "content_ref": uuid.uuid4().hex if status == "completed" else None,
        "error": {"code": "generation_failed", "message": "x"} if status == "failed" else None,
        "doc": doc,
        "extra": None,
    }


def build(path: str, total: int) -> tuple[object, list[str]]:
    """A JobDB with `total` rows; the polled owner's 40 jobs are spread through the history."""
    from sqlalchemy import insert

    from pipelines.serve.db import JobDB, jobs

    random.seed(total)
    db = JobDB(f"sqlite:///{path}")
    base = time.time_ns() - total * 10**6
    polled_at = set(random.sample(range(total), POLLED_JOBS))
    rows, polled = [], []
    for i in range(total):
        status = "queued" if i % 2000 == 1999 else ("failed" if i % 50 == 0 else "completed")
        owner = POLLED_OWNER if i in polled_at else f"owner-{i % 997}"
        row = _row(i, owner, "completed" if owner == POLLED_OWNER else status, base + i * 10**6)
        rows.append(row)
        if owner == POLLED_OWNER:
            polled.append(row["id"])
    with db.engine.begin() as conn:
        for start in range(0, len(rows), 5000):
            conn.execute(insert(jobs), rows[start : start + 5000])
    return db, polled


def poll_once(db, ids: list[str]) -> None:
    from pipelines.serve import api

    for job_id in ids[:3]:
        api.video_object(db.get(job_id))
    page, more = db.list(POLLED_OWNER, 20)
    [api.video_object(j) for j in page]
    page2, _ = db.list(POLLED_OWNER, 20, after=page[-1]["id"])
    [api.video_object(j) for j in page2]
    db.count_unfinished()
    assert len(page) == 20 and more and len(page2) == 20


def run(quick: bool) -> dict:
    big_n = 100_000
    reps = 60 if quick else 200
    work = tempfile.mkdtemp(prefix="sora-bench-poll-")
    try:
        t0 = time.perf_counter()
        small, small_ids = build(os.path.join(work, "small.db"), 100)
        print("building 100,000 job rows ...", file=sys.stderr, flush=True)
        big, big_ids = build(os.path.join(work, "big.db"), big_n)
        build_s = time.perf_counter() - t0
        size_mb = os.path.getsize(os.path.join(work, "big.db")) / 1e6
        print(f"built in {build_s:.1f}s ({size_mb:.0f} MB); timing {reps} rounds ...", file=sys.stderr, flush=True)
        fns = {"100k": lambda: poll_once(big, big_ids), "100": lambda: poll_once(small, small_ids)}
        times = interleaved(fns, reps=reps, warmup=3)
        for db in (small, big):
            db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = paired_ratio(times["100k"], times["100"])
    per_call_ms = {n: round(median(ts) * 1e3 / 6, 3) for n, ts in times.items()}
    return {
        "value": round(ratio, 3),
        "compared": (
            "one poll round (3 GETs by id, 2 list pages of 20, the admission count) on the SQLite job database: "
            f"{big_n:,} job rows / 100 job rows, same rows returned; median of paired rounds"
        ),
        "details": {
            "seconds_per_round": {n: summary(ts, 5) for n, ts in times.items()},
            "ms_per_query_median": per_call_ms,
            "rows": {"small": 100, "big": big_n},
            "big_db_mb": round(size_mb, 1),
            "build_s": round(build_s, 1),
            "old_json_store": (
                "listed by reading every job file: a list at 100k jobs read 1000x the files of one at 100"
            ),
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
