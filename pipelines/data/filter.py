"""`sora data filter`: a subset of a curated dataset (`sora data prepare --curate`), without decoding anything.

    sora data filter --in data/prepared --out data/moving --min-motion 0.5 --drop-duplicates [--max-hamming 4]
    ray job submit --working-dir . -- python -m pipelines.data.filter --in s3://b/prepared --out s3://b/moving ...

Reads each shard's small curation columns (scene, motion, phash; prepare/curate.py), decides which clips stay,
then copies the kept rows of each shard into OUT (same columns, same bucket folders; whole rows, nothing
re-encoded). Near-duplicates are found across the whole dataset: clips are visited in a fixed order (bucket, source,
start) and a clip whose every hashed frame is within --max-hamming bits of a kept clip's is dropped; candidates
come from an index of hash bands (pigeonhole: within N bits, one of N + 1 bands is equal), so the work grows with
the clips, not their pairs. OUT/dataset.json is the input's with the new counts and the thresholds under
`filters`; OUT/filtered.jsonl lists each dropped clip with its reason; the input's rejects.jsonl and
null_prompt.safetensors are copied as they are. Files are written before dataset.json, so an interrupted run
leaves no dataset that looks whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.data.prepare.curate import CURATE_COLUMNS, DEFAULT_MAX_HAMMING, HASH_FRAMES, hamming
from pipelines.data.prepare.options import DATASET_INFO, NULL_PROMPT, REJECTS

FILTERED = "filtered.jsonl"
"""OUT's list of the clips the filter dropped: {clip_id, source, start_s, bucket, reason, detail}."""
HASH_BITS = 64


class FilterError(ValueError):
    """Bad filter options or a dataset that cannot be filtered; one line, exit 2."""


@dataclass(frozen=True)
class FilterOptions:
    src: str
    out: str
    min_motion: float | None = None
    """Clips whose `motion` is below this are dropped (None: no motion filter)."""
    drop_duplicates: bool = False
    max_hamming: int = DEFAULT_MAX_HAMMING
    """Near-duplicate when every hashed frame is within this many bits (of 64)."""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.min_motion is None and not self.drop_duplicates:
            raise FilterError("nothing to filter: give --min-motion X and/or --drop-duplicates")
        if self.min_motion is not None and not self.min_motion >= 0:
            raise FilterError(f"--min-motion must be >= 0, got {self.min_motion}")
        if not 0 <= self.max_hamming < HASH_BITS:
            raise FilterError(f"--max-hamming must be in [0, {HASH_BITS - 1}], got {self.max_hamming}")
        if self.src.rstrip("/") == self.out.rstrip("/"):
            raise FilterError("--out must differ from --in (the filter writes a new dataset)")


