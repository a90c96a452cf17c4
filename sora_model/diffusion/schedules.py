"""Noise processes (article 3.1): the linear DDPM chain, its complexity-adaptive variant, and rectified flow.

The network is only ever a callable, `model_fn(x_t, timestep) -> prediction`, all (B, C, T, H, W) with
timestep (B,) float. What the timestep embedding receives is `Diffusion.model_timestep(t)`: the
integer training index for DDPM chains, and 1000 * t for flow, so both use the same embedding range.

Randomness in training is drawn in a fixed order from the given generator: timesteps (their distributions are
in `timesteps.py`), then noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from sora_model.config import DiffusionConfig, LossConfig
from sora_model.diffusion import multistep as M
from sora_model.diffusion import samplers as S
from sora_model.diffusion.losses import Decoder, combine_losses
from sora_model.diffusion.registry import SAMPLER_NAMES, SAMPLERS, sampler_problem
from sora_model.diffusion.timesteps import (
    effective_shift,
    sample_adaptive_timesteps,
    sample_flow_timesteps,
    sample_uniform_timesteps,
    video_complexity,
)

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""model_fn(x_t (B, C, T, H, W), timestep (B,) float) -> prediction (B, C, T, H, W)."""
PackedModelFn = Callable[[list[Tensor], Tensor], list[Tensor]]
"""model_fn(groups of x_t [(n_g, C, T_g, H_g, W_g)], timesteps (Σn_g,)) -> predictions, one per group."""

