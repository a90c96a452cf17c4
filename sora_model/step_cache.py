"""Step caching: skip the transformer's blocks on sampling steps whose input has barely moved (per request, off by
default; `TextToVideoPipeline.sample_latents(step_cache=..., cache_threshold=...)`).

Both methods cache a residual: what the blocks added to their input on the last call that ran them. A skipped call
adds that residual to its own input and goes straight to the output head, so everything outside the blocks (patch
embedding, conditions, final layer) still runs on the current input.

- `teacache` (TeaCache, Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"):
  the first block's timestep-modulated input is cheap to get (a LayerNorm and the adaLN shift and scale, no block).
  Its relative L1 change since the previous call, mapped through a rescale polynomial (fitted from that change to the
  change of the blocks' output), is accumulated; while the sum stays under the threshold the call is skipped, and a
  call that runs resets it. For a converted Wan2.1 T2V export (shared modulation, width 1536 or 5120) the indicator
  is Wan's `e0` (the shared modulation projection, our `block_c`) with the published Wan coefficients of TeaCache's
  `use_ret_steps` mode and its 5 always-computed first steps. For our own DiTs the indicator is the modulated input,
  with the polynomial calibrated on the demo export (`DIT_TEACACHE_COEFFICIENTS`; `fit_coefficients` re-fits one
  from `record=True` runs).
- `fbcache` (First-Block-Cache, ParaAttention / cache-dit's DBCache F1B0): the first block always runs; when its
  residual changed by less than the threshold (relative L1) since the last call that ran everything, the remaining
  blocks are skipped and their cached residual is added.

Consistency. Under classifier-free guidance the pipeline puts a prompt's conditional and unconditional rows in the
same model call (also when it splits a batch into calls on CPU), and a call skips all of its rows or none: both
branches skip together, so the guidance difference `cond - uncond` never mixes a fresh branch with a stale one
(which guidance would amplify). Each call of a step (a chunk, `select(key)`) keeps its own state, since it holds other
prompts. Threshold 0 never skips: the output then equals uncached sampling bit for bit (the same ops in the same
order). The first `keep_first` and last `keep_last` calls of a sampling run always compute.

The object lives on `DiT.step_cache` for one `sample_latents` call only; `DiT._denoise` uses it outside training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .conditioning import full_precision
from .config import DiTConfig

STEP_CACHE_METHODS = ("teacache", "fbcache")
"""The names `step_cache` takes; `none` (or None) means no caching."""
DEFAULT_THRESHOLDS = {"teacache": 0.15, "fbcache": 0.2}
"""Chosen on a demo-cpu export (310 steps) at its 10 ab2 steps with CFG 2, 16 eval prompts: TeaCache skipped 27 of
80 transformer calls at 0.1, 48 at 0.2 (mean pixel change 2.7 and 6.6 of 255); First-Block-Cache 0 at 0.1, 23 at
0.15, 36 at 0.25 (2.7 and 3.3). TeaCache's threshold is in units of the rescaled (predicted output) relative change,
accumulated; First-Block-Cache's is the first block's residual relative change. Wan's own TeaCache runs 50-step
sampling at 0.05-0.08 (1.3B, ret-steps mode); pass cache_threshold for other models and step counts."""
WAN_TEACACHE_COEFFICIENTS = {
    (1536, 16): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),  # Wan2.1-T2V-1.3B
    (5120, 16): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),  # Wan2.1-T2V-14B
}
"""TeaCache4Wan2.1's published rescale polynomials (highest power first) for its `use_ret_steps` mode, whose indicator
is `e0`, the shared modulation projection of the timestep embedding; keyed by (hidden size, input channels): the
text-to-video models only (image-to-video ones take 36 channels and have per-resolution polynomials)."""
WAN_TEACACHE_KEEP_FIRST = 5
"""`use_ret_steps` mode computes the first 5 steps whatever the distance (the coefficients were fitted so)."""
DIT_TEACACHE_COEFFICIENTS = (-16.0517, 30.9795, -10.2076, 1.96631, -0.0506348)
"""Rescale polynomial for our DiTs' modulated-input indicator, degree 4 as TeaCache's: fitted (`fit_coefficients`) on
72 calls of a demo-cpu export (310 steps) sampling 16 captions outside the eval prompts (seeds 100+), 10 ab2 steps
with CFG 2. The indicator's changes (0.067-0.27 a step) track the blocks' output changes closely (correlation 0.99,
rmse 0.0036; a straight line fits to 0.0094)."""


@dataclass
class StepCacheStats:
    """What a sampling call's cache did: transformer calls (one per model call: a step, or a CPU chunk of a step)
    and how many of them skipped their blocks."""

    method: str
    threshold: float
    calls: int = 0
    skipped: int = 0

    def summary(self) -> str:
        skipped = f"skipped {self.skipped} of {self.calls} transformer calls"
        return f"step cache {self.method} (threshold {self.threshold:g}): {skipped}"


def check_step_cache(method: str | None, threshold: float | None) -> tuple[str | None, float | None]:
    """Validated (method, threshold): None when off; the method's default threshold when None. A ValueError names the
    allowed values for an unknown method, a threshold without a method, or a negative or non-finite threshold."""
    if method is not None and not isinstance(method, str):
        raise ValueError(f"step_cache must be one of none, {', '.join(STEP_CACHE_METHODS)}, got {method!r}")
    name = None if method is None or method.strip().lower() in ("", "none") else method.strip().lower()
    if name is not None and name not in STEP_CACHE_METHODS:
        raise ValueError(f"step_cache must be one of none, {', '.join(STEP_CACHE_METHODS)}, got '{method}'")
    if threshold is None:
        return name, None if name is None else DEFAULT_THRESHOLDS[name]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise ValueError(f"cache_threshold must be a finite number >= 0, got {threshold!r}")
    if name is None:
        raise ValueError(
            f"cache_threshold needs a step_cache ({', '.join(STEP_CACHE_METHODS)}), got step_cache {method!r}"
        )
    return name, float(threshold)


@dataclass
class _State:
    """One model call's cache (one chunk of every step), across the steps of one sampling run."""

    calls: int = 0
    accumulated: float = 0.0  # teacache: rescaled distance since the last computed call
    previous: torch.Tensor | None = (
        None  # teacache: the last indicator; fbcache: the first block's last computed residual
    )
    residual: torch.Tensor | None = None  # what the cached blocks added on the last computed call
    last_output: torch.Tensor | None = None  # record mode: the blocks' previous output


