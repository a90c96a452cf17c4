"""The HTTP surface: OpenAI Videos API schemas, limit checks, and OpenAI-shaped errors.

Pure pydantic and dataclasses (no Ray, no torch), so it is unit-tested on its own. The ingress parses
a create request into `VideoCreateRequest` (requests.py: bodies, multipart, text checks), then `resolve()`
(resolve.py) checks it against the configured limits and the model's card (params.py: defaults, samplers, step
caches, LoRA adapters) and gives the `GenerationParams` a generator replica samples. This module renders jobs:
a new job's row (`new_job`), its public view (`video_object`), its result-cache key, and byte ranges of its
files. Errors are OpenAI's shape (errors.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

from .errors import ApiError, error_body, from_validation_error, invalid
from .params import GenerationParams, ModelCard, cli_sampling, model_card, params_from_doc, params_to_doc
from .requests import (
    IMAGE_FIELDS,
    MAX_BODY_BYTES,
    MAX_PART_HEADER_BYTES,
    MAX_PARTS,
    VideoCreateRequest,
    parse_create,
    parse_multipart,
    read_body,
    read_create_fields,
)
from .resolve import PREVIEW_SUFFIX, check_images, resolve, resolve_references

__all__ = [  # what callers name through `api` (parsing in requests.py, checks in resolve.py, errors in errors.py)
    "IMAGE_FIELDS",
    "PREVIEW_SUFFIX",
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
    "cli_sampling",
    "model_card",
    "params_from_doc",
    "params_to_doc",
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
