"""The cluster path end to end, as a user runs it: a Ray head started with `cluster/local/start.sh`
(`ray start --head`, dashboard on, token auth on), data prepared and the smoke recipe trained by
`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`, the export served by
`serve deploy` of a copy of cluster/serve/local.yaml, and one video fetched over HTTP.

Everything talks to the cluster through explicit addresses on free, non-default ports and a temp
folder of its own, so a Ray that another test module started with `ray.init()` (or one a developer
has running) is neither used nor stopped: `cluster/local/stop.sh` ends only the nodes this test started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "cluster" / "local" / "start.sh"
STOP = ROOT / "cluster" / "local" / "stop.sh"
RUNTIME_ENV = "cluster/runtime_env.yaml"
SMOKE = "cluster/recipes/smoke-cpu.yaml"
PROMPT = "a red circle moving left"


def run(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> str:
    """Run a CLI command; on failure the assertion shows the tail of its output."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stdout[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster (2 CPUs) on free ports; stopped in the end whatever happened."""
    # Short: Ray's unix sockets live under the temp dir and their paths must stay under ~100 bytes.
    base = Path(tempfile.mkdtemp(prefix="sora-e2e-", dir="/tmp"))
    gcs, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_DASHBOARD"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `ray`, `serve`, `python` of this venv
        RAY_AUTH_MODE="token",  # the head requires the token (~/.ray/auth_token); every client sends it
        RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}",  # ray job
        RAY_DASHBOARD_ADDRESS=f"http://127.0.0.1:{dashboard}",  # serve deploy / status
        RAY_ADDRESS=f"127.0.0.1:{gcs}",
        SORA_LOCAL_STATE_DIR=str(base / "state"),
    )
    env.pop("PYTHONPATH", None)  # the nodes get the repository from start.sh, the jobs from --working-dir
    try:
        run(
            [
                str(START),
                "--workers",
                "0",
                "--head-cpus",
                "2",
                "--port",
                str(gcs),
                "--dashboard-port",
                str(dashboard),
                "--object-store-mb",
                "512",
                "--timeout",
                "120",
            ],
            env,
            timeout=180,
            cwd=base,
        )
        yield {"env": env, "base": base, "dashboard": f"http://127.0.0.1:{dashboard}"}
    finally:
        subprocess.run([str(STOP), "--grace", "15"], env=env, timeout=120, check=False)
        shutil.rmtree(base, ignore_errors=True)


def submit(cluster, entrypoint: str, timeout: float) -> str:
    """`ray job submit` (waits for the end; exit code 1 when the job fails) with this checkout as working dir."""
    cmd = ["ray", "job", "submit", "--working-dir", ".", "--runtime-env", RUNTIME_ENV, "--", "bash", "-c", entrypoint]
    try:
        return run(cmd, cluster["env"], timeout=timeout)
    except (
        AssertionError
    ) as e:  # a job that cannot reach the cluster: say what the head node said (its log goes with it)
        log = cluster["base"] / "state" / "head.log"
        tail = (
            "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            if log.is_file()
            else "(no head.log)"
        )
        raise AssertionError(f"{e}\n--- the head node's log ({log}) ends with:\n{tail}") from None


def test_submit_train_then_serve_over_http(cluster):
    import httpx

    base = cluster["base"]
    data, run_dir, store = base / "data", base / "run", base / "store"
    t0 = time.perf_counter()

    # 1. Data: the same commands the KubeRay prepare RayJob runs, as a Ray job.
    manifest = data / "shapes" / "captions.jsonl"
    prepare = " && ".join(
        [
            f"python -m pipelines.cli data synth --out {data / 'shapes'} --num-videos 24 --size 16 --frames 8 "
            "--no-progress"
        ]
        + [
            f"python -m pipelines.cli data prepare --manifest {manifest} --out {data / name} --resolution 16 "
            f"--frames {frames} --no-progress"
            for name, frames in (("images", 1), ("clips", 8))
        ]
    )
    submit(cluster, prepare, timeout=300)
    assert (data / "clips" / "dataset.json").is_file()

    # 2. Training: the job's driver and its Ray Train workers import the shipped copy of the code.
    out = submit(
        cluster,
        "python -c 'import pipelines; print(\"shipped:\", pipelines.__file__)' && "
        f"python -m pipelines.train.trainer --recipe {SMOKE} --data {data / 'images'},{data / 'clips'} "
        f"--run-dir {run_dir} --workers 2",
        timeout=420,
    )
    shipped = next(line for line in out.splitlines() if line.startswith("shipped:"))
    assert "working_dir_files" in shipped and str(ROOT) not in shipped, shipped
    export = run_dir / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file(), out[-3000:]
    t_train = time.perf_counter() - t0

    # 3. Serving: cluster/serve/local.yaml with this run's export, a temp store and a free port.
    config = yaml.safe_load((ROOT / "cluster" / "serve" / "local.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"].update(model=str(export), store=str(store))
    deploy_yaml = base / "serve.yaml"
    deploy_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    run(["serve", "deploy", str(deploy_yaml)], cluster["env"], timeout=120)

    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as http:  # content: a 307 to the file server
        deadline = time.monotonic() + 180
        while True:
            try:
                if http.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, run(["serve", "status"], cluster["env"], timeout=60)
            time.sleep(2)

        created = http.post(
            "/v1/videos", json={"prompt": PROMPT, "size": "16x16", "num_frames": 8, "steps": 2, "seed": 0}
        )
        assert created.status_code == 200, created.text
        video = created.json()
        assert video["object"] == "video" and video["status"] in ("queued", "in_progress", "completed")
        deadline = time.monotonic() + 120
        while video["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, video
            time.sleep(0.5)
            video = http.get(f"/v1/videos/{video['id']}").json()
        assert video["status"] == "completed", video

        content = http.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"].startswith("video/mp4")
        assert content.content[4:8] == b"ftyp" and len(content.content) > 100

    print(f"e2e: prepare+train {t_train:.0f}s, total {time.perf_counter() - t0:.0f}s")
