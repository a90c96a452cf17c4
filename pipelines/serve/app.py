"""The Serve application: a FastAPI ingress (OpenAI Videos API) bound to the generator deployment.

    sora serve --model runs/demo/export [--port 8000] [--config cluster/serve/local.yaml]
    SORA_MODEL=runs/demo/export serve run pipelines.serve.app:app
    serve run cluster/serve/local.yaml              # import_path: pipelines.serve.app:app_builder, args: {model: ...}
    serve deploy cluster/serve/local.yaml           # onto a running cluster (RAY_ADDRESS / KubeRay RayService)

then `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x").videos.create_and_poll(prompt="a red circle moving left")`.

Job flow: POST validates against the limits (global, then the caller's tier), writes a `queued` job to
the store and puts it in this replica's bounded priority queue; a dispatcher hands jobs to the
generator deployment (at most `queue.max_in_flight` at once, higher tiers first), retrying on a dead
replica or Serve backpressure. The generator moves the job through `in_progress` to `completed` and
writes the clip; everything a client sees is read back from the store.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types through serve.ingress.

import asyncio
import hmac
import itertools
import logging
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import api
from .api import ApiError, ModelCard
from .config import (
    APP_NAME,
    GENERATOR_NAME,
    INGRESS_NAME,
    MODEL_ENV,
    RUNTIME_KEYS,
    STORE_ENV,
    ServeSettings,
    apply_user_config,
    hash_key,
    load_settings,
    settings_to_dict,
)
from .generator import Generator
from .metrics import ingress_metrics
from .store import TERMINAL, JobStore

logger = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
"""Waits between tries when the generator pushes back or a replica died (then the last one, repeated)."""
OVERLOADED_CODE = "server_overloaded"

fastapi_app = FastAPI(title="sora-ray video API", description="OpenAI Videos API compatible text-to-video service.")


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape, whatever raised them
# ---------------------------------------------------------------------------------------------


@fastapi_app.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    param = str(first["loc"][-1]) if first.get("loc") else None
    e = ApiError(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")
    return JSONResponse(e.body(), status_code=400)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    message = f"Unknown route {request.method} {request.url.path}." if err.status_code in (404, 405) else str(err.detail)
    return JSONResponse(api.error_body(message, "invalid_request_error", None, code), status_code=err.status_code)


@fastapi_app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(api.error_body(f"Internal error: {type(err).__name__}.", "server_error", None, "internal_error"), status_code=500)


@fastapi_app.middleware("http")
async def _count(request: Request, call_next):
    started = time.perf_counter()
    response = await call_next(request)
    route = getattr(request.scope.get("route"), "path", "unmatched")
    try:
        m = ingress_metrics()
        m["requests"].inc(tags={"route": route, "status": str(response.status_code)})
        m["latency"].observe(time.perf_counter() - started, tags={"route": route})
    except Exception:  # noqa: BLE001 - metrics must never fail a request
        pass
    return response


# ---------------------------------------------------------------------------------------------
# The ingress deployment
# ---------------------------------------------------------------------------------------------


@serve.deployment(
    name=INGRESS_NAME,
    num_replicas=1,
    max_ongoing_requests=200,
    max_queued_requests=400,
    backpressure_config={"status_code": 503, "retry_after_s": 5},
    ray_actor_options={"num_cpus": 0},
    health_check_period_s=10,
)
@serve.ingress(fastapi_app)
class VideoAPI:
    """HTTP in, jobs to the store and the generator. Holds no state a restart would lose (see store.py)."""

    def __init__(self, generator: DeploymentHandle, settings: dict[str, Any]) -> None:
        from sora_model.config import from_dict

        self.base_settings = from_dict(ServeSettings, settings)
        self.settings = self.base_settings
        self.generator = generator
        self.store = JobStore(self.settings.store_uri)
        self.card: ModelCard | None = None
        self.stats: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_ids: set[str] = set()
        self._queue: asyncio.PriorityQueue | None = None
        self._seq = itertools.count()
        self._pending: dict[str, str] = {}  # job id -> tier, accepted and not finished
        self._in_flight = 0
        self._slot_freed: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._ready: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` (limits, tiers, api_keys, queue, ...) replaces those settings on the live replica."""
        self.settings = apply_user_config(self.base_settings, user_config, RUNTIME_KEYS)
        if self._slot_freed is not None:
            self._slot_freed.set()  # max_in_flight may have grown
        logger.info("reconfigured: %s", sorted((user_config or {}).keys()))

    async def check_health(self) -> None:
        await self._ensure_started()
        await asyncio.to_thread(self.store.ping)
        if self._dispatcher is not None and self._dispatcher.done():
            raise RuntimeError(f"job dispatcher stopped: {self._dispatcher.exception()!r}")

    async def _ensure_started(self) -> None:
        """Start the dispatcher on the replica's event loop and re-queue jobs a previous replica accepted.

        Every endpoint awaits this, so no create is admitted before the re-queueing is done (which would
        otherwise see the new job in the store as unfinished and queue it twice)."""
        if self._ready is None:
            self._ready = asyncio.Event()
            self._queue = asyncio.PriorityQueue()
            self._slot_freed = asyncio.Event()
            for job in await asyncio.to_thread(self.store.unfinished):
                logger.info("re-queueing %s (%s) found in the store", job["id"], job["status"])
                self._pending[job["id"]] = job.get("_tier", self.settings.default_tier)
                self._enqueue(job)
            self._dispatcher = asyncio.create_task(self._dispatch_loop())
            self._ready.set()
        await self._ready.wait()

    async def _model_card(self) -> ModelCard:
        if self.card is None:
            self.card = ModelCard(**{k: tuple(v) if isinstance(v, list) else v for k, v in (await self.generator.describe.remote()).items()})
        return self.card

    # -- auth ---------------------------------------------------------------------------------------

    def _caller(self, request: Request) -> tuple[str, str | None]:
        """(tier, owner) of a request. Keys off: the default tier, no owner. Keys on: 401 unless a known key."""
        keys = self.settings.api_keys
        if not keys:
            return self.settings.default_tier, None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key", type="invalid_request_error")
        digest = hash_key(key.strip())
        for known, tier in keys.items():
            if hmac.compare_digest(known, digest):
                return tier, digest[:16]
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", type="invalid_request_error")

    def _job_for(self, job_id: str, owner: str | None) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None or job.get("_owner") != owner:
            raise ApiError(404, f"Video '{job_id}' not found.", param="video_id", code="video_not_found")
        return job

    # -- endpoints ----------------------------------------------------------------------------------

    @fastapi_app.post("/v1/videos")
    async def create_video(self, request: Request) -> JSONResponse:
        await self._ensure_started()
        tier_name, owner = self._caller(request)
        tier = self.settings.tiers[tier_name]
        self.stats["create_requests"] += 1
        fields, is_json = await api.read_create_fields(request)
        req = api.parse_create(fields, strict=is_json)
        params = api.resolve(req, await self._model_card(), self.settings, tier, random_seed=random.SystemRandom().randrange(2**31))
        # Result cache: a repeated (prompt, parameters, seed) request is answered from the store.
        cache_key = params.cache_key() if req.seed is not None else None
        if self.settings.result_cache and cache_key:
            cached = await asyncio.to_thread(self._from_cache, cache_key, params, owner)
            if cached is not None:
                ingress_metrics()["cache_hits"].inc(tags={"cache": "result"})
                self.stats["result_cache_hits"] += 1
                return JSONResponse(api.video_object(cached))
        # Admission: the replica's bounded queue, then the tier's share of it.
        q = self.settings.queue
        retry = {"Retry-After": str(q.retry_after_s)}
        if len(self._pending) >= q.max_pending_jobs:
            ingress_metrics()["rejected"].inc(tags={"reason": "queue_full"})
            self.stats["rejected"] += 1
            raise ApiError(503, f"The server is at capacity ({q.max_pending_jobs} jobs waiting, queue.max_pending_jobs); retry after {q.retry_after_s}s.", code=OVERLOADED_CODE, headers=retry)
        tier_pending = sum(1 for t in self._pending.values() if t == tier_name)
        if tier.max_pending_jobs is not None and tier_pending >= tier.max_pending_jobs:
            ingress_metrics()["rejected"].inc(tags={"reason": "tier_limit"})
            self.stats["rejected"] += 1
            raise ApiError(429, f"Tier '{tier_name}' already has {tier_pending} jobs waiting (tiers.{tier_name}.max_pending_jobs); retry after {q.retry_after_s}s.", code="rate_limit_exceeded", headers=retry)
        job = self._new_job(params, owner, tier_name, tier.priority, cache_key)
        self._pending[job["id"]] = tier_name  # hold the slot now: concurrent creates check it while this one writes
        try:
            await asyncio.to_thread(self.store.put, job)
        except BaseException:
            self._pending.pop(job["id"], None)
            raise
        self._enqueue(job)
        return JSONResponse(api.video_object(job))

    @fastapi_app.get("/v1/videos")
    async def list_videos(self, request: Request, limit: int = 20, after: str | None = None, order: str = "desc") -> JSONResponse:
        _, owner = self._caller(request)
        try:
            q = api.ListQuery(limit=limit, after=after, order=order)
        except ValidationError as err:
            raise api.from_validation_error(err) from None
        jobs, has_more = await asyncio.to_thread(self.store.list, q.limit, q.after, q.order, owner)
        data = [api.video_object(j) for j in jobs]
        return JSONResponse({
            "object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        })

    @fastapi_app.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str, request: Request) -> JSONResponse:
        _, owner = self._caller(request)
        job = self._job_for(video_id, owner)
        headers = {} if job["status"] in TERMINAL else {"openai-poll-after-ms": str(self._poll_after_ms(job))}
        return JSONResponse(api.video_object(job), headers=headers)

    def _poll_after_ms(self, job: dict[str, Any]) -> int:
        """When to poll an unfinished job again: the time left once the generator has estimated it
        (`_eta_ns`, from its pace so far); before that, as long as the job has already waited in its
        current state (a backoff: a job that just started or was just queued is looked at again soon,
        one waiting its turn behind others ever less often). Within [min_poll_after_ms, poll_after_ms]."""
        q = self.settings.queue
        now_ns = time.time_ns()
        if job["status"] == "in_progress" and job.get("_eta_ns") is not None:
            wait_ms = (job["_eta_ns"] - now_ns) / 1e6
        else:
            since_ns = job.get("_started_ns") if job["status"] == "in_progress" else None
            wait_ms = (now_ns - (since_ns or job.get("_created_ns", now_ns))) / 1e6
        return int(min(max(wait_ms, q.min_poll_after_ms), q.poll_after_ms))

    @fastapi_app.get("/v1/videos/{video_id}/content")
    async def download_video(self, video_id: str, request: Request, variant: str = "video") -> Response:
        _, owner = self._caller(request)
        if variant not in api.VIDEO_VARIANTS:
            raise api.invalid("variant", f"'variant' must be one of {', '.join(api.VIDEO_VARIANTS)}, got {variant!r}.")
        job = self._job_for(video_id, owner)
        if job["status"] != "completed":
            raise ApiError(409, f"Video '{video_id}' is {job['status']}; its content is available once it is completed.", param="video_id", code="video_not_ready")
        data = await asyncio.to_thread(self.store.get_content, video_id, variant)
        if data is None:
            raise ApiError(404, f"Content of video '{video_id}' is missing from the store.", param="video_id", code="content_not_found")
        media = "video/mp4" if variant == "video" else "image/png"
        return Response(content=data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{video_id}{".mp4" if variant == "video" else ".png"}"'})

    @fastapi_app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str, request: Request) -> JSONResponse:
        _, owner = self._caller(request)
        self._job_for(video_id, owner)
        await asyncio.to_thread(self.store.delete, video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._caller(request)
        name = self.settings.model_name
        created = int(os.path.getmtime(self.settings.model)) if os.path.exists(self.settings.model) else 0
        data = [{"id": m, "object": "model", "created": created, "owned_by": "sora-ray"} for m in (name, name + api.PREVIEW_SUFFIX)]
        return JSONResponse({"object": "list", "data": data})

    @fastapi_app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        await self._ensure_started()
        try:
            generator = await asyncio.wait_for(self.generator.get_stats.remote(), timeout=5)
        except Exception as err:  # noqa: BLE001 - report, do not fail: the ingress itself is up
            generator = {"error": f"{type(err).__name__}: {err}"}
        return JSONResponse({
            "status": "ok",
            "model": self.settings.model_name,
            "api_keys": bool(self.settings.api_keys),
            "pid": os.getpid(),
            "limits": asdict(self.settings.limits),
            "queue": {"pending": len(self._pending), "in_flight": self._in_flight, "max_pending_jobs": self.settings.queue.max_pending_jobs},
            "stats": {
                **self.stats,
                "pipeline_calls": len(self.batch_ids),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            },
            "generator": generator,
        })

    # -- jobs ---------------------------------------------------------------------------------------

    def _new_job(self, params: api.GenerationParams, owner: str | None, tier: str, priority: int, cache_key: str | None) -> dict[str, Any]:
        now_ns = time.time_ns()
        return {
            "id": f"video_{uuid.uuid4().hex}",
            "object": "video",
            "model": params.model,
            "status": "queued",
            "progress": 0,
            "created_at": now_ns // 10**9,
            "completed_at": None,
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
            "_created_ns": now_ns,
            "_owner": owner,
            "_tier": tier,
            "_priority": priority,
            "_cache_key": cache_key,
            "_params": asdict(params),
        }

    def _from_cache(self, key: str, params: api.GenerationParams, owner: str | None) -> dict[str, Any] | None:
        source_id = self.store.cache_get(key)
        source = self.store.get(source_id) if source_id else None
        if source is None or source.get("status") != "completed" or source.get("_params") != asdict(params):
            return None
        video, thumb = self.store.get_content(source_id, "video"), self.store.get_content(source_id, "thumbnail")
        if video is None or thumb is None:
            return None
        job = self._new_job(params, owner, "cache", 0, key)
        job.update(status="completed", progress=100, completed_at=int(time.time()), _cached_from=source_id)
        self.store.put_content(job["id"], "video", video)
        self.store.put_content(job["id"], "thumbnail", thumb)
        self.store.put(job)
        return job

    def _enqueue(self, job: dict[str, Any]) -> None:
        self._queue.put_nowait((-int(job.get("_priority", 0)), next(self._seq), job["id"]))
        self._update_depth()

    def _update_depth(self) -> None:
        m = ingress_metrics()["queue_depth"]
        m.set(len(self._pending) - self._in_flight, tags={"state": "waiting"})
        m.set(self._in_flight, tags={"state": "running"})

    async def _dispatch_loop(self) -> None:
        while True:
            _, _, job_id = await self._queue.get()
            while self._in_flight >= self.settings.queue.max_in_flight:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self._in_flight += 1
            self._update_depth()
            task = asyncio.create_task(self._run_job(job_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job_id: str) -> None:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        started = time.perf_counter()
        status = "failed"
        try:
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is None or job["status"] in TERMINAL:  # deleted while waiting, or finished by another replica
                return
            # Nothing else waits here: the generator need not hold this job for company (batch wait).
            alone = self._queue.empty() and self._in_flight == 1
            item = {"id": job_id, "params": job["_params"], "alone": alone}
            attempts, waits = 0, 0
            while True:
                try:
                    result = await self.generator.generate.remote(item)
                    break
                except BackPressureError:
                    self.stats["generator_backpressure"] += 1  # the job keeps its place; it was accepted
                except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as err:
                    attempts += 1
                    self.stats["generator_retries"] += 1
                    logger.warning("generator replica lost under %s (try %d): %s", job_id, attempts, type(err).__name__)
                    if attempts >= self.settings.queue.max_attempts:
                        await asyncio.to_thread(self._mark_failed, job_id, f"generation failed after {attempts} tries: the generator replica died ({type(err).__name__})", "replica_failed")
                        return
                await asyncio.sleep(RETRY_BACKOFF_S[min(waits, len(RETRY_BACKOFF_S) - 1)])
                waits += 1
            if result.get("ok"):
                status = "completed"
                self.stats["completed"] += 1
                if not result.get("skipped"):
                    self.batch_ids.add(result["batch_id"])
                    if len(self.batch_ids) > 100_000:
                        self.batch_ids.clear()
                    self.batch_sizes[result["batch_size"]] += 1
            else:
                self.stats["failed"] += 1
        except Exception as err:  # noqa: BLE001 - one job's failure never stops the dispatcher
            logger.exception("job %s failed", job_id)
            self.stats["failed"] += 1
            await asyncio.to_thread(self._mark_failed, job_id, f"generation failed: {type(err).__name__}", "generation_failed")
        finally:
            self._pending.pop(job_id, None)
            self._in_flight -= 1
            self._slot_freed.set()
            self._update_depth()
            ingress_metrics()["job_latency"].observe(time.perf_counter() - started, tags={"status": status})

    def _mark_failed(self, job_id: str, message: str, code: str) -> None:
        self.store.update(job_id, status="failed", error={"code": code, "message": message}, completed_at=int(time.time()))


# ---------------------------------------------------------------------------------------------
# Building the application
# ---------------------------------------------------------------------------------------------


def build_app(settings: ServeSettings, deployments: dict[str, dict[str, Any]] | None = None) -> Any:
    """The bound application; `deployments` overrides per-deployment options (as a Serve config's
    `deployments:` list does): {"Generator": {"autoscaling_config": ..., "user_config": ...}, "VideoAPI": {...}}."""
    deployments = dict(deployments or {})
    unknown = sorted(set(deployments) - {INGRESS_NAME, GENERATOR_NAME})
    if unknown:
        raise ValueError(f"unknown deployment '{unknown[0]}'; this application has {INGRESS_NAME} and {GENERATOR_NAME}")
    raw = settings_to_dict(settings)
    generator = Generator.options(**deployments.get(GENERATOR_NAME, {})).bind(raw)
    return VideoAPI.options(**deployments.get(INGRESS_NAME, {})).bind(generator, raw)


def app_builder(args: dict[str, Any]) -> Any:
    """Application builder for `serve run`/`serve deploy` configs and RayService: `args` are ServeSettings."""
    return build_app(load_settings(args))


def _settings_from_env() -> ServeSettings:
    args: dict[str, Any] = {"model": os.environ.get(MODEL_ENV, "")}
    if os.environ.get(STORE_ENV):
        args["store"] = os.environ[STORE_ENV]
    return load_settings(args) if args["model"] else ServeSettings(model="")


app = build_app(_settings_from_env())
"""`serve run pipelines.serve.app:app` with SORA_MODEL=EXPORT_DIR (and optionally SORA_SERVE_STORE)."""

__all__ = ["APP_NAME", "Generator", "VideoAPI", "app", "app_builder", "build_app"]
