"""`sora data prepare`: videos + captions -> Parquet shards of patch tokens and text embeddings (Ray Data).

    sora data prepare --manifest data/shapes/captions.jsonl --out data/prepared --resolution 32 --frames 8 --fps 8
    sora data prepare --manifest clips.csv --out data/mixed --buckets 1x32x32,8x32x32,8x32x64 --clips-per-video 4
    ray job submit --working-dir . -- python -m pipelines.data.prepare \
        --manifest /mnt/videos/manifest.jsonl --out /mnt/prepared/stage2 --resolution 256 --frames 16 --fps 8

The pipeline (probing is plain Ray tasks; every later step a Ray Data operator, with its progress bars):

    manifest rows --probe (Ray tasks)--> clip plans ---------------------------------- rejects.jsonl
                                       |  (metadata, materialised: it is small and read twice)
    unique captions --text encoder (one task, run while probing)--> embedding table (object store)
                                       |
    per bucket: plans --decode+resize+crop, identity autoencoder + patchify + text lookup, write (tasks)-->
                      OUT/<F>x<H>x<W>/part-<hash>.parquet, one shard per task     (streaming)
    with a diffusers VAE the decode tasks feed a GPU actor pool (autoencoder + patchify + text) and a
    ShardDatasink writes the shards instead.

Stateless stages run as Ray tasks, not actor pools: a task reuses a warm worker process, where each
actor pool would start processes and import torch and the video libraries again (seconds each on a
small machine, more than the work itself on a small dataset). Only the VAE, which has weights to
load once, keeps an actor pool; captions (a few thousand at most, usually) are embedded in one task
that loads the text encoder once and runs beside the probe; a very large caption set falls back to an
actor pool after probing.

On disk (format version 1), one folder per bucket, one row per clip:

    OUT/dataset.json                 counts, buckets, patch size, text encoder, autoencoder, manifest sha256
    OUT/rejects.jsonl                {"line", "path", "source", "reason", "detail"} per unusable input
    OUT/stats.log                    ds.stats() of every bucket's run
    OUT/<F>x<H>x<W>/part-*.parquet   columns:
        clip_id      string           sha1(source + start_s)[:16]: stable across runs and machines' resumes
        source       string           resolved path or URI of the input
        start_s      float64          clip start in the source, seconds
        fps          float32          frame rate of the clip (the requested --fps, else the source's)
        caption      string
        patches      (N, P) float32   model-space tokens, sora_model.patch layout (t-major, (C, pt, ph, pw) per token)
        grid         (3,) int32       (T', H', W') token grid, N = T' * H' * W'
        text_tokens  (L, D) float16   text encoder tokens (half precision halves the disk; cast when training)
        text_mask    (L,) bool        True where a text token is real
        text_pooled  (D,) float32     pooled caption embedding
    Tensor columns are plain Arrow nested fixed-size lists (no Ray extension types), so any Parquet reader
    can open them; `pipelines.data.load` gives them back as arrays of the shapes above.

Image inputs (PNG/JPEG/...) are one-frame clips and only go to one-frame buckets. A video goes to the
multi-frame bucket nearest its aspect ratio among those it has enough frames for (most frames first);
videos give one-frame clips only when every bucket is one frame (`--frames 1`). Resize is short-side
then centre crop.

Resuming: a shard appears atomically (written aside, then renamed) and holds whole clips, so after an
interruption the clips that exist are exactly those in complete shards. Re-running the same command
reads their clip ids, skips those clips and writes the rest; `_run.json` pins the settings (a different
setting refuses to resume), and `dataset.json` is only written once every bucket is done.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sora_model.config import AutoencoderConfig, TextEncoderConfig, to_dict

FORMAT_VERSION = 1
DATASET_INFO = "dataset.json"
RUN_STATE = "_run.json"
REJECTS = "rejects.jsonl"
STATS_LOG = "stats.log"
DECODE_REJECTS_DIR = "_rejects"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"
COLUMNS = (
    "clip_id",
    "source",
    "start_s",
    "fps",
    "caption",
    "patches",
    "grid",
    "text_tokens",
    "text_mask",
    "text_pooled",
)
DEFAULT_PATCH = (1, 4, 4)
"""The DiT-demo model's patch. Tokens are cut at prepare time, so this must equal the recipe's model.patch_size."""
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".3gp", ".ogv", ".gif")
"""What a folder manifest picks up (with IMAGE_EXTENSIONS); a JSONL/CSV manifest may name any file."""
CAPTION_COLUMNS = ("caption", "text")
PARQUET_COMPRESSION = "zstd"
"""zstd shrinks float32 pixel tokens ~2x against snappy's ~1.2x at similar read speed."""
TEXT_BATCH_SIZE = 64
"""Captions per text-encoder call: short captions, so a large batch keeps the matmuls efficient."""
TEXT_TASK_MAX_CAPTIONS = 20_000
"""Up to this many unique captions are embedded in one task beside the probe (one encoder load); beyond,
an actor pool shares them out after probing."""
PROBE_CHUNK_MIN = 8
"""Fewest manifest entries per probe task (a probe is ~2 ms on a short clip; a task costs about as much)."""
DECODE_BATCH_SIZE = 4
"""Clips per decode call when a VAE actor pool follows: small, so the pool balances well and a 1080p batch
stays a few hundred MB."""
FUSED_BATCH_BYTES = 128 * 2**20
"""Most resized pixels per call of the fused decode + patchify + write task (identity autoencoder), whose
batch is one shard: large batches amortise its per-call cost (Arrow tables, setup, the Parquet file),
which at 4 clips of 16x32x32 per call was more than the decoding itself; the bound keeps large buckets'
batches (and shards) a few hundred MB at most."""
ASPECT_TOLERANCE = 1e-3
"""Aspect ratios closer than this (in log space) count as equal when choosing a bucket."""

