"""A sampled clip's way to a completed job, in the generator replica: encode it (MP4 and PNG thumbnail), store it
under the job's lease token, mark the job completed.

It runs in a worker thread outside the batch (generator.py): the next batch samples while the previous one's clips
are encoded and uploaded side by side. Each stage beats the job's heartbeat under its token (db.py), so a lease given
up meanwhile stops the work at the next stage; a refused write (the lease is gone: a newer attempt or a delete)
removes what this attempt stored, named by its token only, and counts in `completions_fenced`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .db import JobDB
from .jobs import JobOutcome, LeasedJob
from .metrics import JobReport
from .store import ContentStore

SAMPLING_SHARE = 95
"""Percent of a job's progress bar spent sampling; encoding and upload take the rest."""
REFERENCE_ARGS = (("image", "input_reference"), ("last_image", "last_frame_reference"))
"""(pipeline argument and GenerationParams field, request field) of each reference image."""


@dataclass
class SampledClip:
    """A job's clip from a pipeline call, on its way to `ClipFinisher.finish` (inside the replica, never over Ray)."""

    clip: Any
    """(T, H, W, 3) uint8."""
    batch_id: str
    batch_size: int
    seconds: float
    """The pipeline call's sampling time."""
    queued_s: float
    report: JobReport


def encode_clip(frames: Any, fps: int, folder: str) -> tuple[str, str]:
    """Paths of the MP4 and the PNG thumbnail (first frame) of one (T, H, W, 3) uint8 clip, in `folder`."""
    from sora_model.video import write_video

    mp4, png = os.path.join(folder, "clip.mp4"), os.path.join(folder, "thumb.png")
    write_video(mp4, frames, fps=fps)
    write_video(png, frames[:1], fps=fps)
    return mp4, png


class ClipFinisher:
    """The generator replica's store side: its database, its content store, its replica id and its counters
    (`stats`, shared with the Generator: `completed`, `completions_fenced`)."""

    def __init__(self, db: JobDB, content: ContentStore, replica: str, stats: Counter[str]) -> None:
        self.db = db
        self.content = content
        self.replica = replica
        self.stats = stats

    def finish(self, item: LeasedJob, sampled: SampledClip) -> JobOutcome:
        """Encode one sampled clip, store it under its token and mark the job completed (a worker thread,
        outside the batch). Each stage beats the job's heartbeat under its token, so a lease given up
        meanwhile stops the work at the next stage; nothing is kept when the completion is refused."""
        job_id, token, ttl = item.id, item.token, item.lease_ttl_s
        report = sampled.report
        encode_started = time.perf_counter()
        batch = {"batch_id": sampled.batch_id, "batch_size": sampled.batch_size}
        skipped = JobOutcome(ok=True, skipped=True, report=report, **batch)
        stored = False
        try:
            with tempfile.TemporaryDirectory(prefix="sora-serve-") as tmp:
                if not self.db.heartbeat(job_id, token, ttl, pct=SAMPLING_SHARE):
                    return self._fenced(skipped)
                mp4, png = encode_clip(sampled.clip, item.params.fps, tmp)
                for path, variant in ((mp4, "video"), (png, "thumbnail")):
                    if not self.db.heartbeat(job_id, token, ttl):  # given up or deleted while encoding/storing
                        return self._fenced(skipped, job_id, token if stored else None)
                    self.content.put_file(path, job_id, token, variant)
                    stored = True
            report.encode_upload_s = time.perf_counter() - encode_started
            # Where the job's time went, for monitoring (not in the API's video object).
            timing = {
                "queued": round(sampled.queued_s, 4),
                "sampling": round(sampled.seconds, 4),
                "encode_store": round(report.encode_upload_s, 4),
            }
            extra = {**batch, "timing_s": timing, "replica": self.replica}
            if not self.db.complete(job_id, token, item.retention_s, extra):
                return self._fenced(skipped, job_id, token)  # deleted, or given up while storing: drop our files only
            self.drop_inputs(item)
        except BaseException:
            if stored:
                self.content.remove(job_id, token)
            raise
        self.stats["completed"] += 1
        return JobOutcome(ok=True, seconds=sampled.seconds, report=report, **batch)

    def _fenced(self, skipped: JobOutcome, job_id: str | None = None, token: str | None = None) -> JobOutcome:
        """A write refused: this attempt's lease is gone (a newer attempt or a delete). Remove what it stored."""
        if job_id is not None and token is not None:
            self.content.remove(job_id, token)  # files named by this token only: a newer attempt's are untouched
        self.stats["completions_fenced"] += 1
        return skipped

    def drop_inputs(self, item: LeasedJob) -> None:
        """A finished job's reference images (its result is final: no attempt will read them again)."""
        self.content.remove_inputs(item.id, tuple(field for arg, field in REFERENCE_ARGS if getattr(item.params, arg)))
