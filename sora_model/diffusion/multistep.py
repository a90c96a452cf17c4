"""The multistep solvers of diffusers' flow schedulers, step for step: UniPC and DPM-Solver++.

Pretrained flow models ship these (Wan2.1's folders: `UniPCMultistepScheduler` with flow sigmas, shift 3 or 5).
Both integrate the rectified-flow ODE as exponential integrators in data-prediction form. At noise level sigma,
with alpha = 1 - sigma, the network's velocity v gives the clean estimate m = x - sigma v and the half log-SNR
lambda = log(alpha / sigma); a step from s to t with h = lambda_t - lambda_s is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m_s  + (higher-order terms from earlier m),

which is exact when m is constant along the path. DPM-Solver++(2M/3M) (Lu et al. 2022) adds finite differences
of the previous estimates; UniPC (Zhao et al. 2023) adds them through its B(h) coefficients (`bh1`: B(h) = h,
`bh2`: B(h) = e^h - 1) and corrects each new point with the network call the next step makes anyway (UniC),
so both cost one network call per step.

Everything mirrors diffusers 0.42: the sigma grids and the integer timesteps the network sees (`set_timesteps`
with `use_flow_sigmas`), the warm-up and final-step order rules, and the coefficient arithmetic, done in float32
0-d tensors as there (its sigmas are stored float32). A converted model's latents then follow `WanPipeline`'s to
the rounding of the network itself (tests/unit/test_wan_samplers.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from sora_model.diffusion.samplers import StepCallback

ModelVelocity = Callable[[Tensor, float], Tensor]
"""(x_t (B, C, T, H, W), the timestep the network sees at this step) -> velocity prediction (B, C, T, H, W)."""
SIGMA_ONE_GUARD = 1e-6
"""diffusers moves a first sigma of exactly 1 to 1 - 1e-6: lambda = log(0) would make the differences infinite."""


# ---------------------------------------------------------------------------------------------
# Grids: diffusers' set_timesteps with use_flow_sigmas
# ---------------------------------------------------------------------------------------------


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)  # diffusers' operation order: the timesteps truncate


def _finish(sigmas: np.ndarray, last: float, num_train_timesteps: int) -> tuple[list[float], list[float]]:
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # torch's .to(int64) truncates the same way
    return np.concatenate([sigmas, [last]]).astype(np.float32).tolist(), timesteps.astype(np.float64).tolist()


def unipc_flow_sigmas(
    steps: int, shift: float, num_train_timesteps: int = 1000, final_sigma: str = "zero"
) -> tuple[list[float], list[float]]:
    """`UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)`: steps + 1 sigmas
    (float32 values), the first 1 - 1e-6, the last 0 or, for final_sigma `sigma_min`, the last shifted sigma again;
    and the `steps` integer timesteps int(sigma * num_train_timesteps) the network receives."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    sigmas = _shift(np.linspace(1, 1 / num_train_timesteps, steps + 1)[:-1], shift)
    if np.fabs(sigmas[0] - 1) < SIGMA_ONE_GUARD:
        sigmas[0] -= SIGMA_ONE_GUARD
    return _finish(sigmas, float(sigmas[-1]) if final_sigma == "sigma_min" else 0.0, num_train_timesteps)


