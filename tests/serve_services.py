"""Real services the serving tests run against, started and stopped by the tests themselves:
a PostgreSQL server (the Debian server binaries, initdb + pg_ctl in a temp folder on a loopback port)
and an S3 endpoint (moto's server mode on loopback)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, patched_environ


def postgres_bindir() -> str | None:
    """Where initdb and pg_ctl are: PATH, else the newest /usr/lib/postgresql/*/bin (Debian puts them there)."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return os.path.dirname(shutil.which("initdb"))
    dirs = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0
    )
    return dirs[-1] if dirs and os.path.exists(os.path.join(dirs[-1], "pg_ctl")) else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server; yields its SQLAlchemy URL. Skips (saying why) where none can start.
    As root the server must run as another user: the `postgres` account, through runuser."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine; apt-get install postgresql")
    prefix: list[str] = []
    folder = tempfile.mkdtemp(prefix="sora-pg-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "server.log"), free_port()

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    run(os.path.join(bindir, "initdb"), "-D", data, "-U", "sora", "--auth=trust", "-E", "UTF8", "--no-sync")
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(os.path.join(bindir, "pg_ctl"), "-D", data, "-o", opts, "-l", log, "-w", "-t", "60", "start")
    try:
        yield f"postgresql://sora@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def s3_server() -> Iterator[dict]:
    """moto's S3 in server mode on a loopback port, with a bucket `sora`; yields fsspec storage options.
    Credentials are moto's dummies, set in the environment as real deployments would set theirs."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        with patched_environ(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
        ):
            import s3fs

            endpoint = f"http://127.0.0.1:{port}"
            # moto keeps its buckets per process, not per server: an earlier module's server may have made it.
            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).makedirs(
                "sora", exist_ok=True
            )
            yield {"client_kwargs": {"endpoint_url": endpoint}}
    finally:
        server.stop()


@contextmanager
def serve_app(settings, port: int, generator: dict) -> Iterator[None]:
    """One local Ray (2 CPUs) with the Serve app on loopback `port`, the generator deployment taking `generator`'s
    options; shut down on exit. Replicas import the project from the checkout (PYTHONPATH)."""
    import ray
    from ray import serve

    from pipelines.serve.app import build_app
    from pipelines.serve.config import APP_NAME

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, {"Generator": generator}), name=APP_NAME, route_prefix="/")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def post_concurrently(client: Callable[[], object], payloads: list[dict], path: str = "/v1/videos") -> list:
    """POST each payload from its own thread and client (`client()` makes an httpx.Client), released together by a
    barrier, as independent users would; the responses in payload order."""
    out: list = [None] * len(payloads)
    go = threading.Barrier(len(payloads))

    def post(i: int) -> None:
        with client() as c:
            go.wait()
            out[i] = c.post(path, json=payloads[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def frames_of(mp4: bytes, where: Path) -> np.ndarray:
    """The frames of an MP4 (written to `where` to be read), as int16 for differences: (T, H, W, 3)."""
    from sora_model.video import probe_video, read_frames

    where.write_bytes(mp4)
    return read_frames(str(where), range(probe_video(str(where)).num_frames)).astype(np.int16)


def thumbnail_of(png: bytes) -> np.ndarray:
    """A PNG's pixels (the served thumbnail: lossless, so a clip's first frame exactly), int16 (H, W, 3)."""
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
