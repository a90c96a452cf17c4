"""Samplers: the reverse processes, written as pure maths over a denoiser or a velocity field.

Nothing here knows the network or the config. `schedules.py` wraps the network into one of two
callables and picks the time grid; these functions only integrate:

- `ddpm_sample` / `ddim_sample` take `denoise(x_t, train_index) -> (x0_hat, eps_hat)` and the training
  chain's `alphas_cumprod`, walking a strided subset of the training timesteps (respacing);
- `euler_sample` / `heun_sample` / `ab2_sample` take `velocity(x_t, t) -> v_hat` for rectified flow and a
  time grid 1 -> 0 (the multistep solvers of diffusers' schedulers are in `multistep.py`).

Which sampler serves which schedule, and how it is run, is `registry.py`.

All randomness comes from the given generator, so one seed gives bitwise the same output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

# SAMPLER_NAMES and STOCHASTIC_SAMPLERS stay importable from here; the registry is where samplers are listed.
from sora_model.diffusion.registry import SAMPLER_NAMES, SAMPLERS, STOCHASTIC_SAMPLERS  # noqa: F401

Denoiser = Callable[[Tensor, int], tuple[Tensor, Tensor]]
"""(x_t (B, C, T, H, W), training timestep index) -> (x0_hat, eps_hat), both (B, C, T, H, W)."""
VelocityField = Callable[[Tensor, float], Tensor]
"""(x_t (B, C, T, H, W), flow time t in [0, 1]) -> velocity prediction (B, C, T, H, W)."""
StepCallback = Callable[[int, int], None]
"""callback(step_index, total_steps), called after each step; step_index counts from 0."""


def draw_normal(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved: seeded results do not depend
    on where the model runs (a CPU generator gives the same noise for a CUDA model)."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def respace_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """`steps` training indices, evenly strided from 0 to num_train_timesteps - 1, ascending.

    Both ends are always kept: the last so sampling starts from (almost) pure noise, the first so the
    chain ends at the cleanest training level. Like improved-diffusion's `space_timesteps`.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_train_timesteps}] for this schedule, got {steps}")
    if steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


def respaced_alphas_cumprod(alphas_cumprod: Tensor, timesteps: list[int]) -> Tensor:
    """alpha_bar at the kept timesteps. The respaced chain's betas are 1 - ab[k] / ab[k-1] (with ab[-1] = 1),
    which keeps every kept step's marginal q(x_t | x0) exactly that of the 1000-step chain."""
    return alphas_cumprod[torch.tensor(timesteps, dtype=torch.long)]