def _bands(h: int, n: int) -> list[tuple[int, int]]:
    """(band, value) keys of a 64-bit hash cut into n bands of near-equal width."""
    edges = np.linspace(0, HASH_BITS, n + 1).round().astype(int)
    return [(k, (h >> int(lo)) & ((1 << int(hi - lo)) - 1)) for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def near_duplicates(hashes: np.ndarray, max_hamming: int) -> np.ndarray:
    """(K, HASH_FRAMES) int64 hashes in visiting order -> (K,) index of the kept clip each one repeats, -1 for kept."""
    of = np.full(len(hashes), -1, dtype=np.int64)
    index: dict[tuple[int, int], list[int]] = {}
    mid = HASH_FRAMES // 2  # the band index is on the middle frame; the others are checked on each candidate
    for i, h in enumerate(hashes):
        keys = _bands(int(h[mid].view(np.uint64)), max_hamming + 1)
        candidates = sorted({j for k in keys for j in index.get(k, ())})
        for j in candidates:
            if int(hamming(h, hashes[j]).max()) <= max_hamming:
                of[i] = j
                break
        else:
            for k in keys:
                index.setdefault(k, []).append(i)
    return of


def _read_all(src: str, info: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
    """(bucket, shard) of every shard, and the curation columns of every clip (with `shard`: its shard's number)."""
    from pipelines.data.load import bucket_files
    from pipelines.data.prepare.shards import _parallel, read_curation

    shards = [(b["name"], f) for b in info["buckets"] if b["num_clips"] > 0 for f in bucket_files(src, b["name"])[2]]
    parts = _parallel(read_curation, [f for _, f in shards])
    for (_, f), got in zip(shards, parts, strict=True):
        if isinstance(got, Exception) and any(c in str(got) for c in CURATE_COLUMNS):
            raise FilterError(f"{f} has no curation columns ({', '.join(CURATE_COLUMNS)}): prepare it with --curate")
        if isinstance(got, Exception):
            raise got
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    cols["shard"] = (
        np.concatenate([np.full(len(p["clip_id"]), i) for i, p in enumerate(parts)]) if parts else np.zeros(0)
    )
    cols["row"] = np.concatenate([np.arange(len(p["clip_id"])) for p in parts]) if parts else np.zeros(0)
    return shards, cols


def decide(
    opts: FilterOptions, shards: list[tuple[str, str]], cols: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(keep mask over clips, one dropped-clip row each), motion first, then near-duplicates among what is left."""
    n = len(cols["clip_id"])
    keep = np.ones(n, dtype=bool)
    dropped: list[dict[str, Any]] = []

    def drop(i: int, reason: str, detail: str) -> None:
        keep[i] = False
        dropped.append(
            {
                "clip_id": str(cols["clip_id"][i]),
                "source": str(cols["source"][i]),
                "start_s": float(cols["start_s"][i]),
                "bucket": shards[int(cols["shard"][i])][0],
                "reason": reason,
                "detail": detail,
            }
        )

    if opts.min_motion is not None:
        for i in np.flatnonzero(cols["motion"] < opts.min_motion):
            drop(int(i), "low motion", f"motion {float(cols['motion'][i]):.4g} < --min-motion {opts.min_motion:g}")
    if opts.drop_duplicates:
        bucket_of = np.asarray([shards[int(s)][0] for s in cols["shard"]], dtype=object)
        order = [int(i) for i in np.flatnonzero(keep)]
        order.sort(key=lambda i: (bucket_of[i], cols["source"][i], float(cols["start_s"][i]), cols["clip_id"][i]))
        of = near_duplicates(cols["phash"][order], opts.max_hamming)
        for pos in np.flatnonzero(of >= 0):
            i, j = order[int(pos)], order[int(of[pos])]
            bits = int(hamming(cols["phash"][i], cols["phash"][j]).max())
            drop(
                i,
                "duplicate",
                f"within {bits} bits of clip {cols['clip_id'][j]} ({cols['source'][j]} at "
                f"{float(cols['start_s'][j]):g}s)",
            )
    return keep, sorted(dropped, key=lambda r: (r["bucket"], r["source"], r["start_s"]))


def _check_out(out: str, overwrite: bool) -> None:
    """OUT must be new or empty; --overwrite replaces a dataset (and nothing else) there."""
    from pipelines.data.prepare.shards import filesystem

    fs, root = filesystem(out)
    if fs.isfile(root):
        raise FilterError(f"--out {out} is a file, not a folder")
    entries = fs.ls(root, detail=True) if fs.isdir(root) else []
    if not entries:
        return
    if not overwrite:
        raise FilterError(
            f"--out {out} is not empty; choose a new folder or pass --overwrite to replace the dataset there"
        )
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
    others = [
        n
        for n, e in names.items()
        if n not in (DATASET_INFO, FILTERED, REJECTS, NULL_PROMPT) and not (e["type"] == "directory" and "x" in n)
    ]
    if DATASET_INFO not in names or others:
        what = f"files a filter did not write ({', '.join(sorted(others)[:3])})" if others else f"no {DATASET_INFO}"
        raise FilterError(f"refusing to --overwrite {out}: it holds {what}")
    for e in names.values():
        fs.rm(e["name"], recursive=e["type"] == "directory")


def filter_dataset(opts: FilterOptions) -> dict[str, Any]:
    """Write the filtered dataset; returns its dataset.json contents."""
    from pipelines.data.load import read_dataset_info
    from pipelines.data.prepare.shards import _parallel, curate_summary, filesystem, join, put_file
    from pipelines.data.prepare.state import write_json

    info = read_dataset_info(opts.src)
    if "curate" not in info:
        raise FilterError(
            f"{opts.src} was prepared without --curate (no scene, motion, phash columns); prepare it again with "
            "--curate"
        )
    shards, cols = _read_all(opts.src, info)
    keep, dropped = decide(opts, shards, cols)
    if not keep.any():
        raise FilterError(
            f"every one of the {len(keep)} clips of {opts.src} would be dropped; lower --min-motion or --max-hamming"
        )
    _check_out(opts.out, opts.overwrite)

    def copy(k: int) -> tuple[str, int]:
        return shards[k][0], _copy_rows(
            shards[k][1], join(opts.out, shards[k][0]), cols["row"][(cols["shard"] == k) & keep]
        )

    counts: dict[str, int] = {}
    for got in _parallel(copy, list(range(len(shards)))):
        if isinstance(got, Exception):
            raise got
        counts[got[0]] = counts.get(got[0], 0) + got[1]
    for name in (NULL_PROMPT, REJECTS):  # what the model needs beside the clips, and what prepare rejected
        src_fs, p = filesystem(join(opts.src, name))
        if src_fs.exists(p):
            data = src_fs.cat_file(p)
            put_file(join(opts.out, name), lambda f, d=data: f.write(d))
    text = "".join(json.dumps(r) + "\n" for r in dropped).encode()
    put_file(join(opts.out, FILTERED), lambda f: f.write(text))
    reasons = {r: sum(d["reason"] == r for d in dropped) for r in ("low motion", "duplicate")}
    step = {
        "from": opts.src,
        "min_motion": opts.min_motion,
        "drop_duplicates": opts.drop_duplicates,
        "max_hamming": opts.max_hamming if opts.drop_duplicates else None,
        "clips_in": int(len(keep)),
        "clips_kept": int(keep.sum()),
        "dropped": reasons,
    }
    out_info = {
        **info,
        "num_clips": int(keep.sum()),
        "buckets": [{**b, "num_clips": counts.get(b["name"], 0)} for b in info["buckets"]],
        "filters": [*info.get("filters", []), step],
    }
    out_info["curate"] = {**info["curate"], **curate_summary([join(opts.out, b["name"]) for b in info["buckets"]])}
    write_json(join(opts.out, DATASET_INFO), out_info)
    return out_info


def _copy_rows(shard: str, folder: str, rows: np.ndarray) -> int:
    """The rows `rows` of one shard, copied whole into a shard of `folder` (none written when empty)."""
    import pyarrow.parquet as pq

    from pipelines.data.prepare.encode import take_rows
    from pipelines.data.prepare.shards import filesystem, write_shard

    if not len(rows):
        return 0
    fs, p = filesystem(shard)
    table = pq.read_table(p, filesystem=fs)
    write_shard(table if len(rows) == table.num_rows else take_rows(table, rows), folder)
    return len(rows)


def add_filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="src", required=True, help="a dataset prepared with --curate (folder or fsspec URI)")
    p.add_argument("--out", required=True, help="folder or URI for the filtered dataset (new or empty)")
    p.add_argument(
        "--min-motion",
        type=float,
        help="drop clips whose motion score is below this (dataset.json curate.motion has the quantiles)",
    )
    p.add_argument("--drop-duplicates", action="store_true", help="keep one clip of each group of near-duplicates")
    p.add_argument(
        "--max-hamming",
        type=int,
        help=f"near-duplicate: every hashed frame within N of 64 bits (default {DEFAULT_MAX_HAMMING})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run_filter(args: argparse.Namespace) -> int:
    if args.max_hamming is not None and not args.drop_duplicates:
        raise FilterError("--max-hamming needs --drop-duplicates")
    opts = FilterOptions(
        args.src,
        args.out,
        args.min_motion,
        args.drop_duplicates,
        DEFAULT_MAX_HAMMING if args.max_hamming is None else args.max_hamming,
        args.overwrite,
    )
    info = filter_dataset(opts)
    step = info["filters"][-1]
    print(
        f"sora data filter: kept {step['clips_kept']} of {step['clips_in']} clips ({step['dropped']['low motion']} "
        f"low motion, {step['dropped']['duplicate']} duplicates) → {opts.out}"
    )
    return 0


if __name__ == "__main__":
    from pipelines.cli import main

    sys.exit(main(["data", "filter", *sys.argv[1:]]))
