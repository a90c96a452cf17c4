"""Reading inputs and writing outputs wherever they live: local paths, or fsspec URIs (s3://, gs://, ...).

A remote input is downloaded to a temporary file for exactly as long as one stage needs it (the decoders
want a seekable local file; a clip reads frames scattered through it) and removed right after, so a worker
never accumulates the dataset on its disk. A request that fails for a transient reason (throttling,
a reset connection, a timeout) is retried with exponential backoff; after RETRIES tries the input is
rejected with the last error as the reason, and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

RETRIES = 5
"""Tries per request; with BACKOFF_S doubling, about 3 s of waiting before an input is given up."""
BACKOFF_S = 0.2
"""First wait between tries; doubled each time, with up to 50% jitter so workers do not retry in step."""
COPY_BLOCK = 8 << 20
"""Bytes per read while downloading: big enough for object stores' throughput, small enough to retry."""

T = TypeVar("T")


class StorageError(Exception):
    """An input that could not be read: `reason` is its reject reason ("missing" or "unreadable")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_transient(err: BaseException) -> bool:
    """Worth another try: throttling, dropped connections and timeouts; not a missing or forbidden object."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = f"{type(err).__name__} {err}".lower()
    markers = ("slowdown", "throttl", "too many requests", "503", "500", "timeout", "timed out", "reset", "connection",
               "temporarily", "broken pipe", "internalerror")  # fmt: skip
    return isinstance(err, (ConnectionError, TimeoutError)) or (isinstance(err, OSError) and any(m in text for m in markers))


def with_retries(fn: Callable[[], T], what: str, retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> T:
    """fn(), retried on transient errors with exponential backoff; StorageError once it gives up."""
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except FileNotFoundError as err:
            raise StorageError("missing", f"{what}: not found ({err})") from None
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err) and not isinstance(err, OSError):
                raise  # not an I/O failure (e.g. a file that does not parse): the caller's to judge
            if not is_transient(err) or attempt == retries:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise StorageError("unreadable", f"{what}: {type(err).__name__}: {' '.join(str(err).split())}{tries}") from None
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def open_uri(uri: str, mode: str = "rb") -> Any:
    import fsspec

    return fsspec.open(uri, mode).open()


class LocalFiles:
    """`with files.local(source) as path`: a local path for the block; a remote source's copy is removed after."""

    def __init__(self) -> None:
        self._dir: str | None = None

    @contextlib.contextmanager
    def local(self, source: str) -> Iterator[str]:
        if not is_uri(source):
            yield source
            return
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sora-prepare-")
        fd, local = tempfile.mkstemp(dir=self._dir, suffix=Path(source).suffix)
        os.close(fd)
        try:
            with_retries(lambda: _download(source, local), source)
            yield local
        finally:
            os.unlink(local)

    def __del__(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _download(source: str, local: str) -> None:
    with open_uri(source) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_BLOCK)
