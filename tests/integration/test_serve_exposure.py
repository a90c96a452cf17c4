"""Closed by default under `serve run`/`serve deploy` too, not only `sora serve`: on a local Ray whose Serve proxies
listen on 0.0.0.0, the application without API keys (or with its keys taken away by the ingress's user_config)
fails to deploy because its ingress replica refuses to start (auth.refuse_open_replica); `auth: none` says by name
that it may, and then it serves."""

from __future__ import annotations

import os

import httpx
import pytest
from helpers import free_port, make_tiny_export

from pipelines.serve.config import APP_NAME, hash_key, load_settings

GENERATOR = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 1}}
REFUSED = "refusing to serve on 0.0.0.0 without API keys"


@pytest.fixture(scope="module")
def open_serve(tmp_path_factory):
    """Serve's proxies on 0.0.0.0 (what cluster/serve/production.yaml asks for), and a tiny export."""
    import ray
    from ray import serve

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    export = make_tiny_export(tmp_path_factory.mktemp("export"))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "0.0.0.0", "port": port})
        yield export, tmp_path_factory.mktemp("store"), port
    finally:
        serve.shutdown()
        ray.shutdown()


def _run(export, store, ingress: dict | None = None, **settings) -> None:
    from ray import serve

    from pipelines.serve.app import build_app

    s = load_settings({"model": str(export), "store": str(store), **settings})
    options = {"VideoAPI": {"max_constructor_retry_count": 1, **(ingress or {})}, "Generator": GENERATOR}
    serve.run(build_app(s, options), name=APP_NAME, route_prefix="/")


def _refusal(export, store, ingress: dict | None = None, **settings) -> str:
    """What the ingress deployment says after a failed `serve run` (serve.run's own error names only the deployment)."""
    from ray import serve

    with pytest.raises(RuntimeError, match=f"Deploying application {APP_NAME} failed"):
        _run(export, store, ingress, **settings)
    return serve.status().applications[APP_NAME].deployments["VideoAPI"].message


@pytest.mark.slow
def test_the_replica_refuses_to_start_open_and_starts_with_auth_none(open_serve):
    export, store, port = open_serve
    assert REFUSED in _refusal(export, store)
    # Keys in the application's settings, taken away by the deployment's user_config: refused as well.
    assert REFUSED in _refusal(
        export, store, ingress={"user_config": {"api_keys": {}}}, api_keys={hash_key("k"): "default"}
    )
    _run(export, store, auth="none")
    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["api_keys"] is False
