"""`sora data prepare` from and to object storage: moto's S3 server on loopback, a local Ray (2 CPUs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from object_store import s3_and_ray

ray = pytest.importorskip("ray")
s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from pipelines.data.load import table_to_numpy  # noqa: E402
from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare  # noqa: E402
from pipelines.data.synth import synth  # noqa: E402

pytestmark = pytest.mark.slow  # a moto server, a local Ray and two prepare runs: over a minute on 2 cores

BUCKET = "videos"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, its environment given to Ray's workers, one bucket of videos."""
    with s3_and_ray(BUCKET) as (fs, _):
        local = tmp_path_factory.mktemp("shapes")
        synth(str(local), num_videos=4, size=32, frames=16, fps=8, seed=0, progress=False)  # on the module's Ray
        rows = [json.loads(line) for line in (local / "captions.jsonl").read_text().splitlines()]
        for r in rows:
            fs.put(str(local / r["path"]), f"{BUCKET}/{r['path']}")
        yield {"fs": fs, "rows": rows, "local": local}


def test_prepare_reads_and_writes_s3(s3, tmp_path):
    fs, rows = s3["fs"], s3["rows"]
    manifest = [{"path": r["path"], "caption": r["caption"]} for r in rows]  # relative to the manifest's prefix
    manifest.append({"path": "videos/9999.mp4", "caption": "a red circle moving left"})  # not in the bucket
    manifest.append({"path": rows[0]["path"], "caption": "the first video, said otherwise"})  # a second caption
    fs.pipe(f"{BUCKET}/manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest).encode())
    out = f"s3://{BUCKET}/prepared"
    # caption_actors=1: the actor stage a GPU cluster uses, here on CPU (the other tests use the task stage).
    opts = dict(
        manifest=f"s3://{BUCKET}/manifest.jsonl",
        buckets=parse_buckets("8x32x32"),
        fps=8,
        progress=False,
        caption_actors=1,
    )
    info = prepare(PrepareOptions(out=out, **opts))
    assert info["num_clips"] == 4 and info["num_rejected"] == 1

    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = fs.glob(f"{BUCKET}/prepared/8x32x32/part-*.parquet")
    assert shards and fs.exists(f"{BUCKET}/prepared/dataset.json")
    data = table_to_numpy(pa.concat_tables([pq.read_table(s, filesystem=fs) for s in shards]))
    assert sorted(data["source"]) == sorted(f"s3://{BUCKET}/{r['path']}" for r in rows)
    first = list(data["source"]).index(f"s3://{BUCKET}/{rows[0]['path']}")
    assert list(data["extra_captions"][first]) == ["the first video, said otherwise"]
    rejects = [json.loads(line) for line in fs.cat(f"{BUCKET}/prepared/rejects.jsonl").decode().splitlines()]
    assert [(r["path"], r["reason"]) for r in rejects] == [("videos/9999.mp4", "missing")]

    # The same clips, byte for byte, as from local files (the clip ids differ: they name the source).
    local_manifest = tmp_path / "m.jsonl"
    local_manifest.write_text(
        "".join(json.dumps({"path": str(s3["local"] / r["path"]), "caption": r["caption"]}) + "\n" for r in rows)
    )
    local_info = prepare(PrepareOptions(out=str(tmp_path / "local"), **{**opts, "manifest": str(local_manifest)}))
    assert local_info["num_clips"] == 4
    from pipelines.data.load import read_prepared

    ref = read_prepared(tmp_path / "local")
    for i, src in enumerate(data["source"]):
        j = [Path(s).name for s in ref["source"]].index(Path(src).name)
        np.testing.assert_array_equal(data["patches"][i], ref["patches"][j])

    # Every temporary download was removed once its stage was done with it.
    import glob
    import tempfile

    assert not [f for f in glob.glob(f"{tempfile.gettempdir()}/sora-prepare-*/*")]
    # A finished dataset is not clobbered.
    with pytest.raises(ValueError, match="--overwrite"):
        prepare(PrepareOptions(out=out, **opts))

    # Training reads the shards where prepare wrote them: the loaders, the training stream, the recipe's lookup.
    from pipelines.data.load import bucket_files, iter_prepared, load_prepared, read_dataset_info
    from pipelines.train.data import StagePlan
    from pipelines.train.stage_data import read_info

    assert read_dataset_info(out)["num_clips"] == 4 and read_info(out + "/")["num_clips"] == 4
    _, _, files = bucket_files(out, "8x32x32")
    assert files and all(f.startswith(f"s3://{BUCKET}/prepared/8x32x32/") for f in files)
    back = read_prepared(out)
    assert sorted(back["clip_id"]) == sorted(data["clip_id"]) and len(list(iter_prepared(out))) == 4
    batches = list(load_prepared(out).iter_batches(batch_size=None, batch_format="numpy"))
    assert sum(len(b["patches"]) for b in batches) == 4 and batches[0]["patches"].shape[1:] == data["patches"].shape[1:]
    assert sum(StagePlan.from_files(files, seed=0, stage_index=0).rows) == 4
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        read_dataset_info(f"s3://{BUCKET}/nothing-here")


def _stream(plan, start: int, num: int) -> Counter:
    """The samples [start, start + num) of the trainer's stage stream, as (epoch, digest of the clip's patches)."""
    from pipelines.train.data import stage_dataset

    out: Counter = Counter()
    for b in stage_dataset(plan, start, num).iter_batches(batch_size=None, batch_format="numpy"):
        out.update(
            (int(e), hashlib.sha1(np.ascontiguousarray(p).tobytes()).hexdigest())
            for e, p in zip(b["epoch"], b["patches"])
        )
    return out


def test_uploaded_dataset_streams_and_resumes_from_s3(s3, tmp_path):
    """A dataset prepared on local disk and uploaded to the bucket: the training stream reads it through s3://, and a
    stream resumed at sample k reads exactly what the uninterrupted one read from k on (no row twice, none lost)."""
    from pipelines.data.load import bucket_files, read_prepared
    from pipelines.train.data import StagePlan

    fs, rows = s3["fs"], s3["rows"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"path": str(s3["local"] / r["path"]), "caption": r["caption"]}) + "\n" for r in rows)
    )
    local = tmp_path / "prepared"
    prepare(
        PrepareOptions(
            out=str(local),
            manifest=str(manifest),
            buckets=parse_buckets("8x32x32"),
            fps=8,
            progress=False,
            rows_per_file=1,
        )
    )  # four shards: a resume point falls between files and inside them
    fs.put(str(local), f"{BUCKET}/uploaded", recursive=True)
    uri = f"s3://{BUCKET}/uploaded"
    _, _, files = bucket_files(uri, "8x32x32")
    _, _, local_files = bucket_files(local, "8x32x32")
    assert len(files) == 4 and [Path(f).name for f in files] == [Path(f).name for f in local_files]
    np.testing.assert_array_equal(read_prepared(uri)["patches"], read_prepared(local)["patches"])

    plan = StagePlan.from_files(files, seed=3, stage_index=1)
    assert plan.rows == [1, 1, 1, 1]
    whole = _stream(plan, 0, 10)  # two and a half epochs, each in its own file order
    assert sum(whole.values()) == 10 and len({d for _, d in whole}) == 4
    # what the local copy gives
    assert whole == _stream(StagePlan.from_files(local_files, seed=3, stage_index=1), 0, 10)
    for k in (3, 6):  # resumed inside the first epoch, and inside the second
        before, after = _stream(plan, 0, k), _stream(plan, k, 10 - k)
        assert sum(after.values()) == 10 - k and before + after == whole


