"""The streaming fallback of downloads: a clip sent from the store through Serve, with a bound on what it holds.

Downloads normally leave Serve: a 307 to a presigned URL (S3, GCS) or to the replica's file server (a folder,
files.py). Where neither can be followed (TLS in front of a folder store, `download_redirect_s: null`) the
ingress streams the clip itself. Ray 2.60 gives that stream no backpressure: the replica's ASGI `send` goes to
Serve's unbounded `MessageQueue`, and the proxy calls the replica's streaming method without
`_generator_backpressure_num_objects` (serve/_private/request_router/replica_wrapper.py, not configurable), so
nothing tells the replica how far the client has read and a fast store fills the replica's and the proxy's
memory with up to the whole clip while a slow client reads.

What can be bounded from the application is bounded here:
  - each read is one `CHUNK_BYTES` (1 MiB) chunk, and the next is read only after the previous one was handed
    to Serve, so the replica holds at most a chunk of its own beyond what Serve has queued;
  - at most `max_streaming_downloads` streams are pushed from one replica at once; one more is answered 503 with
    `Retry-After` (code `too_many_downloads`) before any byte is read, like Serve's own `max_queued_requests`.
What this does not bound: a slot is freed when the replica has pushed its last chunk, and the proxy may still hold
the part a slow client has not read. Bounding that needs a consumer signal Ray 2.60 does not give the replica;
clients that matter get the 307 instead (presigned URL or files.py).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import IO

from .errors import ApiError
from .store import CHUNK_BYTES, ContentStore

RETRY_AFTER_S = 5
"""What a download refused for want of a streaming slot is told to wait: a 1 MiB-chunked clip of a few hundred
MB streams in seconds on a LAN, and the SDK's retries back off from here."""


class StreamSlots:
    """The streaming downloads of one replica (one event loop: a plain counter, no lock)."""

    def __init__(self) -> None:
        self.active = 0

    def acquire(self, limit: int) -> weakref.finalize:
        """A slot, released by calling it (idempotent); 503 with Retry-After when `limit` streams run already."""
        if self.active >= limit:
            raise ApiError(
                503,
                f"Too many downloads are streaming through this server (max_streaming_downloads={limit}); "
                f"retry after {RETRY_AFTER_S} s.",
                code="too_many_downloads",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.active += 1
        return weakref.finalize(self, StreamSlots._release, weakref.ref(self))

    @staticmethod
    def _release(ref: weakref.ref) -> None:
        slots = ref()
        if slots is not None:
            slots.active -= 1


class StoreStream:
    """An async iterator of the bytes [start, start + length) of a stored file, CHUNK_BYTES at a time, holding a
    streaming slot until it ends, fails, is closed (the client went away: Serve cancels the request) or is dropped
    unread (a disconnect before the first chunk): the slot is released exactly once in every case."""

    def __init__(
        self, content: ContentStore, key: tuple[str, str, str], start: int, length: int, slot: weakref.finalize
    ) -> None:
        self.content, self.key, self.start, self.length = content, key, start, length
        self._file: IO[bytes] | None = None
        self._slot = slot
        self._dropped = weakref.finalize(self, slot)  # released when garbage-collected unread

    def __aiter__(self) -> StoreStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            if self.length <= 0:
                raise StopAsyncIteration
            if self._file is None:
                self._file = await asyncio.to_thread(self.content.open_range, *self.key, self.start)
            chunk = await asyncio.to_thread(self._file.read, min(CHUNK_BYTES, self.length))
            if not chunk:
                raise StopAsyncIteration
            self.length -= len(chunk)
            return chunk
        except BaseException:  # the end, a store error, or cancellation: close and free the slot, then pass it on
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self.length = 0
        f, self._file = self._file, None
        try:
            if f is not None:
                await asyncio.to_thread(f.close)
        finally:
            self._slot()
