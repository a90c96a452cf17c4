"""The evaluator's parts: the attribute detector on real synthetic clips, metrics on known inputs, local-file
loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from pipelines.data import grammar, synth
from pipelines.evaluate import attributes, metrics
from pipelines.evaluate.features import SmallVideoEncoderConfig, load_feature_extractor, save_small_encoder
from pipelines.evaluate.run import PromptSpec, format_table, load_prompts
from sora_model.video import read_video, write_video

# ---------------------------------------------------------------------------------------------
# Attribute detector, validated on the real synthetic dataset (MP4 round trip)
# ---------------------------------------------------------------------------------------------


def _synth_clips(tmp_path, size: int, frames: int, seed: int) -> tuple[list[np.ndarray], list[dict]]:
    """Every one of the 84 combinations, rendered by `sora data synth`'s renderer, written as H.264 and read back."""
    spec = synth.SynthSpec(size=size, frames=frames, seed=seed)
    clips, truths = [], []
    for i, combo in enumerate(grammar.all_combinations()):
        path = str(tmp_path / f"{size}_{frames}_{i:03d}.mp4")
        write_video(path, synth.make_video(spec, i, combo), fps=spec.fps)
        clips.append(read_video(path))
        truths.append(dict(zip(grammar.ATTRIBUTES, combo, strict=True)))
    return clips, truths


@pytest.mark.parametrize("size,frames,seed", [(32, 16, 0), (32, 8, 1), (16, 8, 2)])
def test_detector_reads_ground_truth_synthetic_clips(tmp_path, size, frames, seed):
    clips, truths = _synth_clips(tmp_path, size, frames, seed)
    assert len(clips) == len(grammar.COLORS) * len(grammar.SHAPES) * len(grammar.DIRECTIONS)
    acc = attributes.attribute_accuracy(clips, truths)
    assert acc["n"] == 84
    for key in ("color", "shape", "direction", "all"):
        assert acc[key] >= 0.98, acc


def test_detector_survives_blur_like_a_generated_clip(tmp_path):
    """Generated clips are soft-edged: a Gaussian blur of the ground truth must still read correctly."""
    from scipy.ndimage import gaussian_filter

    spec = synth.SynthSpec(size=32, frames=8, seed=3)
    clips, truths = [], []
    for i, combo in enumerate(grammar.all_combinations()):
        v = synth.make_video(spec, i, combo).astype(np.float32)
        clips.append(np.clip(gaussian_filter(v, sigma=(0, 0.7, 0.7, 0)) * 0.8, 0, 255).astype(np.uint8))
        truths.append(grammar.caption(*combo))  # captions work as ground truth too
    acc = attributes.attribute_accuracy(clips, truths)
    assert acc["color"] >= 0.98 and acc["direction"] >= 0.98 and acc["shape"] >= 0.9, acc


def _ragged(clip: np.ndarray, rng: np.random.Generator, share: float = 0.25) -> np.ndarray:
    """A quarter of each frame's edge pixels flipped (inside ones cleared, outside ones filled): the ragged outline
    of a generated shape, whose every side still reads straight to a person."""
    from scipy import ndimage

    out = clip.copy()
    for t, frame in enumerate(clip):
        inside = frame.max(axis=-1) > 60
        edge = ndimage.binary_dilation(inside) & ~ndimage.binary_erosion(inside)
        flip = edge & (rng.random(inside.shape) < share)
        out[t][flip & inside] = 0
        out[t][flip & ~inside] = frame[inside].mean(axis=0)
    return out


def test_detector_reads_ragged_edged_shapes_by_their_outline():
    """One pixel standing out of a square's edge widens its bounding box by a whole pixel: read by the box's fill
    alone, every ragged square below is a circle (0 of 28). The fitted outline reads each shape as drawn."""
    rng = np.random.default_rng(0)
    spec = synth.SynthSpec(size=32, frames=8, seed=3)
    read: dict[str, list[bool]] = {s: [] for s in grammar.SHAPES}
    for i, combo in enumerate(grammar.all_combinations()):
        clip = _ragged(synth.make_video(spec, i, combo), rng)
        read[combo[1]].append(attributes.detect(clip).shape == combo[1])
    assert all(np.mean(hits) >= 0.95 for hits in read.values()), {s: f"{sum(h)}/{len(h)}" for s, h in read.items()}


def test_detector_on_empty_clip_predicts_nothing():
    det = attributes.detect(np.zeros((4, 16, 16, 3), np.uint8))
    assert det.attributes() == {"color": None, "shape": None, "direction": None} and det.confidence == 0
    assert attributes.attribute_accuracy([np.zeros((4, 16, 16, 3), np.uint8)], ["a red circle moving left"])["all"] == 0


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        attributes.detect(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="grammar"):
        attributes.attribute_accuracy([np.zeros((2, 8, 8, 3), np.uint8)], ["a dog running"])


# ---------------------------------------------------------------------------------------------
# Metrics on known inputs
# ---------------------------------------------------------------------------------------------


def _scipy_reference_fd(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid computation: sqrtm of the covariance product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # |dmu|^2 + sum (s1 - s2)^2 per axis
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance([3.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(9 + 1)


def test_frechet_distance_matches_scipy_reference_on_random_full_covariances():
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
            _scipy_reference_fd(mu1, s1, mu2, s2), rel=1e-6
        )


def test_frechet_distance_from_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    cov1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    cov2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, -2.0])
    x = rng.multivariate_normal(mu1, cov1, size=200_000)
    y = rng.multivariate_normal(mu2, cov2, size=200_000)
    expected = _scipy_reference_fd(mu1, cov1, mu2, cov2)
    assert metrics.frechet_distance_from_features(x, y) == pytest.approx(expected, rel=0.02)
    assert metrics.frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_is_zero_for_identical_rank_deficient_sets():
    """Fewer samples than dimensions (the usual small-eval case): exact 0, never complex or negative."""
    f = np.random.default_rng(2).normal(size=(5, 32))
    assert metrics.frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance_from_features(f, f + 1.0) == pytest.approx(32.0, abs=1e-4)


