"""What a run writes, and what a resume reads back: shards, reject files, and the done filter.

Every file appears whole or not at all (a local file is written aside and renamed; an object-store PUT
is atomic), and is named by a hash of what it holds, so a retried task rewrites its file instead of
adding a copy. The output may be a local folder or an fsspec URI (`s3://bucket/prepared`).

Resume is a filter on what is written (`resume_state`, run as a Ray task, never on the driver): the
clip ids of complete shards and of clips rejected at decode, and the manifest lines that are finished (each
clip a line planned is in a shard or rejected, or the line itself was rejected). Finished lines are dropped
before probing; written and rejected clips of unfinished lines are dropped after planning. A failure of the
storage itself (StorageUnavailable) is never taken for a damaged shard or a bad input: it stops the run. A shard that
cannot be parsed is moved to `_damaged/` (kept for a look, never deleted) and its clips are written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.prepare.options import (
    DECODE_REJECTS_DIR,
    PARQUET_COMPRESSION,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    TMP_PREFIX,
)
from pipelines.data.prepare.storage import is_uri, storage_failure, with_retries

DAMAGED_DIR = "_damaged"
MERGE_FAN_IN = 256
"""Reject files merged at once (open files); more are merged in rounds."""
FOOTER_THREADS = 32
"""Shards whose footers (and few small columns) are read at once at a resume and a run's end: on an object store
each read is a few round trips of latency, so 10,000 shards read one at a time take minutes."""


def content_name(prefix: str, keys: list[str]) -> str:
    """A file name from the hash of what it holds: a retried task rewrites its file instead of adding one."""
    return prefix + hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]


def _parallel(fn: Any, items: list[Any]) -> list[Any]:
    """[fn(item)] in order, FOOTER_THREADS at a time; an item's exception is returned in its place."""
    from concurrent.futures import ThreadPoolExecutor

    def safe(item: Any) -> Any:
        try:
            return fn(item)
        except Exception as err:  # noqa: BLE001 - handed to the caller, which knows what it means
            return err

    if len(items) < 2:
        return [safe(i) for i in items]
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(items))) as pool:
        return list(pool.map(safe, items))


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local folder or a URI."""
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def join(folder: str, *names: str) -> str:
    return "/".join([folder.rstrip("/"), *names]) if is_uri(folder) else os.path.join(folder, *names)


def put_file(path: str, write: Any) -> None:
    """`write(file)` into `path` atomically: aside and renamed locally, one PUT (retried) on object stores."""
    if is_uri(path):
        fs, p = filesystem(path)

        def put() -> None:
            with fs.open(p, "wb") as f:
                write(f)

        with_retries(put, path)
        return
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}{Path(path).suffix}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:
        ours = storage_failure(err, f"writing {path}")
        if ours is None:
            raise
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk keeps no half file
        raise ours from None


def write_shard(table: Any, folder: str) -> str:
    """Write an Arrow table of clips as `part-<sha1 of its clip ids>.parquet`; returns the name."""
    import pyarrow.parquet as pq

    name = content_name(SHARD_PREFIX, table.column("clip_id").to_pylist()) + SHARD_SUFFIX
    put_file(join(folder, name), lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION))
    return name


def write_rejects(rows: list[dict[str, Any]], rejects_dir: str, kind: str) -> None:
    """A stage's reject rows, sorted by line, as one file under OUT/_rejects/ (merged at the end)."""
    if not rows:
        return
    rows = sorted(rows, key=lambda r: (r["line"], r.get("clip_id") or "", r["reason"]))
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    name = content_name(f"{kind}-", [f"{r['line']}:{r['detail']}" for r in rows]) + ".jsonl"
    put_file(join(rejects_dir, name), lambda f: f.write(text))


def shard_files(folder: str) -> list[str]:
    fs, p = filesystem(folder)
    if not fs.isdir(p):
        return []
    names = sorted(fs.ls(p, detail=False))
    prefix = "" if not is_uri(folder) else folder.split("://", 1)[0] + "://"
    return [prefix + n for n in names if n.rsplit("/", 1)[-1].startswith(SHARD_PREFIX) and n.endswith(SHARD_SUFFIX)]


def shard_rows(folder: str) -> int:
    import pyarrow.parquet as pq

    fs, _ = filesystem(folder)
    return sum(pq.ParquetFile(filesystem(f)[1], filesystem=fs).metadata.num_rows for f in shard_files(folder))


CURATION_COLUMNS = ("source_fps", "repeated_frames", "text_truncated")
"""Per-clip columns summarised into dataset.json (format-1 shards written before them lack them)."""


