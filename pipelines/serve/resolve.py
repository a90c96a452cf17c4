"""A create request checked against the limits (global, tightened by the caller's tier) and the model's card, with
its defaults filled in: `VideoCreateRequest` -> `GenerationParams`, or an ApiError (400) naming the parameter and the
limit it broke. Pure (no Ray, no torch); decoding the reference images is `check_images`' (run it off the event loop).
"""

from __future__ import annotations

import hashlib
import math
import re

from .config import Limits, ServeSettings, Tier
from .errors import ApiError, invalid
from .params import GenerationParams, ModelCard
from .requests import IMAGE_FIELDS, VideoCreateRequest, open_image, reference_bytes

SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
MAX_SEED = 2**63 - 1
"""torch.Generator.manual_seed takes 64-bit seeds; JSON clients handle signed 64-bit best."""
PREVIEW_SUFFIX = "-preview"


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
                "This model generates from text only and cannot use 'input_reference' (image-to-video is not "
                "supported).",
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
            "This model conditions on one image ('input_reference') and cannot use 'last_frame_reference' (that "
            "needs a first-last-frame model).",
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
            f"'negative_prompt' has {len(negative)} characters; the limit is {limits.max_prompt_chars} "
            "(limits.max_prompt_chars).",
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
                f"'size' must be 'WIDTHxHEIGHT' with positive integers, e.g. '{card.width}x{card.height}'; got "
                f"{req.size!r}.",
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
            f"'size' {width}x{height} is {width * height} pixels per frame; the limit is {max_pixels} "
            "(limits.max_pixels).",
        )
    if width % card.spatial_multiple or height % card.spatial_multiple:
        raise invalid(
            "size",
            f"'size' width and height must be multiples of {card.spatial_multiple} for this model, got "
            f"{width}x{height}.",
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
            f"'guidance_scale' must be between {limits.min_guidance:g} and {limits.max_guidance:g} "
            f"(limits.min_guidance, limits.max_guidance), got {guidance:g}.",
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
