"""Shared setup of the two Serve figures: a tiny export, the real app on a local Ray, an HTTP client.

The export is the CPU demo's model (DiT-demo: width 128, depth 6, patch 1x4x4, MiniLM text) with fresh
weights: sampling cost does not depend on whether the weights are trained. Requests are 8 frames at
32x32 with the export's default steps and guidance, sent as the OpenAI SDK would (POST /v1/videos, then
polling GET /v1/videos/{id} until `completed` and waiting what each answer's `openai-poll-after-ms` says
between polls, as the SDK's create_and_poll does (the SDK reads it from the first answer only). The
server's hint is the job's time left once the generator knows its pace, before that a backoff (as long
as the job has waited so far), within [20 ms, 500 ms] (QueueConfig), so the client polls about when the
clip is done and waiting jobs are polled ever less often. A fixed fine interval instead costs
CPU: each poll takes ~3-4 ms across client, Serve proxy and ingress, and polling every 20 ms slowed
the replica's sampling by ~0.3 s of 1.7 s on a loaded 2-core machine (the replica's own timings,
`_timing_s` in the job record, say so).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

PORT = 8765
POLL_S = 0.05
"""Wait between polls when an answer carries no `openai-poll-after-ms`."""
REQUEST = {"prompt": "a red circle moving left", "size": "32x32", "num_frames": 8}


def make_export(folder: str, steps: int) -> str:
    import torch

    from sora_model.config import DiffusionConfig, PipelineConfig, dit_preset
    from sora_model.pipeline import TextToVideoPipeline

    torch.manual_seed(0)
    cfg = PipelineConfig(
        model=dit_preset("DiT-demo"), diffusion=DiffusionConfig(num_sampling_steps=steps), preset="DiT-demo"
    )
    TextToVideoPipeline.from_config(cfg).save(folder)
    return folder


def start_app(export: str, store: str, max_batch_size: int, max_in_flight: int = 16, **args: Any) -> None:
    """The real application (`pipelines.serve.app.build_app`), one generator replica, result cache off
    (every request must sample), batching as given; `args`: more ServeSettings (db, storage_options)."""
    from ray import serve

    from pipelines.serve.app import build_app
    from pipelines.serve.config import load_settings

    settings = load_settings(
        {
            "model": export,
            "store": store,
            "result_cache": False,
            "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.05},
            "queue": {"max_in_flight": max_in_flight},
            **args,
        }
    )
    fixed = {"min_replicas": 1, "max_replicas": 1, "initial_replicas": 1}
    app = build_app(settings, {"Generator": {"autoscaling_config": fixed}})
    serve.start(http_options={"port": PORT, "host": "127.0.0.1"})
    serve.run(app, name="sora", route_prefix="/", blocking=False)
    wait_ready()


def wait_ready(timeout: float = 180.0) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("serve app did not become healthy")


async def one_request(client: Any, body: dict[str, Any]) -> float:
    """Seconds from POST to `completed` (what a client waits)."""
    import asyncio

    t0 = time.perf_counter()
    r = await client.post(f"http://127.0.0.1:{PORT}/v1/videos", json=body)
    r.raise_for_status()
    vid = r.json()["id"]
    while True:
        r = await client.get(f"http://127.0.0.1:{PORT}/v1/videos/{vid}")
        job = r.json()
        if job["status"] == "completed":
            return time.perf_counter() - t0
        if job["status"] == "failed":
            raise RuntimeError(f"request failed: {job.get('error')}")
        hint = r.headers.get("openai-poll-after-ms")
        await asyncio.sleep(int(hint) / 1000 if hint else POLL_S)


def session(steps: int):
    """(tmp folder, export path, store path) with Ray started on 2 CPUs."""
    import ray

    work = tempfile.mkdtemp(prefix="bench-serve-")
    export = make_export(os.path.join(work, "export"), steps)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return work, export, os.path.join(work, "store")


def shutdown(work: str) -> None:
    import shutil

    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def _completed_extras(store: str) -> list[dict[str, Any]]:
    """The monitoring fields (`extra`: timing_s, batch_size) of the completed jobs in the app's default
    SQLite job database beside the store."""
    from sqlalchemy import select

    from pipelines.serve.db import JobDB, jobs

    db = JobDB(f"sqlite:///{os.path.join(store, 'jobs.db')}")
    try:
        with db.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(jobs.c.extra).where(jobs.c.status == "completed")) if r[0]]
    finally:
        db.close()


def replica_timings(store: str) -> dict[str, Any]:
    """Medians of where the completed jobs' time went inside the replica (`timing_s`, seconds)."""
    import statistics

    rows = [e["timing_s"] for e in _completed_extras(store) if e.get("timing_s")]
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]} if rows else {}


def sampling_s_per_video_by_batch_size(store: str) -> dict[str, float]:
    """Median replica sampling seconds per clip, by the batch size it was sampled in: whether one batched
    forward pass is cheaper per clip than one alone on this hardware."""
    import statistics

    by: dict[str, list[float]] = {}
    for e in _completed_extras(store):
        if e.get("timing_s") and e.get("batch_size"):
            by.setdefault(str(e["batch_size"]), []).append(e["timing_s"]["sampling"] / e["batch_size"])
    return {k: round(statistics.median(v), 4) for k, v in sorted(by.items(), key=lambda kv: int(kv[0]))}


def generator_stats() -> dict[str, Any]:
    """The generator replica's own counters (batch sizes it actually ran)."""
    from ray import serve

    try:
        return serve.get_deployment_handle("Generator", "sora").get_stats.remote().result(timeout_s=30)
    except Exception as err:  # noqa: BLE001 - stats are a detail; never fail the figure on them
        return {"error": f"{type(err).__name__}: {err}"}