def shard_summary(folder: str) -> dict[str, Any]:
    """{rows, text_truncated, source_fps: [min, max, sum], repeated_clips} over a bucket's shards: one small
    read of three numeric columns per shard (a run's end, in the driver)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(folder)
    out: dict[str, Any] = {"rows": 0, "text_truncated": 0, "source_fps": None, "repeated_clips": 0}

    def read(f: str) -> tuple[int, Any]:
        pf = pq.ParquetFile(filesystem(f)[1], filesystem=fs)
        cols = [c for c in CURATION_COLUMNS if c in pf.schema_arrow.names]
        return pf.metadata.num_rows, pf.read(columns=cols) if len(cols) == len(CURATION_COLUMNS) else None

    for got in _parallel(read, shard_files(folder)):
        if isinstance(got, Exception):
            raise got
        rows, t = got
        out["rows"] += rows
        if t is None:
            continue
        fps = t.column("source_fps").to_numpy()
        out["text_truncated"] += int(t.column("text_truncated").to_numpy().sum())
        out["repeated_clips"] += int((t.column("repeated_frames").to_numpy() > 0).sum())
        if len(fps):
            lo, hi, total = out["source_fps"] or (float("inf"), 0.0, 0.0)
            out["source_fps"] = (min(lo, float(fps.min())), max(hi, float(fps.max())), total + float(fps.sum()))
    return out


def read_curation(shard: str) -> dict[str, np.ndarray]:
    """A curated shard's clip ids and curation columns (a small read: no patches, no text), as numpy."""
    import pyarrow.parquet as pq

    from pipelines.data.prepare.curate import CURATE_COLUMNS, HASH_FRAMES

    fs, p = filesystem(shard)
    t = pq.read_table(p, columns=["clip_id", "source", "start_s", *CURATE_COLUMNS], filesystem=fs)
    hashes = t.column("phash").combine_chunks().flatten().to_numpy().reshape(t.num_rows, HASH_FRAMES)
    return {
        "clip_id": np.asarray(t.column("clip_id").to_pylist(), dtype=object),
        "source": np.asarray(t.column("source").to_pylist(), dtype=object),
        "start_s": t.column("start_s").to_numpy(),
        "scene": t.column("scene").to_numpy(),
        "motion": t.column("motion").to_numpy(),
        "phash": hashes,
    }


def curate_summary(folders: list[str]) -> dict[str, Any]:
    """dataset.json's `curate`: how the columns were made, and the motion quantiles to choose `--min-motion` from."""
    from pipelines.data.prepare import curate as c

    shards = [f for folder in folders for f in shard_files(folder)]
    parts = _parallel(read_curation, shards)
    for got in parts:
        if isinstance(got, Exception):
            raise got
    motion = np.concatenate([p["motion"] for p in parts]) if parts else np.zeros(0, np.float32)
    scenes = {(s, int(k)) for p in parts for s, k in zip(p["source"], p["scene"], strict=True)}
    return {
        "columns": list(c.CURATE_COLUMNS),
        "scene": {
            "detector": c.SCENE_DETECTOR,
            "adaptive_threshold": c.SCENE_THRESHOLD,
            "min_scene_s": c.MIN_SCENE_S,
            "sources_with_cuts": len({s for s, k in scenes if k > 0}),
        },
        "motion": {
            "measure": c.MOTION,
            "flow_short_side": c.FLOW_SIDE,
            **({f"p{q}": round(float(np.percentile(motion, q)), 4) for q in (10, 50, 90)} if len(motion) else {}),
        },
        "phash": {"measure": c.PHASH, "default_max_hamming": c.DEFAULT_MAX_HAMMING},
    }


def _read_done_columns(path: str) -> Any:
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    schema = with_retries(lambda: pq.read_schema(p, filesystem=fs), path)
    cols = [c for c in ("clip_id", "lines", "line_clips") if c in schema.names]
    return with_retries(lambda: pq.read_table(p, columns=cols, filesystem=fs), path)


def _set_aside(path: str, out: str) -> None:
    fs, p = filesystem(path)
    fs_out, o = filesystem(join(out, DAMAGED_DIR))
    fs_out.makedirs(o, exist_ok=True)
    fs.mv(p, o.rstrip("/") + "/" + p.rsplit("/", 1)[-1] + f".{uuid.uuid4().hex[:8]}")


