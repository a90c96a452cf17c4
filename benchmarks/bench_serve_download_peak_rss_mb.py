"""Peak resident-memory growth of the serving processes (ingress replica + HTTP proxy) while a client
downloads a 200 MB video through `GET /v1/videos/{id}/content` (following redirects, as the SDK does).

What is compared: the real application on a local Ray with a completed job whose MP4 is 200 MB (random
bytes: the server never parses it), in the store kinds the service supports, one after the other:
  - `folder` (the value: the default store, a local or NFS folder, which cannot presign): the ingress
    answers 307 to a signed URL on its replica's file server (pipelines/serve/files.py), which sends the
    file at the socket's pace (Starlette FileResponse under uvicorn), outside Serve's proxy;
  - `s3`: the store is S3 (moto's server on loopback); the ingress answers 307 to a presigned URL and the
    client reads the object from S3, so the video's bytes never pass through Serve;
  - `folder_through_serve` (the baseline, `download_port: null`): the ingress streams 1 MiB chunks through
    `ContentStore.open_range` and Serve's HTTP proxy passes them on (what the folder store did before).
  - `through_serve_3_clients_4_slots` / `..._1_slot`: three clients at once on the baseline's path, with
    `max_streaming_downloads` 4 (the default: all three stream together) and 1 (the other two are answered 503
    with Retry-After and retry): what the per-replica bound on streams does to the peak (pipelines/serve/streaming.py).
RSS of the ingress replica (which hosts the file server) and of the proxy is sampled every 10 ms during the
download; a figure is the largest growth of their sum over what they held just before. Also recorded: what
the first ingress did (`fs.cat_file`: the whole file read into memory), as the RSS growth of a process
doing just that read.

Why fair: the same file and client, the same machine, one after the other in one command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

from benchmarks.common import main

FIGURE = "serve_download_peak_rss_mb"
GOAL = ("<=", 64.0)
VIDEO_MB = 200
CLIENTS = 3
SLOTS = {"through_serve_3_clients_4_slots": 4, "through_serve_3_clients_1_slot": 1}
"""The concurrent runs: max_streaming_downloads of each."""

BASELINE = """
import sys, fsspec, psutil
p = psutil.Process()
before = p.memory_info().rss
data = fsspec.filesystem("file").cat_file(sys.argv[1])
print((p.memory_info().rss - before) / 2**20, len(data))
"""


def _write_video(path: str) -> None:
    with open(path, "wb") as f:
        for _ in range(VIDEO_MB):
            f.write(os.urandom(2**20))


def _completed_job_in(store: str, video: str, options: dict | None, db_url: str | None) -> str:
    """A completed job row and its 200 MB clip, written as the generator would, in the app's database (the
    default beside a folder store, else `db_url`) and store."""
    from pipelines.serve.db import JobDB
    from pipelines.serve.store import ContentStore

    db = JobDB(db_url or f"sqlite:///{os.path.join(store, 'jobs.db')}")
    job_id, ref = f"video_{uuid.uuid4().hex}", uuid.uuid4().hex
    content = ContentStore(store, options)
    content.put_file(video, job_id, ref, "video")
    content.put_bytes(b"\x89PNG", job_id, ref, "thumbnail")
    now_ns = time.time_ns()
    job = {
        "id": job_id,
        "object": "video",
        "model": "sora-ray",
        "status": "completed",
        "progress": 100,
        "created_at": now_ns // 10**9,
        "completed_at": now_ns // 10**9,
        "expires_at": None,
        "size": "32x32",
        "seconds": "1",
        "prompt": "big",
        "error": None,
        "num_frames": 8,
        "steps": 1,
        "guidance_scale": 1.0,
        "seed": 0,
        "sampler": "euler",
        "_created_ns": now_ns,
        "_params": {},
        "_content_ref": ref,
    }
    db.insert(job, "", "default", 0, None, None)
    db.close()
    return job_id


def _serving_pids(ingress_pid: int) -> dict[str, int]:
    import psutil

    pids = {"ingress": ingress_pid}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ProxyActor" in cmd:
            pids["proxy"] = p.info["pid"]
    return pids


def _watch(pids: dict[str, int], body) -> dict:
    """Run `body()` while sampling the servers' RSS every 10 ms; its result with the peak growth (sum and per
    process)."""
    import psutil

    procs = {k: psutil.Process(v) for k, v in pids.items()}
    base = {k: p.memory_info().rss for k, p in procs.items()}
    peak_sum, peak = 0, dict.fromkeys(procs, 0)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_sum
        while not done.is_set():
            grow = {k: p.memory_info().rss - base[k] for k, p in procs.items()}
            peak_sum = max(peak_sum, sum(grow.values()))
            for k, g in grow.items():
                peak[k] = max(peak[k], g)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        out = body()
    finally:
        done.set()
        sampler.join()
    return {
        **out,
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_mb": peak_sum / 2**20,
        "peak_mb_by_process": {k: round(v / 2**20, 1) for k, v in peak.items()},
    }


def _get(url: str) -> tuple[int, int]:
    """One download (following redirects, as the SDK does), retried after a 503's Retry-After: (bytes, 503s)."""
    import httpx

    refused = 0
    while True:
        with httpx.stream("GET", url, timeout=600, follow_redirects=True) as r:
            if r.status_code == 503 and "retry-after" in r.headers:
                refused += 1
                time.sleep(min(float(r.headers["retry-after"]), 10.0))
                continue
            r.raise_for_status()
            return sum(len(c) for c in r.iter_bytes(2**20)), refused


