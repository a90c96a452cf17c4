"""Downloads from a folder store without passing the bytes through Serve: signed URLs on a file server.

Object stores presign (store.py: a 307 to S3/GCS, which serves the bytes and Range itself). A folder
cannot, and streaming a clip through Serve costs memory: in Ray 2.60 the replica's ASGI messages go to
the HTTP proxy as a Ray streaming generator with no backpressure (Serve's `MessageQueue` is unbounded and
the proxy's handle sets no `_generator_backpressure_num_objects`), so a fast replica pushes the whole file
into its own and the proxy's memory while a slower client reads (a 200 MB clip grew them by 378 MB:
benchmarks/bench_serve_download_peak_rss_mb.py).

So each ingress replica of a folder store runs a small HTTP file server (uvicorn, in a thread) that plays
the object store's part: the ingress checks the caller and ownership as for any download, then answers
307 to `http://HOST:PORT/files/NAME?expires=T&sig=HMAC`, valid `download_redirect_s` like a presigned
URL. The file server checks the signature and expiry and sends the file with Starlette's `FileResponse`
(Range and 206 included) straight to the socket, which waits for the client (uvicorn's flow control):
memory stays flat whatever the file's size. The HMAC key is a random file in the store folder, created
once, so any replica's signature is good on any replica's server.

The redirect is only given where it can be followed: the request came over plain HTTP to a host name of
this machine (the proxy that received it runs here: one-machine serving, what folder stores are for).
Elsewhere (a folder shared by several nodes, TLS in front) the ingress streams through Serve, at most
`max_streaming_downloads` at once per replica (streaming.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

logger = logging.getLogger("ray.serve")

KEY_FILE = ".download-key"
"""The HMAC key's file in the store folder (0600): shared by every replica that reads the folder."""
ROUTE = "/files/"
START_TIMEOUT_S = 10.0


def store_key(folder: str) -> bytes:
    """The folder's signing key, created by the first replica (O_EXCL: two replicas starting at once agree)."""
    path = os.path.join(folder, KEY_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the creator may not have written it yet
            with open(path, "rb") as f:
                key = f.read()
            if len(key) == 32:
                return key
            time.sleep(0.02)
        raise RuntimeError(f"{path} does not hold a 32-byte key") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def signature(key: bytes, name: str, expires: int) -> str:
    return hmac.new(key, f"{name}\n{expires}".encode(), hashlib.sha256).hexdigest()


def is_this_machine(host: str) -> bool:
    """Whether `host` (a request's Host) names this machine: `localhost`, this machine's own name, or an IP
    literal that is loopback or one of its interface addresses. No DNS: a client's Host header is never
    resolved (a lookup per request, in a shared thread pool, for a name the client chose)."""
    import psutil

    host = host.strip("[]").split("%")[0].lower()
    if host in ("localhost", socket.gethostname().lower()):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mine = {a.address.split("%")[0] for nics in psutil.net_if_addrs().values() for a in nics}
    return addr.is_loopback or str(addr) in mine


class FileServer:
    """Serves `content_dir`'s files to holders of a signed URL, on `host`:`port` (0: any free port); `host` is
    the interface clients following the 307 reach (settings.download_host, as Serve's own HTTP host)."""

    def __init__(
        self,
        content_dir: str,
        key: bytes,
        port: int = 0,
        media_types: dict[str, str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.content_dir, self.key, self.media_types, self.host = content_dir, key, media_types or {}, host
        self.port: int | None = None
        self._server: Any = None
        self._requested_port = port

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, JSONResponse
        from starlette.routing import Route

        from .api import ApiError, parse_range

        def refuse(err: ApiError) -> Any:  # OpenAI's error shape, as the API's own answers
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

        async def serve_file(request: Any) -> Any:
            name = request.path_params["name"]
            try:
                expires = int(request.query_params.get("expires", ""))
            except ValueError:
                expires = -1
            # Bytes, not str: compare_digest raises TypeError on a non-ASCII str (a 500 on any `sig=é`).
            sig = request.query_params.get("sig", "").encode("utf-8", "surrogateescape")
            if (
                "/" in name
                or name.startswith(".")
                or not hmac.compare_digest(sig, signature(self.key, name, expires).encode())
            ):
                return refuse(ApiError(403, "This download link is not valid.", code="invalid_signature"))
            if expires < time.time():
                return refuse(
                    ApiError(403, "This download link has expired; ask for the content again.", code="link_expired")
                )
            path = os.path.join(self.content_dir, name)
            try:
                span = parse_range(request.headers.get("range"), os.path.getsize(path))  # 416 in the API's words
            except FileNotFoundError:
                return refuse(ApiError(404, "The content is no longer in the store.", code="content_not_found"))
            except ApiError as err:
                return refuse(err)
            # FileResponse parses Range again: hand it the range as checked here (digits bounded), or none.
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"range"]
            if span is not None:
                headers.append((b"range", f"bytes={span[0]}-{span[1]}".encode()))
            request.scope["headers"] = headers
            stem, ext = os.path.splitext(name)
            video_id = stem.rsplit("-", 1)[0]
            # FileResponse reads 64 KiB at a time and awaits each send: the socket's pace, Range and 206 included.
            return FileResponse(
                path,
                media_type=self.media_types.get(ext),
                filename=f"{video_id}{ext}",
                headers={"Cache-Control": "private, no-store"},
            )

        return Starlette(routes=[Route(ROUTE + "{name}", serve_file, methods=["GET", "HEAD"])])

    def start(self) -> int | None:
        """Start serving in a daemon thread; the bound port, or None when it could not start (logged)."""
        import uvicorn

        config = uvicorn.Config(
            self.app(), host=self.host, port=self._requested_port, log_level="warning", access_log=False, lifespan="off"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="sora-file-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            logger.warning(
                "download file server did not start on %s:%s; folder-store downloads stream through Serve",
                self.host,
                self._requested_port,
            )
            server.should_exit = True
            return None
        self._server = server
        self.port = int(server.servers[0].sockets[0].getsockname()[1])
        return self.port

    def url(self, scheme: str, host: str | None, name: str, expires_s: float) -> str | None:
        """A signed URL of `name` valid `expires_s`, or None where the client could not follow it (see the module)."""
        if self.port is None or scheme != "http" or not host or not is_this_machine(host):
            return None
        if ipaddress.ip_address(self.host).is_loopback and host.strip("[]") not in ("localhost", "127.0.0.1", "::1"):
            return None  # listening on loopback only: a client that reached another address could not follow
        expires = int(time.time() + expires_s)
        netloc = f"[{host}]" if ":" in host else host
        return f"http://{netloc}:{self.port}{ROUTE}{name}?expires={expires}&sig={signature(self.key, name, expires)}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
