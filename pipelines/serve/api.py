"""The HTTP surface: OpenAI Videos API schemas, limit checks, and OpenAI-shaped errors.

Pure pydantic and dataclasses (no Ray, no torch), so it is unit-tested on its own. The ingress parses
a create request into `VideoCreateRequest`, then `resolve()` checks it against the configured limits
and the model's defaults and gives the `GenerationParams` a generator replica samples.

Errors are `{"error": {"message", "type", "param", "code"}}`, the shape the `openai` SDK parses into
`openai.BadRequestError` and friends.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Limits, ServeSettings, Tier

SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")
MAX_SEED = 2**63 - 1
"""torch.Generator.manual_seed takes 64-bit seeds; JSON clients handle signed 64-bit best."""
PREVIEW_SUFFIX = "-preview"
VIDEO_VARIANTS = ("video", "thumbnail")
"""`spritesheet` (the third OpenAI variant) is not produced; asking for it is a 400 that says so."""
MAX_LIST_LIMIT = 100
MAX_BODY_BYTES = 20 * 1024 * 1024
"""A create carries a prompt and at most a reference image; anything bigger is refused unread."""
MAX_TEXT_CHARS = 100_000
"""Hard cap on prompt strings before the configurable `limits.max_prompt_chars` check (a cheap first fence)."""
MAX_SHORT_CHARS = 64
"""model, size, sampler and string seconds: names and numbers, never long."""
VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")
"""What `new_job_id` makes: anything else is an unknown id without asking the database."""
FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters (NUL above all: PostgreSQL text cannot hold it); tab and newlines stay allowed."""


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        if type is None:
            type = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the parameter."""
    first = err.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None  # a union's branch names (seconds.str) stay out
    kind = first["type"]
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    got = first.get("input")
    shown = repr(got) if not isinstance(got, str) or len(got) < 60 else repr(got[:57] + "...")
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if kind.startswith("string_too_long"):
        return ApiError(400, f"'{param}' is too long: {first['msg'].lower()}.", param=param, code="string_above_max_length")
    return ApiError(400, f"Invalid type for '{param}': {first['msg'].lower()}, got {shown}.", param=param, code="invalid_type")


# ---------------------------------------------------------------------------------------------
# Requests and responses
# ---------------------------------------------------------------------------------------------


class VideoCreateRequest(BaseModel):
    """`POST /v1/videos`: the OpenAI fields plus our sampling extensions.

    Multipart forms send every value as a string, so a form is validated in lax mode ("8" becomes 8);
    a JSON body is validated strictly: `true` is not a step count, `2.0` not a seed, `"2.5"` not a
    guidance scale (each a 400 naming the field, where lax mode would silently coerce it).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    model: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    seconds: str | float | None = Field(default=None, union_mode="left_to_right")
    """OpenAI sends "4", "8", "12"; any positive number is accepted and becomes seconds x fps frames."""
    size: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    """"WIDTHxHEIGHT"."""
    input_reference: Any = None
    # Extensions (sent with the SDK's `extra_body=`).
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


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

    def check_frames(self, frames: int) -> str | None:
        if self.causal_frames:
            if (frames - 1) % self.frame_multiple:
                return f"num_frames must be 1 + a multiple of {self.frame_multiple} for this model, got {frames}"
        elif frames % self.frame_multiple:
            return f"num_frames must be a multiple of {self.frame_multiple} for this model, got {frames}"
        return None


