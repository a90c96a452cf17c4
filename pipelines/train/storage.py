"""The run folder: a local path or any fsspec URI (`s3://bucket/runs/x`, `gs://...`, `abfs://...`).

    store = RunStore("s3://bucket/runs/smoke")
    store.write_text("run.json", "...")
    store.upload("/tmp/mirror/export", "export")        # a file or a whole folder
    fs, path = store.pyarrow_filesystem()                  # Ray Train's storage_filesystem

Ray Train writes checkpoints through the same filesystem (one set of credentials and endpoint, from the
environment: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ... for S3). What rank 0 writes itself (metrics,
TensorBoard events, the loss plot, exports) goes to a local mirror first: on a local run folder the
mirror is the folder itself; on object storage it is a temp folder uploaded at each checkpoint and at
the end (object stores cannot append to metrics.csv in place).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Any


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than file:// (local paths and file:// are local)."""
    return "://" in uri and not uri.startswith("file://")


class RunStore:
    """Files of one run folder through fsspec; paths are relative to the run folder, `/`-separated."""

    def __init__(self, uri: str):
        import fsspec

        self.remote = is_remote(uri)
        self.uri = uri.rstrip("/") if self.remote else os.path.abspath(uri.removeprefix("file://"))
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    def _path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """What a person or another tool uses to find `rel` (a local path, or the URI)."""
        if not self.remote:
            return os.path.join(self.uri, rel) if rel else self.uri
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._path(rel))

    def is_empty(self) -> bool:
        """True when the folder does not exist or holds nothing."""
        if not self.exists():
            return True
        return not self.fs.ls(self._path(), detail=False)

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly inside `rel` (empty when it does not exist)."""
        if not self.exists(rel):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._path(rel), detail=False))

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self._path(rel), exist_ok=True)

    def read_text(self, rel: str) -> str:
        with self.fs.open(self._path(rel), "r") as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        parent = posixpath.dirname(rel)
        if parent and not self.remote:
            self.makedirs(parent)
        with self.fs.open(self._path(rel), "w") as f:
            f.write(text)

    def upload(self, local: str, rel: str) -> None:
        """Copy a local file or folder to `rel` (a folder lands at `rel`, merged into what is there)."""
        if not self.remote:
            dest = os.path.join(self.uri, rel)
            if os.path.abspath(local) == os.path.abspath(dest):
                return
            if os.path.isdir(local):
                shutil.copytree(local, dest, dirs_exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(local, dest)
            return
        if os.path.isdir(local):
            for base, _, files in os.walk(local):
                for name in files:
                    src = os.path.join(base, name)
                    sub = os.path.relpath(src, local).replace(os.sep, "/")
                    self.fs.put_file(src, self._path(posixpath.join(rel, sub)))
        else:
            self.fs.put_file(local, self._path(rel))

    def download(self, rel: str, local: str) -> str:
        """Copy `rel` (a file or folder) to the local path `local`; returns `local`."""
        if self.fs.isdir(self._path(rel)):
            os.makedirs(local, exist_ok=True)
            self.fs.get(self._path(rel).rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
        else:
            os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
            self.fs.get_file(self._path(rel), local)
        return local

    def pyarrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it) of the run folder, for Ray Train's RunConfig."""
        import pyarrow.fs

        if not self.remote:
            return pyarrow.fs.LocalFileSystem(), self.uri
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs)), self.root


class LocalMirror:
    """Where rank 0 writes run files before they reach the store (the run folder itself when local)."""

    def __init__(self, store: RunStore, tmp_dir: str | None = None):
        self.store = store
        self._tmp = None if not store.remote else tempfile.mkdtemp(prefix="sora-run-", dir=tmp_dir)
        self.root = store.uri if self._tmp is None else self._tmp
        os.makedirs(self.root, exist_ok=True)

    def path(self, rel: str = "") -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def fetch(self, rel: str) -> bool:
        """Bring `rel` from the store into the mirror (resuming a remote run); False when it is not there."""
        if self._tmp is None:
            return os.path.exists(self.path(rel))
        if not self.store.exists(rel):
            return False
        self.store.download(rel, self.path(rel))
        return True

    def sync(self, *rels: str) -> None:
        """Upload these files/folders of the mirror to the store (nothing to do for a local run folder)."""
        if self._tmp is None:
            return
        for rel in rels:
            if os.path.exists(self.path(rel)):
                self.store.upload(self.path(rel), rel)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
