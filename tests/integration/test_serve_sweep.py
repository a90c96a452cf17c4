"""The orphan sweep (pipelines/serve/sweep.py) against a folder store and S3 (moto's server), no Ray: files a
crashed generator or a delete racing a run left behind are deleted once past the grace; a live job's files,
files inside the grace and names the store did not write are kept. Also that the dispatcher runs it."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import pytest
from serve_services import s3_server
from test_serve_db import add

from pipelines.serve.config import ConfigError, ServeSettings
from pipelines.serve.db import JobDB
from pipelines.serve.dispatch import Dispatcher
from pipelines.serve.metrics import ServeMetrics
from pipelines.serve.store import CONTENT_SUFFIX, ContentStore
from pipelines.serve.sweep import sweep_orphans

GRACE_S = 60.0


@pytest.fixture
def db(tmp_path):
    d = JobDB(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield d
    d.close()


def _upload(store: ContentStore, job_id: str, ref: str) -> None:
    for variant in CONTENT_SUFFIX:
        store.put_bytes(f"{job_id}-{ref}-{variant}".encode(), job_id, ref, variant)


def _claimed(db: JobDB, ttl_s: float = 60.0) -> tuple[str, str]:
    """A new job, claimed and started (the only claimable one), and its files uploaded by that attempt."""
    job_id = add(db)["id"]
    (job,) = db.claim("w", 1, ttl_s)
    assert job["id"] == job_id and db.start(job_id, job["_lease_token"], "gen", ttl_s) is not None
    return job_id, job["_lease_token"]


def _scene(db: JobDB, store: ContentStore) -> dict[str, tuple[str, str]]:
    """One job of each kind, its files uploaded: {kind: (job id, ref of the files)}."""
    scene = {}
    scene["completed"] = _claimed(db)
    _upload(store, *scene["completed"])
    assert db.complete(*scene["completed"], retention_s=None, extra={})
    scene["running"] = _claimed(db)  # uploaded, not yet completed: an upload of the lease's holder
    _upload(store, *scene["running"])
    scene["superseded"] = _claimed(db, ttl_s=0.2)  # uploaded, then its holder died and another re-claimed it
    _upload(store, *scene["superseded"])
    time.sleep(0.3)
    (again,) = db.claim("w2", 1, 60.0)
    assert again["id"] == scene["superseded"][0] and again["_lease_token"] != scene["superseded"][1]
    scene["failed"] = _claimed(db)
    _upload(store, *scene["failed"])
    assert db.fail(*scene["failed"], "generation_failed", "boom", retention_s=None)
    scene["deleted"] = _claimed(db)  # DELETE while it ran: row gone, the generator crashed after uploading
    _upload(store, *scene["deleted"])
    assert db.mark_deleted(scene["deleted"][0], None)[0] and db.purge([scene["deleted"][0]]) == 1
    scene["expired"] = _claimed(db)  # a delete that crashed after marking the row
    _upload(store, *scene["expired"])
    assert db.complete(*scene["expired"], retention_s=None, extra={}) and db.mark_deleted(scene["expired"][0], None)[0]
    return scene


def _present(store: ContentStore, job_id: str, ref: str) -> bool:
    sizes = [store.size(job_id, ref, v) for v in CONTENT_SUFFIX]
    assert (sizes[0] is None) == (sizes[1] is None)
    return sizes[0] is not None


def _check(store: ContentStore, scene: dict, fresh: tuple[str, str], counts: Counter, no_row: int = 2) -> None:
    assert _present(store, *scene["completed"]) and _present(store, *scene["running"])
    for kind in ("superseded", "failed", "deleted", "expired"):
        assert not _present(store, *scene[kind]), kind
    assert _present(store, *fresh)  # an orphan inside the grace (a cache copy before its row, say)
    assert counts["kept_live"] == 4 and counts["kept_fresh"] == 2
    # two objects (mp4, png) of each job
    assert all(counts[k] == 2 for k in ("superseded", "failed", "expired")) and counts["no_row"] == no_row, counts


def test_folder_store_orphans_are_swept_past_the_grace(db, tmp_path):
    store = ContentStore(str(tmp_path / "store"))
    scene = _scene(db, store)
    old = time.time() - 2 * GRACE_S
    for name in os.listdir(store.content_dir):
        os.utime(os.path.join(store.content_dir, name), (old, old))
    stale_tmp = os.path.join(store.content_dir, ".tmp-crashed")  # a folder upload cut short
    open(stale_tmp, "wb").close()
    os.utime(stale_tmp, (old, old))
    notes = os.path.join(store.content_dir, "README.txt")  # not a name the store writes: never touched
    open(notes, "w").close()
    os.utime(notes, (old, old))
    fresh = (f"video_{'a' * 32}", "b" * 32)
    _upload(store, *fresh)
    counts = sweep_orphans(db, store, GRACE_S)
    _check(store, scene, fresh, counts)
    assert (
        counts["temp"] == 1 and not os.path.exists(stale_tmp) and os.path.exists(notes) and counts["kept_unknown"] == 1
    )
    assert sum(sweep_orphans(db, store, GRACE_S).get(k, 0) for k in ("superseded", "failed", "no_row", "expired")) == 0


def test_reference_images_are_swept_once_their_job_no_longer_needs_them(db, tmp_path):
    """inputs/<id>-<field>: kept while the job is unfinished (or inside the grace), deleted past the grace once it
    completed or failed, or when no row was ever written (an ingress that crashed after storing the image)."""
    from pipelines.serve.store import INPUTS

    store = ContentStore(str(tmp_path / "store"))
    running, completed, failed = _claimed(db), _claimed(db), _claimed(db)
    assert db.complete(*completed, retention_s=None, extra={}) and db.fail(
        *failed, "generation_failed", "x", retention_s=None
    )
    crashed, fresh = f"video_{'a' * 32}", f"video_{'b' * 32}"
    for job_id in (running[0], completed[0], failed[0], crashed):
        store.put_input(b"png", job_id, "input_reference")
    store.put_input(b"png", running[0], "last_frame_reference")
    folder = os.path.join(store.root, INPUTS)
    old = time.time() - 2 * GRACE_S
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (old, old))
    store.put_input(b"png", fresh, "input_reference")  # inside the grace: its row may be on its way
    counts = sweep_orphans(db, store, GRACE_S)
    assert (counts["finished"], counts["failed"], counts["no_row"]) == (1, 1, 1), counts
    assert counts["kept_live"] == 2 and counts["kept_fresh"] == 1, counts
    left = sorted(os.listdir(folder))
    assert left == sorted(
        [f"{running[0]}-input_reference", f"{running[0]}-last_frame_reference", f"{fresh}-input_reference"]
    )


def test_s3_store_orphans_are_swept_past_the_grace(db):
    with s3_server() as options:
        store = ContentStore("s3://sora/sweep", options)
        scene = _scene(db, store)
        store.fs.ls(store.content_dir, detail=True)  # s3fs now holds a listing of the prefix in its cache
        elsewhere = ContentStore("s3://sora/sweep", {**options, "skip_instance_cache": True})  # another process
        crashed = (f"video_{'e' * 32}", "f" * 32)  # uploaded by a generator that crashed before writing its row
        _upload(elsewhere, *crashed)
        time.sleep(3)
        fresh = (f"video_{'c' * 32}", "d" * 32)
        _upload(elsewhere, *fresh)  # written elsewhere too: a write here would refresh this process's listing
        # S3 keeps LastModified (to the second): look from 58.5 s on, so what was written before the sleep is
        # past the 60 s grace and the fresh upload is not.
        counts = sweep_orphans(db, store, GRACE_S, now=time.time() + GRACE_S - 1.5)
        _check(store, scene, fresh, counts, no_row=4)
        assert not _present(elsewhere, *crashed)


def test_the_dispatcher_runs_the_orphan_sweep_and_counts_it(db, tmp_path):
    store = ContentStore(str(tmp_path / "store"))
    orphan = (f"video_{'e' * 32}", "f" * 32)
    _upload(store, *orphan)
    old = time.time() - 2 * GRACE_S
    for name in os.listdir(store.content_dir):
        os.utime(os.path.join(store.content_dir, name), (old, old))
    settings = ServeSettings(model="unused", orphan_grace_s=GRACE_S, orphan_sweep_interval_s=3600)
    metrics = ServeMetrics("test-replica")
    dispatcher = Dispatcher(db, store, None, lambda: settings, "w", Counter(), metrics)

    async def sweep() -> None:
        await dispatcher._sweep(settings)
        if dispatcher._orphan_task is not None:  # it runs beside the claim loop: wait for it here
            await dispatcher._orphan_task

    dispatcher._last_orphan_sweep = time.monotonic()  # swept just now: not again before the interval
    asyncio.run(sweep())
    assert _present(store, *orphan) and dispatcher._orphan_task is None
    dispatcher._last_orphan_sweep -= settings.orphan_sweep_interval_s
    asyncio.run(sweep())
    assert not _present(store, *orphan) and dispatcher.stats["orphans_swept"] == 2
    assert b'sora_serve_orphans_swept_total{reason="no_row",replica="test-replica"} 2.0' in metrics.exposition()[0]


def test_orphan_settings_out_of_range_name_the_limit():
    with pytest.raises(ConfigError, match="orphan_grace_s must be >= 60"):
        ServeSettings(model="m", orphan_grace_s=5)
    with pytest.raises(ConfigError, match="orphan_sweep_interval_s must be > 0"):
        ServeSettings(model="m", orphan_sweep_interval_s=0)