REJECT_REASONS = (
    "missing",
    "empty",
    "truncated",
    "not a video",
    "unreadable",
    "too short",
    "no caption",
    "bad entry",
    "duplicate",
)
_VIDEO_ERROR_REASONS = {
    # sora_model.video.VideoReadError.reason -> our reject reason
    "missing file": "missing",
    "empty file": "empty",
    "not a video": "not a video",
    "truncated/undecodable": "truncated",
    "no video stream": "unreadable",
}


class PrepareError(ValueError):
    """Bad input or a refused output folder; the CLI prints it as one line (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Bucket:
    """A clip shape: frames x height x width (pixels, before any autoencoder)."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        parts = text.strip().lower().split("x")
        try:
            f, h, w = (int(p) for p in parts)
        except ValueError:
            raise PrepareError(f"bucket '{text}' must be FRAMESxHEIGHTxWIDTH, e.g. 8x32x32") from None
        if min(f, h, w) < 1:
            raise PrepareError(f"bucket '{text}' needs positive frames, height and width")
        return cls(f, h, w)


def parse_buckets(text: str | Sequence[str]) -> list[Bucket]:
    items = text.split(",") if isinstance(text, str) else [t for s in text for t in s.split(",")]
    buckets = sorted({Bucket.parse(t) for t in items if t.strip()})
    if not buckets:
        raise PrepareError("--buckets is empty; give e.g. 1x32x32,8x32x32")
    return buckets


def parse_patch(text: str) -> tuple[int, int, int]:
    b = Bucket.parse(text)
    return (b.frames, b.height, b.width)


