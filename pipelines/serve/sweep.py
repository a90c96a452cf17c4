"""The orphan sweep: store objects that no job row can ever serve, deleted once they are older than a grace period.

The delete path and the expiry sweep (dispatch.py) remove a job's files before its row, so they leave no
orphan behind. What they cannot see are files whose row no longer names them: a generator that uploaded its
clip and crashed before `complete` (its token was superseded by a re-claim, or the job failed meanwhile), one
whose job was deleted or expired while it ran, a `.tmp-` file of a folder store's upload cut short, a cache
copy whose row insert failed. Each ingress replica's dispatcher calls `sweep_orphans` every
`orphan_sweep_interval_s`; it lists the content prefix once and looks the ids up in batches along the primary key.

An object `content/<id>-<ref>.<ext>` is kept when its row holds it: the job is completed with `content_ref ==
ref`, or unfinished with `lease_token == ref` (an upload of the attempt that holds the lease), and not past
`expires_at`. Otherwise (no row, a failed or expired job, a superseded attempt's token) it is deleted, but
only once its last-modified time is `orphan_grace_s` old: a cache copy is written before its row exists,
and an upload in progress is never touched. Names the store did not write are left alone.

A reference image `inputs/<id>-<field>` (image-to-video) is kept while its job is unfinished and not expired;
one whose job finished (`finished`, `failed`), expired or has no row (an ingress that crashed between storing the
image and inserting the row) is deleted past the same grace.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from .db import JobDB
from .metrics import ORPHAN_REASONS as SWEPT
from .schema import UNFINISHED, jobs
from .store import INPUTS, ContentStore

logger = logging.getLogger("ray.serve")
__all__ = ["SWEPT", "sweep_orphans"]  # SWEPT: the outcomes of `sweep_orphans` that deleted an object

OBJECT_NAME = re.compile(r"^(video_[0-9a-f]{32})-([0-9a-f]{32})\.(mp4|png)$")
"""What store.py writes: the job id, the lease token of the run that wrote it, the variant's suffix."""
INPUT_NAME = re.compile(r"^(video_[0-9a-f]{32})-(input_reference|last_frame_reference)$")
"""A job's reference image (store.put_input): the job id, the request field it came in."""
TEMP_PREFIX = ".tmp-"
"""A folder store's upload in flight (store.put_file); one this old was cut short by a crash."""
LOOKUP_BATCH = 500
"""Ids per row lookup: one indexed `IN (...)` query each."""


def modified_s(fs: Any, info: dict[str, Any]) -> float | None:
    """An object's last-modified time (unix seconds) from a listing entry: `mtime` (folders), `LastModified`
    (S3), `updated` (GCS); else one `fs.modified` call. None when the store cannot say (never swept)."""
    for key in ("mtime", "LastModified", "updated", "last_modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    from fsspec import AbstractFileSystem

    if type(fs).modified is AbstractFileSystem.modified or "name" not in info:
        return None  # this filesystem keeps no modification times: never swept
    try:
        value = fs.modified(info["name"])
    except OSError:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def _why_orphan(row: Any, ref: str, now_s: int) -> str | None:
    """Why the object (job row, ref) can never be served, or None while the row holds it."""
    if row is None:
        return "no_row"
    if row.expires_at is not None and row.expires_at <= now_s:
        return "expired"
    if row.status == "completed":
        return None if ref == row.content_ref else "superseded"
    if row.status in UNFINISHED:
        return None if ref == row.lease_token else "superseded"
    return "failed"


def _why_input_orphan(row: Any, now_s: int) -> str | None:
    """Why a job's reference image is no longer needed, or None while its job may still sample from it."""
    if row is None:
        return "no_row"
    if row.expires_at is not None and row.expires_at <= now_s:
        return "expired"
    if row.status in UNFINISHED:
        return None
    return "failed" if row.status == "failed" else "finished"


def _rows(db: JobDB, ids: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for i in range(0, len(ids), LOOKUP_BATCH):
        q = select(jobs.c.id, jobs.c.status, jobs.c.content_ref, jobs.c.lease_token, jobs.c.expires_at).where(
            jobs.c.id.in_(ids[i : i + LOOKUP_BATCH])
        )
        with db.engine.connect() as conn:
            found.update({r.id: r for r in conn.execute(q)})
    return found


def sweep_orphans(db: JobDB, content: ContentStore, grace_s: float, now: float | None = None) -> Counter[str]:
    """Delete the store's orphaned objects older than `grace_s`; counts by outcome: swept reasons (`no_row`,
    `expired`, `failed`, `superseded`, `finished`, `temp`), `kept_live`, `kept_fresh` (inside the grace),
    `kept_unknown`."""
    now = time.time() if now is None else now
    counts: Counter[str] = Counter()
    videos = _old_enough(content, None, OBJECT_NAME, grace_s, now, counts)
    images = _old_enough(content, INPUTS, INPUT_NAME, grace_s, now, counts)
    rows = _rows(db, sorted({job_id for _, job_id, _ in videos + images}))
    for path, job_id, ref in videos:
        _sweep(content, path, _why_orphan(rows.get(job_id), ref, int(now)), counts)
    for path, job_id, _ in images:
        _sweep(content, path, _why_input_orphan(rows.get(job_id), int(now)), counts)
    return counts


def _old_enough(
    content: ContentStore, folder: str | None, names: re.Pattern, grace_s: float, now: float, counts: Counter[str]
) -> list[tuple[str, str, str]]:
    """(path, job id, second name part) of the objects in `folder` (content/ by default) named by `names` and past
    the grace; a stale `.tmp-` upload is deleted here."""
    try:
        listing = content.list_content(folder)  # afresh: generators and other replicas upload from other processes
    except FileNotFoundError:  # an object store with nothing under the prefix yet
        return []
    candidates: list[tuple[str, str, str]] = []
    for info in listing:
        if info.get("type") not in (None, "file"):
            continue
        path, name = info["name"], os.path.basename(info["name"].rstrip("/"))
        m = names.match(name)
        if m is None and not name.startswith(TEMP_PREFIX):
            counts["kept_unknown"] += 1
            continue
        mtime = modified_s(content.fs, info)
        if mtime is None or now - mtime < grace_s:
            counts["kept_fresh"] += 1
        elif m is None:
            _remove(content, path, "temp", counts)
        else:
            candidates.append((path, m.group(1), m.group(2)))
    return candidates


def _sweep(content: ContentStore, path: str, why: str | None, counts: Counter[str]) -> None:
    if why is None:
        counts["kept_live"] += 1
    else:
        _remove(content, path, why, counts)


def _remove(content: ContentStore, path: str, why: str, counts: Counter[str]) -> None:
    try:
        content.fs.rm_file(path)
        counts[why] += 1
    except FileNotFoundError:  # another replica's sweep (or the expiry sweep) got there first
        pass
    except OSError:
        logger.warning("orphan sweep: could not delete %s", path, exc_info=True)
        counts["delete_failed"] += 1
