"""The streaming fallback's bounds (pipelines/serve/streaming.py), no Ray: a real folder store, chunks of at most
CHUNK_BYTES read one at a time, at most N streams per replica (then 503 with Retry-After), and a slot freed
exactly once whether the stream ends, is closed, is cancelled mid-read or is dropped unread."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest

from pipelines.serve.errors import ApiError
from pipelines.serve.store import CHUNK_BYTES, ContentStore
from pipelines.serve.streaming import RETRY_AFTER_S, StoreStream, StreamSlots

JOB, REF = f"video_{'1' * 32}", "2" * 32


@pytest.fixture
def store(tmp_path):
    content = ContentStore(str(tmp_path / "store"))
    data = os.urandom(3 * CHUNK_BYTES + 123)
    content.put_bytes(data, JOB, REF, "video")
    return content, data


def _stream(content: ContentStore, slots: StreamSlots, start: int, length: int, limit: int = 2) -> StoreStream:
    return StoreStream(content, (JOB, REF, "video"), start, length, slots.acquire(limit))


def test_a_stream_sends_its_range_in_bounded_chunks_and_frees_its_slot(store):
    content, data = store
    slots = StreamSlots()

    async def read(start: int, length: int) -> list[bytes]:
        return [c async for c in _stream(content, slots, start, length)]

    chunks = asyncio.run(read(0, len(data)))
    assert b"".join(chunks) == data and max(map(len, chunks)) == CHUNK_BYTES and len(chunks) == 4
    assert slots.active == 0
    assert b"".join(asyncio.run(read(CHUNK_BYTES - 5, 10))) == data[CHUNK_BYTES - 5 : CHUNK_BYTES + 5]
    assert slots.active == 0


def test_past_the_limit_a_download_gets_503_with_retry_after(store):
    content, _ = store
    slots = StreamSlots()
    held = [_stream(content, slots, 0, 10, limit=2) for _ in range(2)]
    with pytest.raises(ApiError) as err:
        slots.acquire(2)
    assert err.value.status == 503 and err.value.code == "too_many_downloads"
    assert err.value.headers == {"Retry-After": str(RETRY_AFTER_S)} and "max_streaming_downloads=2" in err.value.message
    asyncio.run(held[0].aclose())
    asyncio.run(held[0].aclose())  # closing twice frees one slot, not two
    assert slots.active == 1
    slots.acquire(2)()  # a slot is free again
    assert slots.active == 1


def test_a_cancelled_or_dropped_stream_frees_its_slot(store):
    content, data = store
    slots = StreamSlots()

    async def cancel_mid_read() -> None:
        stream = _stream(content, slots, 0, len(data))
        first = await stream.__anext__()
        assert len(first) == CHUNK_BYTES and slots.active == 1
        task = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)
        task.cancel()  # the client went away: Serve cancels the request
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slots.active == 0 and stream._file is None  # freed and closed at once, not when garbage-collected

    asyncio.run(cancel_mid_read())
    assert slots.active == 0
    unread = _stream(content, slots, 0, len(data))  # disconnected before the first chunk: never iterated
    assert slots.active == 1
    del unread
    gc.collect()
    assert slots.active == 0
