"""Reading inputs and writing outputs wherever they live: local paths, or fsspec URIs (s3://, gs://, ...).

A remote input is downloaded to a temporary file for exactly as long as one stage needs it (the decoders
want a seekable local file; a clip reads frames scattered through it) and removed right after, so a worker
never accumulates the dataset on its disk (`--scratch DIR` says where). The probe of a remote MP4/MOV does not
download it: it reads byte ranges (`RangeFile`), so the decode stage's download is the file's one whole read
(probe.RANGE_PROBE_SUFFIXES says which files). A request that fails for a transient reason (throttling, a reset
connection, a timeout, EAGAIN) is retried with exponential backoff.

Two kinds of failure, kept apart: the *input's* (missing, forbidden: `StorageError`, the input is rejected
with the reason and the run goes on) and the *run's own storage* (a full or failing disk, a store that stays
unreachable after RETRIES tries: `StorageUnavailable`), which stops the run with one line and rejects
nothing, so the same command resumes once the storage is back.
"""

from __future__ import annotations

import contextlib
import errno
import io
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
RANGE_BLOCK = 256 << 10
"""Bytes per ranged request of a `RangeFile`: a probe reads an MP4's header, index and first frames in one or two,
where a request costs tens of milliseconds whatever its size up to about this."""
RANGE_BLOCKS = 16
"""Blocks a `RangeFile` keeps (4 MiB): FFmpeg goes back to the header and the index while it seeks."""

T = TypeVar("T")


class StorageError(Exception):
    """An input that could not be read: `reason` is its reject reason ("missing" or "unreadable")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class StorageUnavailable(Exception):
    """The run's own storage failed (disk full, I/O error, a store unreachable after retries): the run stops;
    no input is rejected for it. One line: what was being read or written, and the error."""


STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EIO", "EROFS", "ENOMEM", "EMFILE", "ENFILE", "ESTALE")
    if hasattr(errno, name)
)
"""OSError numbers that say the machine or its storage failed, not the input: no retry, the run stops."""
RETRY_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EAGAIN", "EINTR", "EBUSY", "ETIMEDOUT") if hasattr(errno, name)
)
"""OSError numbers worth another try; still failing after RETRIES, the run stops (StorageUnavailable)."""


def storage_failure(err: BaseException, what: str) -> StorageUnavailable | None:
    """The StorageUnavailable to raise for `err` (an error of our disk, not of the input), else None."""
    if isinstance(err, StorageUnavailable):
        return err
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return StorageUnavailable(f"{what}: {type(err).__name__}: [Errno {err.errno}] {os.strerror(err.errno)}")
    return None


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_transient(err: BaseException) -> bool:
    """Worth another try: throttling, dropped connections and timeouts; not a missing or forbidden object."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, OSError) and err.errno in RETRY_ERRNOS:
        return True
    text = f"{type(err).__name__} {err}".lower()
    markers = (
        "slowdown",
        "throttl",
        "too many requests",
        "503",
        "500",
        "timeout",
        "timed out",
        "reset",
        "connection",
        "temporarily",
        "broken pipe",
        "internalerror",
    )
    return isinstance(err, (ConnectionError, TimeoutError)) or (
        isinstance(err, OSError) and any(m in text for m in markers)
    )


def with_retries(fn: Callable[[], T], what: str, retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> T:
    """fn(), retried on transient errors with exponential backoff. Gives up with StorageError (the input's fault:
    missing, forbidden) or StorageUnavailable (our storage's: a full disk at once, a transient error that
    outlasted the retries)."""
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except FileNotFoundError as err:
            raise StorageError("missing", f"{what}: not found ({err})") from None
        except Exception as err:  # noqa: BLE001 - classified below
            ours = storage_failure(err, what)
            if ours is not None:
                raise ours from None
            if not is_transient(err) and not isinstance(err, OSError):
                raise  # not an I/O failure (e.g. a file that does not parse): the caller's to judge
            detail = f"{what}: {type(err).__name__}: {' '.join(str(err).split())}"
            if is_transient(err) and attempt == retries:
                raise StorageUnavailable(f"{detail} (still failing after {attempt} tries)") from None
            if not is_transient(err):
                raise StorageError("unreadable", detail) from None
            time.sleep(backoff_s * 2 ** (attempt - 1) * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def open_uri(uri: str, mode: str = "rb") -> Any:
    import fsspec

    return fsspec.open(uri, mode).open()


class LocalFiles:
    """`with files.local(source) as path`: a local path for the block; a remote source's copy is removed after.
    Copies go under `scratch` (None: the system's temp folder)."""

    def __init__(self, scratch: str | None = None) -> None:
        self.scratch = scratch
        self._dir: str | None = None

    @contextlib.contextmanager
    def local(self, source: str) -> Iterator[str]:
        if not is_uri(source):
            yield source
            return
        try:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="sora-prepare-", dir=self.scratch)
            fd, local = tempfile.mkstemp(dir=self._dir, suffix=Path(source).suffix)
            os.close(fd)
        except OSError as err:
            raise storage_failure(err, f"scratch folder {self.scratch or tempfile.gettempdir()}") or err from None
        try:
            with_retries(lambda: _download(source, local), f"{source} (copying to {self._dir})")
            yield local
        finally:
            os.unlink(local)

    def __del__(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _download(source: str, local: str) -> None:
    with open_uri(source) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_BLOCK)


class RangeFile(io.RawIOBase):
    """A remote object as a seekable binary file that fetches only the byte ranges read: RANGE_BLOCK-sized ranged
    GETs (each retried like any request), the last RANGE_BLOCKS kept. The probe hands it to FFmpeg so that a remote
    video is not downloaded twice (once to probe, once to decode): the probe reads its header, index and a few
    packets. Opening raises StorageError for a missing or forbidden object, StorageUnavailable for a store that
    stays unreachable; `bytes_read` counts what was fetched."""

    def __init__(self, uri: str, block: int = RANGE_BLOCK, blocks: int = RANGE_BLOCKS) -> None:
        from collections import OrderedDict

        import fsspec

        super().__init__()
        self.name = uri
        self.fs, self.path = fsspec.core.url_to_fs(uri)
        self.size = int(with_retries(lambda: self.fs.size(self.path), uri))
        self.block, self.blocks = block, blocks
        self.bytes_read = 0
        self._pos = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self.size:
            k, offset = divmod(self._pos, self.block)
            data = self._fetch(k)
            n = min(len(view) - done, len(data) - offset)
            view[done : done + n] = data[offset : offset + n]
            self._pos += n
            done += n
        return done

    def _fetch(self, k: int) -> bytes:
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        start, end = k * self.block, min(self.size, (k + 1) * self.block)
        data = with_retries(
            lambda: self.fs.cat_file(self.path, start=start, end=end), f"{self.name} (bytes {start}-{end})"
        )
        self.bytes_read += len(data)
        self._cache[k] = data
        if len(self._cache) > self.blocks:
            self._cache.popitem(last=False)
        return data
