"""The HTTP surface: OpenAI Videos API schemas, limit checks, and OpenAI-shaped errors.

Pure pydantic and dataclasses (no Ray, no torch), so it is unit-tested on its own. The ingress parses
a create request into `VideoCreateRequest` (requests.py: bodies, multipart, text checks), then `resolve()`
checks it against the configured limits and the model's card (defaults, samplers, step caches, LoRA adapters)
and gives the `GenerationParams` a generator replica samples. Errors are OpenAI's shape (errors.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydantic import BaseModel, Field

from .config import Limits, ServeSettings, Tier
from .errors import ApiError, error_body, from_validation_error, invalid
from .requests import (
    IMAGE_FIELDS,
    MAX_BODY_BYTES,
    MAX_PART_HEADER_BYTES,
    MAX_PARTS,
    VideoCreateRequest,
    open_image,
    parse_create,
    parse_multipart,
    read_body,
    read_create_fields,
    reference_bytes,
)

__all__ = [  # what callers name through `api` (the parsing lives in requests.py, the errors in errors.py)
    "IMAGE_FIELDS",
    "MAX_BODY_BYTES",
    "MAX_PARTS",
    "MAX_PART_HEADER_BYTES",
    "ApiError",
    "GenerationParams",
    "ModelCard",
    "VideoCreateRequest",
    "error_body",
    "from_validation_error",
    "invalid",
    "model_card",
    "parse_create",
    "parse_multipart",
    "parse_range",
    "new_job",
    "read_body",
    "read_create_fields",
    "resolve",
    "resolve_references",
    "check_images",
    "result_cache_key",
    "video_object",
]

SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
MAX_SEED = 2**63 - 1
"""torch.Generator.manual_seed takes 64-bit seeds; JSON clients handle signed 64-bit best."""
PREVIEW_SUFFIX = "-preview"
VIDEO_VARIANTS = ("video", "thumbnail")
"""`spritesheet` (the third OpenAI variant) is not produced; asking for it is a 400 that says so."""
MAX_LIST_LIMIT = 100
VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")
"""What `new_job_id` makes: anything else is an unknown id without asking the database."""


# ---------------------------------------------------------------------------------------------
# Requests and responses
# ---------------------------------------------------------------------------------------------


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """What every video endpoint answers; the OpenAI `Video` fields plus the parameters we sampled with."""

    id: str
    object: str = "video"
    model: str
    status: str
    progress: int = 0
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    size: str
    seconds: str
    prompt: str | None = None
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    # Extensions.
    num_frames: int
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    negative_prompt: str | None = None
    lora: str | None = None
    step_cache: str | None = None
    cache_threshold: float | None = None


class ListQuery(BaseModel):
    limit: int = Field(default=20, ge=1, le=MAX_LIST_LIMIT)
    after: str | None = None
    order: str = Field(default="desc", pattern="^(asc|desc)$")


# ---------------------------------------------------------------------------------------------
# Resolving a request against limits and the model's defaults
# ---------------------------------------------------------------------------------------------


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


def effective_limit(global_value: int, tier_value: int | None) -> int:
    return global_value if tier_value is None else min(global_value, tier_value)


def resolve(
    req: VideoCreateRequest,
    card: ModelCard,
    settings: ServeSettings,
    tier: Tier,
    random_seed: int,
    references: dict[str, bytes] | None = None,
) -> GenerationParams:
    """Check a request against the limits (global, tightened by the tier) and fill in defaults; `references` are
    `resolve_references`' (computed here when not given), the images named in the params by their digests.

    Raises ApiError (400) naming the parameter and the limit it broke.
    """
    refs = resolve_references(req, card) if references is None else references
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in refs.items()}
    limits: Limits = settings.limits
    model, preview = resolve_model(req, settings)
    prompt, negative = resolve_prompts(req, limits)
    width, height = resolve_size(req, card, limits, tier)
    frames = resolve_frames(req, card, limits, tier)
    steps, guidance, sampler = resolve_sampling(req, card, settings, tier, preview)
    seed = random_seed if req.seed is None else req.seed
    if not 0 <= seed <= MAX_SEED:
        raise invalid("seed", f"'seed' must be between 0 and {MAX_SEED}, got {seed}.")
    step_cache, threshold = resolve_step_cache(req, card)
    return GenerationParams(
        prompt=prompt,
        num_frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance_scale=float(guidance),
        seed=int(seed),
        sampler=sampler,
        negative_prompt=negative,
        fps=card.fps,
        model=model,
        lora=resolve_lora(req, card),
        step_cache=step_cache,
        cache_threshold=threshold,
        image=digests.get("input_reference"),
        last_image=digests.get("last_frame_reference"),
    )


def resolve_model(req: VideoCreateRequest, settings: ServeSettings) -> tuple[str, bool]:
    """(model name as asked, whether it is the preview variant): ours, its preview variant, or an OpenAI alias."""
    name = settings.model_name
    model = req.model or name
    preview = model == name + PREVIEW_SUFFIX
    if model != name and not preview and model not in settings.model_aliases:
        known = ", ".join([name, name + PREVIEW_SUFFIX, *settings.model_aliases])
        raise ApiError(
            400,
            f"The model '{model}' does not exist; available models: {known}.",
            param="model",
            code="model_not_found",
        )
    return model, preview


def resolve_references(req: VideoCreateRequest, card: ModelCard) -> dict[str, bytes]:
    """{field: encoded image} of the reference images a request sends, checked against what the model takes
    (`card.image_inputs`) and `reference_bytes`' limits; a 400 naming the field otherwise. Decoding them is
    `check_images`' (slower: run it off the event loop)."""
    first, last = req.input_reference is not None, req.last_frame_reference is not None
    if last and not first:
        raise invalid(
            "last_frame_reference",
            "'last_frame_reference' needs 'input_reference' (the first frame) as well.",
            code="missing_required_parameter",
        )
    count = first + last
    if count not in card.image_inputs:
        if card.image_inputs == (0,):
            raise invalid(
                "input_reference",
                "This model generates from text only and cannot use 'input_reference' (image-to-video is not supported).",
                code="unsupported_parameter",
            )
        if count == 0:
            raise invalid(
                "input_reference",
                "This model is image-to-video: send the first frame as 'input_reference'.",
                code="missing_required_parameter",
            )
        if count == 1:
            raise invalid(
                "last_frame_reference",
                "This model generates between a first and a last frame: send 'last_frame_reference' as well.",
                code="missing_required_parameter",
            )
        raise invalid(
            "last_frame_reference",
            "This model conditions on one image ('input_reference') and cannot use 'last_frame_reference' (that needs a first-last-frame model).",
            code="unsupported_parameter",
        )
    refs = {name: reference_bytes(getattr(req, name), name) for name in IMAGE_FIELDS}
    return {name: data for name, data in refs.items() if data is not None}


