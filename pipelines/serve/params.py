"""What a generator samples, and what the ingress knows of the model to check requests against it.

`ModelCard` is the export's defaults and shape rules (asked once from a replica, `model_card`); `GenerationParams`
is one validated request, frozen (resolve.py makes it from a request, the generator samples from it);
`params_to_doc` / `params_from_doc` are the one pair that writes it into a job row and reads it back (jobs.py).
Pure dataclasses (no Ray, no torch).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelCard:
    """What the ingress needs to know about the export, asked once from a generator replica."""

    num_frames: int
    height: int
    width: int
    fps: int
    steps: int
    guidance_scale: float
    sampler: str
    samplers: tuple[str, ...]
    """Samplers valid for the export's noise schedule."""
    spatial_multiple: int
    """height and width must be multiples of this (autoencoder downsampling x patch size)."""
    frame_multiple: int
    """frames (minus 1 for causal video VAEs) must be multiples of this."""
    causal_frames: bool = False
    """True for a video VAE that encodes the first frame alone: frames = 1 + k x frame_multiple."""
    loras: tuple[str, ...] = ()
    """LoRA adapters a request may name: those of the config's `loras:` that the replica checked against the model."""
    lora_errors: dict[str, str] = field(default_factory=dict)
    """Configured adapters that cannot be used, with the one-line reason (a request naming one answers 400 with it)."""
    step_caches: tuple[str, ...] = ()
    """Step-cache methods the pipeline offers (`sora_model.step_cache.STEP_CACHE_METHODS`); empty: none."""
    cache_thresholds: dict[str, float] = field(default_factory=dict)
    """Each method's default threshold (what an unset `cache_threshold` means)."""
    image_inputs: tuple[int, ...] = (0,)
    """How many reference images a request may send: (0,) text-to-video, (1,) image-to-video, (2,) first-last-frame."""

    def check_frames(self, frames: int) -> str | None:
        if self.causal_frames:
            if (frames - 1) % self.frame_multiple:
                return f"num_frames must be 1 + a multiple of {self.frame_multiple} for this model, got {frames}"
        elif frames % self.frame_multiple:
            return f"num_frames must be a multiple of {self.frame_multiple} for this model, got {frames}"
        return None


def cli_sampling(args: Any, card: ModelCard) -> tuple[int, int, int, int, str]:
    """`sora generate`'s (frames, height, width, steps, sampler): the flags, else the model's defaults, checked
    against what the model can make; a bad value is a one-line UserError naming the flag."""
    from pipelines.cli import UserError

    frames, steps = args.frames or card.num_frames, args.steps or card.steps
    height, width = args.height or card.height, args.width or card.width
    sampler = args.sampler or card.sampler
    if sampler not in card.samplers:
        raise UserError(f"--sampler must be one of {', '.join(card.samplers)} for this model, got '{sampler}'")
    if height % card.spatial_multiple or width % card.spatial_multiple:
        raise UserError(
            f"--height and --width must be multiples of {card.spatial_multiple} for this model, got {height}x{width}"
        )
    problem = card.check_frames(frames)
    if problem:
        raise UserError(problem.replace("num_frames", "--frames"))
    return frames, height, width, steps, sampler


def model_card(pipe: Any, loras: tuple[str, ...] = (), lora_errors: dict[str, str] | None = None) -> ModelCard:
    """The defaults and shape rules of a loaded pipeline (and the adapters its replica can apply), for validating
    requests without the model. Step caches are offered when the pipeline says so (`offers_step_caches`)."""
    from sora_model.diffusion import SAMPLER_NAMES
    from sora_model.step_cache import DEFAULT_THRESHOLDS, STEP_CACHE_METHODS

    cached = pipe.offers_step_caches
    # What `pipe.image_problem(first, last)` allows: no image, a first frame, or a first and a last frame.
    image_inputs = tuple(
        n
        for n, (first, last) in enumerate(((False, False), (True, False), (True, True)))
        if pipe.image_problem(first, last) is None
    )

    cfg = pipe.config
    _, ph, pw = cfg.model.patch_size
    ae = pipe.autoencoder
    family = "flow" if cfg.diffusion.schedule == "rectified_flow" else "gaussian"
    causal = ae.temporal_factor > 1
    return ModelCard(
        num_frames=cfg.sample.num_frames,
        height=cfg.sample.height,
        width=cfg.sample.width,
        fps=cfg.sample.fps,
        steps=cfg.diffusion.num_sampling_steps,
        guidance_scale=cfg.diffusion.guidance_scale,
        sampler=cfg.diffusion.sampler,
        samplers=tuple(SAMPLER_NAMES[family]),
        spatial_multiple=ae.spatial_factor * math.lcm(ph, pw),
        frame_multiple=ae.temporal_factor if causal else cfg.model.patch_size[0],
        causal_frames=causal,
        loras=tuple(loras),
        lora_errors=dict(lora_errors or {}),
        step_caches=tuple(STEP_CACHE_METHODS) if cached else (),
        cache_thresholds={k: float(v) for k, v in DEFAULT_THRESHOLDS.items()} if cached else {},
        image_inputs=image_inputs,
    )


@dataclass(frozen=True)
class GenerationParams:
    """Everything a generator needs for one clip; frozen and hashable into the result-cache key."""

    prompt: str
    num_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    negative_prompt: str | None
    fps: int
    model: str
    lora: str | None = None
    step_cache: str | None = None
    cache_threshold: float | None = None
    image: str | None = None
    """sha256 of the `input_reference` image's bytes (the bytes are stored beside the job: store.put_input)."""
    last_image: str | None = None
    """sha256 of the `last_frame_reference` image's bytes."""

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys are sampled in one pipeline call (guidance, seeds, prompts may differ).
        Negative prompts replace the learned null condition for the whole call, so they split groups too; so do
        the LoRA adapter (one per call: `sora_model.adapters`), the step cache (it decides per call) and the
        reference images (the pipeline conditions a whole call on one first and last frame)."""
        return (
            self.num_frames,
            self.height,
            self.width,
            self.steps,
            self.sampler,
            self.negative_prompt is not None,
            self.lora,
            self.step_cache,
            self.cache_threshold,
            self.image,
            self.last_image,
        )

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        return format_seconds(self.num_frames / self.fps)

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


PARAM_FIELDS = frozenset(f.name for f in fields(GenerationParams))
"""What a job row's `doc._params` may hold (params_from_doc)."""


def params_to_doc(params: GenerationParams) -> dict[str, Any]:
    """The params as the job row stores them (`doc._params`, JSON), and as the result cache compares them."""
    return asdict(params)


def params_from_doc(doc: dict[str, Any]) -> GenerationParams:
    """The params a job row stored (`params_to_doc`). ValueError naming the field when the row was not written by
    this version of the server (a field it does not know, or one it needs and lacks)."""
    unknown = sorted(set(doc) - PARAM_FIELDS)
    if unknown:
        raise ValueError(f"job params: unknown field '{unknown[0]}' (a row from another version of the server)")
    try:
        return GenerationParams(**doc)
    except TypeError as err:
        raise ValueError(f"job params: {err}") from None


def format_seconds(s: float) -> str:
    """ "4" for whole seconds (what OpenAI answers), "0.5" otherwise."""
    return str(int(s)) if float(s).is_integer() else f"{s:.3g}"
