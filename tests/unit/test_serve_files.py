"""The folder store's download server (pipelines/serve/files.py): signed links, expiry, Range, no Ray."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from pipelines.serve.files import KEY_FILE, FileServer, is_this_machine, signature, store_key


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    (root / "content").mkdir()
    data = os.urandom(300_000)
    (root / "content" / "video_abc-ref1.mp4").write_bytes(data)
    key = store_key(str(root))
    srv = FileServer(str(root / "content"), key, 0, {".mp4": "video/mp4"})
    assert srv.start() is not None
    yield srv, data, root
    srv.stop()


def test_a_signed_link_serves_the_file_with_ranges(server):
    srv, data, _ = server
    url = srv.url("http", "127.0.0.1", "video_abc-ref1.mp4", 60)
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content == data and whole.headers["content-type"] == "video/mp4"
    assert 'filename="video_abc.mp4"' in whole.headers["content-disposition"]
    part = httpx.get(url, headers={"Range": "bytes=4-7"})
    assert (
        part.status_code == 206
        and part.content == data[4:8]
        and part.headers["content-range"] == f"bytes 4-7/{len(data)}"
    )
    assert httpx.get(url, headers={"Range": "bytes=-2"}).content == data[-2:]
    beyond = httpx.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.json()["error"]["code"] == "range_not_satisfiable"


def test_bad_expired_or_foreign_links_are_refused(server):
    srv, _, root = server
    url = srv.url("http", "127.0.0.1", "video_abc-ref1.mp4", 60)
    assert httpx.get(url.replace("sig=", "sig=0")).status_code == 403
    past = int(time.time()) - 1
    expired = (
        f"http://127.0.0.1:{srv.port}/files/video_abc-ref1.mp4?expires={past}"
        f"&sig={signature(srv.key, 'video_abc-ref1.mp4', past)}"
    )
    assert httpx.get(expired).status_code == 403
    forged = (
        f"http://127.0.0.1:{srv.port}/files/{KEY_FILE}?expires={past + 99}"
        f"&sig={signature(b'x' * 32, KEY_FILE, past + 99)}"
    )
    assert httpx.get(forged).status_code == 403
    assert store_key(str(root)) == srv.key  # a second replica reads the same key


def test_links_are_only_given_where_the_client_can_follow_them(server):
    srv, _, _ = server
    assert srv.url("https", "127.0.0.1", "video_abc-ref1.mp4", 60) is None  # TLS in front: stream instead
    assert srv.url("http", "sora.example.invalid", "video_abc-ref1.mp4", 60) is None  # not this machine
    assert is_this_machine("localhost")
