"""Video files in a folder or object storage, through fsspec: `/srv/sora/store`, `s3://bucket/sora`, `gs://...`.

Job state is not here (see db.py); this holds only bytes:
    content/<id>-<ref>.mp4     the clip
    content/<id>-<ref>.png     its thumbnail
    inputs/<id>-<field>        a reference image of the request (image-to-video), until the job is done with it

`ref` is the lease token of the run that produced the clip, so a stale generator whose lease was taken
over writes (and cleans up) its own files and never touches the winner's. Writes are whole-object:
an atomic rename on a local disk, one upload on object stores, so a reader never sees half a video.
Reads are ranged and chunked (`open_range`); on object stores that presign (S3, GCS) a download is a
redirect to a short-lived signed URL instead (`sign`), so the bytes never pass through Serve at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

CONTENT_SUFFIX = {"video": ".mp4", "thumbnail": ".png"}
MEDIA_TYPE = {"video": "video/mp4", "thumbnail": "image/png"}
INPUTS = "inputs"
"""Where a job's reference images wait for its generator: `inputs/<job id>-<field>`, beside (not in) content/, so
neither the download file server nor the orphan sweep of content/ (sweep.py) sees them."""
CHUNK_BYTES = 1024 * 1024
"""One read of a streamed download: big enough for object-store throughput, small next to any replica's memory."""


class ContentStore:
    """Thread-safe: every call opens its own file handle."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self._lister: Any = None  # list_content's uncached filesystem (object stores)
        self.fs.makedirs(self._path("content"), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def path(self, job_id: str, ref: str, variant: str) -> str:
        if not job_id or "/" in job_id or "/" in ref or job_id.startswith("."):
            raise KeyError(job_id)
        return self._path("content", f"{job_id}-{ref}{CONTENT_SUFFIX[variant]}")

    @property
    def content_dir(self) -> str:
        """The folder (or prefix) holding the clips and thumbnails."""
        return self._path("content")

    def list_content(self, folder: str | None = None) -> list[dict[str, Any]]:
        """Every object under content/ (or `folder`, e.g. INPUTS) with its details (name, size, last-modified), listed
        afresh by a filesystem
        instance that caches no listing: fsspec caches listings per instance (s3fs, gcsfs: for good) and only this
        process's writes invalidate them, so a cached listing would hide what generators and other replicas upload
        (the orphan sweep's test shows it), and a listing left in `self.fs`'s cache is one fsspec's `info` may trust."""
        where = self.content_dir if folder is None else self._path(folder)
        if self.local:
            return self.fs.ls(where, detail=True)
        if self._lister is None:
            self._lister = type(self.fs)(
                **{**self.fs.storage_options, "use_listings_cache": False, "skip_instance_cache": True}
            )
        return self._lister.ls(where, detail=True)

    def ping(self) -> None:
        """Raises when the store cannot be reached (a health check): one metadata call, not a listing.
        "Not found" is an answer (object stores have no empty folders), so it passes."""
        try:
            self.fs.info(self._path("content"))
        except FileNotFoundError:
            pass

    # -- writing ------------------------------------------------------------------------------------

    def put_file(self, local_path: str, job_id: str, ref: str, variant: str) -> None:
        """Upload a finished local file (streamed by fsspec, never read whole here)."""
        self._put(local_path, self.path(job_id, ref, variant))

    def _put(self, local_path: str, dest: str) -> None:
        if self.local:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(dest))
            os.close(fd)
            try:
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, dest)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.put_file(local_path, dest)

    def put_bytes(self, data: bytes, job_id: str, ref: str, variant: str) -> None:
        with tempfile.NamedTemporaryFile(prefix="sora-put-") as f:
            f.write(data)
            f.flush()
            self.put_file(f.name, job_id, ref, variant)

    # -- reference images (inputs/) ------------------------------------------------------------------

    def input_path(self, job_id: str, name: str) -> str:
        if not job_id or "/" in job_id or job_id.startswith(".") or not name.isidentifier():
            raise KeyError(job_id)
        return self._path(INPUTS, f"{job_id}-{name}")

    def put_input(self, data: bytes, job_id: str, name: str) -> None:
        """Store a job's reference image (`name`: its request field) until the job is done with it."""
        dest = self.input_path(job_id, name)
        self.fs.makedirs(self._path(INPUTS), exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix="sora-put-") as f:
            f.write(data)
            f.flush()
            self._put(f.name, dest)

    def read_input(self, job_id: str, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.input_path(job_id, name))
        except (FileNotFoundError, OSError, KeyError):
            return None

    def find_input(self, job_ids: list[str], name: str, digest: str) -> bytes | None:
        """The first of these jobs' copies of reference image `name` whose sha256 is `digest` (jobs sampled together
        sent the same image, each stored under its own id); None when none is left."""
        for job_id in job_ids:
            data = self.read_input(job_id, name)
            if data is not None and hashlib.sha256(data).hexdigest() == digest:
                return data
        return None

    def remove_inputs(self, job_id: str, names: tuple[str, ...]) -> None:
        """Delete a job's reference images (finished, deleted, expired, or never admitted); missing ones are fine."""
        for name in names:
            try:
                self.fs.rm_file(self.input_path(job_id, name))
            except (FileNotFoundError, OSError, KeyError):
                pass

    def copy(self, src: tuple[str, str], dst: tuple[str, str]) -> bool:
        """Copy both variants of job src=(id, ref) to dst=(id, ref), server-side on object stores; False if missing."""
        try:
            for variant in CONTENT_SUFFIX:
                self.fs.copy(self.path(*src, variant), self.path(*dst, variant))
            return True
        except (FileNotFoundError, OSError):
            self.remove(*dst)
            return False

    def remove(self, job_id: str, ref: str | None) -> None:
        if not ref:
            return
        for variant in CONTENT_SUFFIX:
            try:
                self.fs.rm_file(self.path(job_id, ref, variant))
            except (FileNotFoundError, OSError, KeyError):
                pass

    # -- reading ------------------------------------------------------------------------------------

    def size(self, job_id: str, ref: str, variant: str) -> int | None:
        try:
            return int(self.fs.size(self.path(job_id, ref, variant)))
        except (FileNotFoundError, OSError, KeyError):
            return None

    def open_range(self, job_id: str, ref: str, variant: str, start: int) -> IO[bytes]:
        """A binary file positioned at `start`; the caller reads CHUNK_BYTES at a time and closes it.
        On object stores fsspec turns reads into ranged GETs (block_size caps what it buffers)."""
        f = self.fs.open(self.path(job_id, ref, variant), "rb", block_size=CHUNK_BYTES)
        if start:
            f.seek(start)
        return f

    def sign(self, job_id: str, ref: str, variant: str, expires_s: float) -> str | None:
        """A presigned URL of the object (S3, GCS: `fs.sign`), or None where the store cannot sign (a folder)."""
        from fsspec.spec import AbstractFileSystem

        # fsspec's base class cannot sign; only filesystems that override `sign` (s3fs, gcsfs, ...) can.
        if self.local or type(self.fs).sign is AbstractFileSystem.sign:
            return None
        return self.fs.sign(self.path(job_id, ref, variant), expiration=int(expires_s))

    def read_all(self, job_id: str, ref: str, variant: str) -> bytes | None:
        """Whole small files only (tests, thumbnails): downloads go through open_range."""
        try:
            return self.fs.cat_file(self.path(job_id, ref, variant))
        except (FileNotFoundError, OSError, KeyError):
            return None