def check_images(references: dict[str, bytes]) -> None:
    """Decode each reference image in full (format, pixel limit, truncation): a 400 naming the field, never a 500."""
    for name, data in references.items():
        open_image(data, name).close()


def resolve_prompts(req: VideoCreateRequest, limits: Limits) -> tuple[str, str | None]:
    """(prompt, negative prompt or None), stripped and within `limits.max_prompt_chars`."""
    prompt = req.prompt.strip()
    if not prompt:
        raise invalid("prompt", "'prompt' must not be empty.")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid(
            "prompt",
            f"'prompt' has {len(prompt)} characters; the limit is {limits.max_prompt_chars} (limits.max_prompt_chars).",
            code="string_above_max_length",
        )
    negative = req.negative_prompt.strip() if req.negative_prompt is not None else None
    if negative is not None and len(negative) > limits.max_prompt_chars:
        raise invalid(
            "negative_prompt",
            f"'negative_prompt' has {len(negative)} characters; the limit is {limits.max_prompt_chars} (limits.max_prompt_chars).",
            code="string_above_max_length",
        )
    return prompt, negative or None


def resolve_size(req: VideoCreateRequest, card: ModelCard, limits: Limits, tier: Tier) -> tuple[int, int]:
    """(width, height): the request's `size` or the model's, within the side, pixel and multiple limits."""
    width, height = card.width, card.height
    if req.size is not None:
        m = SIZE_PATTERN.match(req.size)
        if not m:
            raise invalid(
                "size",
                f"'size' must be 'WIDTHxHEIGHT' with positive integers, e.g. '{card.width}x{card.height}'; got {req.size!r}.",
            )
        width, height = int(m.group(1)), int(m.group(2))
    if width < 1 or height < 1:
        raise invalid("size", f"'size' must have a positive width and height, got {width}x{height}.")
    if max(width, height) > limits.max_side:
        raise invalid("size", f"'size' {width}x{height} has a side over {limits.max_side} pixels (limits.max_side).")
    max_pixels = effective_limit(limits.max_pixels, tier.max_pixels)
    if width * height > max_pixels:
        raise invalid(
            "size",
            f"'size' {width}x{height} is {width * height} pixels per frame; the limit is {max_pixels} (limits.max_pixels).",
        )
    if width % card.spatial_multiple or height % card.spatial_multiple:
        raise invalid(
            "size",
            f"'size' width and height must be multiples of {card.spatial_multiple} for this model, got {width}x{height}.",
        )
    return width, height


