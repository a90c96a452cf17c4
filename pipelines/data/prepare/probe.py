"""Probing inputs and planning their clips: which bucket, which frames, or a reject with the reason.

The plan stage sees the manifest grouped by source (group.py), so every row naming one file is in one block: the
file is probed once however many rows list it, and rows that give the same clip (same source and start)
become one clip with several captions (multi-caption datasets: MSR-VTT lists each video 20 times), not
duplicates. Only a row repeating another row's clip *and* caption is a "duplicate" reject.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.data.prepare.isolate import DECODE_TIMEOUT_S, isolated
from pipelines.data.prepare.options import (
    ASPECT_TOLERANCE,
    DEFAULT_MAX_FPS_RATIO,
    DEFAULT_MAX_UPSCALE,
    Bucket,
)
from pipelines.data.prepare.reasons import reject_reason
from pipelines.data.prepare.storage import LocalFiles, RangeFile, StorageUnavailable, is_uri

RANGE_PROBE_SUFFIXES = (".mp4", ".m4v", ".mov", ".3gp")
"""Remote files of these kinds (ISO-BMFF: the index holds every frame's count, time and place) are probed by
ranged reads, not downloaded: the decode stage's download is the one whole read. Other remote files (WebM/MKV
often carry no frame count, so counting reads every packet anyway), stills, and every file of a --curate run
(scene detection decodes every frame) are downloaded for the probe as well."""


def probed_by_ranges(source: str, curate: bool) -> bool:
    """Whether the plan stage reads `source` by byte ranges (see RANGE_PROBE_SUFFIXES) instead of a download."""
    return is_uri(source) and not curate and source.lower().endswith(RANGE_PROBE_SUFFIXES)


@dataclass(frozen=True)
class Remote:
    """A remote source the decoder child reads by ranges (a `RangeFile`), in place of a local copy's path."""

    uri: str


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


