r"""Every manifest row of a source in one block: a hash partition of the manifest's small rows, in plain Ray tasks.

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

With many chunks the merge takes two levels, so the driver never holds N x P references at once (they grow
with the cluster: 4 chunks per CPU, P up to GROUP_PARTITIONS_MAX):

    chunks 0..F-1 --parse--> F x P pieces --merge_group--> P partials  \
    chunks F..2F-1 ...                                                   -- merge partial k of every group -> block k
    ...                                                                 /

F = ceil(sqrt(N)) chunks per group, at most GROUP_WINDOW groups parsed at once (the driver waits for the oldest
group's merge before parsing another), so it holds at most (GROUP_WINDOW * F + N / F + 1) x P references,
about 3 sqrt(N) x P; never rows. The blocks are the same as a one-level merge's, row for row.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pipelines.data.prepare.manifest import ManifestScan, entry_schema, parse_chunks

GROUP_PARTITIONS_MAX = 1024
"""Blocks the plan stage receives at most: one per manifest chunk up to this, so the driver's references
(chunks x partitions) stay in the low millions on a thousand-CPU cluster."""
GROUP_WINDOW = 2
"""First-level groups of chunks parsed at once: one merging while the next parses."""


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
    part = np.fromiter(
        (
            partition_of(s or "", n, partitions)
            for s, n in zip(rows.column("source").to_pylist(), rows.column("line").to_pylist(), strict=True)
        ),
        dtype=np.int64,
        count=rows.num_rows,
    )
    pieces = tuple(rows.filter(pa.array(part == k)) for k in range(partitions))
    return pieces if partitions > 1 else pieces[0]


def merge(*pieces: Any) -> Any:
    """Piece k of every chunk -> block k, its rows ordered by source (a file's rows side by side)."""
    import pyarrow as pa

    table = pa.concat_tables(pieces) if pieces else entry_schema().empty_table()
    return table.sort_by([("source", "ascending"), ("line", "ascending")])


def merge_group(partitions: int, *pieces: Any) -> Any:
    """The pieces of a group's chunks (chunk-major: chunk c's piece k at c * partitions + k) -> its P partials."""
    if partitions == 1:
        return merge(*pieces)
    return tuple(merge(*pieces[k::partitions]) for k in range(partitions))


def _remote(fn: Any, **options: Any) -> Any:
    import ray

    return ray.remote(fn).options(**options)


def group_by_source(
    scan: ManifestScan,
    chunks: list[tuple[int, int, int]],
    done: Any,
    partitions: int | None = None,
    fan_in: int | None = None,
) -> list[Any]:
    """Object references of the blocks (entry_schema), each holding every row of its sources: `partitions` blocks
    (default: one per chunk, up to GROUP_PARTITIONS_MAX), merged in groups of `fan_in` chunks (default
    ceil(sqrt(chunks)); one level when that covers every chunk)."""
    import ray

    n = len(chunks)
    partitions = partitions or max(1, min(n, GROUP_PARTITIONS_MAX))
    fan_in = fan_in or max(1, math.ceil(math.sqrt(n)))
    split = _remote(parse_split, num_cpus=1, num_returns=partitions)

    def pieces_of(chunk: tuple[int, int, int]) -> list[Any]:
        # `done` (a resume's filter, by reference) goes inside a list so that Ray hands the reference over
        # instead of fetching it into every task's arguments.
        refs = split.remote(*chunk, scan, [done], partitions)
        return list(refs) if partitions > 1 else [refs]

    join = _remote(merge, num_cpus=1)
    if fan_in >= n:
        parts = [pieces_of(c) for c in chunks]
        return [join.remote(*[p[k] for p in parts]) for k in range(partitions)]
    join_group = _remote(merge_group, num_cpus=1, num_returns=partitions)
    partials: list[list[Any]] = []  # per group, its P partials
    for g in range(0, n, fan_in):
        if len(partials) >= GROUP_WINDOW:  # the oldest group in flight merged: its pieces are freed
            oldest = partials[-GROUP_WINDOW]
            ray.wait(oldest, num_returns=len(oldest), fetch_local=False)
        out = join_group.remote(partitions, *[r for c in chunks[g : g + fan_in] for r in pieces_of(c)])
        partials.append(list(out) if partitions > 1 else [out])
    return [join.remote(*[p[k] for p in partials]) for k in range(partitions)]
