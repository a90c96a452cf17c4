"""Wan2.2 A14B's two experts: a tiny random `WanPipeline` folder with `transformer_2` and `boundary_ratio` (made here
with `save_pretrained`) converts into one export (`model.safetensors` + `model_2.safetensors`) whose sampling switches
from the high-noise to the low-noise expert at the boundary timestep exactly as diffusers' WanPipeline does
(4 CFG steps on both sides of the boundary, fp32, asserted <= 1e-4). Inconsistent folders fail with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers import WAN_CHANNELS, make_tiny_wan_folder, perturb, tiny_wan_transformer  # noqa: E402

from pipelines.cli import main  # noqa: E402
from sora_model.pipeline import MODEL_2_FILE, TextToVideoPipeline, load_export_config  # noqa: E402

TOL = 1e-4
BOUNDARY = 0.875  # Wan2.2 T2V-A14B's
OPTIONS = {"num_frames": 9, "height": 32, "width": 48, "guidance_scale": 5.0}
PROMPT = "a red circle &amp; a  blue square"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wan22")
    t2v = make_tiny_wan_folder(base / "t2v")
    low_noise = tiny_wan_transformer()
    perturb(low_noise, 5)  # another expert than the high-noise one
    out = base / "Wan2.2-tiny-Diffusers"
    diffusers.WanPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(t2v / "tokenizer")),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(str(t2v / "text_encoder")).eval(),
        transformer=diffusers.WanTransformer3DModel.from_pretrained(str(t2v / "transformer")).eval(),
        transformer_2=low_noise,
        vae=diffusers.AutoencoderKLWan.from_pretrained(str(t2v / "vae")).eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        boundary_ratio=BOUNDARY,
    ).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def export(folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "wan22"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    return out


def test_export_holds_both_experts(export: Path) -> None:
    assert load_export_config(str(export)).boundary_ratio == BOUNDARY
    assert (export / MODEL_2_FILE).is_file()


def test_sampling_switches_experts_as_wan_pipeline(folder: Path, export: Path) -> None:
    wan = diffusers.WanPipeline.from_pretrained(str(folder))
    wan.set_progress_bar_config(disable=True)
    wan.scheduler.set_timesteps(4)
    timesteps = wan.scheduler.timesteps.tolist()
    boundary = BOUNDARY * wan.scheduler.config.num_train_timesteps
    assert any(t >= boundary for t in timesteps) and any(t < boundary for t in timesteps), timesteps  # both experts run
    with torch.no_grad():
        expected = wan(
            PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(7), output_type="latent", **OPTIONS
        ).frames
    pipe = TextToVideoPipeline.load(str(export))
    got = pipe.sample_latents(PROMPT, steps=4, seed=7, **OPTIONS)
    diff = (got - expected).abs().max().item()
    print(f"two experts, 4 CFG steps vs WanPipeline (boundary {BOUNDARY}), fp32: max abs latent difference {diff:.2e}")
    assert got.shape == expected.shape == (1, WAN_CHANNELS, 3, 4, 6)
    assert diff <= TOL
    # The second expert matters: the high-noise expert alone gives another clip.
    pipe.model_2 = pipe.model
    assert (pipe.sample_latents(PROMPT, steps=4, seed=7, **OPTIONS) - expected).abs().max().item() > 100 * TOL
    with pytest.raises(ValueError, match="two-expert"):
        pipe.sample_latents(PROMPT, steps=1, seed=7, step_cache="teacache", **OPTIONS)


def test_inconsistent_expert_folders_fail_with_one_line(folder: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    def convert(path: Path) -> str:
        assert main(["convert", "--from-diffusers", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, err
        return err

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": None}))
    assert "transformer_2 without boundary_ratio" in convert(bad)
    (bad / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 1.5}))
    assert "boundary_ratio 1.5" in convert(bad)
    (bad / "model_index.json").write_text(json.dumps(index))
    config = json.loads((bad / "transformer_2" / "config.json").read_text())
    (bad / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    assert "transformer_2 has another shape" in convert(bad)
