"""Many replicas on a local Ray, as on a cluster: job state in a PostgreSQL server and videos in S3 (moto's
server on loopback), both started by this module. The OpenAI SDK flow end to end on them; two ingress
replicas sharing the queue (claims with FOR UPDATE SKIP LOCKED); the generator autoscaled 1 -> 2 -> 1
under load; replicas killed mid-job. The checks read the job database itself: every accepted job
completed, and sampled to completion exactly once. (test_serve.py runs the SDK flow on the SQLite default.)

Small on purpose (2 cores): a short lease (3 s) so a dead replica's jobs are re-claimed quickly, and a
fast autoscaling config so the scale-up and the scale-down both happen within a minute.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_export, wait_done
from serve_services import postgres_server, s3_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PORT = 8313
BASE = f"http://127.0.0.1:{PORT}"
LONG_JOB = {"steps": 60, "num_frames": 16, "size": "16x16"}
"""A few seconds of sampling here: long enough to kill a replica under it, short enough for the suite."""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    export = make_tiny_export(tmp_path_factory.mktemp("export"))
    with postgres_server() as db_url, s3_server() as s3_options:  # before ray.init: replicas inherit the S3 env
        yield from _deployed(export, db_url, s3_options)


def _deployed(export: Path, db_url: str, s3_options: dict):
    import ray
    from ray import serve

    from pipelines.serve.app import build_app
    from pipelines.serve.config import APP_NAME, load_settings

    settings = load_settings(
        {
            "model": str(export),
            "db": db_url,
            "store": "s3://sora/videos",
            "storage_options": s3_options,
            "result_cache": False,
            "queue": {
                "max_pending_jobs": 100,
                "max_in_flight": 4,
                "lease_ttl_s": 3,
                "claim_interval_s": 0.2,
                "poll_after_ms": 100,
            },
        }
    )
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    deployments = {
        "VideoAPI": {"num_replicas": 2},
        "Generator": {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 2,
                "upscale_delay_s": 1,
                "downscale_delay_s": 4,
            },
            "ray_actor_options": {"num_cpus": 1},
            "max_ongoing_requests": 2,
            "user_config": {"batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}},
        },
    }
    serve.run(build_app(settings, deployments), name=APP_NAME, route_prefix="/")
    from pipelines.serve.db import JobDB

    db = JobDB(settings.db_url)
    try:
        yield db
    finally:
        db.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=BASE, timeout=60) as client:
        yield client


def replicas(deployment: str) -> list[dict]:
    import ray

    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA") and f"#{deployment}#" in a["name"]
    ]


def running(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications["sora"].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def kill(actor: dict) -> None:
    import ray

    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def submit(http: httpx.Client, n: int, prefix: str, **extra) -> list[str]:
    return [
        http.post("/v1/videos", json={"prompt": f"{prefix} {i}", "seed": i, **LONG_JOB, **extra}).json()["id"]
        for i in range(n)
    ]


def test_sdk_flow_on_postgresql_and_s3(http, service):
    import openai
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=60)
    video = sdk.videos.create_and_poll(
        prompt="a red circle moving left", seconds="1", size="16x16", poll_interval_ms=100
    )
    assert video.status == "completed" and video.expires_at > video.completed_at, video
    mp4 = sdk.videos.download_content(video.id).content
    assert mp4[4:8] == b"ftyp"
    assert sdk.videos.download_content(video.id, variant="thumbnail").content[:4] == b"\x89PNG"
    # On S3 the content is a redirect to a presigned URL (the SDK follows it): S3 serves the bytes and ranges.
    redirect = http.get(f"/v1/videos/{video.id}/content")
    assert redirect.status_code == 307 and "Signature=" in redirect.headers["location"]
    part = http.get(f"/v1/videos/{video.id}/content", headers={"Range": "bytes=4-11"}, follow_redirects=True)
    assert (
        part.status_code == 206
        and part.content == mp4[4:12]
        and part.headers["content-range"] == f"bytes 4-11/{len(mp4)}"
    )
    assert sdk.videos.retrieve(video.id).id == video.id and video.id in [v.id for v in sdk.videos.list()]
    assert service.dialect == "postgresql" and service.get(video.id)["_runs"] == 1
    assert sdk.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)


def test_generator_scales_1_to_2_under_load_and_back_to_1_when_idle(http):
    deadline = time.time() + 120
    while running("Generator") != 1 and time.time() < deadline:
        time.sleep(0.5)
    assert running("Generator") == 1
    ids = submit(http, 8, "a scaling square")
    seen = {1}
    while time.time() < deadline and not all(wait_status(http, i) for i in ids):
        seen.add(running("Generator"))
        time.sleep(0.5)
    print(f"\ngenerator replicas seen under load: {sorted(seen)}")
    assert 2 in seen, seen
    assert all(wait_done(http, i)["status"] == "completed" for i in ids)
    idle_deadline = time.time() + 90
    while (running("Generator"), len(replicas("Generator"))) != (1, 1) and time.time() < idle_deadline:
        time.sleep(0.5)  # the scaled-down replica stops, then its actor goes
    assert running("Generator") == 1 and len(replicas("Generator")) == 1


def wait_status(http: httpx.Client, video_id: str) -> bool:
    return http.get(f"/v1/videos/{video_id}").json()["status"] in ("completed", "failed")


def test_generator_killed_mid_job_the_job_completes_on_another_replica(http, service):
    (vid,) = submit(http, 1, "a killed generator circle")
    deadline = time.time() + 60
    while (job := service.get(vid))["status"] != "in_progress" and time.time() < deadline:
        time.sleep(0.05)
    assert job["status"] == "in_progress"
    from sqlalchemy import select

    from pipelines.serve.schema import jobs

    with service.engine.connect() as conn:  # the generator replica that started it holds the lease
        sampling_on = conn.execute(select(jobs.c.lease_owner).where(jobs.c.id == vid)).scalar()
    (actor,) = [a for a in replicas("Generator") if a["name"].endswith(sampling_on)]
    kill(actor)
    done = wait_done(http, vid, timeout=120)
    assert done["status"] == "completed", done
    final = service.get(vid)
    assert final["_extra"]["replica"] != sampling_on and final["_runs"] == 2, final
    assert http.get(f"/v1/videos/{vid}/content", follow_redirects=True).content[4:8] == b"ftyp"


def test_two_ingress_replicas_one_killed_under_load_every_job_completes_exactly_once(http, service):
    ingress = replicas("VideoAPI")
    assert len(ingress) == 2
    accepted: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a client creating jobs the whole time; the proxy spreads them over both replicas
        i = 0
        with httpx.Client(base_url=BASE, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post(
                        "/v1/videos", json={"prompt": f"a loaded triangle {i}", "seed": i, **LONG_JOB, "steps": 20}
                    )
                except httpx.HTTPError:
                    continue  # the request died with the replica: never accepted
                if r.status_code == 200:
                    accepted.append(r.json()["id"])
                i += 1
                time.sleep(0.3)

    client = threading.Thread(target=load)
    client.start()
    deadline = time.time() + 60
    while not any(service.get(i)["status"] == "in_progress" for i in list(accepted)) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    kill(ingress[0])
    time.sleep(4.0)  # keep creating while only one replica answers (and Serve starts a new one)
    stop.set()
    client.join()
    assert len(accepted) >= 4, accepted
    jobs = [wait_done(http, i, timeout=180) for i in accepted]
    assert all(j["status"] == "completed" for j in jobs), [j for j in jobs if j["status"] != "completed"]
    rows = [service.get(i) for i in accepted]
    # Exactly once: each job started sampling once (no generator died here), whichever replica held it.
    assert all(r["_runs"] == 1 for r in rows), [(r["id"], r["_runs"], r["_attempts"]) for r in rows]
    print(
        f"\n{len(accepted)} jobs accepted under load; re-claimed after the kill: "
        f"{sum(r['_attempts'] > 1 for r in rows)}"
    )
    assert all(http.get(f"/v1/videos/{i}/content", follow_redirects=True).status_code == 200 for i in accepted[:3])
