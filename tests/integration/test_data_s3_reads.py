"""`sora data prepare` reads each remote video once: moto's S3 server on loopback, with the bytes of every GET
counted where they leave the server (a WSGI layer around moto's app), and a local Ray (2 CPUs)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from object_store import s3_and_ray

ray = pytest.importorskip("ray")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: E402

from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare  # noqa: E402
from sora_model.video import write_video  # noqa: E402

pytestmark = pytest.mark.slow  # a moto server, a local Ray and a prepare run

BUCKET = "reads"
FRAMES, SIZE, FPS = 96, 192, 24


class CountingApp:
    """WSGI middleware: the body bytes and the number of GET answers, per request path."""

    def __init__(self, app):
        self.app = app
        self.bytes: Counter = Counter()
        self.gets: Counter = Counter()

    def __call__(self, environ, start_response):
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            return body
        path = environ["PATH_INFO"]
        self.gets[path] += 1
        return self._count(path, body)

    def _count(self, path, body):
        try:
            for chunk in body:
                self.bytes[path] += len(chunk)
                yield chunk
        finally:
            if hasattr(body, "close"):
                body.close()


class CountingMotoServer(ThreadedMotoServer):
    """moto's threaded server with its app wrapped in CountingApp (moto's server mode keeps no such counts)."""

    def _server_entry(self) -> None:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self.counts = CountingApp(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, self.counts, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_and_ray(BUCKET, CountingMotoServer) as (fs, server):
        yield {"fs": fs, "counts": server.counts, "local": tmp_path_factory.mktemp("videos")}


def test_each_remote_video_is_read_once(s3):
    """Two 2 MB MP4s (incompressible frames) and a copy cut in half: the probe reads ranges (header, index, the
    packets of the last frame needed), the decode stage downloads each kept file once. Before: downloaded twice."""
    fs, counts, local = s3["fs"], s3["counts"], s3["local"]
    rng = np.random.default_rng(0)
    sizes = {}
    for name in ("a.mp4", "b.mp4"):
        path = write_video(str(local / name), rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8), fps=FPS)
        fs.put(path, f"{BUCKET}/{name}")
        sizes[name] = fs.size(f"{BUCKET}/{name}")
    data = (local / "a.mp4").read_bytes()
    fs.pipe(f"{BUCKET}/cut.mp4", data[: len(data) // 2])  # its front index is whole; the data of its last second is not
    manifest = [
        {"path": "a.mp4", "caption": "noise one"},
        {"path": "b.mp4", "caption": "noise two"},
        {"path": "a.mp4", "caption": "noise one, said otherwise"},  # a second caption: still one read
        {"path": "cut.mp4", "caption": "cut short", "start_s": 3.0},
    ]
    fs.pipe(f"{BUCKET}/manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest).encode())
    counts.bytes.clear()
    counts.gets.clear()

    info = prepare(
        PrepareOptions(
            manifest=f"s3://{BUCKET}/manifest.jsonl",
            out=str(local / "out"),
            buckets=parse_buckets("8x32x32"),
            fps=8,
            progress=False,
        )
    )

    got = {name: counts.bytes[f"/{BUCKET}/{name}"] for name in ("a.mp4", "b.mp4", "cut.mp4")}
    for name, size in sizes.items():
        # One whole read by the decode stage, plus the probe's ranges: well under a second whole read.
        assert size <= got[name] < 1.5 * size, (name, got[name], size)
    assert got["cut.mp4"] < 0.5 * len(data) / 2  # rejected by the probe's ranges: never downloaded
    assert info["num_clips"] == 2 and info["num_rejected"] == 1
    rejects = [json.loads(line) for line in (local / "out" / "rejects.jsonl").read_text().splitlines()]
    # The index promises 96 frames, the data of frame 72 on is missing (a downloaded copy's decord index says 'too
    # short').
    assert [(r["path"], r["reason"]) for r in rejects] == [("cut.mp4", "truncated")]