def model_card(pipe: Any) -> ModelCard:
    """The defaults and shape rules of a loaded pipeline, for validating requests without the model."""
    from sora_model.diffusion import SAMPLER_NAMES

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

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys are sampled in one pipeline call (guidance, seeds, prompts may differ).
        Negative prompts replace the learned null condition for the whole call, so they split groups too."""
        return (self.num_frames, self.height, self.width, self.steps, self.sampler, self.negative_prompt is not None)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds(self) -> str:
        return format_seconds(self.num_frames / self.fps)

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def format_seconds(s: float) -> str:
    """"4" for whole seconds (what OpenAI answers), "0.5" otherwise."""
    return str(int(s)) if float(s).is_integer() else f"{s:.3g}"


def effective_limit(global_value: int, tier_value: int | None) -> int:
    return global_value if tier_value is None else min(global_value, tier_value)


def resolve(
    req: VideoCreateRequest,
    card: ModelCard,
    settings: ServeSettings,
    tier: Tier,
    random_seed: int,
) -> GenerationParams:
    """Check a request against the limits (global, tightened by the tier) and fill in defaults.

    Raises ApiError (400) naming the parameter and the limit it broke.
    """
    limits: Limits = settings.limits
    # 1. Model: ours, its preview variant, or an OpenAI alias of ours.
    name = settings.model_name
    model = req.model or name
    preview = model == name + PREVIEW_SUFFIX
    if model != name and not preview and model not in settings.model_aliases:
        known = ", ".join([name, name + PREVIEW_SUFFIX, *settings.model_aliases])
        raise ApiError(400, f"The model '{model}' does not exist; available models: {known}.", param="model", code="model_not_found")
    if req.input_reference is not None:
        raise invalid("input_reference", "This model generates from text only and cannot use 'input_reference' (image-to-video is not supported).", code="unsupported_parameter")
    # 2. Prompts.
    prompt = req.prompt.strip()
    if not prompt:
        raise invalid("prompt", "'prompt' must not be empty.")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid("prompt", f"'prompt' has {len(prompt)} characters; the limit is {limits.max_prompt_chars} (limits.max_prompt_chars).", code="string_above_max_length")
    negative = req.negative_prompt.strip() if req.negative_prompt is not None else None
    if negative is not None and len(negative) > limits.max_prompt_chars:
        raise invalid("negative_prompt", f"'negative_prompt' has {len(negative)} characters; the limit is {limits.max_prompt_chars} (limits.max_prompt_chars).", code="string_above_max_length")
    negative = negative or None
    # 3. Size.
    width, height = card.width, card.height
    if req.size is not None:
        m = SIZE_PATTERN.match(req.size)
        if not m:
            raise invalid("size", f"'size' must be 'WIDTHxHEIGHT' with positive integers, e.g. '{card.width}x{card.height}'; got {req.size!r}.")
        width, height = int(m.group(1)), int(m.group(2))
    if width < 1 or height < 1:
        raise invalid("size", f"'size' must have a positive width and height, got {width}x{height}.")
    if max(width, height) > limits.max_side:
        raise invalid("size", f"'size' {width}x{height} has a side over {limits.max_side} pixels (limits.max_side).")
    max_pixels = effective_limit(limits.max_pixels, tier.max_pixels)
    if width * height > max_pixels:
        raise invalid("size", f"'size' {width}x{height} is {width * height} pixels per frame; the limit is {max_pixels} (limits.max_pixels).")
    if width % card.spatial_multiple or height % card.spatial_multiple:
        raise invalid("size", f"'size' width and height must be multiples of {card.spatial_multiple} for this model, got {width}x{height}.")
    # 4. Length: num_frames wins over seconds.
    max_frames = effective_limit(limits.max_frames, tier.max_frames)
    if req.num_frames is not None:
        frames, param = req.num_frames, "num_frames"
    elif req.seconds is not None:
        try:
            secs = float(req.seconds)
        except ValueError:
            raise invalid("seconds", f"'seconds' must be a number of seconds such as \"4\", got {req.seconds!r}.", code="invalid_type") from None
        if not math.isfinite(secs) or secs <= 0:
            raise invalid("seconds", f"'seconds' must be > 0, got {req.seconds!r}.")
        if secs > limits.max_seconds:
            raise invalid("seconds", f"'seconds' is {secs:g}; the limit is {limits.max_seconds:g} (limits.max_seconds).")
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
    # 5. Sampling.
    max_steps = effective_limit(limits.max_steps, tier.max_steps)
    default_steps = settings.preview_steps if preview else (tier.default_steps or card.steps)
    steps = req.steps if req.steps is not None else min(default_steps, max_steps)
    if steps < 1 or steps > max_steps:
        raise invalid("steps", f"'steps' must be between 1 and {max_steps} (limits.max_steps), got {steps}.")
    guidance = card.guidance_scale if req.guidance_scale is None else req.guidance_scale
    if not math.isfinite(guidance) or not limits.min_guidance <= guidance <= limits.max_guidance:
        raise invalid("guidance_scale", f"'guidance_scale' must be between {limits.min_guidance:g} and {limits.max_guidance:g} (limits.min_guidance, limits.max_guidance), got {guidance:g}.")
    allowed = [s for s in (limits.samplers or card.samplers) if s in card.samplers]
    sampler = req.sampler or card.sampler
    if sampler not in allowed:
        raise invalid("sampler", f"'sampler' must be one of {', '.join(allowed)} for this model, got {sampler!r}.")
    seed = random_seed if req.seed is None else req.seed
    if not 0 <= seed <= MAX_SEED:
        raise invalid("seed", f"'seed' must be between 0 and {MAX_SEED}, got {seed}.")
    return GenerationParams(
        prompt=prompt, num_frames=frames, height=height, width=width, steps=steps, guidance_scale=float(guidance),
        seed=int(seed), sampler=sampler, negative_prompt=negative, fps=card.fps, model=model,
    )


MAX_PARTS = 64
"""Parts of one multipart body: a create has a dozen fields; more is a body built to be slow to parse (the
standard library's MIME parser took 115 s over 400k tiny parts under the 20 MiB limit on one core)."""
MAX_PART_HEADER_BYTES = 8 * 1024
"""Header block of one part (HTTP servers' usual cap): a part with millions of header lines is refused unread."""
FILE_FIELDS = ("input_reference",)
"""Fields that carry a file; any other field sent as a file part is decoded as text and checked like one."""
TEXT_CHARSETS = ("utf-8", "ascii", "iso8859-1")
"""Charsets a text field may declare (codec names as `codecs.lookup` gives them)."""


def multipart_boundary(content_type: str) -> tuple[bytes, str]:
    """(boundary, default charset of text parts) of a multipart/form-data Content-Type."""
    from email.message import Message

    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise ApiError(400, "multipart/form-data request without a valid boundary (1 to 70 ASCII characters).", param="Content-Type", code="invalid_body")
    charset = msg.get_param("charset")
    return boundary.encode("ascii"), text_charset(charset if isinstance(charset, str) else "utf-8", "Content-Type")


def parse_multipart(body: bytes, content_type: str) -> dict[str, Any]:
    """Fields of a multipart/form-data body (RFC 7578, what the SDK sends); file parts of FILE_FIELDS come
    back as bytes, every other part as text. The body is cut at its delimiters with `bytes` methods (C speed)
    and each part's headers, bounded in count and size first, are read by the standard library's header
    parser, so a 20 MiB body of any shape parses in milliseconds. Raises ApiError (400) naming the field."""
    from email.parser import BytesHeaderParser
    from email.policy import HTTP

    boundary, default_charset = multipart_boundary(content_type)
    delimiter = b"\r\n--" + boundary
    body = b"\r\n" + body  # the first delimiter may open the body
    if body.count(delimiter) > MAX_PARTS + 1:
        raise ApiError(400, f"The multipart body has more than {MAX_PARTS} parts (the limit).", param="body", code="too_many_parts")
    pieces = body.split(delimiter)
    fields: dict[str, Any] = {}
    closed = False
    for piece in pieces[1:]:  # pieces[0] is the preamble
        if piece.startswith(b"--"):
            closed = True
            break
        _, eol, rest = piece.partition(b"\r\n")  # transport padding up to the delimiter line's end
        if not eol:
            raise ApiError(400, "The request body is not valid multipart/form-data (a delimiter line does not end).", param="body", code="invalid_body")
        if rest.startswith(b"\r\n"):
            raw_headers, payload = b"", rest[2:]
        else:
            raw_headers, sep, payload = rest.partition(b"\r\n\r\n")
            if not sep:
                raise ApiError(400, "The request body is not valid multipart/form-data (a part's headers do not end).", param="body", code="invalid_body")
        if len(raw_headers) > MAX_PART_HEADER_BYTES:
            raise ApiError(400, f"A multipart part has {len(raw_headers)} bytes of headers; the limit is {MAX_PART_HEADER_BYTES}.", param="body", code="part_headers_too_large")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(raw_headers)
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        charset = headers.get_content_charset() if headers.get("content-type") else None
        if headers.get_filename() is not None and name in FILE_FIELDS:
            fields[name] = payload
        else:  # a text field, even when sent as a file (`curl -F prompt=@caption.txt`): checked like any text
            fields[name] = decode_text(payload, name, charset or default_charset)
    if not closed:
        raise ApiError(400, "The request body is not valid multipart/form-data (it has no closing delimiter).", param="body", code="invalid_body")
    return fields


def text_charset(charset: str, param: str) -> str:
    """The codec name of a declared charset, if text fields may use it; else a 400 naming `param`."""
    import codecs

    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        name = ""
    if name not in TEXT_CHARSETS:
        raise invalid(param, f"'{param}' declares charset {charset[:40]!r}; text fields must be utf-8, us-ascii or iso-8859-1.", code="unsupported_charset")
    return name


def decode_text(raw: bytes, param: str, charset: str = "utf-8") -> str:
    """Text of a form field; bytes that are not valid in its charset are a 400 naming the field
    (never replaced by U+FFFD and accepted, never a 500 further on)."""
    codec = text_charset(charset, param)
    try:
        return raw.decode(codec)
    except UnicodeError:
        raise invalid(param, f"'{param}' is not valid {codec} text.", code="invalid_encoding") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_text(fields: dict[str, Any]) -> None:
    """Every string field is encodable Unicode without control characters: JSON's \\ud800 escapes give
    lone surrogates that fail later when encoded, and NUL cannot be stored in PostgreSQL."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(str(name), f"'{name}' is not valid Unicode (it holds a lone surrogate).", code="invalid_encoding") from None
        if FORBIDDEN_CHARS.search(value):
            raise invalid(str(name), f"'{name}' contains control characters; only printable text, tabs and newlines are allowed.", code="invalid_encoding")


async def read_body(request: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body read as a stream and cut off at `limit` bytes: a chunked upload (no
    Content-Length) larger than the limit is refused once the limit is passed, never buffered whole."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"The request body is {size} bytes; the limit is {limit}.", code="request_too_large")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"The request body is over {limit} bytes (the limit); stopped reading it there.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_create_fields(request: Any) -> tuple[dict[str, Any], bool]:
    """The create request's fields from multipart/form-data (what the SDK sends) or JSON, and whether they came
    as JSON (typed values, validated strictly) rather than a form (strings). Any other Content-Type is a 415
    before the body is read: a browser may send text/plain or a url-encoded form to a local server from any
    site without asking (no CORS preflight), JSON and multipart bodies only from pages the server trusts."""
    import asyncio

    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media not in ("application/json", "multipart/form-data"):
        shown = repr(media[:60]) if media else "none"
        raise ApiError(415, f"Content-Type {shown} is not accepted; send application/json or multipart/form-data.", param="Content-Type", code="unsupported_media_type")
    body = await read_body(request)
    if media == "multipart/form-data":
        return await asyncio.to_thread(parse_multipart, body, ctype), False  # off the event loop: /healthz keeps answering
    if not body.strip():
        raise ApiError(400, "The request body is empty; send JSON or multipart/form-data with at least 'prompt'.", code="invalid_body")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"The request body is not valid JSON: {err}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    return data, True


def parse_create(fields: dict[str, Any], strict: bool = False) -> VideoCreateRequest:
    """Fields -> request; `strict` for JSON bodies (no type coercion), lax for forms (all strings)."""
    check_text(fields)
    try:
        return VideoCreateRequest.model_validate(fields, strict=strict)
    except ValidationError as err:
        raise from_validation_error(err) from None


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
    return ApiError(416, f"Range {header[:60]!r} is outside the content ({size} bytes).", param="range", code="range_not_satisfiable",
                    headers={"Content-Range": f"bytes */{size}"})