FLOW_TIMESTEP_SCALE = 1000.0
"""Flow time t in [0, 1] is fed to the network as t * 1000: the range DiT's sinusoidal embedding expects."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _bcast(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1, 1) in `like`'s dtype, to scale whole clips."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def linear_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """(T,) float64 betas, linear from beta_start to beta_end (DDPM; the article's 1e-4 ... 0.02)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The processes
# ---------------------------------------------------------------------------------------------


class Diffusion(ABC):
    """A noise process: forward noising, training targets and losses, and sampling."""

    family: str
    """Key into `registry.SAMPLER_NAMES`: which samplers apply."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    # -- what subclasses define ------------------------------------------------------------------

    @abstractmethod
    def sample_training_timesteps(
        self, x0: Tensor, generator: torch.Generator | None, num_tokens: int | None
    ) -> Tensor:
        """(B,) training times in the process's own units (integer index or flow time)."""

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """(B,) float timesteps for the network's embedding."""

    @abstractmethod
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Noised clip x_t (B, C, T, H, W)."""

    @abstractmethod
    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network regresses (B, C, T, H, W)."""

    @abstractmethod
    def predict_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """The clean clip implied by a prediction (B, C, T, H, W)."""

    @abstractmethod
    def aux_weight(self, t: Tensor) -> Tensor:
        """(B,) factor on the auxiliary (x0_hat-based) losses."""

    @abstractmethod
    def _sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        sampler: str,
        steps: int,
        generator: torch.Generator | None,
        num_tokens: int | None,
        callback: S.StepCallback | None,
    ) -> Tensor:
        """Run `sampler` from `noise`; names are already validated."""

    # -- shared ------------------------------------------------------------------------------------

    @property
    def sampler_names(self) -> tuple[str, ...]:
        return SAMPLER_NAMES[self.family]

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        loss_cfg: LossConfig,
        *,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        perceptual_net: nn.Module | None = None,
        decode: Decoder | None = None,
    ) -> dict[str, Tensor]:
        """Noise x0, call the network once, and return the loss terms (see `losses.combine_losses`).

        x0: (B, C, T, H, W) clean clip in model space. Returns scalars "loss" (weighted total, with the
        graph), "diffusion", "temporal_consistency", "motion_smoothness" and "perceptual" (unweighted).
        """
        if x0.ndim != 5:
            raise ValueError(f"training_losses expects x0 of shape (B, C, T, H, W), got {tuple(x0.shape)}")
        # 1. Timesteps, then noise, from the one generator (fixed order: reproducible per seed).
        t = self.sample_training_timesteps(x0, generator, num_tokens)  # (B,)
        noise = S.draw_normal(tuple(x0.shape), generator, x0.device, x0.dtype)  # (B, C, T, H, W)
        # 2. Forward process and one network call.
        x_t = self.q_sample(x0, t, noise)  # (B, C, T, H, W)
        pred = model_fn(x_t, self.model_timestep(t))  # (B, C, T, H, W)
        if pred.shape != x0.shape:
            raise ValueError(f"model_fn returned shape {tuple(pred.shape)}, expected {tuple(x0.shape)}")
        # 3. Regression target, implied clean clip, and all terms.
        target = self.target(x0, t, noise)
        x0_hat = self.predict_x0(x_t, t, pred)
        return combine_losses(
            pred, target, x0_hat, x0, self.aux_weight(t), loss_cfg, perceptual_net=perceptual_net, decode=decode
        )

    def training_losses_packed(
        self,
        model_fn: PackedModelFn,
        x0s: list[Tensor],
        loss_cfg: LossConfig,
        *,
        generator: torch.Generator | None = None,
        num_tokens: list[int] | None = None,
        perceptual_net: nn.Module | None = None,
        decode: Decoder | None = None,
    ) -> dict[str, Tensor]:
        """`training_losses` for clips of several shapes trained in one network call (a packed batch).

        x0s: one (n_g, C, T_g, H_g, W_g) tensor per group of same-shape clips; num_tokens: each group's
        tokens per clip (the resolution-dependent timestep shift). model_fn takes the noisy groups and the
        (Σn_g,) model timesteps, clips in group order, and returns one prediction per group. Every term is a
        token-weighted mean over the clips (a group counts by its elements, as in the padded mean it replaces);
        with one group this is `training_losses` exactly, the random draws included.
        """
        if not x0s or any(x0.ndim != 5 for x0 in x0s):
            raise ValueError(
                "training_losses_packed expects a list of (n, C, T, H, W) groups, got shapes "
                f"{[tuple(x.shape) for x in x0s]}"
            )
        counts = num_tokens if num_tokens is not None else [None] * len(x0s)
        # 1. Each group's timesteps then noise, groups in order (one group draws as `training_losses` does).
        ts, noises = [], []
        for x0, n in zip(x0s, counts, strict=True):
            ts.append(self.sample_training_timesteps(x0, generator, n))  # (n_g,)
            noises.append(S.draw_normal(tuple(x0.shape), generator, x0.device, x0.dtype))
        # 2. One network call over every clip.
        x_ts = [self.q_sample(x0, t, noise) for x0, t, noise in zip(x0s, ts, noises)]
        preds = model_fn(x_ts, torch.cat([self.model_timestep(t) for t in ts]))
        if [p.shape for p in preds] != [x.shape for x in x0s]:
            raise ValueError(
                f"model_fn returned shapes {[tuple(p.shape) for p in preds]}, expected {[tuple(x.shape) for x in x0s]}"
            )
        # 3. Terms per group, weighted by its share of the batch's elements.
        total = sum(x0.numel() for x0 in x0s)
        out: dict[str, Tensor] = {}
        for x0, t, noise, x_t, pred in zip(x0s, ts, noises, x_ts, preds):
            terms = combine_losses(
                pred,
                self.target(x0, t, noise),
                self.predict_x0(x_t, t, pred),
                x0,
                self.aux_weight(t),
                loss_cfg,
                perceptual_net=perceptual_net,
                decode=decode,
            )
            for key, value in terms.items():
                out[key] = out[key] + value * (x0.numel() / total) if key in out else value * (x0.numel() / total)
        return out

    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        *,
        steps: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
        noise: Tensor | None = None,
        callback: S.StepCallback | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Generate clean clips of `shape` (B, C, T, H, W) from pure noise.

        steps and sampler default to cfg.num_sampling_steps and cfg.sampler. The start noise is `noise`
        if given, else drawn from `generator` on `device` (default: the generator's device, else CPU).
        Guidance is the caller's: pass a model_fn that already mixes conditional and unconditional outputs.
        callback(step_index, total_steps) runs after each step, step_index from 0.
        """
        sampler = sampler if sampler is not None else self.cfg.sampler
        steps = steps if steps is not None else self.cfg.num_sampling_steps
        problem = sampler_problem(sampler, self.cfg.schedule)
        if problem is not None:
            raise ValueError(problem)
        if steps < 1:
            raise ValueError(f"sampling steps must be >= 1, got {steps}")
        if noise is None:
            if device is None:
                device = generator.device if generator is not None else torch.device("cpu")
            noise = S.draw_normal(tuple(shape), generator, torch.device(device), dtype)  # (B, C, T, H, W)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was asked for")
        return self._sample(model_fn, noise, sampler, steps, generator, num_tokens, callback)


class GaussianDiffusion(Diffusion):
    """The DDPM chain with linear betas (`ddpm_linear`), or with complexity-adaptive timesteps (`adaptive`).

    Predictions: `eps` (the noise) or `v` = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho).
    """

    family = "gaussian"

    def __init__(self, cfg: DiffusionConfig):
        super().__init__(cfg)
        # Schedule tables in float64: 1 - alpha_bar near t = 0 is ~1e-4 and loses digits in float32.
        self.betas = linear_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)  # (T,)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._tables: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        """(3, T) [alpha_bar, sqrt(ab), sqrt(1 - ab)] on `device`, cached: indexing with on-device timesteps
        then needs no host sync per training step."""
        if device not in self._tables:
            rows = (self.alphas_cumprod, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
            table = torch.stack(rows)
            # float64 where the device has it (MPS does not); the values are exact to float32 precision anyway.
            self._tables[device] = table.to(device, torch.float32 if device.type == "mps" else torch.float64)
        return self._tables[device]

    @property
    def num_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(ab_t), sqrt(1 - ab_t) for integer t (B,), shaped (B, 1, 1, 1, 1) in like's dtype."""
        table = self._table(like.device)[:, t.to(like.device).long()]  # (3, B)
        return _bcast(table[1], like), _bcast(table[2], like)

    def sample_training_timesteps(
        self, x0: Tensor, generator: torch.Generator | None, num_tokens: int | None
    ) -> Tensor:
        if self.cfg.schedule == "adaptive":
            return sample_adaptive_timesteps(
                self.num_timesteps, video_complexity(x0), self.cfg.adaptive_strength, generator
            )
        return sample_uniform_timesteps(self.num_timesteps, x0.shape[0], generator, x0.device)

    def model_timestep(self, t: Tensor) -> Tensor:
        return t.float()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.cfg.prediction == "eps":
            return noise
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def predict_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        a, s = self._coefs(t, x_t)
        if self.cfg.prediction == "eps":
            return (x_t - s * pred) / a
        return a * x_t - s * pred

    def predict_eps(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """The noise implied by a prediction (B, C, T, H, W)."""
        if self.cfg.prediction == "eps":
            return pred
        a, s = self._coefs(t, x_t)
        return s * x_t + a * pred

    def aux_weight(self, t: Tensor) -> Tensor:
        # eps-prediction: x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab) amplifies the network's error by
        # sqrt(1 - ab) / sqrt(ab), ~150x at t = 999. The aux terms are squared errors, so weighting them by
        # ab (= sqrt(ab)^2) cancels that amplification exactly and leaves (1 - ab) * |eps error|^2: bounded,
        # and the terms count most where x0_hat is meaningful. v-prediction's x0_hat = sqrt(ab) x_t
        # - sqrt(1 - ab) v_hat is already well conditioned (error scaled by sqrt(1 - ab) <= 1): weight 1.
        if self.cfg.prediction == "eps":
            return self._table(t.device)[0, t.long()].float()
        return torch.ones(t.shape, device=t.device)

    def _sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        sampler: str,
        steps: int,
        generator: torch.Generator | None,
        num_tokens: int | None,
        callback: S.StepCallback | None,
    ) -> Tensor:
        timesteps = S.respace_timesteps(self.num_timesteps, steps)
        batch = noise.shape[0]

        def denoise(x: Tensor, index: int) -> tuple[Tensor, Tensor]:
            # The network always sees the original training index, also on a respaced chain.
            t = torch.full((batch,), index, device=x.device, dtype=torch.long)
            pred = model_fn(x, self.model_timestep(t))  # (B, C, T, H, W)
            return self.predict_x0(x, t, pred), self.predict_eps(x, t, pred)

        options = {"eta": self.cfg.ddim_eta} if sampler == "ddim" else {}
        run = SAMPLERS[sampler].resolve()  # ddpm_sample / ddim_sample
        return run(denoise, noise, self.alphas_cumprod, timesteps, generator=generator, callback=callback, **options)


