"""`unipc` and `dpmpp` against diffusers' own schedulers, step for step.

The same nonlinear, timestep-dependent velocity field is integrated by `UniPCMultistepScheduler` /
`DPMSolverMultistepScheduler` (flow prediction, flow sigmas, WanPipeline's loop: `set_timesteps`,
`set_begin_index(0)`, `step` per timestep) and by our schedule with the matching DiffusionConfig. The grids,
the timesteps the field sees, and the final samples are bitwise equal. (Whole converted Wan folders:
tests/unit/test_wan_samplers.py.)
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sora_model.config import ConfigError, DiffusionConfig, MultistepConfig  # noqa: E402
from sora_model.diffusion import build_diffusion, dpm_flow_sigmas, unipc_flow_sigmas  # noqa: E402
from sora_model.diffusion.multistep import unipc_sample  # noqa: E402

SHAPE = (2, 4, 2, 3, 5)
FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}

# (id, diffusers class, its config, our sampler, our time grid, our multistep settings)
CASES = [
    ("unipc-shift3", "UniPCMultistepScheduler", {"flow_shift": 3.0}, "unipc", "unipc", {}),
    (
        "unipc-shift5-order3",
        "UniPCMultistepScheduler",
        {"flow_shift": 5.0, "solver_order": 3},
        "unipc",
        "unipc",
        {"order": 3},
    ),
    ("unipc-order1", "UniPCMultistepScheduler", {"flow_shift": 3.0, "solver_order": 1}, "unipc", "unipc", {"order": 1}),
    (
        "unipc-bh1-sigma-min",
        "UniPCMultistepScheduler",
        {"flow_shift": 5.0, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        "unipc",
        "unipc",
        {"unipc_variant": "bh1", "final_sigma": "sigma_min"},
    ),
    (
        "unipc-no-corrector",
        "UniPCMultistepScheduler",
        {"flow_shift": 3.0, "disable_corrector": [0, 4], "lower_order_final": False, "final_sigmas_type": "sigma_min"},
        "unipc",
        "unipc",
        {"disable_corrector": (0, 4), "lower_order_final": False, "final_sigma": "sigma_min"},
    ),
    ("dpmpp-shift3", "DPMSolverMultistepScheduler", {"flow_shift": 3.0}, "dpmpp", "dpm_solver", {}),
    (
        "dpmpp-order3-heun",
        "DPMSolverMultistepScheduler",
        {"flow_shift": 5.0, "solver_order": 3, "solver_type": "heun"},
        "dpmpp",
        "dpm_solver",
        {"order": 3, "dpm_solver_type": "heun"},
    ),
    (
        "dpmpp-order3-sigma-min",
        "DPMSolverMultistepScheduler",
        {"flow_shift": 5.0, "solver_order": 3, "final_sigmas_type": "sigma_min"},
        "dpmpp",
        "dpm_solver",
        {"order": 3, "final_sigma": "sigma_min"},
    ),
    (
        "dpmpp-euler-at-final",
        "DPMSolverMultistepScheduler",
        {"flow_shift": 3.0, "euler_at_final": True, "final_sigmas_type": "sigma_min"},
        "dpmpp",
        "dpm_solver",
        {"euler_at_final": True, "final_sigma": "sigma_min"},
    ),
]


def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear velocity that depends on the timestep: (B, C, T, H, W), (B,) -> (B, C, T, H, W)."""
    tt = t.float().view(-1, 1, 1, 1, 1)
    return torch.tanh(x * (1 + tt / 700)) * 0.7 + 0.2 * torch.sin(tt / 100)


def noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("steps", [10, 23])
@pytest.mark.parametrize(
    ("cls", "config", "sampler", "grid", "multistep"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_sampler_equals_diffusers_scheduler(cls, config, sampler, grid, multistep, steps) -> None:
    scheduler = getattr(diffusers, cls)(**FLOW, **config)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    seen_ref, seen_ours = [], []
    x = noise()
    for t in scheduler.timesteps:
        seen_ref.append(float(t))
        x = scheduler.step(field(x, t.expand(SHAPE[0])), t, x, return_dict=False)[0]
    expected = x

    def ours_field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_ours.append(t[0].item())
        return field(x, t)

    cfg = DiffusionConfig(
        sampler=sampler, time_grid=grid, shift=config["flow_shift"], multistep=MultistepConfig(**multistep)
    )
    diff = build_diffusion(cfg)
    sigmas, times = diff.time_grid(steps, cfg.shift)
    assert sigmas == scheduler.sigmas.tolist() and times == scheduler.timesteps.float().tolist()
    got = diff.sample(ours_field, SHAPE, steps=steps, noise=noise())
    assert seen_ours == seen_ref  # the network sees diffusers' integer timesteps
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_grids_start_below_one_and_end_as_asked() -> None:
    sigmas, times = unipc_flow_sigmas(10, 3.0)
    assert len(sigmas) == 11 and len(times) == 10
    assert 1 - 2e-6 < sigmas[0] < 1 and sigmas[-1] == 0 and times[0] == 999
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert all(t == int(t) for t in times)
    last, _ = unipc_flow_sigmas(10, 3.0, final_sigma="sigma_min")
    assert last[-1] == last[-2] > 0  # sigma_min repeats the last level: the final step leaves it
    dpm, dpm_times = dpm_flow_sigmas(10, 3.0)
    assert dpm[0] < sigmas[0] and dpm[-1] == 0 and dpm_times[0] == 999
    dpm_min, _ = dpm_flow_sigmas(10, 3.0, final_sigma="sigma_min")
    assert dpm_min[-1] == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-3)  # the beta chain's first level (float32)
    with pytest.raises(ValueError, match=">= 1"):
        unipc_flow_sigmas(0, 3.0)


def test_unipc_refuses_a_non_finite_setting() -> None:
    """diffusers' UniPC without lower_order_final ends in inf/NaN on a grid to sigma 0: we refuse it instead."""
    with pytest.raises(ConfigError, match="sigma_min"):
        DiffusionConfig(sampler="unipc", time_grid="unipc", multistep=MultistepConfig(lower_order_final=False))
    with pytest.raises(ValueError, match="sigma_min"):
        unipc_sample(lambda x, t: x, noise(), *unipc_flow_sigmas(5, 3.0), lower_order_final=False)
    with pytest.raises(ConfigError, match="final_sigma 'sigma_min' needs time_grid"):
        DiffusionConfig(sampler="unipc", multistep=MultistepConfig(final_sigma="sigma_min"))
    with pytest.raises(ConfigError, match="order must be 1, 2 or 3"):
        MultistepConfig(order=4)


def test_bh1_into_sigma_zero_is_finite() -> None:
    """diffusers' bh1 step into sigma 0 multiplies B(h) = -inf by 0 (NaN); the update is x0_hat there, as for bh2."""
    diff = build_diffusion(
        DiffusionConfig(sampler="unipc", time_grid="unipc", multistep=MultistepConfig(unipc_variant="bh1"))
    )
    out = diff.sample(field, SHAPE, steps=6, noise=noise())
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["unipc", "dpmpp"])
def test_multistep_runs_on_cuda_like_cpu(sampler) -> None:
    """The coefficients stay CPU scalars; the latents and the order-2/3 weights live on the model's device."""
    grid = "unipc" if sampler == "unipc" else "dpm_solver"
    diff = build_diffusion(
        DiffusionConfig(sampler=sampler, time_grid=grid, shift=3.0, multistep=MultistepConfig(order=3))
    )
    cpu = diff.sample(field, SHAPE, steps=8, noise=noise())
    gpu = diff.sample(field, SHAPE, steps=8, noise=noise().cuda())
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-5)