def reject_row(entry: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    """One line of rejects.jsonl."""
    return {
        "line": int(entry["line"]),
        "path": entry["path"],
        "source": entry["source"],
        "reason": reason,
        "detail": " ".join(detail.split()),
    }


class PlanInputs:
    """All manifest rows of one source -> (clip plans, rejects); one probe of the file for all of them.

    A plan: {clip_id, source, path, start_s, fps, bucket, indices, lines, line_clips, captions}, where
    `lines` are the manifest rows whose captions the clip carries and `line_clips[i]` how many clips row
    `lines[i]` planned (a resume counts a row done when that many of its clips are written).
    """

    def __init__(
        self,
        buckets: list[Bucket],
        fps: float | None,
        clips_per_video: int,
        stride_s: float | None,
        decode_timeout_s: float = DECODE_TIMEOUT_S,
        guards: Guards | None = None,
        scratch: str | None = None,
        curate: bool = False,
    ):
        self.planner = ClipPlanner(buckets, fps, clips_per_video, stride_s, guards or Guards(), curate)
        self.files = LocalFiles(scratch)
        self.curate = curate
        self.calls = isolated(decode_timeout_s)  # probing runs the decoder libraries too: same isolation

    def __call__(self, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(plans, rejects) of the rows of one source."""
        return self.plan_groups([entries])

    def plan_groups(self, groups: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(plans, rejects) of several sources' rows: PROBE_BATCH files per call of the decoder child (one
        round trip, not one per file); a call that crashes or hangs is redone one file per call, so only
        the file at fault is rejected."""
        plans, rejects, usable = [], [], []
        for entries in groups:
            good, bad = self._usable(entries)
            rejects += bad
            if good:
                usable.append(good)
        for k in range(0, len(usable), PROBE_BATCH):
            p, r = self._plan_batch(usable[k : k + PROBE_BATCH])
            plans += p
            rejects += r
        return plans, sorted(rejects, key=lambda r: r["line"])

    def _usable(self, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rejects, good, seen = [], [], {}
        for e in sorted(entries, key=lambda e: e["line"]):
            if e["error"]:
                rejects.append(reject_row(e, "bad entry", e["error"]))
            elif not e["caption"]:
                rejects.append(reject_row(e, "no caption", "empty caption" if e["path"] else "no caption given"))
            elif (key := (e["start_s"], e["end_s"], e["caption"])) in seen:
                rejects.append(reject_row(e, "duplicate", f"same clip and caption as line {seen[key]}"))
            else:
                seen[key] = e["line"]
                good.append(e)
        return good, rejects

    def _plan_batch(self, batch: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        plans, rejects, work = [], [], []
        with contextlib.ExitStack() as stack:
            for good in batch:
                source = good[0]["source"]
                if probed_by_ranges(source, self.curate):
                    work.append((good, Remote(source)))
                    continue
                try:
                    work.append((good, stack.enter_context(self.files.local(source))))
                except StorageUnavailable:
                    raise  # our disk or store failed, not the input: the run stops
                except Exception as err:  # noqa: BLE001 - a download that failed for good is the input's reject
                    reason, detail = reject_reason(err)
                    rejects += [reject_row(e, reason, detail) for e in good]
            try:
                answers = self.calls(self.planner.plan_sources, work) if work else []
            except StorageUnavailable:
                raise  # a store unreachable from the decoder child (a ranged read): the run stops
            except Exception:  # noqa: BLE001 - a crash or hang somewhere in the batch: one file per call
                answers = []
                for good, local in work:
                    try:
                        answers.append(self.calls(self.planner.plan_source, good, local))
                    except StorageUnavailable:
                        raise
                    except Exception as err:  # noqa: BLE001
                        reason, detail = reject_reason(err)
                        answers.append(([], [reject_row(e, reason, detail) for e in good]))
        for p, r in answers:
            plans += p
            rejects += r
        return plans, rejects


@dataclass(frozen=True)
class Guards:
    """What a source must offer its bucket: limits that reject the input rather than write a poor clip."""

    max_upscale: float = DEFAULT_MAX_UPSCALE
    """Largest scale factor from the source to the bucket (see options.DEFAULT_MAX_UPSCALE)."""
    max_fps_ratio: float = DEFAULT_MAX_FPS_RATIO
    """Largest clip fps / source fps (see options.DEFAULT_MAX_FPS_RATIO)."""


@dataclass
class ClipPlanner:
    """The clips of a probed file's rows (picklable: it runs in the decoder child)."""

    buckets: list[Bucket]
    fps: float | None
    clips_per_video: int
    stride_s: float | None
    guards: Guards = Guards()
    curate: bool = False
    """Find the file's scene cuts first (curate.detect_cuts) and plan every clip inside one scene."""

    def plan_sources(
        self, work: list[tuple[list[dict[str, Any]], str | Remote]]
    ) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        return [self.plan_source(good, local) for good, local in work]

    def plan_source(
        self, good: list[dict[str, Any]], where: str | Remote
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(plans, rejects) of the usable rows of one file (see PlanInputs): a local path, or a Remote read by
        ranges."""
        if not isinstance(where, Remote):
            return self._plan_file(good, where)
        try:
            with RangeFile(where.uri) as f:
                return self._plan_file(good, f)
        except StorageUnavailable:
            raise  # the store, not the input: the run stops
        except Exception as err:  # noqa: BLE001 - missing, forbidden: the input's reject
            reason, detail = reject_reason(err)
            return [], [reject_row(e, reason, detail) for e in good]

    def _plan_file(self, good: list[dict[str, Any]], local: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from sora_model.video import probe_video
        from sora_model.video_presence import require_frames_present

        try:
            info = probe_video(local)
        except StorageUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - any library failure on one input is that input's reject
            reason, detail = reject_reason(err)
            return [], [reject_row(e, reason, detail) for e in good]
        cuts: list[int] = []
        if self.curate and info.num_frames > 1:
            from pipelines.data.prepare.curate import detect_cuts

            try:
                cuts = detect_cuts(local, info.fps)
            except Exception as err:  # noqa: BLE001 - a file the scene detector cannot read is that input's reject
                reason, detail = reject_reason(err)
                return [], [reject_row(e, reason, f"scene detection: {detail}") for e in good]
        plans: dict[str, dict[str, Any]] = {}
        rejects = []
        for e in good:
            rows, reject = self._plan_entry(e, info, cuts)
            if reject:
                rejects.append(reject)
            for row in rows:
                clip = plans.setdefault(row["clip_id"], {**row, "lines": [], "line_clips": [], "captions": []})
                clip["lines"].append(int(e["line"]))
                clip["line_clips"].append(len(rows))
                if e["caption"] not in clip["captions"]:
                    clip["captions"].append(e["caption"])
        if plans:
            # A file cut after a front index probes fine and fails on the missing frames: check now that the
            # data of the last frame needed is there (demuxing, not decoding), so truncation is a reject.
            try:
                require_frames_present(local, max(i for p in plans.values() for i in p["indices"]), info.num_frames)
            except StorageUnavailable:
                raise
            except Exception as err:  # noqa: BLE001
                reason, detail = reject_reason(err, default="truncated")
                by_line = {e["line"]: e for e in good}
                lines = sorted({line for p in plans.values() for line in p["lines"]})
                return [], rejects + [reject_row(by_line[line], reason, detail) for line in lines]
        return list(plans.values()), rejects

    def _plan_entry(
        self, entry: dict[str, Any], info: Any, cuts: list[int]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The clips of one manifest row, `stride` apart from its start; with scene cuts, a clip that would span a
        cut starts at the cut instead, and the clips after it count their stride from there."""
        from pipelines.data.prepare.curate import scene_of, spanned_cut

        start0 = float(entry["start_s"] or 0.0)
        end_s = entry["end_s"]

        def clip_at(bucket: Bucket, start: float) -> list[int] | None:
            return self._clip_at(info, bucket, start, end_s)

        still = info.num_frames == 1
        bucket = choose_bucket(self.buckets, info.width, info.height, still, lambda b: clip_at(b, start0) is not None)
        if bucket is None:
            return [], reject_row(entry, "too short", self._too_short(info, start0, still))
        guard = self._guard(info, bucket)
        if guard:
            return [], reject_row(entry, *guard)
        rate = info.fps if (self.fps is None or bucket.frames == 1) else self.fps
        stride = self.stride_s or bucket.frames / rate
        plans = []
        origin, n = start0, 0  # clips are laid `stride` apart from `origin`: the row's start, then the last cut crossed
        while self.clips_per_video == 0 or len(plans) < self.clips_per_video:
            start = round(origin + n * stride, 6)
            idx = clip_at(bucket, start)
            if idx is None:
                break
            cut = spanned_cut(cuts, idx)
            if cut is not None:
                origin, n = round(cut / info.fps, 6), 0
                continue
            n += 1
            plans.append(
                {
                    "clip_id": clip_id(entry["source"], start),
                    "source": entry["source"],
                    "path": entry["path"],
                    "start_s": start,
                    "fps": float(rate),
                    "source_fps": float(info.fps),
                    "repeated_frames": sum(a == b for a, b in zip(idx, idx[1:])),
                    "bucket": bucket.name,
                    "indices": idx,
                    "scene": scene_of(cuts, idx[0]),
                }
            )
            if bucket.frames == 1 and info.num_frames == 1:
                break  # a still gives one clip
        return plans, None

    def _clip_at(self, info: Any, bucket: Bucket, start: float, end_s: Any) -> list[int] | None:
        """The source frame indices of a `bucket` clip starting at `start` seconds, or None where it does not fit:
        past the file's end, or past the manifest row's end_s."""
        from sora_model.video import sample_indices

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

    def _guard(self, info: Any, bucket: Bucket) -> tuple[str, str] | None:
        """(reason, detail) when the source is too small or too slow for its bucket, else None."""
        scale = max(bucket.height / info.height, bucket.width / info.width)
        if scale > self.guards.max_upscale * (1 + 1e-9):
            return "upscaled", (
                f"{info.width}x{info.height} source would be upscaled {scale:.3g}x to bucket {bucket.name}, "
                f"beyond --max-upscale {self.guards.max_upscale:g}"
            )
        if self.fps is not None and bucket.frames > 1 and self.fps / info.fps > self.guards.max_fps_ratio * (1 + 1e-9):
            return "low fps", (
                f"source at {info.fps:g} fps for clips at {self.fps:g} fps repeats frames ({self.fps / info.fps:.3g}x, "
                f"beyond --max-fps-ratio {self.guards.max_fps_ratio:g})"
            )
        return None

    def _too_short(self, info: Any, start0: float, still: bool) -> str:
        if still:
            b = self.buckets[0]
            return f"a still image (1 frame) but every bucket needs more frames; add a 1x{b.height}x{b.width} bucket"
        smallest = min((b for b in self.buckets if b.frames > 1), key=lambda b: b.frames)
        rate = f"{self.fps:g} fps" if self.fps else "its own fps"
        return (
            f"{info.duration:.3f}s ({info.num_frames} frames at {info.fps:g} fps) from {start0:g}s "
            f"cannot give {smallest.frames} frames at {rate}"
        )


def plan_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("clip_id", pa.string()),
            ("source", pa.string()),
            ("path", pa.string()),
            ("start_s", pa.float64()),
            ("fps", pa.float32()),
            ("source_fps", pa.float32()),
            ("repeated_frames", pa.int32()),
            ("bucket", pa.string()),
            ("indices", pa.list_(pa.int32())),
            ("scene", pa.int32()),
            ("lines", pa.list_(pa.int64())),
            ("line_clips", pa.list_(pa.int32())),
            ("captions", pa.list_(pa.string())),
        ]
    )


PROBE_BATCH = 32
"""Files probed per call of the decoder child (remote ones are downloaded for the call, then removed)."""
_PLANNERS: dict[str, PlanInputs] = {}
"""Per worker process: the planner of the run's settings (its LocalFiles keeps one temp folder)."""


def plan_block(
    table: Any,
    buckets: list[Bucket],
    fps: float | None,
    clips_per_video: int,
    stride_s: float | None,
    rejects_dir: str,
    done: list[Any],
    decode_timeout_s: float = DECODE_TIMEOUT_S,
    guards: Guards | None = None,
    scratch: str | None = None,
    curate: bool = False,
) -> Any:
    """Ray Data stage over the manifest sorted by source: every source of the block probed once, its rows
    planned into clips; rejects go to a file under `rejects_dir`; clips already written (a resume) are
    dropped. Returns the plans (`plan_schema`)."""
    import pyarrow as pa

    from pipelines.data.prepare.shards import write_rejects
    from pipelines.data.prepare.state import shared

    key = repr((buckets, fps, clips_per_video, stride_s, decode_timeout_s, guards, scratch, curate))
    if key not in _PLANNERS:
        _PLANNERS.clear()
        _PLANNERS[key] = PlanInputs(buckets, fps, clips_per_video, stride_s, decode_timeout_s, guards, scratch, curate)
    planner = _PLANNERS[key]
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in table.to_pylist():
        groups.setdefault(e["source"] or f"\0line {e['line']}", []).append(e)
    plans, rejects = planner.plan_groups(list(groups.values()))
    write_rejects(rejects, rejects_dir, "probe")
    written = shared(done[0])["clips"] if done[0] is not None else None
    if written is not None and len(written) and plans:
        ids = np.asarray([p["clip_id"] for p in plans], dtype="S16")
        plans = [p for p, w in zip(plans, np.isin(ids, written), strict=True) if not w]
    return pa.Table.from_pylist(plans, schema=plan_schema())