def resume_state(out: str, buckets: list[str]) -> dict[str, Any]:
    """{clips: clip ids not to make again (written or rejected at decode; sorted, S16), lines: finished manifest
    lines (sorted int64), written, damaged}: a Ray task's result, so the driver never holds them.

    A line is finished when each clip it planned is written or rejected, or when the line itself was rejected
    (at probe: no clip planned). A decode reject names its clip, so one bad clip of a video never marks the
    video's other clips done."""
    from pipelines.data.prepare.storage import StorageError, StorageUnavailable

    clips: list[np.ndarray] = []
    done: dict[int, set[str]] = {}  # line -> its clips written or rejected
    need: dict[int, int] = {}
    damaged = 0
    for b in buckets:
        folder = join(out, b)
        fs, p = filesystem(folder)
        if fs.isdir(p):
            for tmp in fs.glob(p.rstrip("/") + f"/{TMP_PREFIX}*"):
                fs.rm(tmp)
        paths = shard_files(folder)
        for path, table in zip(paths, _parallel(_read_done_columns, paths), strict=True):
            if isinstance(table, (StorageError, StorageUnavailable)):
                raise table  # the storage's failure, not the shard's: never set a good shard aside for it
            if isinstance(table, Exception):  # a file that parses as no Parquet: its clips are redone
                _set_aside(path, out)
                damaged += 1
                continue
            ids = table.column("clip_id").to_pylist()
            clips.append(np.asarray(ids, dtype="S16"))
            if "lines" in table.column_names:
                rows = zip(ids, table.column("lines").to_pylist(), table.column("line_clips").to_pylist(), strict=True)
                for cid, lines, ns in rows:
                    for line, n in zip(lines, ns, strict=True):
                        done.setdefault(line, set()).add(cid)
                        need[line] = n
    finished: set[int] = set()
    rejected: set[str] = set()
    for path in reject_files(join(out, DECODE_REJECTS_DIR)):
        for row in _read_jsonl(path):
            line = int(row["line"])
            if row.get("clip_id") and row.get("line_clips"):  # one clip of the line
                rejected.add(row["clip_id"])
                done.setdefault(line, set()).add(row["clip_id"])
                need[line] = int(row["line_clips"])
            else:  # the whole line
                finished.add(line)
    finished.update(line for line, ids in done.items() if len(ids) >= need[line])
    if rejected:
        clips.append(np.asarray(sorted(rejected), dtype="S16"))
    ids = np.unique(np.concatenate(clips)) if clips else np.zeros(0, dtype="S16")
    written = sum(len(c) for c in clips) - len(rejected)
    return {"clips": ids, "lines": np.asarray(sorted(finished), dtype=np.int64), "written": written, "damaged": damaged}


def reject_files(rejects_dir: str) -> list[str]:
    fs, p = filesystem(rejects_dir)
    if not fs.isdir(p):
        return []
    prefix = "" if not is_uri(rejects_dir) else rejects_dir.split("://", 1)[0] + "://"
    return [prefix + n for n in sorted(fs.ls(p, detail=False)) if n.endswith(".jsonl")]


def _read_jsonl(path: str):
    """The rows of a reject file, one at a time."""
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        for raw in f:
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the input is probed again next run


REJECT_KEYS = ("line", "path", "source", "reason", "detail", "clip_id")
"""The columns of rejects.jsonl; `clip_id` only on a clip's reject (the rest of its video was used)."""
RESUME_KEYS = (*REJECT_KEYS, "line_clips")
"""What the reject files under _rejects/ keep for a resume (merged rounds included)."""


def merge_rejects(rejects_dir: str, target: str) -> tuple[int, int]:
    """Merge the sorted reject files into `target`, sorted by line, streaming; returns (distinct lines, distinct
    clips rejected at decode).

    More than MERGE_FAN_IN files are first merged in groups into files of the same folder (which replace
    them, so a resume reads the same rows), then once more."""
    files = reject_files(rejects_dir)
    while len(files) > MERGE_FAN_IN:
        merged = []
        for k in range(0, len(files), MERGE_FAN_IN):
            group = files[k : k + MERGE_FAN_IN]
            name = join(rejects_dir, f"merged-{uuid.uuid4().hex}.jsonl")
            _merge_into(group, name, RESUME_KEYS)
            for f in group:
                fs, p = filesystem(f)
                fs.rm(p)
            merged.append(name)
        files = merged
    return _merge_into(files, target)


def _merge_into(files: list[str], target: str, keys: tuple[str, ...] = REJECT_KEYS) -> tuple[int, int]:
    lines, clips = [0], set()

    def write(f: Any) -> None:
        last = None
        for row in heapq.merge(*(_read_jsonl(p) for p in files), key=lambda r: (r["line"], r.get("clip_id") or "")):
            f.write((json.dumps({k: row[k] for k in keys if row.get(k) is not None}) + "\n").encode())
            lines[0] += row["line"] != last
            last = row["line"]
            if row.get("clip_id"):
                clips.add(row["clip_id"])

    put_file(target, write)
    return lines[0], len(clips)
