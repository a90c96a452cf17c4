"""Fewest network evaluations at which our default sampler (rectified flow + the config's default) matches DDPM-1000.

Setup, and why it is fair: trained networks would mix sampler error with each model's own fitting
error (two models never fit equally well), so both samplers get the *ideal* network instead. The data
is a Gaussian mixture (16 components in 8 dimensions, unit overall scale like normalised pixels,
tight components like a data manifold), for which the exact denoiser E[x0 | x_t] is closed form at
every noise level; from it come the exact eps-prediction for the article's linear DDPM chain
(1000 steps, beta 1e-4..0.02) and the exact velocity for rectified flow. Both are run through our own
samplers (`sora_model.diffusion`: `GaussianDiffusion` with the `ddpm` sampler, `RectifiedFlow` with
the default config's sampler (`ab2` since it replaced `euler` as the default) and shift), so any
remaining difference is the sampler's discretisation error alone, which is exactly what "how few steps"
asks. NFE counts every network call (`sampler_nfe`: Heun makes 2 per step); plain Euler's curve is kept
in the details as the reference it used to be.

Quality: squared MMD (RBF kernels at 0.5x, 1x, 2x the median pairwise distance) between generated
samples and a fresh draw from the true mixture, averaged over seeds; the same reference draw and the
same starting noise are used for every step count (common random numbers). The figure is the smallest
NFE on the grid from which the sampler's distance stays at or below DDPM-1000's for every larger grid NFE.
Classifier-free guidance is absent here (unconditional), so NFE is the network calls themselves.
"""

from __future__ import annotations

import math
import sys

import torch

from benchmarks.common import main

FIGURE = "sampler_nfe_for_ddpm_quality"
GOAL = ("<=", 25)
DIM, COMPONENTS, COMPONENT_STD = 8, 16, 0.15
NFE_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100)


class Mixture:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(COMPONENTS, DIM, generator=g, dtype=torch.float64)
        # Overall variance ~1 per dimension: means carry 1 - std^2 of it.
        self.means = means / means.std() * math.sqrt(1 - COMPONENT_STD**2)
        self.weights = torch.full((COMPONENTS,), 1.0 / COMPONENTS, dtype=torch.float64)
        self.var = COMPONENT_STD**2

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.means[k] + COMPONENT_STD * torch.randn(n, DIM, generator=g, dtype=torch.float64)

    def denoise(self, x: torch.Tensor, a: float, s: float) -> torch.Tensor:
        """E[x0 | x_t = a x0 + s eps], exact: posterior responsibilities times per-component posterior means."""
        tot = a * a * self.var + s * s
        d2 = ((x[:, None, :] - a * self.means[None]) ** 2).sum(-1)  # (N, K)
        logw = torch.log(self.weights)[None] - 0.5 * d2 / tot
        w = torch.softmax(logw, dim=-1)  # (N, K)
        post = self.means[None] + (a * self.var / tot) * (x[:, None, :] - a * self.means[None])  # (N, K, D)
        return (w[..., None] * post).sum(1)


