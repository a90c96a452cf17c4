"""The job store: video objects, their MP4s and PNG thumbnails, in a folder or any fsspec URI.

Everything a client was told about lives here, not in a replica's memory, so a replica that dies or
restarts loses nothing that was accepted: the ingress re-queues unfinished jobs it finds at start,
and any replica can answer for any job.

Layout under the root:
    jobs/<id>.json       the job record (the public video object plus internal fields, `_`-prefixed)
    content/<id>.mp4     the clip
    content/<id>.png     its thumbnail
    cache/<key>.json     result cache: a (prompt, parameters, seed) hash -> the id that produced it

Writes are whole-object: atomic rename on a local disk, single PUTs on object stores, so readers
never see half a record or half a video.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

CONTENT_SUFFIX = {"video": ".mp4", "thumbnail": ".png"}
TERMINAL = ("completed", "failed")


class JobStore:
    """Thread-safe access to one store root (the generator writes from its sampling thread)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._lock = threading.Lock()
        for sub in ("jobs", "content", "cache"):
            self.fs.makedirs(self._path(sub), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- raw I/O --------------------------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        if self.local:
            folder = os.path.dirname(path)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def _read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(path)
        except (FileNotFoundError, OSError):
            return None

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except (FileNotFoundError, OSError):
            pass

    def ping(self) -> None:
        """Raises when the store cannot be listed (a health check)."""
        self.fs.ls(self._path("jobs"), detail=False)

    # -- jobs -----------------------------------------------------------------------------------

    def _job_path(self, job_id: str) -> str:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise KeyError(job_id)
        return self._path("jobs", f"{job_id}.json")

    def put(self, job: dict[str, Any]) -> None:
        self._write(self._job_path(job["id"]), json.dumps(job).encode())

    def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            data = self._read(self._job_path(job_id))
        except KeyError:
            return None
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            return None

    def update(self, job_id: str, **fields: Any) -> dict[str, Any] | None:
        """Merge fields into a job; None (and nothing written) when it was deleted meanwhile."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return None
            job.update(fields)
            self.put(job)
            return job

    def all_jobs(self) -> list[dict[str, Any]]:
        try:
            names = self.fs.ls(self._path("jobs"), detail=False)
        except FileNotFoundError:
            return []
        jobs = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                job = self.get(base[: -len(".json")])
                if job is not None:
                    jobs.append(job)
        return jobs

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc", owner: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Jobs newest first (or oldest with order='asc'), `limit` of them after the id `after`; and whether more remain."""
        jobs = [j for j in self.all_jobs() if j.get("_owner") == owner]
        jobs.sort(key=lambda j: (j.get("_created_ns", j["created_at"] * 10**9), j["id"]), reverse=order == "desc")
        if after is not None:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def unfinished(self) -> list[dict[str, Any]]:
        """Jobs accepted but not finished, oldest first: what an ingress re-queues when it starts."""
        jobs = [j for j in self.all_jobs() if j.get("status") not in TERMINAL]
        return sorted(jobs, key=lambda j: j.get("_created_ns", 0))

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return False
            for variant in CONTENT_SUFFIX:
                self._remove(self._content_path(job_id, variant))
            self._remove(self._job_path(job_id))
            return True

    # -- content --------------------------------------------------------------------------------

    def _content_path(self, job_id: str, variant: str) -> str:
        return self._path("content", f"{job_id}{CONTENT_SUFFIX[variant]}")

    def put_content(self, job_id: str, variant: str, data: bytes) -> None:
        self._write(self._content_path(job_id, variant), data)

    def get_content(self, job_id: str, variant: str) -> bytes | None:
        return self._read(self._content_path(job_id, variant))

    # -- result cache ---------------------------------------------------------------------------

    def cache_put(self, key: str, job_id: str) -> None:
        self._write(self._path("cache", f"{key}.json"), json.dumps({"id": job_id}).encode())

    def cache_get(self, key: str) -> str | None:
        data = self._read(self._path("cache", f"{key}.json"))
        return json.loads(data)["id"] if data else None
