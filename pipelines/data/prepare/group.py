"""Every manifest row of a source in one block: a hash partition of the manifest's small rows, in plain Ray tasks.

    chunk 0 --parse--> P pieces (rows by hash(source) % P) --\
    chunk 1 --parse--> P pieces ---------------------------- merge piece k of every chunk -> block k  (k < P)
    ...                                                     /

The plan stage probes each file once and plans a clip listed with several captions once, so it needs all of
a source's rows in one block. Ray Data's all-to-all operators do that (`sort`, `groupby`, `repartition(keys=)`),
but in Ray 2.60 each of them costs seconds per run on a small cluster and leaves the task workers idle while
it samples and schedules on the driver; the raylet then reaps those idle workers and starts fresh ones, so
every later stage of the run pays a new process's imports and the caption encoder's load (measured on 2
cores, 504 clips: a sort of 64 rows took 10-14 s per run against 0.3-0.5 s for these tasks, with new
worker processes on every run; benchmarks/bench_data_speedup_vs_decord_loop.py). The hash partition is the
same barrier (a block is complete when every chunk is parsed) in N + P tasks that run on warm workers.

The driver holds N x P object references (N chunks, P partitions), never rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipelines.data.prepare.manifest import ManifestScan, entry_schema, parse_chunks

GROUP_PARTITIONS_MAX = 1024
"""Blocks the plan stage receives at most: one per manifest chunk up to this, so the driver's references
(chunks x partitions) stay in the low millions on a thousand-CPU cluster."""


def partition_of(source: str, line: int, partitions: int) -> int:
    """A stable partition (the same in every process and run, unlike hash()); rows without a source
    (a bad entry, rejected by the plan stage) are spread by line."""
    key = source.encode() if source else str(line).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % partitions


def parse_split(start: int, end: int, line: int, scan: ManifestScan, done: list[Any], partitions: int) -> Any:
    """One manifest chunk -> its entries (without finished lines), cut into `partitions` tables by source."""
    import numpy as np
    import pyarrow as pa

    rows = parse_chunks(pa.table({"start": [start], "end": [end], "line": [line]}), [scan], done)
    part = np.fromiter((partition_of(s or "", n, partitions) for s, n in
                        zip(rows.column("source").to_pylist(), rows.column("line").to_pylist(), strict=True)),
                       dtype=np.int64, count=rows.num_rows)  # fmt: skip
    pieces = tuple(rows.filter(pa.array(part == k)) for k in range(partitions))
    return pieces if partitions > 1 else pieces[0]


def merge(*pieces: Any) -> Any:
    """Piece k of every chunk -> block k, its rows ordered by source (a file's rows side by side)."""
    import pyarrow as pa

    table = pa.concat_tables(pieces) if pieces else entry_schema().empty_table()
    return table.sort_by([("source", "ascending"), ("line", "ascending")])


def group_by_source(scan: ManifestScan, chunks: list[tuple[int, int, int]], done: Any) -> list[Any]:
    """Object references of the blocks (entry_schema), each holding every row of its sources."""
    import ray

    partitions = max(1, min(len(chunks), GROUP_PARTITIONS_MAX))
    split = ray.remote(parse_split).options(num_cpus=1, num_returns=partitions)
    # `done` (a resume's filter, by reference) goes inside a list so that Ray hands the reference over
    # instead of fetching it into every task's arguments.
    parts = [split.remote(s, e, line, scan, [done], partitions) for s, e, line in chunks]
    if partitions == 1:
        parts = [[p] for p in parts]
    join = ray.remote(merge).options(num_cpus=1)
    return [join.remote(*[p[k] for p in parts]) for k in range(partitions)]