@dataclass
class StepCache:
    """A step cache for one sampling call; `DiT._denoise` hands it the blocks (`run_blocks`)."""

    method: str
    threshold: float
    coefficients: tuple[float, ...] = DIT_TEACACHE_COEFFICIENTS
    indicator: str = "modulated_input"  # teacache: "modulated_input" (first block's) or "modulation" (Wan's e0)
    keep_first: int = 1
    keep_last: int = 1
    record: bool = False  # teacache: keep (indicator change, output change) pairs for `fit_coefficients`
    stats: StepCacheStats = field(init=False)
    records: list[tuple[float, float]] = field(default_factory=list)
    _states: dict[Any, _State] = field(default_factory=dict)
    _key: Any = None
    _total: int | None = None

    def __post_init__(self) -> None:
        if self.method not in STEP_CACHE_METHODS:
            raise ValueError(f"step_cache must be one of {', '.join(STEP_CACHE_METHODS)}, got '{self.method}'")
        self.stats = StepCacheStats(self.method, self.threshold)

    def begin(self, total_calls: int | None = None) -> None:
        """A new sampling run (a new initial noise): every chunk's state is dropped; the stats add up."""
        self._states.clear()
        self._total = total_calls
        self._key = None

    def select(self, key: Any) -> None:
        """The next model call is chunk `key` of its step (the same rows every step)."""
        self._key = key

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, *args: Any) -> torch.Tensor:
        """x (B, N, D) -> the blocks' output (B, N, D), computed or from the cache; c and args as `DiTBlock.forward`
        takes them after x: (c, context, context_mask, rope, layout)."""
        state = self._states.setdefault(self._key, _State())
        call, state.calls = state.calls, state.calls + 1
        self.stats.calls += 1
        forced = call < self.keep_first or (self._total is not None and call >= self._total - self.keep_last)
        if self.method == "teacache":
            return self._teacache(state, blocks, x, c, args, forced)
        return self._fbcache(state, blocks, x, c, args, forced)

    def _teacache(
        self, state: _State, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, args: tuple, forced: bool
    ) -> torch.Tensor:
        indicator = (
            c if self.indicator == "modulation" else first_block_modulated_input(blocks[0], x, c, args[-1])
        )  # (B, N, D) | (clips, 6 D)
        change = _relative_l1(indicator, state.previous)
        state.previous = indicator
        if change is not None:
            state.accumulated += float(np.polyval(self.coefficients, change))
        usable = state.residual is not None and state.residual.shape == x.shape and change is not None
        if usable and not forced and self.threshold > 0 and state.accumulated < self.threshold:
            self.stats.skipped += 1
            return x + state.residual  # (B, N, D)
        state.accumulated = 0.0
        out = _run(blocks, x, c, args)  # (B, N, D)
        if self.record:
            out_change = _relative_l1(out, state.last_output)
            if change is not None and out_change is not None:
                self.records.append((change, out_change))
            state.last_output = out
        state.residual = out - x
        return out

    def _fbcache(
        self, state: _State, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, args: tuple, forced: bool
    ) -> torch.Tensor:
        h = blocks[0](x, c, *args)  # (B, N, D)
        first = h - x  # (B, N, D): the first block's residual
        usable = state.residual is not None and state.residual.shape == x.shape
        if usable and not forced and self.threshold > 0:
            change = _relative_l1(first, state.previous)
            if change is not None and change < self.threshold:
                self.stats.skipped += 1
                return h + state.residual  # (B, N, D)
        out = _run(blocks[1:], h, c, args)  # (B, N, D)
        state.previous, state.residual = first, out - h
        return out


