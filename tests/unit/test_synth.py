"""The synthetic dataset's grammar and renderer, and the Ray-free parts of `prepare` (no Ray here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data import grammar
from pipelines.data.prepare import Bucket, choose_bucket, clip_id, parse_buckets, read_manifest, resize_center_crop
from pipelines.data.synth import SynthSpec, make_video, render, trajectory


def test_grammar_has_the_design_vocabulary():
    assert list(grammar.COLORS) == ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
    assert grammar.SHAPES == ("circle", "square", "triangle")
    assert grammar.DIRECTIONS == ("left", "right", "up", "down")
    assert grammar.caption("red", "circle", "left") == "a red circle moving left"
    assert grammar.parse_caption("a red circle moving left") == {"color": "red", "shape": "circle", "direction": "left"}
    assert grammar.parse_caption("a purple circle moving left") is None
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        grammar.caption("purple", "circle", "left")


def test_combinations_cycle_covers_everything_early():
    combos = grammar.all_combinations()
    assert len(combos) == len(set(combos)) == 84
    first = combos[:12]  # lcm(3, 4): every shape and direction; 7 colours already by 7
    assert {c[0] for c in combos[:7]} == set(grammar.COLORS)
    assert {c[1] for c in first} == set(grammar.SHAPES) and {c[2] for c in first} == set(grammar.DIRECTIONS)


def test_exclude_patterns_and_wildcards():
    kept = grammar.combinations(["red circle left", "a blue square moving up", "* triangle *"])
    assert ("red", "circle", "left") not in kept and ("blue", "square", "up") not in kept
    assert not any(c[1] == "triangle" for c in kept)
    assert len(kept) == 84 - 28 - 2
    with pytest.raises(ValueError, match="color 'purple'"):
        grammar.combinations(["purple circle left"])
    with pytest.raises(ValueError, match="three words"):
        grammar.combinations(["red circle"])
    with pytest.raises(ValueError, match="no combination"):
        grammar.combinations(["* * *"])


def _centroid(frame: np.ndarray) -> np.ndarray:
    w = frame.astype(np.float64).sum(-1)
    ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]]
    return np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])


@pytest.mark.parametrize("direction", grammar.DIRECTIONS)
@pytest.mark.parametrize("shape", grammar.SHAPES)
def test_render_moves_at_constant_speed_inside_the_frame(shape, direction):
    spec = SynthSpec(size=32, frames=16, seed=3)
    video = make_video(spec, 5, ("cyan", shape, direction))
    assert video.shape == (16, 32, 32, 3) and video.dtype == np.uint8
    # Fixed size, never clipped by the frame or wrapped round it: the same total coverage every frame.
    coverage = video.astype(np.float64).sum(axis=(1, 2, 3))
    assert coverage.max() - coverage.min() <= 0.02 * coverage.mean()
    steps = np.diff(np.stack([_centroid(f) for f in video]), axis=0)  # (T-1, 2)
    dx, dy = grammar.DIRECTION_VECTORS[direction]
    np.testing.assert_allclose(steps, np.tile([dx * spec.speed, dy * spec.speed], (15, 1)), atol=0.15)
    # Only the caption's colour (or blends of it with black) appears.
    rgb = np.array(grammar.COLORS["cyan"])
    lit = video[video.max(-1) > 0].astype(np.float64)
    scale = lit.max(-1, keepdims=True) / 255.0
    np.testing.assert_allclose(lit, scale * rgb, atol=1.0)


def test_render_is_deterministic_per_seed_and_index():
    spec = SynthSpec(seed=7)
    combo = ("red", "triangle", "up")
    np.testing.assert_array_equal(make_video(spec, 3, combo), make_video(spec, 3, combo))
    assert not np.array_equal(make_video(spec, 3, combo), make_video(spec, 4, combo))
    assert not np.array_equal(make_video(spec, 3, combo), make_video(SynthSpec(seed=8), 3, combo))


def test_trajectory_stays_inside_for_many_seeds():
    spec = SynthSpec(size=32, frames=16)
    for seed in range(50):
        for d in grammar.DIRECTIONS:
            corners = trajectory(spec, d, np.random.default_rng(seed))
            assert corners.min() >= 0 and corners.max() <= spec.size - spec.extent
    one = render(SynthSpec(frames=1), "white", "square", np.array([[4.0, 4.0]]))
    assert one.shape == (1, 32, 32, 3)


def test_choose_bucket_prefers_aspect_then_frames():
    buckets = parse_buckets("1x32x32,8x32x32,16x32x32,8x32x64")
    assert choose_bucket(buckets, 176, 144, False, lambda b: True) == Bucket(16, 32, 32)
    assert choose_bucket(buckets, 176, 144, False, lambda b: b.frames <= 8) == Bucket(8, 32, 32)
    assert choose_bucket(buckets, 1280, 720, False, lambda b: True) == Bucket(8, 32, 64)
    assert choose_bucket(buckets, 640, 480, True, lambda b: True) == Bucket(1, 32, 32)  # a still
    assert choose_bucket(buckets, 640, 480, False, lambda b: b.frames == 1) is None  # too short: not an image
    assert choose_bucket(parse_buckets("1x32x32"), 64, 64, False, lambda b: True) == Bucket(1, 32, 32)  # --frames 1
    assert choose_bucket(parse_buckets("8x32x32"), 64, 64, True, lambda b: b.frames == 1) is None


def test_resize_center_crop_shapes_and_identity():
    frames = np.random.default_rng(0).integers(0, 256, (2, 144, 176, 3), dtype=np.uint8)
    assert resize_center_crop(frames, 32, 32).shape == (2, 32, 32, 3)
    assert resize_center_crop(frames, 32, 64).shape == (2, 32, 64, 3)
    np.testing.assert_array_equal(resize_center_crop(frames, 144, 176), frames)
    # A centred square stays in the centre after the crop.
    img = np.zeros((1, 40, 80, 3), np.uint8)
    img[:, 10:30, 30:50] = 255
    out = resize_center_crop(img, 20, 20)
    assert out[0, 10, 10].min() > 200 and out[0, 1, 1].max() < 30


def test_manifests_csv_jsonl_folder_agree(tmp_path):
    (tmp_path / "v").mkdir()
    names = ["a.mp4", "b.mp4", "c.png"]
    caps = ["a red circle moving left", "a blue square moving up", "a white square moving down"]
    for n, c in zip(names, caps, strict=True):
        (tmp_path / "v" / n).write_bytes(b"x")
        (tmp_path / "v" / n).with_suffix(".txt").write_text(c)
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"path": f"v/{n}", "caption": c}) + "\n" for n, c in zip(names, caps, strict=True))
    )
    (tmp_path / "m.csv").write_text("path,text\n" + "".join(f"v/{n},{c}\n" for n, c in zip(names, caps, strict=True)))
    jsonl, _ = read_manifest(str(tmp_path / "m.jsonl"))
    csv_, _ = read_manifest(str(tmp_path / "m.csv"))
    folder, _ = read_manifest(str(tmp_path / "v"))

    def key(rows):
        return sorted((r["source"], r["caption"]) for r in rows)

    assert key(jsonl) == key(csv_) == key(folder)
    assert all(r["source"].startswith(str(tmp_path)) for r in jsonl)
    assert clip_id(jsonl[0]["source"], 0.0) == clip_id(csv_[0]["source"], 0.0)


def test_manifest_errors(tmp_path):
    from pipelines.data.prepare import PrepareError

    with pytest.raises(PrepareError, match="not found"):
        read_manifest(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.csv").write_text("file,label\nx,y\n")
    with pytest.raises(PrepareError, match="needs columns 'path' and 'caption'"):
        read_manifest(str(tmp_path / "bad.csv"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\nnot json\n{"caption": "y"}\n')
    rows, _ = read_manifest(str(tmp_path / "m.jsonl"))
    assert [bool(r["error"]) for r in rows] == [False, True, True]


def test_prepare_checks_the_text_encoder_before_any_work(tmp_path, monkeypatch):
    from pipelines.data import runtime
    from pipelines.data.prepare import Bucket, PrepareError, PrepareOptions, prepare
    from sora_model.config import TextEncoderConfig

    monkeypatch.setattr(runtime, "ensure_ray", lambda: pytest.fail("Ray must not start on a bad text encoder"))
    (tmp_path / "m.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n')
    for encoder, message in (
        (TextEncoderConfig(hidden_layer=9), r"hidden_layer 9 is out of range for 'minilm' \(6 layers: use -7..6"),
        (TextEncoderConfig(name_or_path=str(tmp_path / "nope")), "not found: give 'minilm'"),
    ):
        opts = PrepareOptions(
            manifest=str(tmp_path / "m.jsonl"),
            out=str(tmp_path / "out"),
            buckets=[Bucket.parse("1x16x16")],
            text_encoder=encoder,
        )
        with pytest.raises(PrepareError, match=message):
            prepare(opts)
    assert not (tmp_path / "out").exists()


def test_batch_rows_bounds():
    from pipelines.data.prepare.encode import batch_rows
    from pipelines.data.prepare.options import DECODE_BATCH_BYTES, DECODE_BATCH_ROWS

    assert batch_rows(16 * 32 * 32 * 3, 256, DECODE_BATCH_BYTES) == DECODE_BATCH_ROWS  # small clips: the row bound
    assert batch_rows(16 * 32 * 32 * 3, 5, DECODE_BATCH_BYTES) == 5  # rows_per_file caps the shard
    big = 16 * 720 * 1280 * 3
    assert batch_rows(big, 256, DECODE_BATCH_BYTES) == DECODE_BATCH_BYTES // big  # the pixel budget caps it
    assert batch_rows(10**10, 256, DECODE_BATCH_BYTES) == 1  # never zero
