"""OpenAI-shaped errors of the HTTP surface: `{"error": {"message", "type", "param", "code"}}`, the shape the
`openai` SDK parses into `openai.BadRequestError` and friends. Pure Python and pydantic, imported by every serve
module that answers."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


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
        return ApiError(
            400, f"'{param}' is too long: {first['msg'].lower()}.", param=param, code="string_above_max_length"
        )
    return ApiError(
        400, f"Invalid type for '{param}': {first['msg'].lower()}, got {shown}.", param=param, code="invalid_type"
    )