class RectifiedFlow(Diffusion):
    """Rectified flow: x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0."""

    family = "flow"

    def sample_training_timesteps(
        self, x0: Tensor, generator: torch.Generator | None, num_tokens: int | None
    ) -> Tensor:
        return sample_flow_timesteps(self.cfg, x0.shape[0], generator, x0.device, num_tokens)

    def model_timestep(self, t: Tensor) -> Tensor:
        return t.float() * FLOW_TIMESTEP_SCALE

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        tb = _bcast(t, x0)
        return (1.0 - tb) * x0 + tb * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def predict_x0(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        return x_t - _bcast(t, x_t) * pred

    def aux_weight(self, t: Tensor) -> Tensor:
        # x0_hat = x_t - t v_hat scales the velocity error by t <= 1: well conditioned at every t.
        return torch.ones(t.shape, device=t.device)

    def _sample(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        sampler: str,
        steps: int,
        generator: torch.Generator | None,
        num_tokens: int | None,
        callback: S.StepCallback | None,
    ) -> Tensor:
        sigmas, times = self.time_grid(steps, effective_shift(self.cfg, num_tokens))
        batch = noise.shape[0]
        spec = SAMPLERS[sampler]
        if spec.kind == "multistep":

            def model_velocity(x: Tensor, timestep: float) -> Tensor:
                return model_fn(
                    x, torch.full((batch,), timestep, device=x.device, dtype=torch.float32)
                )  # (B, C, T, H, W)

            return spec.resolve()(
                model_velocity, noise, sigmas, times, callback=callback, **self._multistep_options(sampler)
            )

        def velocity(x: Tensor, t: float) -> Tensor:
            tt = torch.full((batch,), t, device=x.device, dtype=torch.float32)
            return model_fn(x, self.model_timestep(tt))  # (B, C, T, H, W)

        return spec.resolve()(velocity, noise, sigmas, callback=callback)

    def time_grid(self, steps: int, shift: float) -> tuple[list[float], list[float]]:
        """The sampling grid of cfg.time_grid: steps + 1 noise levels from 1 (or just below) to 0 (or the
        scheduler's sigma_min), and the `steps` timesteps the network sees at the first `steps` of them
        (1000 t for our grids; the integer timesteps of diffusers' multistep schedulers for theirs)."""
        cfg = self.cfg
        if cfg.time_grid == "unipc":
            return M.unipc_flow_sigmas(steps, shift, cfg.num_train_timesteps, cfg.multistep.final_sigma)
        if cfg.time_grid == "dpm_solver":
            return M.dpm_flow_sigmas(
                steps, shift, cfg.num_train_timesteps, cfg.multistep.final_sigma, cfg.beta_start, cfg.beta_end
            )
        if cfg.time_grid == "flow_match_euler":
            grid = S.flow_match_euler_grid(steps, shift, cfg.num_train_timesteps)
        else:
            grid = S.flow_time_grid(steps, shift)
        times = self.model_timestep(
            torch.tensor(grid[:-1], dtype=torch.float32)
        )  # (steps,) as the ODE samplers feed them
        return grid, times.tolist()

    def _multistep_options(self, sampler: str) -> dict:
        ms = self.cfg.multistep
        if sampler == "unipc":
            return {
                "order": ms.order,
                "variant": ms.unipc_variant,
                "lower_order_final": ms.lower_order_final,
                "disable_corrector": ms.disable_corrector,
            }
        return {
            "order": ms.order,
            "solver_type": ms.dpm_solver_type,
            "lower_order_final": ms.lower_order_final,
            "euler_at_final": ms.euler_at_final,
        }


def build_diffusion(cfg: DiffusionConfig) -> Diffusion:
    """GaussianDiffusion for `ddpm_linear` and `adaptive`, RectifiedFlow for `rectified_flow`."""
    if cfg.schedule == "rectified_flow":
        return RectifiedFlow(cfg)
    if cfg.schedule in ("ddpm_linear", "adaptive"):
        return GaussianDiffusion(cfg)
    raise ValueError(
        f"unknown diffusion.schedule '{cfg.schedule}'; choose one of: ddpm_linear, adaptive, rectified_flow"
    )
