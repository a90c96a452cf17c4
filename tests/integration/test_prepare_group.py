"""Grouping the manifest by source (prepare/group.py) on a local Ray: the two-level merge gives the one-level
merge's blocks row for row, and the driver's object references stay under its bound, counted by Ray's own
reference table (the core worker's), not by us."""

from __future__ import annotations

import json
import math

import pytest

ray = pytest.importorskip("ray")

from pipelines.data.prepare import group  # noqa: E402
from pipelines.data.prepare import manifest as manifest_mod  # noqa: E402

CHUNKS, PARTITIONS, FAN_IN = 16, 8, 4  # chunks at least


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _held() -> int:
    """Object references the driver's core worker holds (its reference table, as Ray counts it)."""
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def _grouped(scan, chunks, monkeypatch, **kw) -> tuple[list, int]:
    """The blocks of group_by_source, and the most references the driver held while it submitted them."""
    real = group._remote
    peak = [0]

    class Counted:
        def __init__(self, remote):
            self.inner = remote

        def remote(self, *args, **kwargs):
            out = self.inner.remote(*args, **kwargs)
            peak[0] = max(peak[0], _held())
            return out

    monkeypatch.setattr(group, "_remote", lambda fn, **o: Counted(real(fn, **o)))
    base = _held()
    refs = group.group_by_source(scan, chunks, None, **kw)
    monkeypatch.setattr(group, "_remote", real)
    return ray.get(refs), peak[0] - base


def test_two_level_merge_gives_the_same_blocks_holding_fewer_references(local_ray, tmp_path, monkeypatch):
    rows = [json.dumps({"path": f"v{i % 37}.mp4", "caption": f"c {i}"}) for i in range(CHUNKS * 20)] + [
        '{"caption": "no path"}'
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(rows) + "\n")
    scan = manifest_mod.scan_manifest(str(path))
    chunks = scan.chunks(20)
    n = len(chunks)
    assert n >= CHUNKS

    one, one_peak = _grouped(scan, chunks, monkeypatch, partitions=PARTITIONS, fan_in=n)  # one level
    two, two_peak = _grouped(scan, chunks, monkeypatch, partitions=PARTITIONS, fan_in=FAN_IN)
    assert len(one) == len(two) == PARTITIONS
    for a, b in zip(one, two, strict=True):
        assert a.equals(b)  # same rows, same order, block by block
    assert sum(b.num_rows for b in two) == len(rows)

    bound = (group.GROUP_WINDOW * FAN_IN + math.ceil(n / FAN_IN) + 1) * PARTITIONS
    assert one_peak >= n * PARTITIONS  # the one-level merge holds every chunk's every piece at once
    assert two_peak <= bound < n * PARTITIONS, (two_peak, bound, one_peak)

    # The defaults: ceil(sqrt(n)) chunks per group, one block per chunk.
    default, _ = _grouped(scan, chunks, monkeypatch)
    assert len(default) == n and sum(b.num_rows for b in default) == len(rows)