def dpm_flow_sigmas(
    steps: int,
    shift: float,
    num_train_timesteps: int = 1000,
    final_sigma: str = "zero",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> tuple[list[float], list[float]]:
    """`DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)`: its grid starts
    at shift(1 - 1 / num_train_timesteps), not 1. Its `sigma_min` end is the first level of the (linear) beta chain,
    sqrt(beta_0 / (1 - beta_0)), as diffusers computes it for every grid."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
    sigmas = np.flip(_shift(sigmas, shift))[:-1].copy()
    last = 0.0
    if final_sigma == "sigma_min":
        ab0 = 1.0 - torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)[0]
        last = float(((1 - ab0) / ab0) ** 0.5)
    return _finish(sigmas, last, num_train_timesteps)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


def _levels(sigmas: list[float]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """sigma, alpha = 1 - sigma and lambda = log(alpha) - log(sigma) per grid point, float32 0-d (lambda(0) = inf)."""
    sig = [torch.tensor(s, dtype=torch.float32) for s in sigmas]
    alp = [1 - s for s in sig]
    lam = [torch.log(a) - torch.log(s) for a, s in zip(alp, sig)]
    return sig, alp, lam


def _guard_first(sigmas: list[float]) -> list[float]:
    return [1.0 - SIGMA_ONE_GUARD, *sigmas[1:]] if sigmas[0] >= 1.0 else list(sigmas)


def _unipc_update(
    x: Tensor, ms: list[Tensor], s0: int, t: int, order: int, bh1: bool, levels, model_t: Tensor | None
) -> Tensor:
    """One UniP predictor step from grid point s0 to t (model_t None), or the UniC corrector of the point t that
    the predictor reached from x at s0, given the new estimate model_t there. ms[-1] is the estimate at s0,
    ms[-1 - k] the one at s0 - k. diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update."""
    sig, alp, lam = levels
    sigma_t, sigma_s0, alpha_t = sig[t], sig[s0], alp[t]
    h = lam[t] - lam[s0]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[s0 - k] - lam[s0]) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - ms[-1]) / rk)  # (B, C, T, H, W)
    rks.append(torch.ones(()))
    r = torch.stack(rks)  # (order,)
    hh = -h
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if bh1 else torch.expm1(hh)
    factorial, rows, b = 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(r, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, bb = torch.stack(rows), torch.stack(b)  # (order, order), (order,)
    diffs = torch.stack(d1s, dim=1) if d1s else None  # (B, order - 1, C, T, H, W)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * ms[-1]
    if model_t is None:
        if diffs is None:
            # diffusers subtracts alpha_t * B(h) * 0: the same, except bh1 into sigma 0 (B = -inf), where it gives NaN.
            return x_t_.to(x.dtype)
        rhos_p = (
            torch.ones(1, dtype=x.dtype) * 0.5
            if order == 2
            else torch.linalg.solve(big_r[:-1, :-1], bb[:-1]).to(x.dtype)
        )
        rhos_p = rhos_p.to(x.device)  # einsum needs both on one device; the 0-d scalars need not be
        return (x_t_ - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos_p, diffs)).to(x.dtype)
    rhos_c = (torch.ones(1, dtype=x.dtype) * 0.5 if order == 1 else torch.linalg.solve(big_r, bb).to(x.dtype)).to(
        x.device
    )
    corr = torch.einsum("k,bkc...->bc...", rhos_c[:-1], diffs) if diffs is not None else 0
    return (x_t_ - alpha_t * b_h * (corr + rhos_c[-1] * (model_t - ms[-1]))).to(x.dtype)


@torch.no_grad()
def unipc_sample(
    velocity: ModelVelocity,
    x_T: Tensor,
    sigmas: list[float],
    times: list[float],
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC multistep (`UniPCMultistepScheduler` with flow prediction) over `sigmas` (steps + 1, from ~1 to 0 or
    sigma_min), calling `velocity(x, times[i])` once per step.

    Step i corrects the point the previous step predicted with this step's estimate (UniC, unless i - 1 is in
    `disable_corrector`), then predicts the next point (UniP) with order min(order, i + 1), and with
    `lower_order_final` also at most steps - i (the last step is first order). variant: `bh1` or `bh2`.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got '{variant}'")
    if not lower_order_final and order > 1 and sigmas[-1] == 0:
        raise ValueError(
            "UniPC without lower_order_final needs a grid ending at sigma_min: a step of order > 1 "
            "into sigma 0 is not finite"
        )
    total = len(times)
    levels = _levels(_guard_first(sigmas))
    sig = levels[0]
    x, ms, last_x, last_order = x_T, [], x_T, 0
    for i in range(total):
        m = x - sig[i] * velocity(x, times[i])  # clean estimate at sigma_i (B, C, T, H, W)
        if i > 0 and i - 1 not in disable_corrector:
            x = _unipc_update(last_x, ms, i - 1, i, last_order, variant == "bh1", levels, model_t=m)
        ms = [*ms, m][-order:]
        this_order = min(order, total - i) if lower_order_final else order
        last_x, last_order = x, min(this_order, i + 1)  # warm-up: no more history than steps taken
        x = _unipc_update(x, ms, i, i + 1, last_order, variant == "bh1", levels, model_t=None)
        if callback is not None:
            callback(i, total)
    return x


def _dpmpp_update(sample: Tensor, ms: list[Tensor], i: int, order: int, heun: bool, levels) -> Tensor:
    """DPM-Solver++ of `order` (1-3) from grid point i to i + 1; ms[-1 - k] is the estimate at i - k. diffusers'
    dpm_solver_first_order_update / multistep_dpm_solver_second_order_update / _third_order_update."""
    sig, alp, lam = levels
    sigma_t, sigma_s0, alpha_t = sig[i + 1], sig[i], alp[i + 1]
    h = lam[i + 1] - lam[i]
    m0 = ms[-1]
    if order == 1:
        return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        d1 = (1.0 / r0) * (m0 - ms[-2])
        if heun:
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * m0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
            )
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * m0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        )
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - ms[-2]), (1.0 / r1) * (ms[-2] - ms[-3])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (
        (sigma_t / sigma_s0) * sample
        - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
    )


@torch.no_grad()
def dpmpp_sample(
    velocity: ModelVelocity,
    x_T: Tensor,
    sigmas: list[float],
    times: list[float],
    *,
    order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++ multistep (`DPMSolverMultistepScheduler`, algorithm `dpmsolver++`, flow prediction) over
    `sigmas`, one `velocity(x, times[i])` call per step.

    Step i has order min(order, i + 1); the last step is first order when the grid ends at 0, with
    `euler_at_final`, or with `lower_order_final` under 15 steps (which also caps the step before it at 2).
    solver_type `midpoint` or `heun` picks the second-order formula. Updates run in float32.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"DPM-Solver++ solver_type must be 'midpoint' or 'heun', got '{solver_type}'")
    if not 1 <= order <= 3:
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    total = len(times)
    levels = _levels(_guard_first(sigmas))
    sig = levels[0]
    x, ms = x_T, []
    for i in range(total):
        m = x - sig[i] * velocity(x, times[i])  # clean estimate at sigma_i (B, C, T, H, W)
        ms = [*ms, m][-order:]
        first = i == total - 1 and (euler_at_final or (lower_order_final and total < 15) or sigmas[-1] == 0)
        second = i == total - 2 and lower_order_final and total < 15
        this_order = 1 if first else min(order, i + 1, 2 if second else 3)
        sample = x.to(torch.promote_types(x.dtype, torch.float32))  # low precision upcast, as diffusers does
        x = _dpmpp_update(sample, ms, i, this_order, solver_type == "heun", levels).to(m.dtype)
        if callback is not None:
            callback(i, total)
    return x
