"""`sora data prepare --curate` and `sora data filter`: synthetic clips with a hard cut, a static shot, moving
shots and a duplicated file, through the real pipeline on a local Ray (2 CPUs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_tiny_vae

ray = pytest.importorskip("ray")
pytest.importorskip("scenedetect")
pytest.importorskip("imagehash")

from pipelines.data.load import read_dataset_info, read_prepared  # noqa: E402
from pipelines.data.prepare import PrepareOptions, parse_buckets, prepare  # noqa: E402
from pipelines.data.synth import SynthSpec, make_video, render  # noqa: E402
from sora_model.video import write_video  # noqa: E402

pytestmark = pytest.mark.slow  # two prepare runs and filter commands: about a minute on 2 cores

FPS, CUT = 8, 12
"""The cut video shows one shot for CUT frames, then another: clips of 8 frames from 0 s, 1 s, ... would span it."""
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    d = tmp_path_factory.mktemp("curate")
    spec = SynthSpec(size=32, frames=20, fps=FPS, seed=0)
    a = make_video(spec, 0, ("red", "circle", "left"))[:CUT]
    # The second shot is a negative (a light background): the whole frame changes, as at a cut in real footage. A
    # small shape swapped for another on the same black stays within what motion alone does to a 32 px frame.
    b = 255 - make_video(spec, 1, ("green", "square", "up"))
    write_video(str(d / "cut.mp4"), np.concatenate([a, b]), fps=FPS)  # 32 frames, a hard cut at frame 12
    write_video(
        str(d / "moving.mp4"),
        make_video(SynthSpec(size=32, frames=16, fps=FPS, seed=0), 2, ("blue", "triangle", "right")),
        fps=FPS,
    )
    write_video(str(d / "static.mp4"), render(spec, "yellow", "square", np.tile([[9.0, 9.0]], (16, 1))), fps=FPS)
    shutil.copy(d / "moving.mp4", d / "copy.mp4")  # the same footage under another name
    rows = [
        {"path": f"{n}.mp4", "caption": c}
        for n, c in (
            ("cut", "a red circle moving left"),
            ("moving", "a blue triangle moving right"),
            ("static", "a yellow square"),
            ("copy", "a blue triangle moving right, again"),
        )
    ]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield d
    ray.shutdown()


def _prepare(videos: Path, out: Path, curate: bool) -> dict:
    return prepare(
        PrepareOptions(
            manifest=str(videos / "m.jsonl"),
            out=str(out),
            buckets=parse_buckets("8x32x32"),
            fps=FPS,
            clips_per_video=0,
            progress=False,
            curate=curate,
        )
    )


def _by_source(data: dict) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in np.argsort(data["start_s"], kind="stable"):
        out.setdefault(Path(str(data["source"][i])).stem, []).append(int(i))
    return out


@pytest.fixture(scope="module")
def curated(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "prepared"
    _prepare(videos, out, curate=True)
    return out


def test_clips_do_not_span_the_cut_and_columns_say_so(videos, curated, tmp_path):
    data = read_prepared(curated, columns=["clip_id", "source", "start_s", "scene", "motion", "phash", "patches"])
    rows = _by_source(data)
    # The cut video: 0-7 in the first shot, then the clip that would take frames 8-15 starts at the cut instead.
    starts = [float(data["start_s"][i]) for i in rows["cut"]]
    assert starts == [0.0, CUT / FPS, CUT / FPS + 1.0]
    assert [int(data["scene"][i]) for i in rows["cut"]] == [0, 1, 1]
    for s in starts:
        first, last = round(s * FPS), round(s * FPS) + 7
        assert not first < CUT <= last
    assert all(int(data["scene"][i]) == 0 for name in ("moving", "static", "copy") for i in rows[name])

    # Motion: the static shot is still, every moving one is not.
    static = [float(data["motion"][i]) for i in rows["static"]]
    moving = [float(data["motion"][i]) for name in ("cut", "moving", "copy") for i in rows[name]]
    assert max(static) < 0.1 < 0.5 < min(moving), (static, moving)
    # Hashes: the copied file's clips equal the original's; every other pair of clips is far apart.
    from pipelines.data.prepare.curate import hamming

    for i, j in zip(rows["moving"], rows["copy"], strict=True):
        assert int(hamming(data["phash"][i], data["phash"][j]).max()) == 0
    others = [i for name in ("cut", "moving") for i in rows[name]] + rows["static"][
        :1
    ]  # a still shot's clips are alike
    for k, i in enumerate(others):
        for j in others[k + 1 :]:
            assert int(hamming(data["phash"][i], data["phash"][j]).max()) > 4

    info = read_dataset_info(curated)
    assert info["columns"][-3:] == ["scene", "motion", "phash"] and info["curate"]["scene"]["sources_with_cuts"] == 1
    assert info["curate"]["motion"]["p10"] < info["curate"]["motion"]["p90"]

    # Without --curate the same run lays clips 1 s apart, and one of them spans the cut (what --curate prevents).
    plain = _prepare(videos, tmp_path / "plain", curate=False)
    assert "curate" not in plain and "motion" not in plain["columns"]
    data = read_prepared(tmp_path / "plain", columns=["source", "start_s"])
    starts = [float(data["start_s"][i]) for i in _by_source(data)["cut"]]
    assert starts == [0.0, 1.0, 2.0, 3.0] and any(round(s * FPS) < CUT <= round(s * FPS) + 7 for s in starts)
    r = _sora("data", "filter", "--in", str(tmp_path / "plain"), "--out", str(tmp_path / "f"), "--min-motion", "0.1")
    assert r.returncode == 2 and "prepared without --curate" in r.stderr and "Traceback" not in r.stderr


def _sora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_filter_drops_static_clips_and_duplicates_without_decoding(curated, tmp_path):
    src = read_prepared(curated)
    out = tmp_path / "moving"
    r = _sora(
        "data",
        "filter",
        "--in",
        str(curated),
        "--out",
        str(out),
        "--min-motion",
        "0.2",
        "--drop-duplicates",
        "--max-hamming",
        "3",
    )
    assert r.returncode == 0, r.stderr
    rows = _by_source(src)
    # Kept: every clip of the cut and moving videos; "copy" < "moving" in the visiting order, so the copy's clips stay
    # and the original's are the duplicates.
    kept = {str(src["clip_id"][i]) for name in ("cut", "copy") for i in rows[name]}
    got = read_prepared(out)
    assert sorted(got["clip_id"]) == sorted(kept)
    where = {str(c): i for i, c in enumerate(src["clip_id"])}
    for k, cid in enumerate(got["clip_id"]):  # whole rows, as they were: tokens, captions, curation columns
        for col in ("patches", "text_tokens", "text_mask", "phash", "motion", "caption"):
            np.testing.assert_array_equal(got[col][k], src[col][where[str(cid)]])

    info = read_dataset_info(out)
    step = info["filters"][-1]
    assert (step["min_motion"], step["drop_duplicates"], step["max_hamming"]) == (0.2, True, 3)
    n_static, n_dup = len(rows["static"]), len(rows["moving"])
    assert step["dropped"] == {"low motion": n_static, "duplicate": n_dup} and step["clips_kept"] == len(kept)
    assert info["num_clips"] == len(kept) == sum(b["num_clips"] for b in info["buckets"])
    dropped = [json.loads(line) for line in (out / "filtered.jsonl").read_text().splitlines()]
    assert sorted((Path(d["source"]).stem, d["reason"]) for d in dropped) == sorted(
        [("static", "low motion")] * n_static + [("moving", "duplicate")] * n_dup
    )
    assert (out / "rejects.jsonl").read_text() == (curated / "rejects.jsonl").read_text()

    # A second filter of the filtered dataset stacks its step; an existing --out is refused without --overwrite.
    r = _sora("data", "filter", "--in", str(curated), "--out", str(out), "--min-motion", "0.2")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = _sora("data", "filter", "--in", str(out), "--out", str(tmp_path / "twice"), "--min-motion", "100")
    assert r.returncode == 2 and "would be dropped" in r.stderr and not (tmp_path / "twice").exists()
    r = _sora("data", "filter", "--in", str(out), "--out", str(tmp_path / "twice"), "--drop-duplicates")
    assert r.returncode == 0, r.stderr
    assert [s["from"] for s in read_dataset_info(tmp_path / "twice")["filters"]] == [str(curated), str(out)]


def test_vae_path_gives_the_same_curation_columns(videos, curated, tmp_path):
    """With a VAE the columns come from the decode tasks (the encode actors never see them computed): the same
    values."""
    pytest.importorskip("diffusers")
    from sora_model.config import AutoencoderConfig

    write_tiny_vae(tmp_path / "vae")
    prepare(
        PrepareOptions(
            manifest=str(videos / "m.jsonl"),
            out=str(tmp_path / "latents"),
            buckets=parse_buckets("8x32x32"),
            fps=FPS,
            clips_per_video=0,
            progress=False,
            curate=True,
            autoencoder=AutoencoderConfig(kind="diffusers", path=str(tmp_path / "vae")),
        )
    )
    cols = ["clip_id", "scene", "motion", "phash"]
    want, got = read_prepared(curated, columns=cols), read_prepared(tmp_path / "latents", columns=cols)
    order_w, order_g = np.argsort(want["clip_id"]), np.argsort(got["clip_id"])
    for c in cols:
        np.testing.assert_array_equal(got[c][order_g], want[c][order_w])
    assert read_dataset_info(tmp_path / "latents")["columns"][-3:] == ["scene", "motion", "phash"]
