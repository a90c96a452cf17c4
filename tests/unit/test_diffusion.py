"""Schedules and samplers: closed forms, shift maths, determinism, and oracle denoisers that prove the
sampler maths (the ideal model for a point mass or a Gaussian must give back the data)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sora_model.config import ConfigError, DiffusionConfig, MultistepConfig, from_dict
from sora_model.diffusion import (
    FLOW_TIMESTEP_SCALE,
    GaussianDiffusion,
    RectifiedFlow,
    build_diffusion,
    effective_shift,
    flow_time_grid,
    linear_betas,
    respace_timesteps,
    sample_adaptive_timesteps,
    sample_flow_timesteps,
    sampler_nfe,
    shift_timesteps,
    video_complexity,
)

SHAPE = (2, 3, 4, 8, 8)


def ddpm_cfg(**kw) -> DiffusionConfig:
    return DiffusionConfig(**{"schedule": "ddpm_linear", "prediction": "eps", "sampler": "ddpm", **kw})


def flow_cfg(**kw) -> DiffusionConfig:
    return DiffusionConfig(**{"schedule": "rectified_flow", "prediction": "velocity", "sampler": "euler", **kw})


ALL_SAMPLERS = [
    (ddpm_cfg(), "ddpm"),
    (ddpm_cfg(), "ddim"),
    (ddpm_cfg(prediction="v"), "ddpm"),
    (ddpm_cfg(prediction="v"), "ddim"),
    (ddpm_cfg(ddim_eta=1.0), "ddim"),
    (flow_cfg(), "euler"),
    (flow_cfg(), "heun"),
    (flow_cfg(), "ab2"),
    (flow_cfg(), "unipc"),
    (flow_cfg(multistep=MultistepConfig(order=3, unipc_variant="bh1")), "unipc"),
    (flow_cfg(), "dpmpp"),
    (flow_cfg(multistep=MultistepConfig(order=3, dpm_solver_type="heun")), "dpmpp"),
]
IDS = [
    "ddpm-eps",
    "ddim-eps",
    "ddpm-v",
    "ddim-v",
    "ddim-eta1",
    "euler",
    "heun",
    "ab2",
    "unipc",
    "unipc3-bh1",
    "dpmpp",
    "dpmpp3-heun",
]


# ---------------------------------------------------------------------------------------------
# Oracles: the exact minimum-MSE predictions for known data distributions
# ---------------------------------------------------------------------------------------------


def gaussian_oracle(diff, mu: float, sigma: float):
    """Ideal model_fn for data x0 ~ N(mu, sigma^2) per element; sigma = 0 is a point mass at mu."""

    def model_fn(x: Tensor, timestep: Tensor) -> Tensor:
        x64 = x.double()
        if isinstance(diff, RectifiedFlow):
            t = (timestep.double() / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1, 1)
            var = (1 - t) ** 2 * sigma**2 + t**2
            resid = x64 - (1 - t) * mu
            x0 = mu + (1 - t) * sigma**2 / var * resid
            eps = t / var * resid
            return (eps - x0).to(x.dtype)
        ab = diff.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1, 1)
        var = ab * sigma**2 + 1 - ab
        x0 = mu + ab.sqrt() * sigma**2 / var * (x64 - ab.sqrt() * mu)
        eps = (x64 - ab.sqrt() * x0) / (1 - ab).sqrt()
        if diff.cfg.prediction == "eps":
            return eps.to(x.dtype)
        return (ab.sqrt() * eps - (1 - ab).sqrt() * x0).to(x.dtype)

    return model_fn


def point_mass_oracle(diff, x0: Tensor):
    """Ideal model_fn when the data is the single clip x0 (B, C, T, H, W)."""

    def model_fn(x: Tensor, timestep: Tensor) -> Tensor:
        if isinstance(diff, RectifiedFlow):
            t = (timestep / FLOW_TIMESTEP_SCALE).view(-1, 1, 1, 1, 1)
            return (x - x0) / t  # = eps - x0 on the straight path through x0
        ab = diff.alphas_cumprod[timestep.long()].view(-1, 1, 1, 1, 1).float()
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if diff.cfg.prediction == "eps":
            return eps
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model_fn


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv3d(3, 3, kernel_size=3, padding=1)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_linear_schedule_closed_form():
    diff = build_diffusion(ddpm_cfg())
    assert isinstance(diff, GaussianDiffusion)
    assert diff.betas.shape == (1000,)
    assert diff.betas[0].item() == pytest.approx(1e-4)
    assert diff.betas[-1].item() == pytest.approx(0.02)
    steps = diff.betas[1:] - diff.betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999))
    assert torch.allclose(diff.alphas_cumprod, torch.cumprod(1 - diff.betas, 0))
    assert torch.all(diff.alphas_cumprod[1:] < diff.alphas_cumprod[:-1])
    assert diff.alphas_cumprod[-1].item() < 1e-4  # the chain ends at (almost) pure noise
    assert torch.equal(linear_betas(1000, 1e-4, 0.02), diff.betas)


def test_build_diffusion_picks_the_process():
    assert isinstance(build_diffusion(ddpm_cfg(schedule="adaptive")), GaussianDiffusion)
    assert isinstance(build_diffusion(flow_cfg()), RectifiedFlow)


def test_model_timestep_ranges():
    flow = build_diffusion(flow_cfg())
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(flow.model_timestep(t), torch.tensor([0.0, 250.0, 1000.0]))
    ddpm = build_diffusion(ddpm_cfg())
    out = ddpm.model_timestep(torch.tensor([0, 999]))
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 999.0]


def test_shift_maths():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert shifted[5].item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert torch.all(shifted[1:-1] > t[1:-1]) and torch.all(shifted[1:] > shifted[:-1])
    # the inverse shift undoes it
    assert torch.allclose(shift_timesteps(shifted, 1 / 3.0), t, atol=1e-6)


def test_effective_shift_scales_with_tokens():
    assert effective_shift(flow_cfg(shift=2.0), 4096) == 2.0  # no reference: fixed
    cfg = flow_cfg(shift=2.0, shift_reference_tokens=256)
    assert effective_shift(cfg, 256) == pytest.approx(2.0)
    assert effective_shift(cfg, 1024) == pytest.approx(4.0)  # 4x tokens -> 2x shift
    assert effective_shift(cfg, 64) == pytest.approx(1.0)
    assert effective_shift(cfg, None) == 2.0


def test_logit_normal_timesteps_and_shift():
    cfg = flow_cfg(logit_mean=0.5, logit_std=0.8)
    t = sample_flow_timesteps(cfg, 20000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, abs=0.03)
    # shifted samples are exactly the shift of the unshifted draw from the same seed
    cfg_s = flow_cfg(logit_mean=0.5, logit_std=0.8, shift=1.0, shift_reference_tokens=100)
    ts = sample_flow_timesteps(cfg_s, 20000, torch.Generator().manual_seed(0), torch.device("cpu"), num_tokens=900)
    assert torch.allclose(ts, shift_timesteps(t, 3.0))
    assert ts.mean() > t.mean()
    uni = sample_flow_timesteps(flow_cfg(timestep_sampling="uniform"), 20000, torch.Generator().manual_seed(0), "cpu")
    assert uni.mean().item() == pytest.approx(0.5, abs=0.02)


def test_flow_grid_and_respacing():
    grid = flow_time_grid(4, 1.0)
    assert grid == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow_time_grid(4, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and shifted[2] == pytest.approx(0.75)
    assert respace_timesteps(1000, 1000) == list(range(1000))
    ts = respace_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and ts == sorted(set(ts))
    assert respace_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError):
        respace_timesteps(1000, 1001)
    assert sampler_nfe("heun", 10) == 19 and sampler_nfe("euler", 10) == 10 and sampler_nfe("ab2", 10) == 10


def test_video_complexity():
    g = torch.Generator().manual_seed(0)
    flat = torch.zeros(1, 3, 4, 16, 16)
    noise = torch.randn(1, 3, 4, 16, 16, generator=g)
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 1, 16).expand(1, 3, 4, 16, 16)
    moving = torch.stack([torch.roll(noise[0, :, 0], shifts=i, dims=-1) for i in range(4)], dim=1)[None]
    static = noise[:, :, :1].expand(1, 3, 4, 16, 16)
    c = video_complexity(torch.cat([flat, noise, ramp, static, moving]))
    assert c.shape == (5,) and torch.all((c >= 0) & (c <= 1))
    assert c[0] == 0  # flat
    assert c[1] > 0.9  # white noise is complexity ~1
    assert c[2] < 0.2  # smooth ramp, static
    assert c[4] > c[3]  # same frames, but moving is more complex than static
    image = video_complexity(noise[:, :, :1])  # T = 1: spatial only
    assert image.shape == (1,) and image.item() > 0.9
    # scale-free: the same content in another space scale gives the same complexity
    assert torch.allclose(video_complexity(5 * noise), video_complexity(noise), atol=1e-5)


def test_adaptive_timesteps_biased_by_complexity():
    n = 20000
    simple = sample_adaptive_timesteps(1000, torch.zeros(n), 0.5, torch.Generator().manual_seed(0))
    complex_ = sample_adaptive_timesteps(1000, torch.ones(n), 0.5, torch.Generator().manual_seed(0))
    assert simple.min() >= 0 and complex_.max() <= 999 and simple.dtype == torch.long
    assert simple.float().mean().item() == pytest.approx(499.5, abs=10)  # c = 0: uniform
    # E[1 - (1-u)^k] = 1 - 1/(k+1) = 0.6 for k = 1.5
    assert complex_.float().mean().item() == pytest.approx(600, abs=10)
    assert torch.all(complex_ >= simple)  # same u, monotone in complexity

    diff = build_diffusion(ddpm_cfg(schedule="adaptive", adaptive_strength=2.0))
    g = torch.Generator().manual_seed(1)
    noisy = diff.sample_training_timesteps(torch.randn(4000, 1, 1, 4, 4, generator=g), g, None)
    flat = diff.sample_training_timesteps(torch.zeros(4000, 1, 1, 4, 4), g, None)
    assert noisy.float().mean() > flat.float().mean() + 100


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "sampler"), ALL_SAMPLERS, ids=IDS)
def test_sampler_deterministic_per_seed(cfg, sampler):
    diff = build_diffusion(cfg)
    net = tiny_model()

    def model_fn(x, t):
        return 0.1 * net(x)

    with torch.no_grad():
        runs = [
            diff.sample(model_fn, SHAPE, steps=5, sampler=sampler, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)
        ]
    assert runs[0].shape == SHAPE and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize(("cfg", "sampler"), ALL_SAMPLERS, ids=IDS)
def test_sampler_recovers_point_mass(cfg, sampler):
    diff = build_diffusion(cfg)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    out = diff.sample(
        point_mass_oracle(diff, x0), SHAPE, steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(out, x0, atol=1e-3), (out - x0).abs().max()


def test_ddim_eta0_and_ddpm_full_chain_recover_point_mass():
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    for sampler, steps in (("ddim", 1000), ("ddpm", 1000), ("ddim", 1)):
        diff = build_diffusion(ddpm_cfg(ddim_eta=0.0))
        out = diff.sample(
            point_mass_oracle(diff, x0), SHAPE, steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(0)
        )
        assert torch.allclose(out, x0, atol=1e-3), (sampler, steps)


def gaussian_flow_case(shift: float, mu: float = 0.5, sigma: float = 0.2):
    """x0 ~ N(mu, sigma^2): the flow, its exact oracle, fixed noise z and where the exact flow takes z."""
    diff = build_diffusion(flow_cfg(shift=shift))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return diff, gaussian_oracle(diff, mu, sigma), z, mu + sigma * z


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_beats_euler_on_gaussian_data(shift):
    """For x0 ~ N(mu, sigma^2) the exact flow maps noise z to mu + sigma z along curved paths."""
    diff, oracle, z, exact = gaussian_flow_case(shift)

    def error(sampler: str, steps: int) -> float:
        return (diff.sample(oracle, SHAPE, steps=steps, sampler=sampler, noise=z) - exact).abs().max().item()

    errors = {(s, n): error(s, n) for s in ("euler", "heun") for n in (4, 16, 32)}
    for steps in (4, 16, 32):
        assert errors["heun", steps] < errors["euler", steps]
    if shift == 1.0:
        # convergence orders when halving the step: Euler ~ h, Heun ~ h^2
        assert 1.5 < errors["euler", 16] / errors["euler", 32] < 2.5
        assert errors["heun", 16] / errors["heun", 32] > 3.5
        assert errors["heun", 32] < 0.01
        # honest NFE: Heun at 16 steps makes 31 calls and still beats Euler with 31 calls
        assert sampler_nfe("heun", 16) == 31
        assert errors["heun", 16] < error("euler", 31)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ab2_is_second_order_at_euler_cost(shift):
    """The multistep sampler: one network call per step like Euler, second-order error like Heun."""
    diff, oracle, z, exact = gaussian_flow_case(shift)
    calls = []

    def counting(x, t):
        calls.append(1)
        return oracle(x, t)

    def error(sampler: str, steps: int) -> float:
        return (diff.sample(counting, SHAPE, steps=steps, sampler=sampler, noise=z) - exact).abs().max().item()

    errors = {(s, n): error(s, n) for s in ("euler", "ab2") for n in (8, 16, 32)}
    calls.clear()
    error("ab2", 8)
    assert len(calls) == 8 == sampler_nfe("ab2", 8)  # never evaluates at t = 0, one call per step
    for steps in (8, 16, 32):
        assert errors["ab2", steps] < errors["euler", steps]
    if shift == 1.0:
        assert errors["ab2", 16] / errors["ab2", 32] > 3.0  # ~h^2 (Euler halves, see above)
        assert errors["ab2", 32] < 0.01


def test_multistep_samplers_converge_fast_at_euler_cost():
    """unipc and dpmpp on our own (uniform) grid: one call per step, second order or better; DPM-Solver++ of
    order 1 is exactly Euler on the flow ODE (its exponential integrator is linear in sigma there)."""
    diff, oracle, z, exact = gaussian_flow_case(1.0)
    calls = []

    def counting(x, t):
        calls.append(1)
        return oracle(x, t)

    def error(sampler: str, steps: int, d=diff) -> float:
        return (d.sample(counting, SHAPE, steps=steps, sampler=sampler, noise=z) - exact).abs().max().item()

    errors = {(s, n): error(s, n) for s in ("euler", "unipc", "dpmpp") for n in (16, 32)}
    calls.clear()
    error("unipc", 8)
    assert len(calls) == 8 == sampler_nfe("unipc", 8) == sampler_nfe("dpmpp", 8)
    for sampler in ("unipc", "dpmpp"):
        assert errors[sampler, 16] / errors[sampler, 32] > 3.0  # ~h^2 at least; Euler ~h
        assert errors[sampler, 32] < errors["euler", 32] / 5
    first_order = build_diffusion(flow_cfg(multistep=MultistepConfig(order=1)))
    euler = diff.sample(oracle, SHAPE, steps=12, sampler="euler", noise=z)
    assert torch.allclose(first_order.sample(oracle, SHAPE, steps=12, sampler="dpmpp", noise=z), euler, atol=1e-5)


def test_sampler_registry_feeds_config_schedules_and_help():
    from sora_model.diffusion import SAMPLER_NAMES, SAMPLERS, STOCHASTIC_SAMPLERS, is_stochastic, sampler_help
    from sora_model.diffusion.samplers import SAMPLER_NAMES as SAMPLER_NAMES_COMPAT

    assert SAMPLER_NAMES is SAMPLER_NAMES_COMPAT
    assert SAMPLER_NAMES == {"gaussian": ("ddpm", "ddim"), "flow": ("euler", "heun", "ab2", "unipc", "dpmpp")}
    assert STOCHASTIC_SAMPLERS == ("ddpm",) and is_stochastic("ddim", ddim_eta=1.0) and not is_stochastic("ddim")
    assert sampler_help() == "euler|heun|ab2|unipc|dpmpp (flow) or ddpm|ddim (DDPM schedules)"
    for name, spec in SAMPLERS.items():
        assert callable(spec.resolve()), name
        cfg = flow_cfg(sampler=name) if spec.family == "flow" else ddpm_cfg(sampler=name)
        assert build_diffusion(cfg).sampler_names == SAMPLER_NAMES[spec.family]
    # An unknown name is refused with every known one; a flow sampler on a Gaussian schedule and back, too.
    with pytest.raises(
        ConfigError,
        match="diffusion.sampler must be one of 'ddpm', 'ddim', 'euler', 'heun', 'ab2', 'unipc', 'dpmpp', got 'plms'",
    ):
        from_dict(DiffusionConfig, {"sampler": "plms"}, "diffusion")
    with pytest.raises(
        ConfigError, match="sampler 'unipc' is not available for schedule 'ddpm_linear'; choose one of: ddpm, ddim"
    ):
        ddpm_cfg(sampler="unipc")
    with pytest.raises(ConfigError, match="choose one of: euler, heun, ab2, unipc, dpmpp"):
        flow_cfg(sampler="ddim")
    with pytest.raises(ValueError, match="sampler 'dpmpp' is not available for schedule 'adaptive'"):
        build_diffusion(ddpm_cfg(schedule="adaptive")).sample(lambda x, t: x, SHAPE, sampler="dpmpp")
    # The multistep settings round-trip through an export's config.json.
    cfg = from_dict(
        DiffusionConfig, {"sampler": "unipc", "time_grid": "unipc", "multistep": {"order": 3, "disable_corrector": [1]}}
    )
    assert cfg.multistep == MultistepConfig(order=3, disable_corrector=(1,))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_eta0_follows_probability_flow_on_gaussian(prediction):
    """DDIM eta 0 discretises the probability-flow ODE: for Gaussian data its exact solution maps x_T to
    mu + sigma * (x_T - mean_T) / std_T, and DDIM converges to it (first order) as steps grow."""
    mu, sigma = 0.5, 0.3
    diff = build_diffusion(ddpm_cfg(prediction=prediction))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T = diff.alphas_cumprod[-1]
    exact = mu + sigma * (z - ab_T.sqrt() * mu) / (ab_T * sigma**2 + 1 - ab_T).sqrt()
    oracle = gaussian_oracle(diff, mu, sigma)
    err = {
        n: (diff.sample(oracle, SHAPE, steps=n, sampler="ddim", noise=z) - exact).abs().max().item()
        for n in (100, 1000)
    }
    assert err[100] < 0.06
    assert err[1000] < 0.01 and err[1000] < err[100] / 5


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_ancestral_matches_gaussian_data_distribution(prediction):
    """The full 1000-step ancestral chain with the ideal model samples the data distribution. Respaced
    to 50 steps it keeps the mean; the posterior ("fixed small") variance then under-disperses, as known."""
    mu, sigma = 0.5, 0.3
    diff = build_diffusion(ddpm_cfg(prediction=prediction))
    shape = (8, 2, 4, 16, 16)
    oracle = gaussian_oracle(diff, mu, sigma)
    full = diff.sample(
        oracle, shape, steps=1000, sampler="ddpm", generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert full.mean().item() == pytest.approx(mu, abs=0.02)
    assert full.std().item() == pytest.approx(sigma, rel=0.03)
    short = diff.sample(
        oracle, shape, steps=50, sampler="ddpm", generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert short.mean().item() == pytest.approx(mu, abs=0.02)
    assert 0.7 * sigma < short.std().item() <= sigma


def test_sampler_validation_and_callback():
    flow, ddpm = build_diffusion(flow_cfg()), build_diffusion(ddpm_cfg())

    def model_fn(x, t):
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="euler, heun"):
        flow.sample(model_fn, SHAPE, sampler="ddim")
    with pytest.raises(ValueError, match="ddpm, ddim"):
        ddpm.sample(model_fn, SHAPE, sampler="heun")
    with pytest.raises(ValueError, match="not available"):
        ddpm.sample(model_fn, SHAPE, sampler="plms")
    with pytest.raises(ValueError):
        ddpm.sample(model_fn, SHAPE, steps=2000)
    with pytest.raises(ValueError, match="noise has shape"):
        flow.sample(model_fn, SHAPE, noise=torch.zeros(1, 3, 4, 8, 8))

    seen: list[tuple[int, int]] = []
    calls = []

    def counting(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    flow.sample(counting, SHAPE, steps=6, sampler="heun", callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(6)]
    assert len(calls) == sampler_nfe("heun", 6)
    assert calls[0].shape == (SHAPE[0],) and calls[0][0].item() == pytest.approx(1000.0)


def test_sample_defaults_and_given_noise():
    diff = build_diffusion(flow_cfg(num_sampling_steps=3))
    calls = []

    def model_fn(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    out = diff.sample(model_fn, SHAPE, noise=noise)
    assert len(calls) == 3  # cfg.num_sampling_steps with cfg.sampler (euler)
    assert torch.equal(out, noise)  # zero velocity leaves the noise unchanged
    drawn = diff.sample(model_fn, SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, noise)  # noise comes from the generator first


def test_sampling_shift_uses_num_tokens():
    diff = build_diffusion(flow_cfg(shift=1.0, shift_reference_tokens=16))
    seen: list[float] = []

    def model_fn(x, t):
        seen.append(t[0].item() / FLOW_TIMESTEP_SCALE)
        return torch.zeros_like(x)

    diff.sample(model_fn, SHAPE, steps=2, num_tokens=144)  # shift 3
    assert seen == pytest.approx([1.0, 0.75])
    seen.clear()
    diff.sample(model_fn, SHAPE, steps=2)  # unknown tokens: plain shift 1
    assert seen == pytest.approx([1.0, 0.5])
    assert math.isclose(effective_shift(diff.cfg, 144), 3.0)
