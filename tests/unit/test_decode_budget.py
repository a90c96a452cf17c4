"""The decode budget (decoded pixels per decode task) comes from the nodes' memory, with a floor, a cap and an
override."""

from __future__ import annotations

import pytest

from pipelines.data.prepare.encode import batch_rows
from pipelines.data.prepare.options import (
    DECODE_BATCH_BYTES,
    DECODE_BATCH_BYTES_MAX,
    PrepareError,
    PrepareOptions,
    decode_batch_bytes,
    parse_buckets,
)

GIB = 2**30
CLIP_81x480x832 = 81 * 480 * 832 * 3


def _node(cpus: float, memory_gib: float, alive: bool = True) -> dict:
    """A node as `ray.nodes()` reports it."""
    return {"Alive": alive, "Resources": {"CPU": cpus, "memory": memory_gib * GIB, "object_store_memory": 8.0 * GIB}}


def test_budget_follows_the_node_memory() -> None:
    # 16 CPUs sharing 90 GiB of task memory: a quarter of 5.6 GiB per task
    assert decode_batch_bytes([_node(16, 90)]) == int(0.25 * 90 * GIB / 16)
    # more than one 81x480x832 clip per task, where the old fixed 128 MiB allowed one
    assert batch_rows(CLIP_81x480x832, 256, decode_batch_bytes([_node(16, 90)])) == 15
    assert batch_rows(CLIP_81x480x832, 256, DECODE_BATCH_BYTES) == 1


def test_the_smallest_alive_node_decides() -> None:
    nodes = [_node(16, 90), _node(8, 16), _node(64, 1, alive=False), {"Alive": True, "Resources": {"GPU": 1.0}}]
    assert decode_batch_bytes(nodes) == int(0.25 * 16 * GIB / 8)


def test_fewer_workers_get_more_each() -> None:
    assert decode_batch_bytes([_node(16, 40)], workers=4) == int(0.25 * 40 * GIB / 4)


def test_floor_cap_and_override() -> None:
    assert decode_batch_bytes([_node(64, 8)]) == DECODE_BATCH_BYTES  # tiny share: the floor
    assert decode_batch_bytes([_node(2, 512)]) == DECODE_BATCH_BYTES_MAX  # huge share: the cap
    assert decode_batch_bytes([]) == DECODE_BATCH_BYTES  # nothing known
    assert decode_batch_bytes([_node(16, 90)], override_mib=300) == 300 * 2**20


def test_bad_override_is_a_one_line_error() -> None:
    with pytest.raises(PrepareError, match="--decode-batch-mib must be >= 1 MiB, got 0"):
        PrepareOptions(manifest="m.csv", out="o", buckets=parse_buckets("8x32x32"), decode_batch_mib=0)
