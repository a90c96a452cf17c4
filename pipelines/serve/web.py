"""The ingress's FastAPI application and what every route of it shares: errors in OpenAI's shape whatever raised
them (an ApiError, a validation error, an unknown route, an unexpected exception: never a bare 500 page), and the
per-route request, latency and error counters of this process's Prometheus registry (metrics.py). The routes
themselves are VideoAPI's methods (app.py), bound to `fastapi_app` through `serve.ingress`.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types.

import functools
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .dispatch import replica_id
from .errors import ApiError, error_body
from .metrics import ServeMetrics

logger = logging.getLogger("ray.serve")


@functools.cache
def serve_metrics() -> ServeMetrics:
    """This ingress process's Prometheus registry (one ingress replica per process)."""
    return ServeMetrics(replica_id())


fastapi_app = FastAPI(
    title="sora-ray video API",
    description="OpenAI Videos API compatible text-to-video service.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)  # served by VideoAPI, only while keys are off


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape, whatever raised them
# ---------------------------------------------------------------------------------------------


@fastapi_app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    # What the error counters label the answer with: the admission limit of a 429/503, else the error code.
    request.state.error_reason = getattr(err, "reason", None) or err.code or err.type
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    e = ApiError(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")
    request.state.error_reason = "invalid_value"
    return JSONResponse(e.body(), status_code=400)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    request.state.error_reason = code or f"http_{err.status_code}"
    message = (
        f"Unknown route {request.method} {request.url.path}." if err.status_code in (404, 405) else str(err.detail)
    )
    return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=err.status_code)


@fastapi_app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    request.state.error_reason = f"internal_{type(err).__name__}"
    return JSONResponse(
        error_body(f"Internal error: {type(err).__name__}.", "server_error", None, "internal_error"),
        status_code=500,
    )


@fastapi_app.middleware("http")
async def _count(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    try:
        m = serve_metrics()
        status = response.status_code
        m.requests.labels(route=route, status=str(status)).inc()
        m.request_seconds.labels(route=route).observe(time.perf_counter() - started)
        if status >= 400:
            m.errors.labels(status=str(status), reason=getattr(request.state, "error_reason", None) or "unknown").inc()
    except Exception:  # noqa: BLE001 - metrics must never fail a request
        logger.exception("metrics: could not count a request")
    return response
