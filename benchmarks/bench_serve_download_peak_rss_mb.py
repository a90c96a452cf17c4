"""Peak resident-memory growth of the serving processes (ingress replica + HTTP proxy) while a client
downloads a 200 MB video through `GET /v1/videos/{id}/content`.

What is compared: the real application on a local Ray (the ingress streams the clip from the store in
1 MiB chunks through `ContentStore.open_range`, Serve's proxy passes them on), with a completed job
whose MP4 in the store is 200 MB (random bytes: the server never parses it). RSS of the ingress replica
and of the proxy is sampled every 10 ms during the download; the value is the largest growth of their
sum over what they held just before. The baseline, run in the same command: what the old ingress did
(`fs.cat_file`: the whole file read into memory before answering), measured as the RSS growth of a
process doing just that read, the least that approach costs before Serve copies the body again.

Why fair: the same file, the same store, the same machine, one after the other in one command.
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


def _completed_job(store: str, video: str) -> str:
    """A completed job row and its 200 MB clip, written as the generator would (db + content store)."""
    from pipelines.serve.db import JobDB
    from pipelines.serve.store import ContentStore

    db = JobDB(f"sqlite:///{os.path.join(store, 'jobs.db')}")
    job_id, ref = f"video_{uuid.uuid4().hex}", uuid.uuid4().hex
    content = ContentStore(store)
    content.put_file(video, job_id, ref, "video")
    content.put_bytes(b"\x89PNG", job_id, ref, "thumbnail")
    now_ns = time.time_ns()
    job = {
        "id": job_id, "object": "video", "model": "sora-ray", "status": "completed", "progress": 100, "created_at": now_ns // 10**9,
        "completed_at": now_ns // 10**9, "expires_at": None, "size": "32x32", "seconds": "1", "prompt": "big", "error": None,
        "num_frames": 8, "steps": 1, "guidance_scale": 1.0, "seed": 0, "sampler": "euler", "_created_ns": now_ns, "_params": {},
        "_content_ref": ref,
    }  # fmt: skip
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


def _download(url: str, pids: dict[str, int]) -> dict:
    """Stream the download, sampling the servers' RSS meanwhile; (bytes, seconds, peak growth per process)."""
    import httpx
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
    got = 0
    with httpx.stream("GET", url, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes(2**20):
            got += len(chunk)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"bytes": got, "seconds": round(seconds, 2), "peak_mb": peak_sum / 2**20, "peak_mb_by_process": {k: round(v / 2**20, 1) for k, v in peak.items()}}


def run(quick: bool) -> dict:
    import httpx

    from benchmarks import _serve

    work, export, store = _serve.session(steps=2)
    video = os.path.join(work, "big.mp4")
    try:
        _write_video(video)
        base_out = subprocess.run([sys.executable, "-c", BASELINE, video], capture_output=True, text=True, check=True).stdout.split()
        baseline_mb = float(base_out[0])
        _serve.start_app(export, store, max_batch_size=1)
        health = httpx.get(f"http://127.0.0.1:{_serve.PORT}/healthz", timeout=30).json()
        job_id = _completed_job(store, video)
        url = f"http://127.0.0.1:{_serve.PORT}/v1/videos/{job_id}/content"
        # A ranged read first (and a warm-up of the route): 206 with exactly the bytes asked for.
        part = httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=60)
        with open(video, "rb") as f:
            f.seek(1000)
            assert part.status_code == 206 and part.content == f.read(1000), part.status_code
        pids = _serving_pids(health["pid"])
        runs = [_download(url, pids) for _ in range(1 if quick else 3)]
    finally:
        _serve.shutdown(work)
    worst = max(runs, key=lambda r: r["peak_mb"])
    assert all(r["bytes"] == VIDEO_MB * 2**20 for r in runs), [r["bytes"] for r in runs]
    return {
        "value": round(worst["peak_mb"], 1),
        "compared": (
            f"peak RSS growth (MB) of the ingress replica + Serve proxy while streaming a {VIDEO_MB} MB video; "
            f"baseline in the same command: reading it whole as the old ingress did, {baseline_mb:.0f} MB"
        ),
        "details": {
            "downloads": runs,
            "baseline_read_whole_mb": round(baseline_mb, 1),
            "ratio_vs_read_whole": round(worst["peak_mb"] / baseline_mb, 3) if baseline_mb > 0 else None,
            "throughput_mb_s": round(VIDEO_MB / worst["seconds"], 1),
            "processes": sorted(pids),
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