def _sora_train(data: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    recipe = Path(__file__).resolve().parents[2] / "cluster" / "recipes" / "smoke-cpu.yaml"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "train",
            "--recipe",
            str(recipe),
            "--data",
            data,
            "--run-dir",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_bucket_and_no_credentials_are_one_line(s3, tmp_path):
    """`sora train --data s3://...`: a bucket that does not exist, or no credentials at all: exit 2, one line naming the
    URI."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {
        **base,
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    r = _sora_train("s3://no-such-bucket/prepared", env, tmp_path)
    assert r.returncode == 2, r.stderr
    assert (
        "s3://no-such-bucket/prepared: bucket 'no-such-bucket' does not exist" in r.stderr
        and "Traceback" not in r.stderr
    )
    # No keys anywhere: environment, shared files and the instance metadata service all ruled out.
    bare = {
        **base,
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    r = _sora_train(f"s3://{BUCKET}/prepared", bare, tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert (
        len(errors) == 1
        and f"s3://{BUCKET}/prepared: no credentials for s3://" in errors[0]
        and "Traceback" not in r.stderr
    )


def test_curate_and_filter_in_the_bucket(s3):
    """`--curate` written to s3:// and `sora data filter` from one prefix of the bucket to another."""
    from pipelines.data.filter import FilterOptions, filter_dataset
    from pipelines.data.load import read_dataset_info, read_prepared

    fs, rows = s3["fs"], s3["rows"]
    manifest = [{"path": r["path"], "caption": r["caption"]} for r in rows]
    fs.pipe(f"{BUCKET}/curate.jsonl", "".join(json.dumps(m) + "\n" for m in manifest).encode())
    src, out = f"s3://{BUCKET}/curated", f"s3://{BUCKET}/moving"
    prepare(
        PrepareOptions(
            manifest=f"s3://{BUCKET}/curate.jsonl",
            out=src,
            buckets=parse_buckets("8x32x32"),
            fps=8,
            progress=False,
            curate=True,
        )
    )
    data = read_prepared(src, columns=["clip_id", "motion"])
    assert len(data["clip_id"]) == 4 and (data["motion"] > 0).all()
    cut = float(np.sort(data["motion"])[1])  # keeps the three clips at or above the second lowest motion
    info = filter_dataset(FilterOptions(src, out, min_motion=cut, drop_duplicates=True))
    assert info["num_clips"] == 3 and read_dataset_info(out)["filters"][-1]["dropped"] == {
        "low motion": 1,
        "duplicate": 0,
    }
    kept = sorted(str(c) for c, m in zip(data["clip_id"], data["motion"]) if m >= cut)
    assert sorted(read_prepared(out, columns=["clip_id"])["clip_id"]) == kept
    assert [json.loads(line)["reason"] for line in fs.cat(f"{BUCKET}/moving/filtered.jsonl").decode().splitlines()] == [
        "low motion"
    ]