def test_temporal_consistency_static_is_one_noise_is_lower():
    rng = np.random.default_rng(0)
    static = np.repeat(rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8), 6, axis=0)
    noise = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    moving = synth.make_video(synth.SynthSpec(size=32, frames=8), 0, ("red", "circle", "left"))
    assert metrics.temporal_consistency(static) == pytest.approx(1.0)
    assert metrics.frame_change(static) == 0.0
    assert abs(metrics.temporal_consistency(noise)) < 0.1
    assert metrics.temporal_consistency(noise) < metrics.temporal_consistency(moving) < 1.0
    assert metrics.temporal_consistency(static[:1]) == 1.0


def test_diversity_zero_for_identical_clips_positive_otherwise():
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert metrics.diversity(np.stack([clip, clip, clip])) == 0.0
    black, white = np.zeros_like(clip), np.full_like(clip, 255)
    assert metrics.diversity(np.stack([black, white])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.diversity(clip[None])


# ---------------------------------------------------------------------------------------------
# Feature extractors and CLIP from local files
# ---------------------------------------------------------------------------------------------


def test_missing_feature_file_is_one_line_naming_path_and_option(tmp_path):
    path = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError) as err:
        load_feature_extractor(path)
    msg = str(err.value)
    assert path in msg and "--features" in msg and "\n" not in msg


def test_safetensors_feature_extractor_round_trip(tmp_path):
    path = save_small_encoder(str(tmp_path / "enc.safetensors"), SmallVideoEncoderConfig(channels=(8, 16)))
    ex = load_feature_extractor(path)
    clips = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)
    assert ex.frame_features(clips[0]).shape == (4, 16)
    assert ex.clip_features(clips).shape == (3, 16) and ex.takes_video
    # Deterministic: the same file gives the same features.
    np.testing.assert_allclose(load_feature_extractor(path).clip_features(clips), ex.clip_features(clips))


def test_torchscript_frame_extractor_falls_back_to_frame_stats_for_clips(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = str(tmp_path / "frames.pt")
    torch.jit.script(net).save(path)
    ex = load_feature_extractor(path)
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    assert ex.frame_features(clips[0]).shape == (3, 4)
    assert ex.clip_features(clips).shape == (2, 8) and not ex.takes_video


def test_wrong_feature_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript"):
        load_feature_extractor(str(bad))
    with pytest.raises(ValueError, match="unknown extension"):
        (tmp_path / "x.onnx").write_bytes(b"x")
        load_feature_extractor(str(tmp_path / "x.onnx"))


def make_tiny_clip(path: str) -> str:
    """A random 2-layer CLIP with a byte-level tokenizer (no merges) and a 32 px image processor, offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab: dict[str, int] = {}
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[c] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_tiny_clip_checkpoint_scores_clips(tmp_path):
    from pipelines.evaluate.clip import ClipScorer

    scorer = ClipScorer(make_tiny_clip(str(tmp_path / "clip")))
    clips = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    scores, consistency = scorer.score(clips, ["a red circle moving left", "a blue square moving up"])
    assert len(scores) == 2 and all(0.0 <= s <= 100.0 for s in scores)
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in consistency)
    static = np.repeat(clips[:, :1], 3, axis=1)
    assert scorer.score(static, ["a", "b"])[1] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_missing_clip_checkpoint_is_one_line_naming_path_and_option(tmp_path):
    from pipelines.evaluate.clip import ClipScorer

    with pytest.raises(FileNotFoundError) as err:
        ClipScorer(str(tmp_path / "no-clip"))
    assert str(tmp_path / "no-clip") in str(err.value) and "--clip" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Prompts files and the table
# ---------------------------------------------------------------------------------------------


def test_load_prompts_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na red circle moving left\n\na cat playing piano\n")
    specs = load_prompts(str(txt))
    assert [s.prompt for s in specs] == ["a red circle moving left", "a cat playing piano"]
    assert (
        specs[0].attributes == {"color": "red", "shape": "circle", "direction": "left"} and specs[1].attributes is None
    )

    jl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a blue square moving up", "held_out": True},
        {"prompt": "a shape", "attributes": {"color": "green", "shape": "triangle", "direction": "down"}},
    ]
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    specs = load_prompts(str(jl))
    assert specs[0] == PromptSpec(
        "a blue square moving up", {"color": "blue", "shape": "square", "direction": "up"}, True
    )
    assert specs[1].attributes["shape"] == "triangle" and not specs[1].held_out


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no prompts"),
        ('{"prompt": 3}\n', "non-empty string"),
        ('{"prompt": "x"\n', "not valid JSON"),
        ('{"prompt": "x", "attributes": {"color": "red"}}\n', "lacks shape"),
    ],
)
def test_load_prompts_errors(tmp_path, content, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompts(str(p))
    with pytest.raises(FileNotFoundError, match="--prompts"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_format_table_lists_headline_metrics():
    acc = {"color": 1.0, "shape": 0.5, "direction": 0.75, "all": 0.5, "n": 4}
    table = format_table(
        {
            "attribute_accuracy": {"overall": acc, "seen": acc, "held_out": None},
            "temporal_consistency": 0.9,
            "diversity": None,
            "fid": 1.5,
            "num_clips": 4,
            "num_prompts": 2,
            "num_seeds": 2,
        }
    )
    assert "overall" in table and "seen" in table and "held_out" not in table and "50.0%" in table and "fid" in table
