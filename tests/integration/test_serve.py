"""The Serve application on a local Ray, keys off, driven by the official `openai` SDK and raw HTTP.

One Ray + Serve app for the module; the replica-kill test runs last.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import make_tiny_export, wait_done
from serve_services import post_concurrently

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PORT = 8311
BASE = f"http://127.0.0.1:{PORT}"
GENERATOR_OPTIONS = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 4},
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {"batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.5}},
}


def serve_config(export: Path, store: Path, ingress_user_config: dict | None = None) -> dict:
    """cluster/serve/local.yaml, pointed at the test's export and store and sized for 2 cores."""
    config = yaml.safe_load((ROOT / "cluster" / "serve" / "local.yaml").read_text())
    config["http_options"]["port"] = PORT
    app = config["applications"][0]
    app["args"].update(model=str(export), store=str(store))
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Generator"].update(GENERATOR_OPTIONS)
    ingress = deployments["VideoAPI"]["user_config"]
    ingress["queue"]["poll_after_ms"] = 100
    ingress.update(ingress_user_config or {})
    return config


def deploy(config: dict) -> None:
    """What `serve deploy` does: a declarative config, so a user_config change reconfigures live replicas."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    export = make_tiny_export(tmp_path_factory.mktemp("export"))
    store = tmp_path_factory.mktemp("store")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    started = time.perf_counter()
    deploy(serve_config(export, store))
    print(f"\nserve app up in {time.perf_counter() - started:.1f}s")
    try:
        yield {"export": export, "store": store}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=BASE, timeout=60, follow_redirects=True) as client:  # folder-store downloads are a 307
        yield client


@pytest.fixture(scope="module")
def sdk(service):
    from openai import OpenAI

    return OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0, timeout=60)


def assert_openai_error(r: httpx.Response, status_range=(400, 499)) -> dict:
    assert status_range[0] <= r.status_code <= status_range[1], (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_sdk_create_poll_download_list_delete(sdk):
    started = time.perf_counter()
    video = sdk.videos.create_and_poll(
        prompt="a red circle moving left", model="sora-ray", seconds="1", size="16x16", poll_interval_ms=100
    )
    latency = time.perf_counter() - started
    print(f"\none request through the SDK: {latency:.2f}s")
    assert video.status == "completed" and video.progress == 100 and video.error is None, video
    assert (
        video.size == "16x16"
        and video.seconds == "1"
        and video.model == "sora-ray"
        and video.completed_at >= video.created_at
    )
    content = sdk.videos.download_content(video.id)
    assert content.content[4:8] == b"ftyp"
    # A folder store answers 307 to this machine's file server (files.py: the bytes skip Serve's proxy), with Range.
    url = f"{BASE}/v1/videos/{video.id}/content"
    hop = httpx.get(url)
    assert hop.status_code == 307 and "/files/" in hop.headers["location"] and "sig=" in hop.headers["location"]
    part = httpx.get(url, headers={"Range": "bytes=4-7"}, follow_redirects=True)
    size = len(content.content)
    assert part.status_code == 206 and part.content == b"ftyp" and part.headers["content-range"] == f"bytes 4-7/{size}"
    assert httpx.get(url, headers={"Range": "bytes=-2"}, follow_redirects=True).content == content.content[-2:]
    beyond = httpx.get(url, headers={"Range": f"bytes={size}-"}, follow_redirects=True)
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["error"]["code"] == "range_not_satisfiable"
    thumb = sdk.videos.download_content(video.id, variant="thumbnail")
    assert thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert sdk.videos.retrieve(video.id).id == video.id
    assert video.id in [v.id for v in sdk.videos.list(limit=50)]
    deleted = sdk.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    import openai

    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(video.id)


def test_list_is_newest_first_and_pages(sdk):
    ids = [sdk.videos.create(prompt=f"a green square {i}", extra_body={"steps": 1}).id for i in range(3)]
    page = sdk.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    assert sdk.videos.list(limit=2, after=ids[1]).data[0].id == ids[0]
    assert [v.id for v in sdk.videos.list(order="asc", limit=100).data][-3:] == ids


def test_same_seed_same_bytes_and_result_cache(sdk, http):
    def make(model: str, seed: int) -> tuple[bytes, str]:
        v = sdk.videos.create_and_poll(
            prompt="a blue triangle moving up", model=model, extra_body={"seed": seed, "steps": 3}, poll_interval_ms=100
        )
        assert v.status == "completed", v
        return sdk.videos.download_content(v.id).content, v.id

    hits = http.get("/healthz").json()["stats"].get("result_cache_hits", 0)
    a, _ = make("sora-ray", 11)
    b, _ = make("sora-2", 11)  # an alias: a different cache key, so this one is sampled again
    c, _ = make("sora-ray", 12)
    assert a == b and a != c
    again, _ = make("sora-ray", 11)  # identical request: answered from the result cache
    assert again == a
    assert http.get("/healthz").json()["stats"]["result_cache_hits"] == hits + 1


BAD_REQUESTS = [
    ("post", "/v1/videos", {"content": b"{not json", "headers": {"content-type": "application/json"}}, None),
    ("post", "/v1/videos", {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, None),
    ("post", "/v1/videos", {"content": b"", "headers": {"content-type": "application/json"}}, None),
    ("post", "/v1/videos", {"json": {}}, "prompt"),
    ("post", "/v1/videos", {"json": {"prompt": 5}}, "prompt"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "steps": "many"}}, "steps"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "seed": 1.5}}, "seed"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "size": "-16x16"}}, "size"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "size": "100000x100000"}}, "size"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "size": "15x16"}}, "size"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "num_frames": -4}}, "num_frames"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "num_frames": 10**9}}, "num_frames"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "steps": 0}}, "steps"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "guidance_scale": 1e9}}, "guidance_scale"),
    ("post", "/v1/videos", {"json": {"prompt": ""}}, "prompt"),
    ("post", "/v1/videos", {"json": {"prompt": "x" * 100_000}}, "prompt"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "sampler": "dpm++"}}, "sampler"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "model": "nope"}}, "model"),
    ("post", "/v1/videos", {"json": {"prompt": "x", "format": "webm"}}, "format"),
    (
        "post",
        "/v1/videos",
        {"content": b'{"prompt": "\\ud800 lone"}', "headers": {"content-type": "application/json"}},
        "prompt",
    ),
    (
        "post",
        "/v1/videos",
        {"content": b'{"prompt": "x", "steps": true}', "headers": {"content-type": "application/json"}},
        "steps",
    ),
    (
        "post",
        "/v1/videos",
        {"content": b'{"prompt": "x", "guidance_scale": "2.5"}', "headers": {"content-type": "application/json"}},
        "guidance_scale",
    ),
    (
        "post",
        "/v1/videos",
        {"content": b'{"prompt": "x", "guidance_scale": NaN}', "headers": {"content-type": "application/json"}},
        None,
    ),
    (
        "post",
        "/v1/videos",
        {"data": {"prompt": "x"}, "files": {"negative_prompt": (None, b"\xff\xfe")}},
        "negative_prompt",
    ),
    ("get", "/v1/videos?after=not-an-id", {}, "after"),
    ("post", "/v1/videos", {"data": {"prompt": "x"}, "files": {"seconds": (None, "soon")}}, "seconds"),
    (
        "post",
        "/v1/videos",
        {"data": {"prompt": "x"}, "files": {"input_reference": ("r.png", b"\x89PNG", "image/png")}},
        "input_reference",
    ),
    ("get", "/v1/videos/video_doesnotexist", {}, "video_id"),
    ("get", "/v1/videos/video_doesnotexist/content", {}, "video_id"),
    ("delete", "/v1/videos/video_doesnotexist", {}, "video_id"),
    ("get", "/v1/videos?limit=0", {}, "limit"),
    ("get", "/v1/videos?limit=abc", {}, "limit"),
    ("get", "/v1/videos?order=sideways", {}, "order"),
    ("get", "/v1/nothing-here", {}, None),
]


def test_malformed_requests_get_openai_errors_and_the_service_keeps_answering(http):
    for method, path, kw, param in BAD_REQUESTS:
        err = assert_openai_error(getattr(http, method)(path, **kw))
        if param is not None:
            assert err["param"] == param, (path, kw, err)
    # An unknown content variant of a real video.
    vid = http.post("/v1/videos", json={"prompt": "a cyan circle", "steps": 1}).json()["id"]
    assert wait_done(http, vid)["status"] == "completed"
    assert assert_openai_error(http.get(f"/v1/videos/{vid}/content?variant=spritesheet"))["param"] == "variant"
    assert http.get("/healthz").json()["status"] == "ok"
    assert (
        wait_done(http, http.post("/v1/videos", json={"prompt": "still fine", "steps": 1}).json()["id"])["status"]
        == "completed"
    )


def test_a_chunked_upload_over_the_limit_is_cut_off(http):
    from pipelines.serve.api import MAX_BODY_BYTES

    sent = [0]

    def body():  # no Content-Length: the server only learns the size by reading
        while sent[0] < 2 * MAX_BODY_BYTES:
            sent[0] += 2**20
            yield b" " * 2**20

    try:
        r = http.post("/v1/videos", content=body(), headers={"content-type": "application/json"})
    except httpx.HTTPError:  # the server may close the connection while the client still sends
        r = None
    if r is not None:
        err = assert_openai_error(r)
        assert r.status_code == 413 and err["code"] == "request_too_large" and str(MAX_BODY_BYTES) in err["message"]
    assert http.get("/healthz").json()["status"] == "ok"


def test_progress_is_reported_while_in_progress(http):
    vid = http.post("/v1/videos", json={"prompt": "a white square moving right", "steps": 30, "num_frames": 8}).json()[
        "id"
    ]
    seen = set()
    deadline = time.time() + 90
    while time.time() < deadline:
        r = http.get(f"/v1/videos/{vid}")
        job = r.json()
        seen.add((job["status"], job["progress"]))
        if job["status"] == "completed":
            break
        # The hint is the time left once the generator knows its pace, within [min_poll_after_ms, poll_after_ms].
        assert 20 <= int(r.headers["openai-poll-after-ms"]) <= 100
        time.sleep(0.05)
    statuses = {s for s, _ in seen}
    assert "completed" in statuses and "in_progress" in statuses, seen
    assert any(0 < p < 100 for s, p in seen if s == "in_progress"), seen


def test_concurrent_requests_share_one_forward_pass(http):
    before = http.get("/healthz").json()["stats"]
    payloads = [
        {"prompt": f"a magenta circle {i}", "seed": 100 + i, "guidance_scale": 1 + i, "steps": 20, "size": "16x16"}
        for i in range(4)
    ]
    t0 = time.perf_counter()
    responses = post_concurrently(lambda: httpx.Client(base_url=BASE, timeout=60), payloads)
    ids = [r.json()["id"] for r in responses]
    jobs = [wait_done(http, i) for i in ids]
    batched_s = time.perf_counter() - t0
    assert all(j["status"] == "completed" for j in jobs)
    after = http.get("/healthz").json()
    calls = after["stats"]["pipeline_calls"] - before.get("pipeline_calls", 0)
    print(
        f"\n4 concurrent requests: {calls} pipeline call(s), {batched_s:.2f}s; batch sizes "
        f"{after['stats']['batch_sizes']}"
    )
    assert calls < 4, after["stats"]
    assert max(int(k) for k in after["stats"]["batch_sizes"]) > 1
    assert max(int(k) for k in after["generator"]["batch_sizes"]) > 1
    # Batched clips equal the same requests sampled alone (per-request seeds and guidance).
    alone = http.post("/v1/videos", json={**payloads[2], "model": "sora-2"}).json()["id"]
    assert wait_done(http, alone)["status"] == "completed"
    batched = http.get(f"/v1/videos/{ids[2]}/content").content
    assert http.get(f"/v1/videos/{alone}/content").content == batched


def test_models_and_health(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["sora-ray", "sora-ray-preview"]
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["api_keys"] is False and "text_cache" in health["generator"]
    assert health["generator"]["text_cache"]["hits"] > 0  # repeated prompts skipped the text encoder


def test_reconfigure_applies_new_limits_without_restart(service, http):
    pid = http.get("/healthz").json()["pid"]
    deploy(serve_config(service["export"], service["store"], {"limits": {"max_prompt_chars": 10}}))
    deadline = time.time() + 30
    while http.get("/healthz").json()["limits"]["max_prompt_chars"] != 10 and time.time() < deadline:
        time.sleep(0.2)
    err = assert_openai_error(http.post("/v1/videos", json={"prompt": "a prompt longer than ten"}))
    assert "limits.max_prompt_chars" in err["message"] and "10" in err["message"]
    assert http.get("/healthz").json()["pid"] == pid  # same replica process: reconfigured, not restarted
    deploy(serve_config(service["export"], service["store"]))
    while http.get("/healthz").json()["limits"]["max_prompt_chars"] == 10 and time.time() < deadline + 30:
        time.sleep(0.2)
    assert http.post("/v1/videos", json={"prompt": "a prompt longer than ten", "steps": 1}).status_code == 200


def test_killed_generator_replica_is_replaced_and_accepted_jobs_finish(http):
    import ray

    replica_before = http.get("/healthz").json()["generator"]["replica"]
    # Long enough jobs (100 steps, 16 frames: seconds here) that the kill lands while one is sampling.
    ids = [
        http.post(
            "/v1/videos", json={"prompt": f"a yellow square {i}", "steps": 100, "num_frames": 16, "seed": i}
        ).json()["id"]
        for i in range(3)
    ]
    deadline = time.time() + 60
    while (
        not any(http.get(f"/v1/videos/{i}").json()["status"] == "in_progress" for i in ids) and time.time() < deadline
    ):
        time.sleep(0.05)
    names = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Generator" in a["name"] and a["name"].startswith("SERVE_REPLICA")
    ]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    jobs = [wait_done(http, i, timeout=120) for i in ids]
    assert all(j["status"] == "completed" for j in jobs), jobs
    health = http.get("/healthz").json()
    assert health["generator"]["replica"] != replica_before
    assert health["stats"].get("generator_retries", 0) >= 1
    assert http.get(f"/v1/videos/{ids[0]}/content").content[4:8] == b"ftyp"