def _download(url: str, pids: dict[str, int]) -> dict:
    def body() -> dict:
        got, _ = _get(url)
        return {"bytes": got}

    return _watch(pids, body)


def _download_many(url: str, pids: dict[str, int], clients: int) -> dict:
    """`clients` downloads started together, each from its own thread."""
    results: list = [None] * clients

    def one(i: int) -> None:
        results[i] = _get(url)

    def body() -> dict:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"bytes": min(r[0] for r in results), "refused_503": sum(r[1] for r in results)}

    return _watch(pids, body)


def _measure(kind: str, video: str, export: str, work: str, reps: int) -> list[dict]:
    """Deploy the app on a `kind` store holding the video, check a ranged read, download it `reps` times."""
    import httpx
    from ray import serve

    from benchmarks import _serve

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from serve_services import s3_server

    def go(store: str, options: dict | None) -> list[dict]:
        extra = (
            {"storage_options": options, "db": f"sqlite:///{os.path.join(work, kind + '-jobs.db')}"} if options else {}
        )
        if kind.endswith("through_serve") or kind.startswith("through_serve"):
            extra["download_port"] = None
        if kind.startswith("through_serve"):
            extra["max_streaming_downloads"] = SLOTS[kind]
        _serve.start_app(export, store, max_batch_size=1, **extra)
        try:
            health = httpx.get(f"http://127.0.0.1:{_serve.PORT}/healthz", timeout=30).json()
            job_id = _completed_job_in(store, video, options, extra.get("db"))
            url = f"http://127.0.0.1:{_serve.PORT}/v1/videos/{job_id}/content"
            part = httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=60, follow_redirects=True)
            with open(video, "rb") as f:
                f.seek(1000)
                assert part.status_code == 206 and part.content == f.read(1000), part.status_code
            pids = _serving_pids(health["pid"])
            if kind in SLOTS:
                return [{**_download_many(url, pids, CLIENTS), "processes": sorted(pids)} for _ in range(reps)]
            return [{**_download(url, pids), "processes": sorted(pids)} for _ in range(reps)]
        finally:
            serve.delete("sora")

    if kind == "s3":
        with s3_server() as options:
            return go("s3://sora/videos", options)
    return go(os.path.join(work, "store-" + kind), None)


def run(quick: bool) -> dict:
    from benchmarks import _serve

    reps = 1 if quick else 3
    # moto's S3 credentials go in the environment before Ray starts, so the replicas inherit them.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    work, export, _ = _serve.session(steps=2)
    video = os.path.join(work, "big.mp4")
    try:
        _write_video(video)
        base_out = subprocess.run(
            [sys.executable, "-c", BASELINE, video], capture_output=True, text=True, check=True
        ).stdout.split()
        baseline_mb = float(base_out[0])
        runs = {
            kind: _measure(kind, video, export, work, reps) for kind in ("folder", "s3", "folder_through_serve", *SLOTS)
        }
    finally:
        _serve.shutdown(work)
    for kind, rs in runs.items():
        assert all(r["bytes"] == VIDEO_MB * 2**20 for r in rs), (kind, [r["bytes"] for r in rs])
    peak = {kind: max(r["peak_mb"] for r in rs) for kind, rs in runs.items()}
    return {
        "value": round(peak["folder"], 1),
        "note": None
        if peak["folder"] <= GOAL[1]
        else (f"the folder store's file server grew {peak['folder']:.0f} MB (ingress + proxy); see details"),
        "compared": (
            f"peak RSS growth (MB) of the ingress replica + Serve proxy while a client downloads a {VIDEO_MB} MB "
            "video from the default folder store (307 to the replica's file server); same command: an S3 store (307 "
            f"to a presigned URL) {peak['s3']:.1f} MB, the folder streamed through Serve's proxy "
            f"{peak['folder_through_serve']:.0f} MB, reading it whole as the first ingress did {baseline_mb:.0f} MB; "
            f"{CLIENTS} clients at once through Serve: {peak['through_serve_3_clients_4_slots']:.0f} MB with "
            f"max_streaming_downloads 4, {peak['through_serve_3_clients_1_slot']:.0f} MB with 1 (the others 503 + "
            "Retry-After, then retry)"
        ),
        "details": {
            "downloads": runs,
            "peak_mb": {k: round(v, 1) for k, v in peak.items()},
            "baseline_read_whole_mb": round(baseline_mb, 1),
            "ratio_vs_read_whole": {k: round(v / baseline_mb, 3) for k, v in peak.items()} if baseline_mb > 0 else None,
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
