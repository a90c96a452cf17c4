"""Parquet shards: written atomically, named by their clip ids; what a resume reads back."""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from pathlib import Path
from typing import Any

from pipelines.data.prepare.options import PARQUET_COMPRESSION, SHARD_PREFIX, SHARD_SUFFIX, TMP_PREFIX


def _make_datasink(folder: str, rows_per_file: int) -> Any:
    from ray.data import Datasink

    class ShardDatasink(Datasink):
        """Writes blocks as shards of at most `rows_per_file` rows (`write_shard`: atomic, named by clip ids)."""

        def __init__(self) -> None:
            self.folder, self.rows_per_file = folder, rows_per_file

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def get_name(self) -> str:
            return "WriteShards"

        def write(self, blocks: Any, ctx: Any) -> list[tuple[str, int]]:
            import pyarrow as pa

            tables = [b for b in blocks if b.num_rows]
            if not tables:
                return []
            table = pa.concat_tables(tables)
            # Even split: 20 rows at 16 per file give 10 + 10, not 16 + 4.
            num_files = math.ceil(table.num_rows / self.rows_per_file)
            bounds = [round(k * table.num_rows / num_files) for k in range(num_files + 1)]
            return [
                (write_shard(table.slice(lo, hi - lo), self.folder), hi - lo)
                for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
            ]

    return ShardDatasink()


def write_shard(table: Any, folder: str) -> str:
    """Write an Arrow table of clips as `part-<sha1 of its clip ids>.parquet`, atomically; returns the name.

    Written under a temporary name and renamed when closed, so a file either holds all its rows or does
    not exist: the basis of resuming. The name is a hash of its clip ids, so a retried task rewrites the
    same file rather than adding a copy.
    """
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    ids = sorted(table.column("clip_id").to_pylist())
    name = SHARD_PREFIX + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + SHARD_SUFFIX
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}")
    pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
    os.replace(tmp, os.path.join(folder, name))
    return name


def shard_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")) if folder.is_dir() else []


def done_clip_ids(folder: Path) -> set[str]:
    """Clip ids in the complete shards of a bucket folder; leftovers of an interrupted write are removed."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    if not folder.is_dir():
        return done
    for tmp in folder.glob(f"{TMP_PREFIX}*"):
        tmp.unlink()
    for path in shard_files(folder):
        try:
            ids = pq.read_table(path, columns=["clip_id"]).column("clip_id").to_pylist()
        except Exception:  # noqa: BLE001 - only a file we did not rename into place can be unreadable
            path.unlink()
            continue
        done.update(ids)
    return done
