"""Sequence- and CFG-parallel sampling on CPU (gloo, spawned local processes) against one process.

- 2 sequence-parallel ranks sample the same latents as one process, for tiny DiT exports (a ragged temporal window,
  factorised attention) and a tiny converted Wan2.1 export, at odd token counts (padded and masked, never refused);
- CFG parallelism (2 sequence ranks x 2 branches) equals batched CFG, with the learned null condition and with
  Wan's empty prompt;
- `sora generate --sequence-parallel 2` writes the same uint8 frames as one process; a split that does not divide
  the heads is a one-line error with exit code 2, before any process starts.
Tolerance: fp32 latents within 1e-4 (reductions may reorder), frames within one uint8 level.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_wan_folder, perturb

from pipelines.cli import main
from pipelines.parallel.config import ParallelConfig
from pipelines.parallel.launch import run_parallel
from pipelines.parallel.sampling import shard_plan
from sora_model.config import DiffusionConfig, PipelineConfig, SampleConfig, dit_preset
from sora_model.pipeline import TextToVideoPipeline

pytestmark = pytest.mark.slow

PROMPT = "a red circle moving left"
TOL = 1e-4
# Identity autoencoder, patch (1, 2, 2): 3 frames of 14x14 are a 3x7x7 grid, 147 tokens (odd).
DIT_CLIP = {"num_frames": 3, "height": 14, "width": 14, "steps": 3, "seed": 1, "guidance_scale": 4.0}
# Wan VAE (4x frames, 8x space), patch (1, 2, 2): 9 frames of 48x48 are a 3x3x3 grid, 27 tokens (odd).
WAN_CLIP = {"num_frames": 9, "height": 48, "width": 48, "steps": 3, "seed": 1, "guidance_scale": 5.0}


def _dit_export(folder: Path, **model) -> str:
    config = PipelineConfig(
        model=dit_preset("DiT-tiny", text_dim=384, **model),
        sample=SampleConfig(num_frames=3, height=14, width=14, fps=8),
        diffusion=DiffusionConfig(num_sampling_steps=3),
    )
    pipe = TextToVideoPipeline.from_config(config)
    perturb(pipe.model, 0, scale=0.05)  # an untrained DiT predicts zeros: every path must be non-zero to be checked
    return pipe.save(str(folder))


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    base = tmp_path_factory.mktemp("parallel")
    wan = base / "wan-export"
    assert main(["convert", "--from-diffusers", str(make_tiny_wan_folder(base / "wan-folder")), "--out", str(wan)]) == 0
    return {
        "windowed": (_dit_export(base / "windowed", temporal_windows=(2, 0), absolute_positions=True), DIT_CLIP),
        "factorized": (_dit_export(base / "factorized", attention="factorized", temporal_windows=(2,)), DIT_CLIP),
        "wan": (str(wan), WAN_CLIP),
    }


def _latents_on_ranks(groups, device: str, cases: dict[str, tuple[str, dict]]) -> dict[str, np.ndarray]:
    """Every case's latents sampled over this world (rank 0's copy comes back)."""
    from pipelines.parallel.sampling import ParallelPipeline

    out = {}
    for name, (export, clip) in cases.items():
        pipe = ParallelPipeline.load(export, device=device).parallelize(groups)
        out[name] = pipe.sample_latents(PROMPT, **clip).numpy()
    return out


@pytest.fixture(scope="module")
def reference(cases) -> dict[str, np.ndarray]:
    return {
        name: TextToVideoPipeline.load(export).sample_latents(PROMPT, **clip).numpy()
        for name, (export, clip) in cases.items()
    }


@pytest.fixture(scope="module")
def sequence_parallel(cases) -> dict[str, np.ndarray]:
    return run_parallel(_latents_on_ranks, ParallelConfig(sequence=2), "cpu", cases)


@pytest.fixture(scope="module")
def cfg_parallel(cases) -> dict[str, np.ndarray]:
    return run_parallel(_latents_on_ranks, ParallelConfig(sequence=2, cfg=True), "cpu", cases)


def test_shard_plan_pads_the_fewest_tokens() -> None:
    plan = shard_plan((3, 7, 7), 2)
    assert plan.padded == (3, 8, 7) and plan.index.shape == (147,)
    positions = torch.stack(torch.meshgrid(*(torch.arange(g) for g in plan.padded), indexing="ij"), -1).reshape(-1, 3)
    real = torch.stack(torch.meshgrid(*(torch.arange(g) for g in plan.grid), indexing="ij"), -1).reshape(-1, 3)
    assert torch.equal(positions[plan.index], real)  # real tokens keep their (t, h, w), so their RoPE
    assert shard_plan((5, 3, 3), 4).padded == (5, 4, 3)  # 60 tokens: one more row beats 3 more frames (72)
    assert math.prod(shard_plan((21, 45, 79), 8).padded) % 8 == 0
    assert shard_plan((4, 8, 8), 2).index is None  # tokens that divide are not padded


@pytest.mark.parametrize("name", ["windowed", "factorized", "wan"])
def test_two_sequence_ranks_equal_one_process(name, reference, sequence_parallel) -> None:
    ref, got = reference[name], sequence_parallel[name]
    assert got.shape == ref.shape and np.abs(ref).max() > 0.1
    assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()


@pytest.mark.parametrize("name", ["windowed", "wan"])
def test_cfg_parallel_equals_batched_cfg(name, reference, cfg_parallel) -> None:
    ref, got = reference[name], cfg_parallel[name]
    assert np.abs(got - ref).max() <= TOL, np.abs(got - ref).max()


def test_cli_sequence_parallel_writes_the_same_frames(cases, tmp_path) -> None:
    export, _ = cases["windowed"]
    common = [
        "generate",
        "--model",
        export,
        "--prompt",
        PROMPT,
        "--frames",
        "3",
        "--height",
        "14",
        "--width",
        "14",
        "--steps",
        "3",
        "--seed",
        "5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "one.npz")]) == 0
    assert main([*common, "--sequence-parallel", "2", "--out", str(tmp_path / "two.npz")]) == 0
    one, two = (np.load(tmp_path / f"{n}.npz")["frames"] for n in ("one", "two"))
    assert one.dtype == two.dtype == np.uint8 and one.shape == two.shape == (3, 14, 14, 3)
    assert one.std() > 1  # not a constant clip
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1


def test_cli_heads_that_do_not_divide_are_a_one_line_error(cases, tmp_path, capsys) -> None:
    export, _ = cases["windowed"]  # DiT-tiny: 2 heads
    code = main(
        [
            "generate",
            "--model",
            export,
            "--prompt",
            PROMPT,
            "--sequence-parallel",
            "3",
            "--out",
            str(tmp_path / "x.npz"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "x.npz").exists()
    assert len(err.splitlines()) == 1 and "--sequence-parallel 3 must divide the model's 2 attention heads" in err, err