def mmd2(x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).pow(2)
    n = len(x)
    total = 0.0
    for f in (0.5, 1.0, 2.0):
        k = torch.exp(-d2 / (2 * (f * scale) ** 2))
        kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
        total += float((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean())
    return total


def run(quick: bool) -> dict:
    from sora_model.config import DiffusionConfig
    from sora_model.diffusion import build_diffusion, sampler_nfe
    from sora_model.diffusion.schedules import FLOW_TIMESTEP_SCALE

    torch.set_num_threads(1)  # small tensors: threads only add contention on a shared machine
    n = 1000 if quick else 4000
    seeds = (0, 1, 2) if quick else (0, 1, 2, 3, 4)
    mix = Mixture(0)
    flow_cfg = DiffusionConfig()  # the default: rectified flow and its default sampler
    default = flow_cfg.sampler
    curves = (default, "euler") if default != "euler" else ("euler",)

    def steps_for(sampler: str, nfe: int) -> int:  # the most steps whose network calls fit in nfe
        return max(s for s in range(1, nfe + 1) if sampler_nfe(sampler, s) <= nfe)

    ddpm_cfg = DiffusionConfig(schedule="ddpm_linear", prediction="eps", sampler="ddpm")
    flow, ddpm = build_diffusion(flow_cfg), build_diffusion(ddpm_cfg)
    sqrt_ab = ddpm.sqrt_alphas_cumprod
    sqrt_1mab = ddpm.sqrt_one_minus_alphas_cumprod

    def to5(x):  # (N, D) <-> (N, D, 1, 1, 1): the samplers take clips
        return x.view(len(x), DIM, 1, 1, 1)

    def eps_model(x5, t):  # exact eps-prediction for the DDPM chain; t: (B,) training index
        k = int(t[0].item())
        a, s = float(sqrt_ab[k]), float(sqrt_1mab[k])
        x = x5.view(len(x5), DIM)
        return to5((x - a * mix.denoise(x, a, s)) / s)

    def velocity_model(x5, t):  # exact velocity eps - x0 for x_t = (1 - t) x0 + t eps
        tt = float(t[0].item()) / FLOW_TIMESTEP_SCALE
        x = x5.view(len(x5), DIM)
        x0 = mix.denoise(x, 1.0 - tt, tt)
        return to5((x - (1.0 - tt) * x0) / tt - x0)  # eps_hat - x0_hat, eps_hat = (x - (1 - t) x0_hat) / t

    per_seed_ddpm = []
    per_seed = {c: {k: [] for k in NFE_GRID} for c in curves}
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        ref = mix.sample(n, g)
        scale = float(torch.cdist(ref[:500], ref[:500]).median())
        noise = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        x = ddpm.sample(
            eps_model,
            (n, DIM, 1, 1, 1),
            steps=1000,
            sampler="ddpm",
            generator=torch.Generator().manual_seed(seed),
            noise=to5(noise.clone()),
            dtype=torch.float64,
        )
        per_seed_ddpm.append(mmd2(x.view(n, DIM), ref, scale))
        for c in curves:
            for k in NFE_GRID:
                x = flow.sample(
                    velocity_model, (n, DIM, 1, 1, 1), steps=steps_for(c, k), sampler=c, noise=to5(noise.clone())
                )
                per_seed[c][k].append(mmd2(x.view(n, DIM), ref, scale))
        # Floor: a second true draw against the reference (what a perfect sampler would score).
    floor = []
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        ref = mix.sample(n, g)
        scale = float(torch.cdist(ref[:500], ref[:500]).median())
        floor.append(mmd2(mix.sample(n, torch.Generator().manual_seed(5000 + seed)), ref, scale))
    ddpm_mmd = sum(per_seed_ddpm) / len(seeds)
    by_nfe = {c: {k: sum(v) / len(seeds) for k, v in per_seed[c].items()} for c in curves}

    def first_nfe(curve: dict[int, float], bound: float) -> int | None:
        return next((k for i, k in enumerate(NFE_GRID) if all(curve[j] <= bound for j in NFE_GRID[i:])), None)

    value = first_nfe(by_nfe[default], ddpm_mmd)
    # The measurement's own noise: spread of true-vs-true MMD^2 across seeds. "Indistinguishable from
    # DDPM-1000" = within two of those; reported beside the strict headline.
    mean_floor = sum(floor) / len(floor)
    noise_sd = (sum((f - mean_floor) ** 2 for f in floor) / max(1, len(floor) - 1)) ** 0.5
    within = first_nfe(by_nfe[default], ddpm_mmd + 2 * noise_sd)
    return {
        "value": value,
        "compared": (
            f"smallest NFE where rectified flow's default sampler ({default}, default config) reaches DDPM-1000's "
            f"MMD^2 to the true data (Euler: {first_nfe(by_nfe['euler'], ddpm_mmd)}); exact denoiser of a "
            f"{COMPONENTS}-component Gaussian mixture in {DIM}-D, {n} samples x {len(seeds)} seeds"
        ),
        "details": {
            "ddpm_1000_mmd2": ddpm_mmd,
            "true_data_floor_mmd2": sum(floor) / len(floor),
            "default_sampler": default,
            **{f"{c}_mmd2_by_nfe": {str(k): v for k, v in by_nfe[c].items()} for c in curves},
            "euler_nfe_for_ddpm_quality": first_nfe(by_nfe["euler"], ddpm_mmd),
            "flow_shift": flow_cfg.shift,
            "measurement_noise_sd_mmd2": noise_sd,
            "nfe_within_2sd_of_ddpm_1000": within,
            "grid": list(NFE_GRID),
            "none_means": "the sampler never matched DDPM-1000 on the grid",
        },
    }


if __name__ == "__main__":
    sys.exit(main(sys.modules[__name__]))