def _run(blocks: Any, x: torch.Tensor, c: torch.Tensor, args: tuple) -> torch.Tensor:
    for block in blocks:
        x = block(x, c, *args)  # (B, N, D)
    return x


def _relative_l1(now: torch.Tensor, before: torch.Tensor | None) -> float | None:
    """mean |now - before| / mean |before| (TeaCache's and FBCache's distance); None with nothing to compare."""
    if before is None or before.shape != now.shape:
        return None
    return float((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12))


def first_block_modulated_input(block: nn.Module, x: torch.Tensor, c: torch.Tensor, layout: Any) -> torch.Tensor:
    """The first block's self-attention input, norm1(x) shifted and scaled by the timestep's adaLN: (B, N, D)."""
    mod = block.modulation(c) if block.shared_modulation else full_precision(block.adaLN_modulation, c)  # (clips, 6 D)
    shift, scale = mod.chunk(6, dim=-1)[:2]  # (clips, D) each
    return layout.modulate(block.norm1(x), shift, scale)  # (B, N, D)


def build_step_cache(method: str | None, threshold: float | None, model: DiTConfig) -> StepCache | None:
    """The cache a request asks for (validated as `check_step_cache`), with the model's TeaCache coefficients."""
    name, thr = check_step_cache(method, threshold)
    if name is None:
        return None
    assert thr is not None
    wan = WAN_TEACACHE_COEFFICIENTS.get((model.hidden_size, model.in_channels))
    if name == "teacache" and model.modulation == "shared" and wan is not None:
        return StepCache(name, thr, wan, "modulation", keep_first=WAN_TEACACHE_KEEP_FIRST)
    return StepCache(name, thr)


def fit_coefficients(records: list[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """TeaCache's rescale polynomial (highest power first): least squares from indicator change to output change."""
    if len(records) <= degree:
        raise ValueError(f"fitting a degree-{degree} polynomial needs more than {degree} records, got {len(records)}")
    xs, ys = np.array(records, dtype=np.float64).T
    return tuple(float(v) for v in np.polyfit(xs, ys, degree))


__all__ = [
    "DEFAULT_THRESHOLDS",
    "STEP_CACHE_METHODS",
    "StepCache",
    "StepCacheStats",
    "build_step_cache",
    "check_step_cache",
    "first_block_modulated_input",
    "fit_coefficients",
]
