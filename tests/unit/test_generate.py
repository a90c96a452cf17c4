"""`sora generate` on a tiny export: MP4/GIF/NPZ out, deterministic per seed, one-line errors with exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_export

from pipelines.cli import main


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_tiny_export(tmp_path_factory.mktemp("export"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def npz_seed1(export, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("gen") / "seed1.npz"
    assert (
        main(
            [
                "generate",
                "--model",
                str(export),
                "--prompt",
                "a red circle moving left",
                "--seed",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return np.load(out)["frames"]


def test_npz_has_uint8_frames_with_export_defaults(npz_seed1):
    assert npz_seed1.dtype == np.uint8 and npz_seed1.shape == (4, 16, 16, 3)


def test_mp4_and_gif_with_options(export, tmp_path, capsys):
    mp4, gif = tmp_path / "clip.mp4", tmp_path / "clip.gif"
    code, out, err = run(
        capsys,
        "--model",
        str(export),
        "--prompt",
        "a blue square moving up",
        "--out",
        str(mp4),
        "--frames",
        "2",
        "--height",
        "8",
        "--width",
        "12",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--sampler",
        "heun",
    )
    assert code == 0, err
    assert mp4.read_bytes()[4:8] == b"ftyp" and "wrote" in out and "sampling" in err  # the progress bar
    code, _, err = run(
        capsys,
        "--model",
        str(export),
        "--prompt",
        "a blue square",
        "--out",
        str(gif),
        "--negative-prompt",
        "red",
        "--no-progress",
    )
    assert code == 0, err
    from PIL import Image

    with Image.open(gif) as im:
        assert im.format == "GIF" and im.size == (16, 16) and im.n_frames == 4


def test_same_seed_same_clip_other_seed_other_clip(export, npz_seed1, tmp_path):
    for seed, same in (("1", True), ("2", False)):
        out = tmp_path / f"s{seed}.npz"
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(export),
                    "--prompt",
                    "a red circle moving left",
                    "--seed",
                    seed,
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        assert np.array_equal(np.load(out)["frames"], npz_seed1) == same


def test_int8_precision_runs(export, tmp_path):
    out = tmp_path / "q.npz"
    assert (
        main(
            [
                "generate",
                "--model",
                str(export),
                "--prompt",
                "x",
                "--precision",
                "int8",
                "--steps",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.load(out)["frames"].shape == (4, 16, 16, 3)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "{missing}", "--out", "{tmp}/a.mp4"], ["not a folder"]),
        (["--out", "{tmp}/a.avi"], ["--out", ".mp4"]),
        (["--out", "{tmp}/a.mp4", "--frames", "0"], ["--frames", ">= 1"]),
        (["--out", "{tmp}/a.mp4", "--steps", "-2"], ["--steps"]),
        (["--out", "{tmp}/a.mp4", "--height", "15"], ["multiples of 2"]),
        (["--out", "{tmp}/a.mp4", "--sampler", "ddpm"], ["--sampler", "euler, heun"]),
        (["--out", "{tmp}/a.mp4", "--guidance", "nan"], ["--guidance"]),
        (["--out", "{tmp}/a.mp4", "--seed", "-1"], ["--seed"]),
        (["--out", "{tmp}/a.mp4", "--step-cache", "magcache"], ["--step-cache", "none, teacache, fbcache", "magcache"]),
        (
            ["--out", "{tmp}/a.mp4", "--step-cache", "teacache", "--cache-threshold", "-0.5"],
            ["--cache-threshold", ">= 0"],
        ),
        (
            ["--out", "{tmp}/a.mp4", "--step-cache", "fbcache", "--cache-threshold", "inf"],
            ["--cache-threshold", "finite"],
        ),
        (["--out", "{tmp}/a.mp4", "--cache-threshold", "0.1"], ["--cache-threshold", "needs a --step-cache"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(export, tmp_path, capsys, argv, words):
    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(export), *argv]
    code, _, err = run(capsys, "--prompt", "a red circle", "--no-progress", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sora generate: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    assert not list(tmp_path.glob("a.*"))


def test_export_without_config_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "--model", str(tmp_path / "empty"), "--prompt", "x", "--out", str(tmp_path / "a.npz"))
    assert code == 2 and "config.json is missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", ["teacache", "fbcache"])
def test_step_cache_flag(export, npz_seed1, tmp_path, capsys, method):
    """Threshold 0 gives the uncached clip; the default threshold skips some of the 4 steps' calls and says how many."""
    exact, cached = tmp_path / "exact.npz", tmp_path / "cached.npz"
    common = [
        "--model",
        str(export),
        "--prompt",
        "a red circle moving left",
        "--seed",
        "1",
        "--no-progress",
        "--step-cache",
        method,
    ]
    code, out, err = run(capsys, *common, "--cache-threshold", "0", "--out", str(exact))
    assert code == 0, err
    assert np.array_equal(np.load(exact)["frames"], npz_seed1)
    assert f"step cache {method} (threshold 0): skipped 0 of 4 transformer calls" in out
    code, out, err = run(capsys, *common, "--cache-threshold", "1", "--out", str(cached))
    assert code == 0, err
    line = next(s for s in out.splitlines() if s.startswith("step cache"))
    skipped = int(line.split("skipped ")[1].split(" of")[0])
    assert 0 < skipped <= 2, line  # the first and last of 4 calls always compute