def resolve_frames(req: VideoCreateRequest, card: ModelCard, limits: Limits, tier: Tier) -> int:
    """The clip's frame count: `num_frames` wins over `seconds`, else the model's; within the limits it can make."""
    max_frames = effective_limit(limits.max_frames, tier.max_frames)
    if req.num_frames is not None:
        frames, param = req.num_frames, "num_frames"
    elif req.seconds is not None:
        try:
            secs = float(req.seconds)
        except ValueError:
            raise invalid(
                "seconds",
                f"'seconds' must be a number of seconds such as \"4\", got {req.seconds!r}.",
                code="invalid_type",
            ) from None
        if not math.isfinite(secs) or secs <= 0:
            raise invalid("seconds", f"'seconds' must be > 0, got {req.seconds!r}.")
        if secs > limits.max_seconds:
            raise invalid(
                "seconds", f"'seconds' is {secs:g}; the limit is {limits.max_seconds:g} (limits.max_seconds)."
            )
        frames, param = max(1, round(secs * card.fps)), "seconds"
    else:
        frames, param = card.num_frames, "num_frames"
    if frames < 1:
        raise invalid(param, f"'{param}' must give at least 1 frame, got {frames}.")
    if frames > max_frames:
        raise invalid(param, f"'{param}' asks for {frames} frames; the limit is {max_frames} (limits.max_frames).")
    problem = card.check_frames(frames)
    if problem:
        raise invalid(param, problem + ".")
    return frames


def resolve_sampling(
    req: VideoCreateRequest, card: ModelCard, settings: ServeSettings, tier: Tier, preview: bool
) -> tuple[int, float, str]:
    """(steps, guidance scale, sampler): the request's or the tier's/model's defaults, within the limits."""
    limits = settings.limits
    max_steps = effective_limit(limits.max_steps, tier.max_steps)
    default_steps = settings.preview_steps if preview else (tier.default_steps or card.steps)
    steps = req.steps if req.steps is not None else min(default_steps, max_steps)
    if steps < 1 or steps > max_steps:
        raise invalid("steps", f"'steps' must be between 1 and {max_steps} (limits.max_steps), got {steps}.")
    guidance = card.guidance_scale if req.guidance_scale is None else req.guidance_scale
    if not math.isfinite(guidance) or not limits.min_guidance <= guidance <= limits.max_guidance:
        raise invalid(
            "guidance_scale",
            f"'guidance_scale' must be between {limits.min_guidance:g} and {limits.max_guidance:g} (limits.min_guidance, limits.max_guidance), got {guidance:g}.",
        )
    allowed = [s for s in (limits.samplers or card.samplers) if s in card.samplers]
    sampler = req.sampler or card.sampler
    if sampler not in allowed:
        raise invalid("sampler", f"'sampler' must be one of {', '.join(allowed)} for this model, got {sampler!r}.")
    return steps, guidance, sampler


def resolve_lora(req: VideoCreateRequest, card: ModelCard) -> str | None:
    """The adapter a request names: one the replica can apply, else a 400 naming the field and the allowed names."""
    if req.lora is None or not req.lora.strip():
        return None
    name = req.lora.strip()
    if name in card.lora_errors:
        raise invalid("lora", f"'lora' {name!r} cannot be used: {card.lora_errors[name]}", code="lora_unavailable")
    if name not in card.loras:
        allowed = ", ".join(card.loras) if card.loras else "none (the server's config has no loras)"
        raise invalid(
            "lora",
            f"'lora' must be one of the configured adapters: {allowed}; got {name[:64]!r}.",
            code="lora_not_found",
        )
    return name