@dataclass
class PrepareOptions:
    manifest: str
    out: str
    buckets: list[Bucket]
    fps: float | None = None
    """Clip frame rate; None keeps each source's own rate (consecutive frames)."""
    clips_per_video: int = 1
    """Clips taken per video, `stride_s` apart; 0 takes every clip that fits."""
    stride_s: float | None = None
    """Seconds between clip starts; None means one clip length (clips touch, never overlap)."""
    patch: tuple[int, int, int] = DEFAULT_PATCH
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    rows_per_file: int = 256
    overwrite: bool = False
    workers: int | None = None
    """Decode actors at most; None: one per CPU of the cluster, less one for the other stages."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise PrepareError(f"--fps must be > 0, got {self.fps}")
        if self.clips_per_video < 0:
            raise PrepareError(f"--clips-per-video must be >= 0, got {self.clips_per_video}")
        if self.stride_s is not None and not self.stride_s > 0:
            raise PrepareError(f"--stride must be > 0 seconds, got {self.stride_s}")
        if self.rows_per_file < 1:
            raise PrepareError(f"--rows-per-file must be >= 1, got {self.rows_per_file}")
        if any(p < 1 for p in self.patch):
            raise PrepareError(f"--patch must be three positive ints, got {self.patch}")

    def settings(self, manifest_sha256: str) -> dict[str, Any]:
        """Everything that decides the rows' content: a resume must see the same settings."""
        return {
            "format_version": FORMAT_VERSION,
            "manifest_sha256": manifest_sha256,
            "buckets": [b.name for b in self.buckets],
            "fps": self.fps,
            "clips_per_video": self.clips_per_video,
            "stride_s": self.stride_s,
            "patch": list(self.patch),
            "text_encoder": self.text_encoder.embedding_settings(),
            "autoencoder": to_dict(self.autoencoder),
        }


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _strip_file_scheme(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _resolve(path: str, base: str) -> str:
    path = _strip_file_scheme(path.strip())
    if _is_uri(path) or os.path.isabs(path):
        return path
    if _is_uri(base):
        return base.rstrip("/") + "/" + path
    return os.path.normpath(os.path.join(base, path))


def _entry(line: int, path: Any, caption: Any, base: str, start_s: Any = None, end_s: Any = None) -> dict[str, Any]:
    row = {"line": line, "path": "", "source": "", "caption": "", "start_s": None, "end_s": None, "error": ""}
    if not isinstance(path, str) or not path.strip():
        row["error"] = "no 'path'"
        return row
    row["path"], row["source"] = path, _resolve(path, base)
    row["caption"] = caption.strip() if isinstance(caption, str) else ""
    for key, value in (("start_s", start_s), ("end_s", end_s)):
        if value in (None, ""):
            continue
        try:
            row[key] = float(value)
        except (TypeError, ValueError):
            row["error"] = f"{key} '{value}' is not a number"
    return row


def read_manifest(manifest: str) -> tuple[list[dict[str, Any]], str]:
    """Entries {line, path, source, caption, start_s, end_s, error} and the manifest's sha256.

    A malformed entry keeps its line with `error` set (it becomes a reject, the run goes on); a manifest
    that cannot be read at all is a PrepareError.
    """
    manifest = _strip_file_scheme(manifest)
    if not _is_uri(manifest) and os.path.isdir(manifest):
        return _read_folder(manifest)
    if _is_uri(manifest):
        import fsspec

        try:
            with fsspec.open(manifest, "rb") as f:
                data = f.read()
        except (FileNotFoundError, OSError) as err:
            raise PrepareError(f"cannot read manifest {manifest}: {err}") from None
        base = manifest.rsplit("/", 1)[0]
    else:
        if not os.path.exists(manifest):
            raise PrepareError(f"manifest {manifest} not found")
        data = Path(manifest).read_bytes()
        base = os.path.dirname(os.path.abspath(manifest))
    sha = hashlib.sha256(data).hexdigest()
    text = data.decode("utf-8-sig", errors="replace")
    if manifest.lower().endswith(".csv"):
        entries = _parse_csv(text, manifest, base)
    else:
        entries = _parse_jsonl(text, base)
    if not entries:
        raise PrepareError(f"manifest {manifest} has no entries")
    return entries, sha


def _parse_jsonl(text: str, base: str) -> list[dict[str, Any]]:
    entries = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            row = _entry(line, None, None, base)
            row["error"] = f"not JSON: {err.msg}"
            entries.append(row)
            continue
        if not isinstance(obj, dict):
            row = _entry(line, None, None, base)
            row["error"] = "not a JSON object"
            entries.append(row)
            continue
        caption = obj.get("caption", obj.get("text"))
        entries.append(_entry(line, obj.get("path"), caption, base, obj.get("start_s"), obj.get("end_s")))
    return entries


def _parse_csv(text: str, manifest: str, base: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    caption_col = next((c for c in CAPTION_COLUMNS if c in fields), None)
    if "path" not in fields or caption_col is None:
        raise PrepareError(f"CSV manifest {manifest} needs columns 'path' and 'caption' (or 'text'); it has {fields}")
    entries = []
    for line, raw in enumerate(reader, start=2):  # line 1 is the header
        row = {(k or "").strip().lower(): v for k, v in raw.items()}
        entries.append(_entry(line, row.get("path"), row.get(caption_col), base, row.get("start_s"), row.get("end_s")))
    return entries


def _read_folder(folder: str) -> tuple[list[dict[str, Any]], str]:
    """Every video/image under `folder` (recursively, sorted), captioned by NAME.txt beside it."""
    from sora_model.video import IMAGE_EXTENSIONS

    root = Path(folder).resolve()
    media = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
    if not media:
        raise PrepareError(f"folder manifest {folder} holds no videos or images ({', '.join(VIDEO_EXTENSIONS)})")
    digest = hashlib.sha256()
    entries = []
    for line, path in enumerate(media, start=1):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else ""
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{caption}\0".encode())
        entries.append(_entry(line, rel, caption, str(root)))
    return entries, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Probing and clip planning
# ---------------------------------------------------------------------------------------------


def clip_id(source: str, start_s: float) -> str:
    """Stable id of a clip: the same source and start give the same id on every run."""
    return hashlib.sha1(f"{source}\0{start_s:.6f}".encode()).hexdigest()[:16]


def choose_bucket(buckets: Sequence[Bucket], width: int, height: int, still: bool, frames_fit: Any) -> Bucket | None:
    """The bucket an input goes to, or None.

    Stills go to one-frame buckets. Videos go to multi-frame buckets they have enough frames for, or to
    one-frame buckets when every bucket is one frame (`--frames 1` takes image clips from videos); a video
    too short for every multi-frame bucket is rejected rather than silently turned into an image. Among
    the candidates: the nearest aspect ratio, then the most frames, then no upscaling, then the largest.
    `frames_fit(bucket) -> bool` says whether the input can supply the bucket's clip.
    """
    images_only = all(b.frames == 1 for b in buckets)
    wanted = [b for b in buckets if (b.frames == 1) == (still or images_only)]
    candidates = [b for b in wanted if frames_fit(b)]
    if not candidates:
        return None
    aspect = math.log(width / height)

    def key(b: Bucket) -> tuple:
        gap = abs(math.log(b.width / b.height) - aspect)
        upscales = b.height > height or b.width > width
        return (round(gap / ASPECT_TOLERANCE), -b.frames, upscales, -(b.height * b.width))

    return min(candidates, key=key)


def _reject(entry: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {**_plan_row(entry), "kind": "reject", "reason": reason, "detail": " ".join(detail.split())}


def _plan_row(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "clip",
        "line": int(entry["line"]),
        "path": entry["path"],
        "source": entry["source"],
        "caption": entry["caption"],
        "reason": "",
        "detail": "",
        "clip_id": "",
        "start_s": 0.0,
        "fps": 0.0,
        "bucket": "",
        "indices": [],
    }


class LocalFiles:
    """Remote inputs (fsspec URIs) are copied to a per-actor temp folder; local paths pass through."""

    def __init__(self) -> None:
        self._dir: str | None = None
        self._cache: dict[str, str] = {}

    def get(self, source: str) -> str:
        if not _is_uri(source):
            return source
        if source not in self._cache:
            import fsspec

            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="sora-prepare-")
            local = os.path.join(self._dir, hashlib.sha1(source.encode()).hexdigest() + Path(source).suffix)
            try:
                with fsspec.open(source, "rb") as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except FileNotFoundError:
                return source + ".missing"  # the probe then reports "missing"
            self._cache[source] = local
        return self._cache[source]


class ProbeInputs:
    """One manifest entry -> its clip plans, or one reject with the reason (run by `probe_chunk` tasks)."""

    def __init__(self, buckets: list[Bucket], fps: float | None, clips_per_video: int, stride_s: float | None):
        self.buckets, self.fps, self.clips_per_video, self.stride_s = buckets, fps, clips_per_video, stride_s
        self.files = LocalFiles()

    def __call__(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        from sora_model.video import VideoReadError, probe_video, require_frames_present, sample_indices

        if entry["error"]:
            return [_reject(entry, "bad entry", entry["error"])]
        if not entry["caption"]:
            return [_reject(entry, "no caption", "empty caption" if entry["path"] else "no caption given")]
        local = self.files.get(entry["source"])
        try:
            info = probe_video(local)
        except VideoReadError as err:
            return [_reject(entry, _VIDEO_ERROR_REASONS.get(err.reason, "unreadable"), str(err))]
        except Exception as err:  # noqa: BLE001 - any library failure on one input is that input's reject
            return [_reject(entry, "unreadable", f"{type(err).__name__}: {err}")]

        start0 = float(entry["start_s"] or 0.0)
        end_s = entry["end_s"]

        def clip_at(bucket: Bucket, start: float) -> list[int] | None:
            fps = None if bucket.frames == 1 else self.fps
            try:
                idx = sample_indices(info, bucket.frames, fps, start)
            except ValueError:
                return None
            if end_s is not None and bucket.frames > 1:
                rate = fps or info.fps
                if start + bucket.frames / rate > float(end_s) + 1e-6:
                    return None
            return idx

        still = info.num_frames == 1
        bucket = choose_bucket(self.buckets, info.width, info.height, still, lambda b: clip_at(b, start0) is not None)
        if bucket is None:
            if still:
                b = self.buckets[0]
                detail = f"a still image (1 frame) but every bucket needs more frames; add a 1x{b.height}x{b.width} bucket"
            else:
                smallest = min((b for b in self.buckets if b.frames > 1), key=lambda b: b.frames)
                rate = f"{self.fps:g} fps" if self.fps else "its own fps"
                detail = (
                    f"{info.duration:.3f}s ({info.num_frames} frames at {info.fps:g} fps) from {start0:g}s "
                    f"cannot give {smallest.frames} frames at {rate}"
                )
            return [_reject(entry, "too short", detail)]

        rate = info.fps if (self.fps is None or bucket.frames == 1) else self.fps
        stride = self.stride_s or bucket.frames / rate
        plans = []
        k = 0
        while self.clips_per_video == 0 or k < self.clips_per_video:
            start = round(start0 + k * stride, 6)
            idx = clip_at(bucket, start)
            if idx is None:
                break
            plans.append(
                {
                    **_plan_row(entry),
                    "clip_id": clip_id(entry["source"], start),
                    "start_s": start,
                    "fps": float(rate),
                    "bucket": bucket.name,
                    "indices": idx,
                }
            )
            k += 1
            if bucket.frames == 1 and info.num_frames == 1:
                break  # a still gives one clip
        # A file cut after a front index probes fine and fails on the missing frames: check now that the
        # data of the last frame we will need is there (demuxing, not decoding: the decode stage decodes
        # it), so truncation is a reject with its reason rather than a failure mid-run.
        try:
            require_frames_present(local, max(max(p["indices"]) for p in plans), info.num_frames)
        except VideoReadError as err:
            return [_reject(entry, _VIDEO_ERROR_REASONS.get(err.reason, "unreadable"), str(err))]
        except Exception as err:  # noqa: BLE001
            return [_reject(entry, "truncated", f"{type(err).__name__}: {err}")]
        return plans


def probe_chunk(entries: list[dict[str, Any]], buckets: list[Bucket], fps: float | None, clips_per_video: int, stride_s: float | None) -> list[dict[str, Any]]:
    """ProbeInputs over a run of manifest entries, one Ray task: plans and rejects in entry order."""
    probe = ProbeInputs(buckets, fps, clips_per_video, stride_s)
    return [row for entry in entries for row in probe(entry)]


def probe_all(entries: list[dict[str, Any]], options: PrepareOptions, cpus: int) -> list[dict[str, Any]]:
    """Probe every entry with plain Ray tasks, a few chunks per CPU, and show how far it got.

    Plain tasks rather than a Ray Data operator: the output is small metadata the driver needs whole
    (dedup, resume, buckets), and starting a Ray Data execution costs ~0.7 s on a 2-core machine,
    about what probing 1000 short videos takes on both cores.
    """
    import ray

    if not entries:
        return []
    remote = ray.remote(probe_chunk).options(num_cpus=1)
    kwargs = {"buckets": options.buckets, "fps": options.fps, "clips_per_video": options.clips_per_video, "stride_s": options.stride_s}
    n_chunks = max(1, min(math.ceil(len(entries) / PROBE_CHUNK_MIN), 4 * cpus, 200))
    bounds = [round(i * len(entries) / n_chunks) for i in range(n_chunks + 1)]
    pending = {remote.remote(entries[a:b], **kwargs): (i, b - a) for i, (a, b) in enumerate(itertools.pairwise(bounds))}
    parts: dict[int, list[dict[str, Any]]] = {}
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, size = pending.pop(ready[0])
        parts[i] = ray.get(ready[0])
        done += size
        if options.progress:
            print(f"\rprobed {done}/{len(entries)} inputs", end="" if pending else "\n", file=sys.stderr, flush=True)
    return [row for i in sorted(parts) for row in parts[i]]


# ---------------------------------------------------------------------------------------------
# Decode, encode, patchify
# ---------------------------------------------------------------------------------------------


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8: scale the short side to fit, crop the centre.

    One PIL resize per frame over the centre box (antialiased bicubic when shrinking), so a 1080p frame
    is never upsampled to float in full; a frame already of the target size is returned unchanged.
    """
    from PIL import Image

    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return np.ascontiguousarray(frames)
    scale = max(height / h, width / w)
    bh, bw = height / scale, width / scale  # the source box that maps onto the output
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    out = np.empty((t, height, width, 3), dtype=np.uint8)
    for i in range(t):
        img = Image.fromarray(frames[i]).resize((width, height), Image.Resampling.BICUBIC, box=box)
        out[i] = np.asarray(img)
    return out


def _append_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


PLAN_COLUMNS = ("clip_id", "source", "start_s", "fps", "caption", "line", "path")


class DecodeClips:
    """Ray Data actor: clip plans -> (B, F, H, W, 3) uint8 `pixels`, resized and centre-cropped to the bucket.

    A clip that fails here (a file changed since probing, a corrupt frame past the probed one) is
    appended to OUT/_rejects/ by this actor and dropped; the run goes on.
    """

    def __init__(self, bucket: Bucket, rejects_dir: str):
        self.bucket = bucket
        self.rejects_path = os.path.join(rejects_dir, f"decode-{uuid.uuid4().hex}.jsonl")
        self.files = LocalFiles()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sora_model.video import VideoReadError, read_frames

        b = self.bucket
        keep, clips, rejects = [], [], []
        for i in range(len(batch["clip_id"])):
            source = str(batch["source"][i])
            try:
                frames = read_frames(self.files.get(source), [int(x) for x in batch["indices"][i]])
                clips.append(resize_center_crop(frames, b.height, b.width))  # (F, H, W, 3)
                keep.append(i)
            except (VideoReadError, ValueError, RuntimeError) as err:
                reason = _VIDEO_ERROR_REASONS.get(getattr(err, "reason", ""), "unreadable")
                rejects.append(
                    {
                        "line": int(batch["line"][i]),
                        "path": str(batch["path"][i]),
                        "source": source,
                        "reason": reason,
                        "detail": " ".join(f"clip at {float(batch['start_s'][i]):g}s: {err}".split()),
                    }
                )
        if rejects:
            _append_jsonl(self.rejects_path, rejects)
        out = {k: np.asarray(batch[k])[keep] for k in PLAN_COLUMNS}
        out["pixels"] = np.stack(clips) if clips else np.zeros((0, b.frames, b.height, b.width, 3), np.uint8)
        return out


def row_schema(n: int, p: int, length: int, dim: int) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("start_s", pa.float64()),
            ("fps", pa.float32()),
            ("caption", pa.string()),
            ("patches", pa.list_(pa.list_(pa.float32(), p), n)),
            ("grid", pa.list_(pa.int32(), 3)),
            ("text_tokens", pa.list_(pa.list_(pa.float16(), dim), length)),
            ("text_mask", pa.list_(pa.bool_(), length)),
            ("text_pooled", pa.list_(pa.float32(), dim)),
        ]
    )


def _fixed_list(values: np.ndarray, item_type: Any) -> Any:
    """(B, d1, ..., dk) ndarray -> Arrow array of nested fixed-size lists, zero-copy for numeric types."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(values).reshape(-1), type=item_type)
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


class EncodeClips:
    """Ray Data actor: pixels -> autoencoder -> patchify -> Arrow rows with the caption's text embeddings.

    Identity runs on CPU next to decoding; a diffusers VAE gets its own GPU actors (`num_gpus=1`).
    """

    def __init__(self, autoencoder: AutoencoderConfig, patch: tuple[int, int, int], text_table: list[Any]):
        import torch

        from sora_model.autoencoder import build_autoencoder

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autoencoder = build_autoencoder(autoencoder).to(self.device).eval()
        self.patch = patch
        table = _text_table(text_table[0])
        self.text = table
        self.row_of = {c: i for i, c in enumerate(table["captions"])}

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa
        import torch

        from sora_model.autoencoder import pixels_to_model
        from sora_model.patch import patch_grid, patchify

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))  # (B, F, H, W, 3) uint8
        with torch.no_grad():
            video = pixels_to_model(pixels).to(self.device)  # (B, 3, F, H, W)
            latents = self.autoencoder.encode(video).float()  # (B, C, T', H', W')
            tokens = patchify(latents, self.patch).cpu().numpy()  # (B, N, P)
        grid = np.asarray(patch_grid(tuple(latents.shape[2:]), self.patch), dtype=np.int32)
        rows = np.asarray([self.row_of[str(c)] for c in batch["caption"]], dtype=np.int64)
        b = len(rows)
        text_tokens = self.text["tokens"][rows]  # (B, L, D) float16
        schema = row_schema(tokens.shape[1], tokens.shape[2], text_tokens.shape[1], text_tokens.shape[2])
        columns = [
            pa.array([str(x) for x in batch["clip_id"]], pa.string()),
            pa.array([str(x) for x in batch["source"]], pa.string()),
            pa.array(np.asarray(batch["start_s"], dtype=np.float64)),
            pa.array(np.asarray(batch["fps"], dtype=np.float32)),
            pa.array([str(x) for x in batch["caption"]], pa.string()),
            _fixed_list(tokens.astype(np.float32, copy=False), pa.float32()),
            _fixed_list(np.broadcast_to(grid, (b, 3)), pa.int32()),
            _fixed_list(text_tokens, pa.float16()),
            _fixed_list(self.text["mask"][rows], pa.bool_()),
            _fixed_list(self.text["pooled"][rows], pa.float32()),
        ]
        return pa.Table.from_arrays(columns, schema=schema)


_TEXT_TABLES: dict[Any, dict[str, Any]] = {}
"""Per worker process: the run's text table, fetched from the object store once per run (keyed by its ref)."""


def _text_table(ref: Any) -> dict[str, Any]:
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _TEXT_TABLES:
        _TEXT_TABLES.clear()  # one run's table at a time
        _TEXT_TABLES[key] = ray.get(ref)
    return _TEXT_TABLES[key]


def decode_encode_write(
    batch: dict[str, np.ndarray],
    bucket: Bucket,
    rejects_dir: str,
    autoencoder: AutoencoderConfig,
    patch: tuple[int, int, int],
    text_table: list[Any],
    folder: str,
) -> dict[str, np.ndarray]:
    """DecodeClips, EncodeClips and one shard write in one stateless task, for autoencoders that need no
    weights loaded (identity): pixels and rows never cross processes, no actor has to start, and no
    writer task needs a worker process of its own (on a small machine, starting one costs seconds).
    Returns the shard written: {"shard": [name], "rows": [n]}, or empty when every clip was rejected."""
    table = EncodeClips(autoencoder, patch, text_table)(DecodeClips(bucket, rejects_dir)(batch))
    if not table.num_rows:
        return {"shard": np.asarray([], dtype=np.str_), "rows": np.asarray([], dtype=np.int64)}
    name = write_shard(table, folder)
    return {"shard": np.asarray([name], dtype=np.str_), "rows": np.asarray([table.num_rows], dtype=np.int64)}


def fused_rows_per_task(num_clips: int, clip_bytes: int, rows_per_file: int, workers: int) -> int:
    """Clips per decode-encode-write task (and so per shard): at most `rows_per_file` and FUSED_BATCH_BYTES
    of pixels, and few enough that every worker gets two tasks (equal tasks keep the cores busy to the end).
    Shards are therefore smaller than `rows_per_file` on small datasets, many CPUs or large clips."""
    return max(1, min(rows_per_file, FUSED_BATCH_BYTES // clip_bytes, math.ceil(num_clips / (2 * workers))))


def embed_captions(captions: list[str], config: TextEncoderConfig) -> dict[str, Any]:
    """The text table of `captions`, in one process (one encoder load): {captions, tokens, mask, pooled}."""
    embed = EmbedCaptions(config)
    parts = [embed({"caption": np.asarray(captions[i : i + TEXT_BATCH_SIZE], dtype=object)}) for i in range(0, len(captions), TEXT_BATCH_SIZE)]
    return {
        "captions": [str(c) for p in parts for c in p["caption"]],
        "tokens": np.concatenate([p["tokens"] for p in parts]),  # (U, L, D) float16
        "mask": np.concatenate([p["mask"] for p in parts]),  # (U, L) bool
        "pooled": np.concatenate([p["pooled"] for p in parts]),  # (U, D) float32
    }


class EmbedCaptions:
    """Ray Data actor: unique captions -> text tokens (fp16), mask and pooled embedding."""

    def __init__(self, config: TextEncoderConfig):
        from sora_model.text import build_text_encoder

        self.encoder = build_text_encoder(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        emb = self.encoder.encode(captions)
        return {
            "caption": np.asarray(captions, dtype=object),
            "tokens": _numpy(emb.tokens).astype(np.float16),  # (B, L, D)
            "mask": _numpy(emb.mask).astype(bool),  # (B, L)
            "pooled": _numpy(emb.pooled).astype(np.float32),  # (B, D)
        }


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _owned_entries(out: Path) -> tuple[list[Path], list[Path]]:
    """(ours, others) among OUT's entries: ours are the files and bucket folders a prepare run writes."""
    ours, others = [], []
    for p in out.iterdir():
        fixed = p.name in (DATASET_INFO, RUN_STATE, REJECTS, STATS_LOG, DECODE_REJECTS_DIR)
        bucket = p.is_dir() and _is_bucket_name(p.name)
        (ours if fixed or bucket else others).append(p)
    return ours, others


def _is_bucket_name(name: str) -> bool:
    try:
        Bucket.parse(name)
    except PrepareError:
        return False
    return True


def _prepare_output(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Create or check OUT; returns True when resuming an interrupted run with the same settings."""
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return False
    if not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    ours, others = _owned_entries(out)
    complete = (out / DATASET_INFO).exists()
    state_path = out / RUN_STATE
    if not complete and not state_path.exists():
        raise PrepareError(f"--out {out} exists and is not a prepared dataset; choose an empty or new folder")
    if overwrite:
        if others:
            names = ", ".join(p.name for p in others[:3])
            raise PrepareError(f"refusing to --overwrite {out}: it holds files prepare did not write ({names})")
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return False
    if complete:
        raise PrepareError(f"{out} already holds a prepared dataset; pass --overwrite to replace it")
    try:
        previous = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        previous = {}
    if previous.get("settings_hash") != _settings_hash(settings):
        changed = [k for k in settings if previous.get("settings", {}).get(k) != settings[k]]
        raise PrepareError(
            f"{out} holds an interrupted run with other settings ({', '.join(changed) or 'unknown'} differ); "
            "re-run with the same options to resume, or pass --overwrite"
        )
    return True


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _collect_text_table(ds: Any) -> dict[str, Any]:
    captions, tokens, mask, pooled = [], [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        captions.extend(str(c) for c in batch["caption"])
        tokens.append(batch["tokens"])
        mask.append(batch["mask"])
        pooled.append(batch["pooled"])
    return {
        "captions": captions,
        "tokens": np.concatenate(tokens),  # (U, L, D) float16
        "mask": np.concatenate(mask),  # (U, L) bool
        "pooled": np.concatenate(pooled),  # (U, D) float32
    }


def prepare(options: PrepareOptions) -> dict[str, Any]:
    """Run the pipeline; returns the dataset.json contents. Ray is started (or joined) on demand."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.data.runtime import cluster_cpus, cluster_gpus, ensure_ray
    from sora_model.autoencoder import build_autoencoder
    from sora_model.patch import patch_grid
    from sora_model.text import check_text_encoder

    t0 = time.perf_counter()
    opts = options
    out = Path(opts.out).resolve()
    entries, manifest_sha = read_manifest(opts.manifest)

    # Fail on a text encoder that cannot load, or shapes the autoencoder or the patch cannot take,
    # before any work starts.
    try:
        check_text_encoder(opts.text_encoder)
    except (ValueError, OSError, ImportError) as err:
        raise PrepareError(" ".join(str(err).split())) from None
    autoencoder = build_autoencoder(opts.autoencoder)
    grids = {}
    for b in opts.buckets:
        try:
            latent = autoencoder.latent_shape(b.frames, b.height, b.width)
            grids[b.name] = patch_grid(latent, opts.patch)
        except ValueError as err:
            raise PrepareError(f"bucket {b.name}: {err}") from None
    channels = autoencoder.latent_channels
    del autoencoder

    settings = opts.settings(manifest_sha)
    resuming = _prepare_output(out, settings, opts.overwrite)
    _write_json(out / RUN_STATE, {"settings_hash": _settings_hash(settings), "settings": settings})
    rejects_dir = out / DECODE_REJECTS_DIR

    ensure_ray()
    timings = {"setup": time.perf_counter() - t0}  # manifest, shape checks, Ray start or connect
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = opts.progress  # the caller's context: a library call with progress=False stays quiet
    cpus = cluster_cpus()
    workers = opts.workers or max(1, cpus - 1)

    # 0. Text embeddings of every caption the manifest could use, each once, in one task that runs
    # while the inputs are probed (a caption whose input is rejected costs one row of a small table).
    manifest_captions = sorted({e["caption"] for e in entries if e["caption"] and not e["error"]})
    text_task = None
    if manifest_captions and len(manifest_captions) <= TEXT_TASK_MAX_CAPTIONS:
        text_task = ray.remote(embed_captions).options(num_cpus=1).remote(manifest_captions, opts.text_encoder)

    # 1-2. Probe every input and plan its clips (metadata only, so it is materialised and read twice).
    planned = probe_all(entries, opts, cpus)
    timings["probe"] = time.perf_counter() - t0 - sum(timings.values())
    rejects = [r for r in planned if r["kind"] == "reject"]
    clips = sorted((r for r in planned if r["kind"] == "clip"), key=lambda r: (r["line"], r["start_s"]))
    first_line: dict[str, int] = {}
    unique_clips = []
    for r in clips:  # the same file listed twice would otherwise give two rows with one clip id
        if r["clip_id"] in first_line:
            if first_line[r["clip_id"]] != r["line"]:
                rejects.append(
                    {**r, "kind": "reject", "reason": "duplicate", "detail": f"same clip as line {first_line[r['clip_id']]}"}
                )
            continue
        first_line[r["clip_id"]] = r["line"]
        unique_clips.append(r)
    clips = unique_clips

    # Resume: skip every clip already in a complete shard.
    by_bucket: dict[str, list[dict[str, Any]]] = {b.name: [] for b in opts.buckets}
    skipped = 0
    for b in opts.buckets:
        done = done_clip_ids(out / b.name) if resuming else set()
        for r in clips:
            if r["bucket"] == b.name:
                if r["clip_id"] in done:
                    skipped += 1
                else:
                    by_bucket[b.name].append(r)
    if resuming:
        print(f"resuming {out}: {skipped} clips already written, {sum(map(len, by_bucket.values()))} to go")

    # 3. Text embeddings: the task started before probing, or an actor pool for a very large caption set.
    # Awaited here rather than inside the clip tasks: a task blocked in ray.get gives its CPU back and Ray
    # starts another worker process for the next one (seconds of imports), which cost more than it saved.
    captions = sorted({r["caption"] for rows in by_bucket.values() for r in rows})
    text_ref = None
    if captions and text_task is not None:
        text_ref = text_task
        text_dim = int(ray.get(text_task)["tokens"].shape[2])
    elif captions:
        text_ds = ray.data.from_items([{"caption": c} for c in captions]).map_batches(
            EmbedCaptions,
            fn_constructor_kwargs={"config": opts.text_encoder},
            batch_size=TEXT_BATCH_SIZE,
            compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(workers, math.ceil(len(captions) / TEXT_BATCH_SIZE)))),
            num_cpus=1,
        )
        text_table = _collect_text_table(text_ds)
        text_dim = int(text_table["tokens"].shape[2])
        text_ref = ray.put(text_table)
    timings["text"] = time.perf_counter() - t0 - sum(timings.values())

    # 4-7. Per bucket, stream: decode -> encode + patchify + text -> Parquet shards.
    use_gpu = opts.autoencoder.kind != "identity" and cluster_gpus() > 0
    stats_lines = []
    for b in opts.buckets:
        rows = by_bucket[b.name]
        if not rows:
            continue
        plan_cols = [{k: r[k] for k in (*PLAN_COLUMNS, "indices")} for r in rows]
        if opts.autoencoder.kind == "identity":
            # No weights to load: decode, patchify, attach text and write the shard in one task per batch.
            # One operator of one-CPU tasks: Ray Data's default per-operator CPU reservation only let it
            # run one task at a time on 2 cores (CPU 55% busy; without it 95%, 1008 clips 3.7 -> 2.7 s).
            # Datasets copy the context when created; the caller's is restored afterwards.
            per_task = fused_rows_per_task(len(rows), b.frames * b.height * b.width * 3, opts.rows_per_file, opts.workers or cpus)
            reservation = ctx.op_resource_reservation_enabled
            ctx.op_resource_reservation_enabled = False
            try:
                ds = ray.data.from_items(plan_cols, override_num_blocks=math.ceil(len(rows) / per_task)).map_batches(
                    decode_encode_write,
                    fn_kwargs={"bucket": b, "rejects_dir": str(rejects_dir), "autoencoder": opts.autoencoder, "patch": opts.patch,
                               "text_table": [text_ref], "folder": str(out / b.name)},
                    batch_size=None,  # each block (at most per_task rows) is one batch, one task and one shard
                    num_cpus=1,
                    concurrency=workers if opts.workers else None,
                ).materialize()  # fmt: skip
            finally:
                ctx.op_resource_reservation_enabled = reservation
        else:
            ds = ray.data.from_items(plan_cols, override_num_blocks=max(1, min(len(rows) // DECODE_BATCH_SIZE, 4 * cpus, 200)))
            ds = ds.map_batches(
                DecodeClips,
                fn_constructor_kwargs={"bucket": b, "rejects_dir": str(rejects_dir)},
                batch_size=DECODE_BATCH_SIZE,
                compute=ActorPoolStrategy(min_size=1, max_size=workers),
                num_cpus=1,
            )
            encode_args: dict[str, Any] = {"num_gpus": 1} if use_gpu else {"num_cpus": 0.5}
            ds = ds.map_batches(
                EncodeClips,
                fn_constructor_kwargs={"autoencoder": opts.autoencoder, "patch": opts.patch, "text_table": [text_ref]},
                batch_size=min(opts.rows_per_file, 64),
                compute=ActorPoolStrategy(min_size=1, max_size=max(1, cluster_gpus() if use_gpu else 1)),
                **encode_args,
            )
            ds.write_datasink(_make_datasink(str(out / b.name), opts.rows_per_file), ray_remote_args={"num_cpus": 0.25})
        stats_lines.append(f"==== bucket {b.name}: {len(rows)} clips ====\n{ds.stats()}\n")

    timings["clips"] = time.perf_counter() - t0 - sum(timings.values())

    # Rejects: the probe's plus any clip the decoders dropped.
    for path in sorted(rejects_dir.glob("*.jsonl")) if rejects_dir.is_dir() else []:
        rejects.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    reject_rows = [
        {k: r.get(k) for k in ("line", "path", "source", "reason", "detail")} for r in sorted(rejects, key=lambda r: r["line"])
    ]
    with open(out / REJECTS, "w") as f:
        for r in reject_rows:
            f.write(json.dumps(r) + "\n")
    if stats_lines:
        with open(out / STATS_LOG, "a") as f:
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} phases: {phases}\n" + "".join(stats_lines))

    import pyarrow.parquet as pq

    bucket_infos = []
    for b in opts.buckets:
        n = sum(pq.ParquetFile(p).metadata.num_rows for p in shard_files(out / b.name))
        bucket_infos.append(
            {
                "frames": b.frames,
                "height": b.height,
                "width": b.width,
                "name": b.name,
                "grid": list(grids[b.name]),
                "num_clips": n,
                "path": b.name,
            }
        )
    num_clips = sum(bi["num_clips"] for bi in bucket_infos)
    num_rejected = len({r["line"] for r in reject_rows})
    elapsed = time.perf_counter() - t0
    if num_clips == 0:
        raise PrepareError(f"no clips written: all {num_rejected} inputs were rejected; reasons in {out / REJECTS}")
    if text_ref is None:  # resumed with nothing left to do: dimensions from an existing shard
        first = next(p for bi in bucket_infos for p in shard_files(out / bi["path"]))
        text_dim = pq.ParquetFile(first).schema_arrow.field("text_pooled").type.list_size
    pt, ph, pw = opts.patch
    info = {
        "format_version": FORMAT_VERSION,
        "num_clips": num_clips,
        "num_rejected": num_rejected,
        "buckets": bucket_infos,
        "fps": opts.fps,
        "patch_size": list(opts.patch),
        "in_channels": channels,
        "patch_dim": channels * pt * ph * pw,
        "autoencoder": to_dict(opts.autoencoder),
        "text_encoder": {
            "name_or_path": opts.text_encoder.name_or_path,
            "max_length": opts.text_encoder.max_length,
            "hidden_layer": opts.text_encoder.hidden_layer,
            "dim": text_dim,
        },
        "manifest": {"path": str(opts.manifest), "sha256": manifest_sha},
        "clips_per_video": opts.clips_per_video,
        "stride_s": opts.stride_s,
        "columns": list(COLUMNS),
        "dtypes": {
            "patches": "float32",
            "grid": "int32",
            "text_tokens": "float16",
            "text_mask": "bool",
            "text_pooled": "float32",
        },
        "layout": "one folder per bucket, OUT/<frames>x<height>x<width>/part-*.parquet",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(elapsed, 2),
        "phase_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    _write_json(out / DATASET_INFO, info)
    print(f"{num_clips} clips written, {num_rejected} inputs rejected ({out}; {elapsed:.1f}s)")
    return info


def options_from_args(args: Any) -> PrepareOptions:
    """argparse namespace (see commands.add_prepare_arguments) -> PrepareOptions."""
    if args.buckets:
        if args.resolution is not None or args.frames is not None:
            raise PrepareError("give either --resolution and --frames, or --buckets, not both")
        buckets = parse_buckets(args.buckets)
    else:
        if args.resolution is None or args.frames is None:
            raise PrepareError("--resolution and --frames are required (or --buckets FxHxW,...)")
        buckets = [Bucket.parse(f"{args.frames}x{args.resolution}x{args.resolution}")]
    autoencoder = (
        AutoencoderConfig(kind="diffusers", path=args.autoencoder_path) if args.autoencoder_path else AutoencoderConfig()
    )
    return PrepareOptions(
        manifest=args.manifest,
        out=args.out,
        buckets=buckets,
        fps=args.fps,
        clips_per_video=args.clips_per_video,
        stride_s=args.stride,
        patch=parse_patch(args.patch),
        text_encoder=TextEncoderConfig(
            name_or_path=args.text_encoder, max_length=args.max_text_length, hidden_layer=args.text_hidden_layer
        ),
        autoencoder=autoencoder,
        rows_per_file=args.rows_per_file,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.no_progress,
    )


__all__ = [
    "Bucket",
    "PrepareError",
    "PrepareOptions",
    "choose_bucket",
    "clip_id",
    "parse_buckets",
    "prepare",
    "read_manifest",
    "resize_center_crop",
]


if __name__ == "__main__":
    from pipelines.data.commands import run_module

    sys.exit(run_module("prepare"))
