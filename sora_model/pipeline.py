"""Text-to-video: prompts -> text embeddings -> sampling with guidance -> decode -> uint8 frames.

The same object serves `sora generate`, the Serve replicas, the trainer's stage samples and the
evaluator. It loads and saves an export folder (`export_io.py`: `model.safetensors`, optional `ema.safetensors`,
and `config.json`, the `PipelineConfig`): loading reads only safetensors and JSON, never a pickle, each weights file
straight into a DiT in its inference dtype (`dit_load.load_dit`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from safetensors.torch import save_file

from .autoencoder import Autoencoder, build_autoencoder, model_to_pixels
from .captions import trim_text_padding
from .config import PipelineConfig
from .diffusion import build_diffusion, is_stochastic, sampler_nfe
from .dit import DiT
from .dit_load import load_dit
from .export_io import EMA_FILE, MODEL_2_FILE, MODEL_FILE, cpu_state, load_export_config, local_paths, save_export
from .i2v_condition import image_condition
from .image_encoder import ImageCondition, ImageEncoder, ImageInput, load_image
from .patch import patch_grid
from .step_cache import StepCache, StepCacheStats, build_step_cache
from .text import TextEmbedding, TextEncoder, build_text_encoder

Precision = Literal["fp32", "bf16", "int8"]
CPU_TOKENS_PER_CALL = 2048
"""On CPU the model runs over at most this many tokens per call (whole samples, at least one), so a small
model's activations stay in cache: one call over 8 clips of 8x32x32 (16 samples with guidance, DiT-demo,
one thread) cost 15% more per clip than a clip alone; in calls of 4 samples it costs the same. On a GPU
the whole batch goes in one call, which is what batching is for there. Under guidance a call holds prompts' two
branches together (at least one prompt's pair, even over this budget), so a step cache skips both or neither."""


def _row(emb: TextEmbedding, i: int) -> TextEmbedding:
    """The i-th caption of a batch of embeddings, keeping the batch dimension."""
    return TextEmbedding(*(x[i : i + 1] for x in emb))


def _image_inputs(x: torch.Tensor, image: ImageCondition | None, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's input for noisy latents x (B, C, T, H, W) under image-to-video's condition, and the image features
    for `rows` rows (B, or 2B under guidance): the noisy latents, then the mask and the conditioning latents (Wan's
    channel order). x and None without an image."""
    if image is None:
        return x, None
    features = None if image.features is None else image.features.expand(rows, -1, -1)  # (rows, Li, Di)
    x_in = torch.cat([x, image.channels.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)], dim=1)  # (B, C_in, T, H, W)
    return x_in, features


class TextToVideoPipeline:
    """A DiT, its noise process, a text encoder and an autoencoder, with the export's sampling defaults."""

    offers_step_caches = True
    """Whether `sample_latents` takes `step_cache=`: the serving model card reads it (a parallel pipeline says no)."""

    def __init__(
        self,
        model: DiT,
        config: PipelineConfig,
        text_encoder: TextEncoder | None = None,
        autoencoder: Autoencoder | None = None,
        device: str | torch.device = "cpu",
        model_2: DiT | None = None,
    ):
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if (model_2 is None) != (config.boundary_ratio is None):
            raise ValueError(
                "a two-expert pipeline needs both model_2 and config.boundary_ratio; a one-model pipeline neither"
            )
        self.model_2 = None if model_2 is None else model_2.to(self.device).eval()
        # Image-to-video: the CLIP image encoder of `model.image_dim` models (Wan2.1 I2V/FLF2V).
        self.image_encoder = (
            ImageEncoder(config.image_encoder, self.device) if config.model.image_dim is not None else None
        )
        self.diffusion = build_diffusion(config.diffusion)
        self.text_encoder = text_encoder or build_text_encoder(config.text_encoder, device=self.device)
        self.autoencoder = (autoencoder or build_autoencoder(config.autoencoder)).to(self.device).eval()
        if self.text_encoder.dim != config.model.text_dim:
            raise ValueError(
                f"text encoder '{config.text_encoder.name_or_path}' gives width {self.text_encoder.dim} "
                f"but model.text_dim is {config.model.text_dim}"
            )

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: PipelineConfig, device: str | torch.device = "cpu", **kw) -> TextToVideoPipeline:
        """A pipeline around a freshly initialised model."""
        return cls(DiT(config.model), config, device=device, **kw)

    @classmethod
    def load(
        cls,
        export_dir: str,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        use_ema: bool = True,
        lora: str | None = None,
        **kw,
    ) -> TextToVideoPipeline:
        """Rebuild from an export. EMA weights are preferred when present (they sample better).

        lora: a peft LoRA adapter folder, merged into the fp32 weights before any precision change
        (`sora_model.lora.merge_lora`: adapters trained on this DiT or on diffusers' Wan transformer).

        precision: `fp32`; `bf16` (bf16 weights, conditioning path and residual stream fp32; the text encoder
        in bf16 too on GPU); `int8`
        (dynamic quantisation of every Linear, CPU only: ~4x smaller weights, faster matmuls).
        """
        if precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"precision must be one of fp32, bf16, int8, got '{precision}'")
        config = local_paths(load_export_config(export_dir), export_dir)
        weights = os.path.join(
            export_dir, EMA_FILE if use_ema and os.path.isfile(os.path.join(export_dir, EMA_FILE)) else MODEL_FILE
        )
        # Straight into the inference dtype and onto the device (`load_dit`); int8 quantises fp32 weights on CPU.
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        where = "cpu" if precision == "int8" else device
        model = load_dit(config, weights, lora, dtype, where)
        if config.boundary_ratio is not None:
            kw["model_2"] = load_dit(config, os.path.join(export_dir, MODEL_2_FILE), lora, dtype, where)
        if "text_encoder" not in kw and torch.device(device).type == "cuda" and precision == "bf16":
            kw["text_encoder"] = build_text_encoder(config.text_encoder, device=device, dtype=torch.bfloat16)
        pipe = cls(model, config, device=device, **kw)
        pipe.set_precision(precision)
        return pipe

    def set_precision(self, precision: Precision) -> None:
        if precision == "int8":
            if self.device.type != "cpu":
                raise ValueError("precision 'int8' (dynamic quantisation) runs on CPU only; use 'bf16' on GPU")
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
            if self.model_2 is not None:
                self.model_2 = torch.ao.quantization.quantize_dynamic(
                    self.model_2, {torch.nn.Linear}, dtype=torch.qint8
                )
        elif precision == "bf16":
            # bf16 weights, not autocast over fp32 ones: half the memory; the conditioning path stays fp32.
            self.model = self.model.to_inference_dtype(torch.bfloat16)
            if self.model_2 is not None:
                self.model_2 = self.model_2.to_inference_dtype(torch.bfloat16)
            if self.device.type == "cuda":  # on CPU bf16 matmuls are slower than fp32; the encoder is small there
                self.text_encoder.model.to(torch.bfloat16)
        elif precision != "fp32":
            raise ValueError(f"precision must be one of fp32, bf16, int8, got '{precision}'")

    def save(self, export_dir: str, ema_state_dict: dict[str, torch.Tensor] | None = None) -> str:
        save_export(export_dir, self.config, self.model.state_dict(), ema_state_dict)
        if self.model_2 is not None:
            save_file(cpu_state(self.model_2.state_dict()), os.path.join(export_dir, MODEL_2_FILE))
        return export_dir

    # -- sampling -------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> TextEmbedding:
        emb = self.text_encoder.encode(list(prompts))
        return TextEmbedding(emb.tokens.to(self.device), emb.mask.to(self.device), emb.pooled.to(self.device))

    def guided_model_fn(
        self,
        cond: TextEmbedding,
        guidance_scale: torch.Tensor,
        uncond: TextEmbedding | None = None,
        image: ImageCondition | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """model_fn(x, t) with classifier-free guidance, cond and uncond in one batched forward pass:
        uncond + scale * (cond - uncond), as Wan and diffusers mix them.

        guidance_scale is (B,) so requests with different scales share a batch. uncond None uses the
        learned null condition (what condition dropout trained); otherwise a negative prompt's embedding
        (for `null_text: empty_prompt` models `__call__` passes the empty prompt's).
        image: image-to-video's condition, the same for every row and both branches (as Wan's pipeline gives it).
        Two-expert exports run `model` on timesteps >= the boundary and `model_2` below it (diffusers' WanPipeline).
        """
        b = cond.tokens.shape[0]
        scale = guidance_scale.to(self.device, torch.float32).view(b, 1, 1, 1, 1)
        need_uncond = bool((guidance_scale != 1).any())
        text, drop = self._text_rows(cond, uncond, need_uncond)
        boundary = (
            None if self.model_2 is None else self.config.boundary_ratio * self.config.diffusion.num_train_timesteps
        )

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device).float().expand(x.shape[0]) if t.ndim == 0 else t.to(self.device).float()
            model = self.model if boundary is None or float(t.reshape(-1)[0]) >= boundary else self.model_2
            x_in, features = _image_inputs(x, image, x.shape[0] * (2 if need_uncond else 1))
            if not need_uncond:
                return self._forward(x_in, t, text.tokens, text.mask, text.pooled, None, features=features, model=model)
            out = self._forward(
                torch.cat([x_in, x_in]),
                torch.cat([t, t]),
                text.tokens,
                text.mask,
                text.pooled,
                drop,
                cfg_pairs=True,
                features=features,
                model=model,
            )
            out_cond, out_uncond = out.chunk(2)  # (B, C, T, H, W) each
            return out_uncond + scale * (out_cond - out_uncond)

        return model_fn

    def _text_rows(
        self, cond: TextEmbedding, uncond: TextEmbedding | None, need_uncond: bool
    ) -> tuple[TextEmbedding, torch.Tensor | None]:
        """The text one forward pass reads, and which of its rows take the learned null condition instead (None: none).

        Under guidance the rows are [cond (B), uncond (B)]: a negative prompt's embedding, or, without one, cond again
        with its rows dropped to the null condition; without guidance cond alone. Caption padding is trimmed here,
        once per generation, unless the model reads it (`text_padding: attended`)."""
        b = cond.tokens.shape[0]
        drop = None  # a negative prompt's embedding stands in for the null condition
        if not need_uncond:
            tokens, mask, pooled = cond
        else:
            neg = uncond if uncond is not None else cond
            tokens = torch.cat([cond.tokens, neg.tokens])  # (2B, L, Dt)
            mask = torch.cat([cond.mask, neg.mask])  # (2B, L)
            pooled = torch.cat([cond.pooled, neg.pooled])  # (2B, Dt)
            if uncond is None:
                drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(self.device)
        if self.config.model.text_padding == "masked":
            tokens, mask = trim_text_padding(tokens, mask)
        return TextEmbedding(tokens, mask, pooled), drop

    def _forward(
        self, x, t, tokens, mask, pooled, drop, cfg_pairs: bool = False, features=None, model: DiT | None = None
    ) -> torch.Tensor:
        """The model on (N, C, T, H, W) -> float32 prediction; on CPU in calls of CPU_TOKENS_PER_CALL tokens.

        cfg_pairs: the rows are [cond (N/2), uncond (N/2)] of the same prompts, and each call takes prompts' two rows
        together (row j with row N/2 + j): the step cache then decides for both branches of a prompt at once."""
        n = x.shape[0]
        per_call = n
        if self.device.type == "cpu":
            tokens_per_sample = math.prod(patch_grid(tuple(x.shape[2:]), self.config.model.patch_size))
            per_call = max(1, CPU_TOKENS_PER_CALL // tokens_per_sample)
        chunks: list[slice | torch.Tensor] = [slice(i, i + per_call) for i in range(0, n, per_call)]
        if cfg_pairs and per_call < n:
            half, pairs = n // 2, max(1, per_call // 2)
            chunks = [
                torch.cat(
                    [torch.arange(j, min(j + pairs, half)), torch.arange(half + j, half + min(j + pairs, half))]
                ).to(x.device)
                for j in range(0, half, pairs)
            ]
        model = model or self.model
        cache: StepCache | None = model.step_cache
        outs = []
        for key, rows in enumerate(chunks):
            if cache is not None:
                cache.select(key)
            outs.append(
                model(
                    x[rows],
                    t[rows],
                    tokens[rows],
                    mask[rows],
                    pooled[rows],
                    drop_text=None if drop is None else drop[rows],
                    image_features=None if features is None else features[rows],
                ).float()
            )
        if len(outs) == 1:
            return outs[0]
        if not isinstance(chunks[0], torch.Tensor):
            return torch.cat(outs)
        out = outs[0].new_empty((n, *outs[0].shape[1:]))
        for rows, part in zip(chunks, outs, strict=True):
            out[rows] = part
        return out

    @torch.no_grad()
    def __call__(self, prompts: str | Sequence[str], **options) -> np.ndarray:
        """Generate clips: (B, T, H, W, 3) uint8; the options are `sample_latents`'."""
        latents = self.sample_latents(prompts, **options)  # (B, C, T', H', W')
        video = self.autoencoder.decode(latents.to(self.device))  # (B, 3, T, H, W) in [-1, 1]
        return model_to_pixels(video).cpu().numpy()  # (B, T, H, W, 3) uint8

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: str | Sequence[str],
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        seed: int | Sequence[int] = 0,
        sampler: str | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        callback: Callable[[int, int], None] | None = None,
        step_cache: str | StepCache | None = None,
        cache_threshold: float | None = None,
        cache_stats: Callable[[StepCacheStats], None] | None = None,
        image: ImageInput | None = None,
        last_image: ImageInput | None = None,
    ) -> torch.Tensor:
        """Sample clips in model space, before decoding: (B, C, T', H', W'). Unset options come from the export's
        defaults. (diffusers pipelines' `output_type="latent"`.)

        step_cache: None or "none" (default, exact), "teacache" or "fbcache" (`step_cache.py`): skip the transformer's
        blocks on steps whose input barely moved. cache_threshold: how much change to tolerate, >= 0 (0 never skips;
        None: the method's default, teacache 0.15 and fbcache 0.2, `step_cache.DEFAULT_THRESHOLDS`). cache_stats, when
        given, receives the cache's `StepCacheStats` (transformer calls and how many skipped) after sampling.
        Unknown names and negative or non-finite thresholds raise a ValueError naming the allowed values. A `StepCache`
        object is used as it is (its own threshold and coefficients; calibration passes one with `record=True`).

        Each prompt's noise comes from its own seed, so a clip is the same whether it was sampled
        alone or in a batch with others (what the server's dynamic batching relies on).

        image, last_image: image-to-video exports (converted from a WanImageToVideoPipeline) start the clip at `image`
        (and FLF2V exports end it at `last_image`): a PIL image, an array or a path, of any size; every prompt of the
        call gets the same one. A text-only export given an image, or a missing or unreadable image, is a ValueError.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts must not be empty")
        cache = self._step_cache(step_cache, cache_threshold)
        frames, height, width, steps, sampler = self._defaults(num_frames, height, width, steps, sampler)
        guidance, seeds = self._per_prompt(len(prompts), guidance_scale, seed)
        # 1. Shapes: the clip in model space (after the autoencoder's compression) and its token count.
        shape, num_tokens = self._latent_grid(frames, height, width)
        image_cond = self.image_condition(image, last_image, frames, height, width)
        if self.model_2 is not None and cache is not None:
            raise ValueError("step_cache is not supported by two-expert exports (the experts' residuals differ)")
        # 2. Text conditions.
        cond, uncond = self._text_conditions(prompts, negative_prompt)
        # 3. Sample.
        latents = self._sample_prompts(
            cond, guidance, uncond, shape, steps, sampler, seeds, num_tokens, callback, image_cond, cache
        )
        if cache is not None and cache_stats is not None:
            cache_stats(cache.stats)
        return latents  # (B, C, T', H', W')

    def _step_cache(self, step_cache: str | StepCache | None, cache_threshold: float | None) -> StepCache | None:
        """The step cache of one `sample_latents` call: a `StepCache` object as given, else one built by name."""
        if not isinstance(step_cache, StepCache):
            return build_step_cache(step_cache, cache_threshold, self.config.model)
        if cache_threshold is not None:
            raise ValueError(
                "cache_threshold goes with a step_cache name; a StepCache object carries its own threshold"
            )
        return step_cache

    def _defaults(
        self, frames: int | None, height: int | None, width: int | None, steps: int | None, sampler: str | None
    ) -> tuple[int, int, int, int, str]:
        """The clip's size and the sampling schedule of one call: what it sets, else the export's defaults."""
        s, d = self.config.sample, self.config.diffusion
        return (
            frames or s.num_frames,
            height or s.height,
            width or s.width,
            steps or d.num_sampling_steps,
            sampler or d.sampler,
        )

    def _per_prompt(
        self, b: int, guidance_scale: float | Sequence[float] | None, seed: int | Sequence[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """Each of b prompts' guidance scale, (B,) float32 (the export's default when None), and seed; one value is
        every prompt's."""
        guidance = self.config.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        guidance = torch.as_tensor([guidance] * b if np.isscalar(guidance) else list(guidance), dtype=torch.float32)
        seeds = [seed] * b if isinstance(seed, int) else list(seed)
        if len(seeds) != b or guidance.numel() != b:
            raise ValueError(f"got {b} prompts but {len(seeds)} seeds and {guidance.numel()} guidance scales")
        return guidance, seeds

    def _latent_grid(self, frames: int, height: int, width: int) -> tuple[tuple[int, int, int, int], int]:
        """One clip's latent shape (C, T', H', W') and its token count; a ValueError when the patch does not tile it."""
        lt, lh, lw = self.autoencoder.latent_shape(frames, height, width)
        pt, ph, pw = self.config.model.patch_size
        if lt % pt or lh % ph or lw % pw:
            raise ValueError(
                f"{frames} frames at {height}x{width} give a latent grid {lt}x{lh}x{lw} not divisible by the patch "
                f"{pt}x{ph}x{pw}; pick frames/height/width that are multiples of it"
            )
        return (self.autoencoder.latent_channels, lt, lh, lw), (lt // pt) * (lh // ph) * (lw // pw)

    def _text_conditions(
        self, prompts: list[str], negative_prompt: str | Sequence[str] | None
    ) -> tuple[TextEmbedding, TextEmbedding | None]:
        """The prompts' embeddings and the negative prompts' (None: guidance uses the learned null condition)."""
        cond = self.encode_prompts(prompts)
        if negative_prompt is None and self.config.model.null_text == "empty_prompt":
            negative_prompt = ""  # Wan's convention: no negative prompt means the empty one
        if negative_prompt is None:
            return cond, None
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        return cond, self.encode_prompts(negs)

    def _sample_prompts(
        self, cond, guidance, uncond, shape, steps, sampler, seeds, num_tokens, callback, image, cache
    ) -> torch.Tensor:
        """Every prompt's latents (B, C, T', H', W'), each from the noise of its own seed. Deterministic samplers take
        the per-prompt initial noise in one batch; stochastic ones run per prompt so each keeps its own noise stream.
        The step cache sits on the model for this call only."""
        b = len(seeds)
        generators = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        self.model.step_cache = cache
        try:
            if is_stochastic(sampler, self.config.diffusion.ddim_eta) and b > 1:  # each row its own noise stream
                parts = [
                    self._sample(
                        _row(cond, i),
                        guidance[i : i + 1],
                        _row(uncond, i) if uncond else None,
                        shape,
                        steps,
                        sampler,
                        generators[i],
                        num_tokens,
                        callback,
                        image=image,
                    )
                    for i in range(b)
                ]
                return torch.cat(parts)
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(
                self.device
            )  # (B, C, T, H, W)
            return self._sample(
                cond, guidance, uncond, (b, *shape), steps, sampler, generators[0], num_tokens, callback, noise, image
            )
        finally:
            self.model.step_cache = None

    def _sample(
        self, cond, guidance, uncond, shape, steps, sampler, generator, num_tokens, callback, noise=None, image=None
    ):
        if noise is None:
            noise = torch.randn((1, *shape), generator=generator).to(self.device)
            shape = noise.shape
        model_fn = self.guided_model_fn(cond, guidance, uncond, image)
        if self.model.step_cache is not None:  # a new run from new noise: no state carries over
            self.model.step_cache.begin(total_calls=sampler_nfe(sampler, steps))
        return self.diffusion.sample(
            model_fn,
            tuple(noise.shape),
            steps=steps,
            sampler=sampler,
            generator=generator,
            num_tokens=num_tokens,
            noise=noise,
            callback=callback,
        )

    def image_condition(self, image, last_image, frames: int, height: int, width: int) -> ImageCondition | None:
        """Image-to-video's condition for one call (`i2v_condition.image_condition`, what training's is built with
        too), None without images; a ValueError (one line) for images this export cannot use or that it needs and did
        not get."""
        problem = self.image_problem(image is not None, last_image is not None)
        if problem:
            raise ValueError(problem)
        if image is None:
            return None
        images = [load_image(image, "image")] + ([] if last_image is None else [load_image(last_image, "last_image")])
        cond = image_condition(images, frames, height, width, self.autoencoder, self.image_encoder, self.device)
        m = self.config.model
        if cond.channels.shape[1] + m.predicted_channels != m.in_channels:
            raise ValueError(
                f"the model reads {m.in_channels} channels but noise, mask and image latents give "
                f"{cond.channels.shape[1] + m.predicted_channels}"
            )
        return cond

    def image_problem(self, image: bool, last_image: bool) -> str | None:
        """Why this export cannot sample with (or without) a first and a last image, in one line; None when it can."""
        m = self.config.model
        if m.in_channels == m.predicted_channels:
            if image or last_image:
                return (
                    "this export is text-to-video only: it takes no image (convert a WanImageToVideoPipeline for "
                    "image-to-video)"
                )
            return None
        if not image:
            return "this export is image-to-video: give the first frame as image"
        if m.image_dim is not None and last_image != m.image_positions:
            if m.image_positions:
                return "this FLF2V export needs last_image (the last frame) as well as image"
            return "this I2V export conditions on one image: last_image needs a first-last-frame (FLF2V) export"
        return None