def resolve_step_cache(req: VideoCreateRequest, card: ModelCard) -> tuple[str | None, float | None]:
    """(method, threshold) of a request's step cache: None when off; the method's default threshold when unset."""
    method = (req.step_cache or "").strip().lower()
    method = None if method in ("", "none") else method
    allowed = ", ".join(("none", *card.step_caches))
    if method is not None and method not in card.step_caches:
        raise invalid("step_cache", f"'step_cache' must be one of {allowed} for this model, got {req.step_cache!r}.")
    if req.cache_threshold is None:
        return method, None if method is None else card.cache_thresholds.get(method)
    if method is None:
        raise invalid(
            "cache_threshold",
            f"'cache_threshold' needs a 'step_cache' ({', '.join(card.step_caches) or 'none offered'}).",
        )
    if not math.isfinite(req.cache_threshold) or req.cache_threshold < 0:
        raise invalid(
            "cache_threshold", f"'cache_threshold' must be a finite number >= 0, got {req.cache_threshold:g}."
        )
    return method, float(req.cache_threshold)


def new_job(params: GenerationParams) -> dict[str, Any]:
    """A queued job for `params`: the public video fields, the request's extensions and `_params` (what the
    generator samples from)."""
    now_ns = time.time_ns()
    return {
        "id": f"video_{uuid.uuid4().hex}",
        "object": "video",
        "model": params.model,
        "status": "queued",
        "progress": 0,
        "created_at": now_ns // 10**9,
        "completed_at": None,
        "expires_at": None,
        "size": params.size,
        "seconds": params.seconds,
        "prompt": params.prompt,
        "error": None,
        "num_frames": params.num_frames,
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "seed": params.seed,
        "sampler": params.sampler,
        "negative_prompt": params.negative_prompt,
        "lora": params.lora,
        "step_cache": params.step_cache,
        "cache_threshold": params.cache_threshold,
        "_created_ns": now_ns,
        "_params": params_to_doc(params),
    }


def result_cache_key(params: GenerationParams, owner: str, identity: dict[str, Any]) -> str:
    """The result cache's key: every sampling parameter of the request (its adapter's name and step cache among
    them), the owner (a cache is never shared across tenants), and what decides the clip beyond the request
    (`Generator.identity`: the export's digest, the merged LoRA, the precision, and the digest of the adapter the
    request names, so replacing an adapter's file under the same name misses the cache)."""
    model = {k: v for k, v in identity.items() if k != "adapters"}
    adapter = (identity.get("adapters") or {}).get(params.lora) if params.lora else None
    blob = json.dumps(
        {"params": params_to_doc(params), "owner": owner, "model": model, "adapter": adapter}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def video_object(job: dict[str, Any]) -> dict[str, Any]:
    """The public view of a stored job (internal bookkeeping stripped)."""
    return VideoObject.model_validate({k: v for k, v in job.items() if k in VideoObject.model_fields}).model_dump()


RANGE_PATTERN = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
MAX_RANGE_DIGITS = 18
"""Byte positions longer than this are past the end of any file (10^18 bytes is an exabyte)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single-range `Range` header (RFC 9110 14.1.2); None to send the
    whole body (no header, several ranges, or one we do not parse, which RFC 9110 says to ignore).
    A range that starts past the end is a 416 naming the size."""
    if not header:
        return None
    m = RANGE_PATTERN.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if len(first) > MAX_RANGE_DIGITS:  # past any file's end (and int() refuses over 4300 digits)
        raise _unsatisfiable(header, size)
    last = last if len(last) <= MAX_RANGE_DIGITS else str(size)  # past the end: clamped, as RFC 9110 says
    if not first:  # a suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise _unsatisfiable(header, size)
    return start, end


def _unsatisfiable(header: str, size: int) -> ApiError:
    return ApiError(
        416,
        f"Range {header[:60]!r} is outside the content ({size} bytes).",
        param="range",
        code="range_not_satisfiable",
        headers={"Content-Range": f"bytes */{size}"},
    )
