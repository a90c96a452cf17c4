"""A generator replica that owns two ranks (`parallel: {sequence: 2}`) on a local Ray (2 CPUs, gloo).

- The app answers the SDK flow with the clip one process samples for the same request and seed (computed here with
  `TextToVideoPipeline` and encoded as the server encodes): the lossless PNG thumbnail within one level, the MP4
  bytes equal or, where H.264 moved a block for a float reordering, its decoded frames equal on average.
- A dynamic batch of two requests is one call over the ranks, and each clip is its one-process clip.
- A deleted job stops both ranks at the same step (one all-reduce per step), and the group serves on.
- The replica's placement group holds it and its two rank actors (fractional CPU bundles); health pings every rank:
  a rank killed while idle fails the health check and Serve replaces the replica.
- Killing one rank actor while a job samples ends the replica (Serve replaces it with two fresh ranks) and the job
  is retried on the replacement and completes.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import make_tiny_export, wait_done
from serve_services import frames_of, post_concurrently, serve_app, thumbnail_of

pytestmark = pytest.mark.slow

PORT = 8319
BASE = f"http://127.0.0.1:{PORT}"
BUNDLES = [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]
"""The replica's bundle, then one per rank: 1.5 of the 2 CPUs, so a replacement fits once the old group is gone."""
GENERATOR = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    "ray_actor_options": {"num_cpus": 0.5},
    "placement_group_bundles": BUNDLES,
    "placement_group_strategy": "STRICT_PACK",
    "health_check_period_s": 2,
    "graceful_shutdown_timeout_s": 5,
    "user_config": {"batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5}},
}
# 3 frames of 14x14 through DiT-tiny's (1, 2, 2) patches: a 3x7x7 grid, 147 tokens, padded to split over 2 ranks.
LONG_JOB = {"num_frames": 4, "size": "16x16", "steps": 100}
"""Seconds of sampling on 2 CPUs: a delete or a kill lands while it samples."""
REQUEST = {"prompt": "a red circle moving left", "num_frames": 3, "size": "14x14", "steps": 4, "seed": 7}


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
            "parallel": {"sequence": 2},
            "queue": {"poll_after_ms": 100, "lease_ttl_s": 5.0, "claim_interval_s": 0.1},
        }
    )
    with serve_app(settings, PORT, GENERATOR):
        yield {"export": export, "tmp": tmp_path_factory.mktemp("clips"), "db": settings.db_url}


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=BASE, timeout=120, follow_redirects=True) as client:
        yield client


def one_process_clip(service, seed: int) -> tuple[np.ndarray, bytes]:
    """(first frame, MP4 bytes) of the request sampled here by one process, encoded as the server does."""
    from pipelines.serve.finish import encode_clip
    from sora_model.pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.load(str(service["export"]))
    clip = pipe(REQUEST["prompt"], num_frames=3, height=14, width=14, steps=4, seed=seed)[0]  # (T, H, W, 3)
    folder = service["tmp"] / f"reference-{seed}"
    folder.mkdir()
    mp4, _ = encode_clip(clip, pipe.config.sample.fps, str(folder))
    return clip[0].astype(np.int16), Path(mp4).read_bytes()


def test_parallel_settings_are_checked_when_the_app_is_built(tmp_path):
    from pipelines.serve.config import load_settings
    from sora_model.config import ConfigError

    export = str(make_tiny_export(tmp_path / "export"))  # DiT-tiny: 2 attention heads
    assert load_settings({"model": export, "parallel": {"sequence": 2, "cfg": True}}).parallel.world_size == 4
    for args, words in [
        ({"parallel": {"sequence": 4}}, ["parallel.sequence 4", "2 attention heads"]),
        ({"parallel": {"sequence": 0}}, ["parallel.sequence", "between 1 and 64"]),
        ({"parallel": {"sequence": 2, "tensor": 2}}, ["parallel.tensor"]),
        ({"parallel": {"sequence": 2}, "loras": {"style": export}}, ["loras", "parallel"]),
        ({"parallel": {"sequence": 2}, "device": "cuda:1"}, ["device", "cuda:1"]),
    ]:
        with pytest.raises(ConfigError) as err:
            load_settings({"model": export, **args})
        assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), (args, str(err.value))


def test_bundles_that_cannot_hold_the_ranks_say_what_to_write():
    from pipelines.parallel.config import ParallelConfig
    from pipelines.parallel.replica import rank_bundles
    from sora_model.config import ConfigError

    assert rank_bundles(BUNDLES, ParallelConfig(2), "auto") == (BUNDLES[1:], "cpu")
    gpus = [{"CPU": 4}, *[{"CPU": 2, "GPU": 1}] * 4]
    assert rank_bundles(gpus, ParallelConfig(2, cfg=True), "auto") == (gpus[1:], "cuda")
    with pytest.raises(ConfigError, match=r"1 \+ 4 bundles .* got 3; e\.g\. placement_group_bundles"):
        rank_bundles(BUNDLES, ParallelConfig(2, cfg=True), "auto")
    with pytest.raises(ConfigError, match="one GPU in each rank bundle"):
        rank_bundles(BUNDLES, ParallelConfig(2), "cuda")
    with pytest.raises(ConfigError, match="a CPU share"):
        rank_bundles([{"CPU": 1}, {"GPU": 1}, {"GPU": 1}], ParallelConfig(2), "cuda")


def rank_actors() -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SamplingRank-")]


