"""`sora data prepare` from and to object storage: moto's S3 server on loopback, a local Ray (2 CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port

ray = pytest.importorskip("ray")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from pipelines.data.load import table_to_numpy  # noqa: E402
from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare  # noqa: E402
from pipelines.data.synth import synth  # noqa: E402

pytestmark = pytest.mark.slow  # a moto server, a local Ray and two prepare runs: over a minute on 2 cores

BUCKET = "videos"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, its environment given to Ray's workers, one bucket of videos."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir(BUCKET)
    local = tmp_path_factory.mktemp("shapes")
    synth(str(local), num_videos=4, size=32, frames=16, fps=8, seed=0, progress=False)
    rows = [json.loads(line) for line in (local / "captions.jsonl").read_text().splitlines()]
    for r in rows:
        fs.put(str(local / r["path"]), f"{BUCKET}/{r['path']}")
    yield {"fs": fs, "rows": rows, "local": local}
    ray.shutdown()
    server.stop()
    mp.undo()


def test_prepare_reads_and_writes_s3(s3, tmp_path):
    fs, rows = s3["fs"], s3["rows"]
    manifest = [{"path": r["path"], "caption": r["caption"]} for r in rows]  # relative to the manifest's prefix
    manifest.append({"path": "videos/9999.mp4", "caption": "a red circle moving left"})  # not in the bucket
    manifest.append({"path": rows[0]["path"], "caption": "the first video, said otherwise"})  # a second caption
    fs.pipe(f"{BUCKET}/manifest.jsonl", "".join(json.dumps(m) + "\n" for m in manifest).encode())
    out = f"s3://{BUCKET}/prepared"
    # caption_actors=1: the actor stage a GPU cluster uses, here on CPU (the other tests use the task stage).
    opts = dict(manifest=f"s3://{BUCKET}/manifest.jsonl", buckets=parse_buckets("8x32x32"), fps=8, progress=False,
                caption_actors=1)  # fmt: skip
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
    local_manifest.write_text("".join(json.dumps({"path": str(s3["local"] / r["path"]), "caption": r["caption"]}) + "\n" for r in rows))
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
