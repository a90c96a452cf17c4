"""Wan folders that ship diffusers' multistep schedulers sample exactly as `WanPipeline` does after conversion.

Tiny random Wan2.1 folders (tests/helpers.py, nothing downloaded) get their scheduler swapped for diffusers'
`UniPCMultistepScheduler` or `DPMSolverMultistepScheduler` with flow sigmas, as the Hub's Wan folders ship them.
`sora convert` makes the folder's scheduler the export's default sampler (`unipc`, `dpmpp`), and 10 steps of
`TextToVideoPipeline.sample_latents` with classifier-free guidance at a non-square size equal `WanPipeline`'s
latents (`output_type="latent"`, same seed) to 1e-4 in fp32. Unsupported scheduler settings fail with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers import WAN_CHANNELS, make_tiny_wan_folder  # noqa: E402

from pipelines.cli import main  # noqa: E402
from sora_model.pipeline import TextToVideoPipeline, load_export_config  # noqa: E402

TOL = 1e-4
STEPS = 10
OPTIONS = {"num_frames": 9, "height": 32, "width": 48, "guidance_scale": 5.0}
PROMPT = "a red circle &amp; a blue square"
UNIPC = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
DPM = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "algorithm_type": "dpmsolver++"}

# (id, scheduler class, its config, the export's expected sampler)
CASES = [
    ("unipc-shift3", "UniPCMultistepScheduler", {**UNIPC, "flow_shift": 3.0}, "unipc"),
    ("unipc-shift5", "UniPCMultistepScheduler", {**UNIPC, "flow_shift": 5.0}, "unipc"),
    (
        "unipc-bh1-order3-sigma-min",
        "UniPCMultistepScheduler",
        {**UNIPC, "flow_shift": 5.0, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
        "unipc",
    ),
    (
        "unipc-no-corrector-sigma-min",
        "UniPCMultistepScheduler",
        {
            **UNIPC,
            "flow_shift": 3.0,
            "disable_corrector": [0, 4],
            "final_sigmas_type": "sigma_min",
            "lower_order_final": False,
        },
        "unipc",
    ),
    ("dpmpp-shift3", "DPMSolverMultistepScheduler", {**DPM, "flow_shift": 3.0}, "dpmpp"),
    (
        "dpmpp-shift5-order3-heun",
        "DPMSolverMultistepScheduler",
        {**DPM, "flow_shift": 5.0, "solver_order": 3, "solver_type": "heun"},
        "dpmpp",
    ),
]


@pytest.fixture(scope="module")
def euler_folder(tmp_path_factory) -> Path:
    return make_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers")


def with_scheduler(base: Path, folder: Path, cls: str, config: dict) -> Path:
    """A copy of the Wan folder whose scheduler is diffusers' `cls(**config)`, saved as `save_pretrained` does."""
    shutil.copytree(base, folder)
    shutil.rmtree(folder / "scheduler")
    getattr(diffusers, cls)(**config).save_pretrained(str(folder / "scheduler"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", cls]}))
    return folder


def convert(folder: Path, out: Path) -> Path:
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(("cls", "config", "sampler"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_converted_multistep_folder_samples_like_wan_pipeline(
    euler_folder: Path, tmp_path: Path, cls, config, sampler
) -> None:
    folder = with_scheduler(euler_folder, tmp_path / "wan", cls, config)
    export = convert(folder, tmp_path / "export")
    assert load_export_config(str(export)).diffusion.sampler == sampler
    wan = diffusers.WanPipeline.from_pretrained(str(folder))
    assert type(wan.scheduler).__name__ == cls
    wan.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = wan(
            PROMPT,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(7),
            output_type="latent",
            **OPTIONS,
        ).frames
    got = TextToVideoPipeline.load(str(export)).sample_latents(PROMPT, steps=STEPS, seed=7, **OPTIONS)
    assert got.shape == expected.shape == (1, WAN_CHANNELS, 3, 4, 6)
    assert torch.isfinite(expected).all()
    diff = (got - expected).abs().max().item()
    print(f"{cls} {config}: {STEPS} CFG steps vs WanPipeline, fp32: max abs latent difference {diff:.2e}")
    assert diff <= TOL


def test_export_records_the_scheduler_settings(euler_folder: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    config = {**UNIPC, "flow_shift": 5.0, "solver_order": 3, "disable_corrector": [2]}
    export = convert(
        with_scheduler(euler_folder, tmp_path / "wan", "UniPCMultistepScheduler", config), tmp_path / "export"
    )
    assert "50 unipc steps (order 3, bh2, final sigma zero), shift 5, guidance 5" in capsys.readouterr().out
    d = load_export_config(str(export)).diffusion
    assert (d.sampler, d.time_grid, d.shift, d.multistep.order, d.multistep.disable_corrector) == (
        "unipc",
        "unipc",
        5.0,
        3,
        (2,),
    )
    euler = convert(euler_folder, tmp_path / "euler")  # the Euler folder stays as it was
    d = load_export_config(str(euler)).diffusion
    assert (d.sampler, d.time_grid, d.shift) == ("euler", "flow_match_euler", 3.0)


@pytest.mark.parametrize(
    ("cls", "config", "message"),
    [
        (
            "DDIMScheduler",
            {},
            "scheduler DDIMScheduler is not supported (supported: FlowMatchEulerDiscreteScheduler, "
            "UniPCMultistepScheduler, DPMSolverMultistepScheduler)",
        ),
        (
            "UniPCMultistepScheduler",
            {"flow_shift": 3.0},
            "prediction_type 'epsilon' is not supported (Wan needs flow_prediction)",
        ),
        ("UniPCMultistepScheduler", {**UNIPC, "use_karras_sigmas": True}, "use_karras_sigmas True is not supported"),
        ("UniPCMultistepScheduler", {**UNIPC, "lower_order_final": False}, "lower_order_final False is not supported"),
        (
            "DPMSolverMultistepScheduler",
            {**DPM, "algorithm_type": "sde-dpmsolver++"},
            "algorithm_type 'sde-dpmsolver++' is not supported",
        ),
        (
            "DPMSolverMultistepScheduler",
            {**DPM, "final_sigmas_type": "sigma_min", "beta_schedule": "scaled_linear"},
            "beta_schedule 'scaled_linear' is not supported (final_sigmas_type sigma_min needs linear betas)",
        ),
    ],
    ids=["class", "prediction", "karras", "unipc-final-order", "sde", "dpm-betas"],
)
def test_unsupported_scheduler_fails_with_one_line(
    euler_folder: Path, tmp_path: Path, capsys, cls, config, message
) -> None:  # noqa: ANN001
    from sora_model.config import ConfigError
    from sora_model.convert_wan import pipeline_config_from_wan

    folder = with_scheduler(euler_folder, tmp_path / "wan", cls, config)
    with pytest.raises(ConfigError, match=r"^scheduler "):
        pipeline_config_from_wan(folder)
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()