def test_two_rank_replica_answers_the_sdk_with_the_one_process_clip(service, http):
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {k: REQUEST[k] for k in ("num_frames", "steps", "seed")}
    video = sdk.videos.create_and_poll(
        prompt=REQUEST["prompt"], model="sora-ray", size=REQUEST["size"], extra_body=extra, poll_interval_ms=100
    )
    assert video.status == "completed" and video.progress == 100, video
    mp4 = sdk.videos.download_content(video.id).content
    thumb = thumbnail_of(sdk.videos.download_content(video.id, variant="thumbnail").content)
    first, reference = one_process_clip(service, REQUEST["seed"])
    # Two ranks gather the same fp32 prediction in another summation order: at most one level on the lossless PNG.
    assert thumb.shape == first.shape and np.abs(thumb - first).max() <= 1
    if mp4 != reference:  # H.264 can move a block when a level flips; the decoded clips still agree on average
        served = frames_of(mp4, service["tmp"] / "served.mp4")
        expected = frames_of(reference, service["tmp"] / "ref.mp4")
        assert np.abs(served - expected).mean() <= 0.5
    health = http.get("/healthz").json()["generator"]
    assert health["clips"] >= 1 and health["text_cache"]["misses"] >= 1  # rank 0's cache figures reach the replica
    assert sorted(a["name"][-5:] for a in rank_actors()) == ["rank0", "rank1"]


def test_a_batch_runs_over_the_ranks_and_each_clip_is_its_one_process_clip(service, http):
    # A job that keeps the replica busy while the two arrive: what queues during a batch becomes the next batch.
    busy = http.post("/v1/videos", json={"prompt": "a busy replica", **LONG_JOB, "steps": 40}).json()["id"]
    deadline = time.time() + 60
    while http.get(f"/v1/videos/{busy}").json()["status"] != "in_progress" and time.time() < deadline:
        time.sleep(0.05)
    seeds = [11, 12]
    payloads = [{**REQUEST, "seed": seed} for seed in seeds]
    responses = post_concurrently(lambda: httpx.Client(base_url=BASE, timeout=60), payloads)
    jobs = [wait_done(http, r.json()["id"]) for r in responses]
    assert [j["status"] for j in jobs] == ["completed"] * 2, jobs
    assert max(int(k) for k in http.get("/healthz").json()["generator"]["batch_sizes"]) > 1  # one call sampled both
    for job, seed in zip(jobs, seeds):
        thumb = thumbnail_of(http.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"}).content)
        first, _ = one_process_clip(service, seed)
        assert np.abs(thumb - first).max() <= 1, seed


def test_a_deleted_job_stops_every_rank_at_the_same_step_and_the_group_serves_on(service, http):
    import ray

    r = http.post("/v1/videos", json={"prompt": "a deleted square", **LONG_JOB, "seed": 2})
    video_id = r.json()["id"]
    deadline = time.time() + 60
    while http.get(f"/v1/videos/{video_id}").json()["progress"] < 10 and time.time() < deadline:
        time.sleep(0.05)
    assert http.delete(f"/v1/videos/{video_id}").status_code == 200  # its lease goes: the replica stops the call
    ranks = {a["name"][-5:]: ray.get_actor(a["name"], namespace=a["namespace"]) for a in rank_actors()}
    steps: dict[str, int] = {}
    while time.time() < deadline:  # until neither rank takes another step
        now = {n: len(ray.get(a.progress.remote(0))) for n, a in ranks.items()}
        if now == steps:
            break
        steps = now
        time.sleep(1.0)
    assert steps["rank0"] == steps["rank1"] < 100, steps  # both left the same call at the same step, early
    after = http.post("/v1/videos", json={"prompt": "after the stop", **LONG_JOB, "steps": 4}).json()
    assert wait_done(http, after["id"])["status"] == "completed"  # the ranks are in step: no collective was left open


def test_killing_a_rank_mid_job_retries_the_job_on_a_new_replica(service, http):
    import ray

    from pipelines.serve.db import JobDB

    before = http.get("/healthz").json()["generator"]["replica"]
    # Long enough (100 steps) that the kill lands while the job samples.
    r = http.post("/v1/videos", json={"prompt": "a killed rank", **LONG_JOB, "seed": 3})
    assert r.status_code == 200, r.text
    video_id = r.json()["id"]
    deadline = time.time() + 60
    while (job := http.get(f"/v1/videos/{video_id}").json())["progress"] < 10 and time.time() < deadline:
        time.sleep(0.05)
    assert job["status"] == "in_progress", job
    (victim,) = [a for a in rank_actors() if a["name"].endswith("rank1")]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    done = wait_done(http, video_id, timeout=120)
    assert done["status"] == "completed", done
    health = http.get("/healthz").json()
    assert health["generator"]["replica"] != before  # the replica went with its rank; Serve started another
    assert health["stats"].get("generator_retries", 0) >= 1
    db = JobDB(service["db"])
    row = db.get(video_id)
    db.close()
    assert row["_runs"] == 2 and row["_extra"]["replica"] != before, row
    assert http.get(f"/v1/videos/{video_id}/content").content[4:8] == b"ftyp"
    assert sorted(a["name"][-5:] for a in rank_actors()) == ["rank0", "rank1"]  # the new replica's two ranks


def test_a_rank_that_dies_while_idle_fails_the_health_check_and_serve_replaces_the_replica(http):
    import ray

    before = http.get("/healthz").json()["generator"]["replica"]
    (victim,) = [a for a in rank_actors() if a["name"].endswith("rank0") and before in a["name"]]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    deadline = time.time() + 120
    while http.get("/healthz").json()["generator"].get("replica") in (before, None) and time.time() < deadline:
        time.sleep(0.5)  # 3 failed checks (health_check_period_s 2), the stop, then a new replica and its 2 ranks
    assert http.get("/healthz").json()["generator"].get("replica") not in (before, None)
    job = http.post("/v1/videos", json={"prompt": "after the replacement", **LONG_JOB, "steps": 4}).json()
    assert wait_done(http, job["id"])["status"] == "completed"
