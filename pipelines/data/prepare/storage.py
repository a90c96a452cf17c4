"""Reading inputs wherever they live: local paths as they are, fsspec URIs through a local copy."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pipelines.data.prepare.manifest import _is_uri


class LocalFiles:
    """Remote inputs (fsspec URIs) are copied to a per-actor temp folder; local paths pass through."""

    def __init__(self) -> None:
        self._dir: str | None = None
        self._cache: dict[str, str] = {}

    def get(self, source: str) -> str:
        if not _is_uri(source):
            return source
        if source not in self._cache:
            import fsspec

            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="sora-prepare-")
            local = os.path.join(self._dir, hashlib.sha1(source.encode()).hexdigest() + Path(source).suffix)
            try:
                with fsspec.open(source, "rb") as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except FileNotFoundError:
                return source + ".missing"  # the probe then reports "missing"
            self._cache[source] = local
        return self._cache[source]
