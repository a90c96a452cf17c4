"""Create-request bodies: reading them (streamed, size-capped), multipart/form-data and JSON parsing, text checks, and
the `VideoCreateRequest` schema they validate into. No Ray, no torch: unit-tested on its own. `api.resolve` then checks
the parsed request against the limits and the model. Reference images (`input_reference`, `last_frame_reference`) are
read here too: their bytes (`reference_bytes`) and a full decode under format, byte and pixel limits (`open_image`)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError, from_validation_error, invalid

MAX_BODY_BYTES = 20 * 1024 * 1024
"""A create carries a prompt and at most two reference images; anything bigger is refused unread."""
IMAGE_FIELDS = ("input_reference", "last_frame_reference")
"""The first frame (OpenAI's field) and our extension, the last frame (first-last-frame models)."""
MAX_IMAGE_BYTES = 8 * 1024 * 1024
"""Bytes of one reference image (two fit the body limit, also as base64 data URLs)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Pixels of one reference image, checked from its header before any pixel is decoded (a decompression bomb: a few
KiB of PNG can declare gigapixels); a 12 MP phone photo fits, and decoding one costs at most ~64 MiB."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""What Pillow may identify a reference image as; other formats (TIFF, PSD, ...) are never parsed."""
MAX_TEXT_CHARS = 100_000
"""Hard cap on prompt strings before the configurable `limits.max_prompt_chars` check (a cheap first fence)."""
MAX_SHORT_CHARS = 64
"""model, size, sampler and string seconds: names and numbers, never long."""
FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Control characters (NUL above all: PostgreSQL text cannot hold it); tab and newlines stay allowed."""


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
    """An image file part; or `{"image_url": "data:image/...;base64,..."}` (the SDK's reference object) or that URL."""
    # Extensions (sent with the SDK's `extra_body=`).
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    lora: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    """A LoRA adapter by the name the server's config gives it (`loras:`); none: the base model."""
    last_frame_reference: Any = None
    """The clip's last frame, as `input_reference` is its first (first-last-frame models only)."""
    step_cache: str | None = Field(default=None, max_length=MAX_SHORT_CHARS)
    """Step caching (`teacache`, `fbcache`; `none` or unset: off, exact)."""
    cache_threshold: float | None = None
    """How much change a step cache tolerates before recomputing; unset: the method's default."""


MAX_PARTS = 64
"""Parts of one multipart body: a create has a dozen fields; more is a body built to be slow to parse (the
standard library's MIME parser took 115 s over 400k tiny parts under the 20 MiB limit on one core)."""
MAX_PART_HEADER_BYTES = 8 * 1024
"""Header block of one part (HTTP servers' usual cap): a part with millions of header lines is refused unread."""
FILE_FIELDS = IMAGE_FIELDS
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
        raise ApiError(
            400,
            "multipart/form-data request without a valid boundary (1 to 70 ASCII characters).",
            param="Content-Type",
            code="invalid_body",
        )
    charset = msg.get_param("charset")
    return boundary.encode("ascii"), text_charset(charset if isinstance(charset, str) else "utf-8", "Content-Type")


def split_part(piece: bytes) -> tuple[bytes, bytes]:
    """One multipart part, as cut between two delimiters -> its raw headers (bounded by MAX_PART_HEADER_BYTES) and
    its payload. Raises ApiError (400) when the delimiter line or the headers do not end, or the headers are too big."""
    _, eol, rest = piece.partition(b"\r\n")  # transport padding up to the delimiter line's end
    if not eol:
        raise ApiError(
            400,
            "The request body is not valid multipart/form-data (a delimiter line does not end).",
            param="body",
            code="invalid_body",
        )
    if rest.startswith(b"\r\n"):
        raw_headers, payload = b"", rest[2:]
    else:
        raw_headers, sep, payload = rest.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(
                400,
                "The request body is not valid multipart/form-data (a part's headers do not end).",
                param="body",
                code="invalid_body",
            )
    if len(raw_headers) > MAX_PART_HEADER_BYTES:
        raise ApiError(
            400,
            f"A multipart part has {len(raw_headers)} bytes of headers; the limit is {MAX_PART_HEADER_BYTES}.",
            param="body",
            code="part_headers_too_large",
        )
    return raw_headers, payload


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
        raise ApiError(
            400, f"The multipart body has more than {MAX_PARTS} parts (the limit).", param="body", code="too_many_parts"
        )
    pieces = body.split(delimiter)
    fields: dict[str, Any] = {}
    closed = False
    for piece in pieces[1:]:  # pieces[0] is the preamble
        if piece.startswith(b"--"):
            closed = True
            break
        raw_headers, payload = split_part(piece)
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
        raise ApiError(
            400,
            "The request body is not valid multipart/form-data (it has no closing delimiter).",
            param="body",
            code="invalid_body",
        )
    return fold_references(fields)


REFERENCE_KEY = re.compile(r"^([a-z_]+)\[([a-z_]+)\]$")
"""A reference object's key as the SDK flattens it into a form: `input_reference[image_url]`."""


def fold_references(fields: dict[str, Any]) -> dict[str, Any]:
    """`input_reference[image_url]=...` form fields back into `{"input_reference": {"image_url": ...}}`."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        m = REFERENCE_KEY.match(name)
        base = m.group(1) if m and m.group(1) in IMAGE_FIELDS else None
        if isinstance(out.get(base or name), dict) != (base is not None) and (base or name) in out:
            raise invalid(base or name, f"'{base or name}' is sent both as a value and as '{base or name}[...]'.")
        if base is not None:
            out.setdefault(base, {})[m.group(2)] = value
        else:
            out[name] = value
    return out


def text_charset(charset: str, param: str) -> str:
    """The codec name of a declared charset, if text fields may use it; else a 400 naming `param`."""
    import codecs

    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        name = ""
    if name not in TEXT_CHARSETS:
        raise invalid(
            param,
            f"'{param}' declares charset {charset[:40]!r}; text fields must be utf-8, us-ascii or iso-8859-1.",
            code="unsupported_charset",
        )
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
            raise invalid(
                str(name), f"'{name}' is not valid Unicode (it holds a lone surrogate).", code="invalid_encoding"
            ) from None
        if FORBIDDEN_CHARS.search(value):
            raise invalid(
                str(name),
                f"'{name}' contains control characters; only printable text, tabs and newlines are allowed.",
                code="invalid_encoding",
            )


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
            raise ApiError(
                413,
                f"The request body is over {limit} bytes (the limit); stopped reading it there.",
                code="request_too_large",
            )
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
        raise ApiError(
            415,
            f"Content-Type {shown} is not accepted; send application/json or multipart/form-data.",
            param="Content-Type",
            code="unsupported_media_type",
        )
    body = await read_body(request)
    if media == "multipart/form-data":
        return await asyncio.to_thread(
            parse_multipart, body, ctype
        ), False  # off the event loop: /healthz keeps answering
    if not body.strip():
        raise ApiError(
            400,
            "The request body is empty; send JSON or multipart/form-data with at least 'prompt'.",
            code="invalid_body",
        )
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


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------


def reference_bytes(value: Any, param: str) -> bytes | None:
    """The encoded image a reference field carries: a file part's bytes, or a base64 `data:` URL given bare or as
    `{"image_url": ...}`. Remote URLs are never fetched and file ids are not kept here: each a 400 naming the field,
    as is an empty or over-`MAX_IMAGE_BYTES` image."""
    if value is None:
        return None
    if isinstance(value, dict):
        if "file_id" in value:
            raise invalid(
                param,
                f"'{param}' by file_id is not supported; upload the image as a file part.",
                code="unsupported_parameter",
            )
        if set(value) != {"image_url"}:
            raise invalid(param, f"'{param}' as an object must hold only 'image_url' (a base64 data: URL).")
        value = value["image_url"]
    if isinstance(value, str):
        value = data_url_bytes(value, param)
    if not isinstance(value, bytes):
        raise invalid(
            param,
            f"'{param}' must be an image file part or a base64 data: URL, got {type(value).__name__}.",
            code="invalid_type",
        )
    if not value:
        raise invalid(param, f"'{param}' is empty; send a PNG, JPEG or WebP image.")
    if len(value) > MAX_IMAGE_BYTES:
        raise invalid(
            param,
            f"'{param}' has {len(value)} bytes; the limit is {MAX_IMAGE_BYTES} bytes per image.",
            code="image_too_large",
        )
    return value


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a `data:[media type];base64,...` URL; anything else a 400 naming the field."""
    head, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        shown = "a remote URL (the server fetches nothing)" if url.startswith(("http:", "https:")) else repr(url[:40])
        raise invalid(
            param,
            f"'{param}' must be an image file part or a base64 data: URL (data:image/png;base64,...), got {shown}.",
        )
    if len(payload) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:  # base64 of more than MAX_IMAGE_BYTES: not decoded at all
        raise invalid(
            param,
            f"'{param}' has over {MAX_IMAGE_BYTES} bytes; the limit is {MAX_IMAGE_BYTES} bytes per image.",
            code="image_too_large",
        )
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, f"'{param}' is a data: URL whose payload is not valid base64.") from None


def open_image(data: bytes, param: str) -> Any:  # -> PIL.Image.Image (RGB)
    """The image as RGB, decoded in full (its EXIF orientation applied, as diffusers' `load_image` does), or a 400
    naming the field: not PNG/JPEG/WebP, over `MAX_IMAGE_PIXELS` (read from the header, before decoding; Pillow's own
    DecompressionBombError too), or truncated or corrupt. Used by the ingress before admission, and by the generator."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    formats = "PNG, JPEG or WebP"  # IMAGE_FORMATS as people write them
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            pixels_check(im.size, param)
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise invalid(param, f"'{param}' is not a {formats} image.", code="invalid_image_format") from None
    except Image.DecompressionBombError:
        raise invalid(
            param, f"'{param}' declares more than {MAX_IMAGE_PIXELS} pixels (the limit).", code="image_too_large"
        ) from None
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, struct.error, ... on bad data: a 400
        detail = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise invalid(
            param, f"'{param}' cannot be decoded (truncated or corrupt {formats} data: {detail}).", code="invalid_image"
        ) from None


def pixels_check(size: tuple[int, int], param: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise invalid(
            param,
            f"'{param}' is {width}x{height} = {width * height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels.",
            code="image_too_large",
        )