@torch.no_grad()
def ddpm_sample(
    denoise: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: list[int],
    *,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_{k-1} | x_k, x0_hat) of the respaced chain.

    Uses the posterior variance ("fixed small", DDPM's sigma^2 = beta_tilde), which is zero at the last
    step, so the returned sample is the final x0 estimate's posterior mean without added noise.
    """
    ab = respaced_alphas_cumprod(alphas_cumprod, timesteps).tolist()  # float64 -> python floats, exact per step
    x = x_T
    total = len(timesteps)
    for step, k in enumerate(reversed(range(total))):
        ab_t = ab[k]
        ab_prev = ab[k - 1] if k > 0 else 1.0
        beta = 1.0 - ab_t / ab_prev  # the respaced chain's beta for this step
        alpha = 1.0 - beta
        x0_hat, _ = denoise(x, timesteps[k])
        coef_x0 = beta * math.sqrt(ab_prev) / (1.0 - ab_t)
        coef_xt = (1.0 - ab_prev) * math.sqrt(alpha) / (1.0 - ab_t)
        mean = coef_x0 * x0_hat + coef_xt * x
        var = beta * (1.0 - ab_prev) / (1.0 - ab_t)
        if k > 0 and var > 0:
            x = mean + math.sqrt(var) * draw_normal(tuple(x.shape), generator, x.device, x.dtype)
        else:
            x = mean
        if callback is not None:
            callback(step, total)
    return x


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: list[int],
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over the strided timesteps; eta = 0 is deterministic given x_T,
    eta = 1 matches the ancestral sampler's variance."""
    ab = respaced_alphas_cumprod(alphas_cumprod, timesteps).tolist()
    x = x_T
    total = len(timesteps)
    for step, k in enumerate(reversed(range(total))):
        ab_t = ab[k]
        ab_prev = ab[k - 1] if k > 0 else 1.0
        x0_hat, eps_hat = denoise(x, timesteps[k])
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * math.sqrt(max(0.0, 1.0 - ab_t / ab_prev))
        dir_coef = math.sqrt(max(0.0, 1.0 - ab_prev - sigma**2))  # max(): rounding at ab_prev = 1
        x = math.sqrt(ab_prev) * x0_hat + dir_coef * eps_hat
        if sigma > 0:
            x = x + sigma * draw_normal(tuple(x.shape), generator, x.device, x.dtype)
        if callback is not None:
            callback(step, total)
    return x


def flow_time_grid(steps: int, shift: float) -> list[float]:
    """steps + 1 times from 1 (noise) to 0 (data): a uniform grid, then shifted toward noise like training."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    grid = []
    for i in range(steps + 1):
        t = 1.0 - i / steps
        grid.append(shift * t / (1.0 + (shift - 1.0) * t))
    return grid


def flow_match_euler_grid(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The steps + 1 times of diffusers' FlowMatchEulerDiscreteScheduler (static shift), to its float32 values.

    It spaces `steps` times evenly from 1 down to its shifted last training time, shift(1 / num_train_timesteps),
    shifts them (so the last is shifted twice), then appends 0. Models converted from diffusers folders with this
    scheduler sample exactly as they did there (`DiffusionConfig.time_grid`).
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    last = torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps
    sigma_min = float(shift * last / (1 + (shift - 1) * last))  # the scheduler's float32 sigmas[-1]
    sigmas = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, steps) / num_train_timesteps
    sigmas = torch.from_numpy(shift * sigmas / (1 + (shift - 1) * sigmas)).float()
    return [*sigmas.tolist(), 0.0]


@torch.no_grad()
def euler_sample(
    velocity: VelocityField, x_1: Tensor, t_grid: list[float], *, callback: StepCallback | None = None
) -> Tensor:
    """Euler on dx/dt = v(x, t) from t_grid[0] = 1 to t_grid[-1] = 0: one network call per step."""
    x = x_1
    total = len(t_grid) - 1
    for i in range(total):
        t, t_next = t_grid[i], t_grid[i + 1]
        x = x + (t_next - t) * velocity(x, t)
        if callback is not None:
            callback(i, total)
    return x


@torch.no_grad()
def heun_sample(
    velocity: VelocityField, x_1: Tensor, t_grid: list[float], *, callback: StepCallback | None = None
) -> Tensor:
    """Heun (explicit trapezoid, 2nd order) on the same grid; the last step, which lands on t = 0, is Euler
    because the velocity at t = 0 is not what the network is trained for (as in EDM's sampler).
    Network calls: 2 * steps - 1 (see `sampler_nfe`)."""
    x = x_1
    total = len(t_grid) - 1
    for i in range(total):
        t, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t
        v = velocity(x, t)
        if t_next > 0:
            v_next = velocity(x + dt * v, t_next)  # slope at the Euler predictor's end point
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x + dt * v
        if callback is not None:
            callback(i, total)
    return x


@torch.no_grad()
def ab2_sample(
    velocity: VelocityField, x_1: Tensor, t_grid: list[float], *, callback: StepCallback | None = None
) -> Tensor:
    """Second-order Adams-Bashforth (linear multistep) on the same grid: one network call per step, like
    Euler, but each step also uses the previous step's velocity to cancel Euler's first-order error.

    Variable step sizes h_i = t_{i+1} - t_i (the grid may be shifted):
        x_{i+1} = x_i + h_i * ((1 + r) v_i - r v_{i-1}),   r = h_i / (2 h_{i-1}),
    the first step is Euler (no previous velocity yet). Like Euler it never evaluates the network at
    t = 0. On the exact velocity of a Gaussian mixture it reaches DDPM-1000's sample quality at ~12 network
    calls where Euler needs ~75 (benchmarks/bench_sampler_nfe_for_ddpm_quality.py): the same idea as
    DPM-Solver++(2M) for diffusion models, here on the straight rectified-flow ODE."""
    x = x_1
    total = len(t_grid) - 1
    prev: tuple[Tensor, float] | None = None  # (velocity, step size) of the previous step
    for i in range(total):
        t, t_next = t_grid[i], t_grid[i + 1]
        h = t_next - t
        v = velocity(x, t)
        if prev is None:
            x = x + h * v
        else:
            r = h / (2.0 * prev[1])
            x = x + h * ((1.0 + r) * v - r * prev[0])
        prev = (v, h)
        if callback is not None:
            callback(i, total)
    return x


def sampler_nfe(sampler: str, steps: int) -> int:
    """Network function evaluations for `steps` steps (before classifier-free guidance doubles them)."""
    return SAMPLERS[sampler].nfe(steps)
