"""Limits that hold and metrics that move, on one Serve app over a local Ray: the hourly quota counts a usage
ledger that deletes do not touch (a create/download/delete loop gets 429 past it), result-cache hits count
against it at their weight and are scoped to their owner, and `GET /metrics` on the API port shows queue wait,
text encode, per-step denoise, decode, encode/upload and end-to-end histograms and the error and cache counters
moving after requests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import make_tiny_export, wait_done
from serve_services import serve_app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PORT = 8318
BASE = f"http://127.0.0.1:{PORT}"
LOOP_KEY, CACHE_KEY, OTHER_KEY = "sk-loop-test", "sk-cache-test", "sk-other-test"
QUOTA = 2


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from pipelines.serve.config import hash_key, load_settings

    export = make_tiny_export(tmp_path_factory.mktemp("export"))
    settings = load_settings(
        {
            "model": str(export),
            "store": str(tmp_path_factory.mktemp("store")),
            "tiers": {"metered": {"max_jobs_per_hour_per_key": QUOTA, "cache_hit_weight": 0.5}, "open": {}},
            "default_tier": "open",
            "api_keys": {hash_key(LOOP_KEY): "metered", hash_key(CACHE_KEY): "metered", hash_key(OTHER_KEY): "open"},
            "queue": {"poll_after_ms": 100},
        }
    )
    generator = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 1}}
    with serve_app(settings, PORT, generator):
        yield settings


def client(key: str) -> httpx.Client:
    return httpx.Client(base_url=BASE, timeout=60, headers={"Authorization": f"Bearer {key}"}, follow_redirects=True)


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a series' samples in a Prometheus exposition whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_quota_holds_through_a_create_download_delete_loop(service):
    with client(LOOP_KEY) as http:
        for i in range(QUOTA):
            r = http.post("/v1/videos", json={"prompt": "a red circle moving left", "seed": 100 + i})
            assert r.status_code == 200, r.text
            assert wait_done(http, r.json()["id"])["status"] == "completed"
            assert http.get(f"/v1/videos/{r.json()['id']}/content").status_code == 200
            assert http.delete(f"/v1/videos/{r.json()['id']}").status_code == 200
        assert http.get("/v1/videos").json()["data"] == []  # nothing left to count: the ledger still counts
        r = http.post("/v1/videos", json={"prompt": "a red circle moving left", "seed": 999})
        err = r.json()["error"]
        assert (
            r.status_code == 429
            and err["code"] == "rate_limit_exceeded"
            and "max_jobs_per_hour_per_key" in err["message"]
        ), r.text
        assert int(r.headers["Retry-After"]) >= 60


def test_cache_hits_cost_quota_and_stay_with_their_owner(service):
    body = {"prompt": "a blue square moving up", "seed": 7}
    with client(CACHE_KEY) as http, client(OTHER_KEY) as other:
        first = http.post("/v1/videos", json=body).json()
        assert wait_done(http, first["id"])["status"] == "completed"  # 1 of 2 used
        hits = [http.post("/v1/videos", json=body) for _ in range(2)]  # 0.5 each: 2 of 2 used
        assert all(h.status_code == 200 and h.json()["status"] == "completed" for h in hits), [h.text for h in hits]
        r = http.post("/v1/videos", json=body)  # even a cache hit is refused past the quota
        assert r.status_code == 429 and "cache hit counts 0.5" in r.json()["error"]["message"], r.text
        # Another tenant asking the same gets its own generation, not the first tenant's clip.
        theirs = other.post("/v1/videos", json=body).json()
        assert theirs["status"] == "queued"
        assert wait_done(other, theirs["id"])["status"] == "completed"
        assert other.get(f"/v1/videos/{first['id']}").status_code == 404


def test_metrics_on_the_api_port_move_with_requests(service):
    with client(OTHER_KEY) as http:
        before = http.get("/metrics")
        assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
        b = before.text
        r = http.post("/v1/videos", json={"prompt": "a green triangle moving down", "seed": 11, "steps": 3})
        assert wait_done(http, r.json()["id"])["status"] == "completed"
        # the text cache hits
        r = http.post("/v1/videos", json={"prompt": "a green triangle moving down", "seed": 12, "steps": 3})
        assert wait_done(http, r.json()["id"])["status"] == "completed"
        assert http.post("/v1/videos", json={"prompt": "x", "steps": 10**6}).status_code == 400
        assert http.get("/v1/videos/video_" + "0" * 32).status_code == 404
        a = http.get("/metrics").text
    assert client("sk-wrong").get("/metrics").status_code == 401  # keys on: metrics need one too

    def moved(name: str, by: float = 1, **labels: str) -> None:
        assert sample(a, name, **labels) - sample(b, name, **labels) >= by, (
            name,
            labels,
            sample(b, name, **labels),
            sample(a, name, **labels),
        )

    moved("sora_serve_queue_wait_seconds_count", 2)
    moved("sora_serve_text_encode_seconds_count", 1)
    moved("sora_serve_denoise_step_seconds_count", 6)  # 3 steps x 2 calls
    moved("sora_serve_vae_decode_seconds_count", 2)
    moved("sora_serve_encode_upload_seconds_count", 2)
    moved("sora_serve_end_to_end_seconds_count", 2, status="completed")
    moved("sora_serve_cache_hits_total", 1, cache="text")
    moved("sora_serve_errors_total", 1, status="400")
    moved("sora_serve_errors_total", 1, status="404", reason="video_not_found")
    moved("sora_serve_requests_total", 2, route="/v1/videos", status="200")
    # What the earlier tests did shows too: a quota refusal and a result-cache hit.
    assert sample(a, "sora_serve_errors_total", status="429", reason="key_quota") >= 1
    assert sample(a, "sora_serve_cache_hits_total", cache="result") >= 2
    assert sample(a, "sora_serve_denoise_step_seconds_sum") > 0
    # The Grafana dashboard reads only series the endpoint serves.
    import json
    import re

    dashboard = (ROOT / "cluster" / "serve" / "grafana-dashboard.json").read_text()
    exprs = [t["expr"] for p in json.loads(dashboard)["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"sora_serve_[a-z_]+", e)}
    assert len(names) >= 10 and all(f"\n{n}" in a for n in names), sorted(n for n in names if f"\n{n}" not in a)
