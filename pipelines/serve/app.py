"""The Serve application: a FastAPI ingress (OpenAI Videos API) bound to the generator deployment.

    sora serve --model runs/demo/export [--port 8000] [--config cluster/serve/local.yaml]
    SORA_MODEL=runs/demo/export serve run pipelines.serve.app:app
    serve run cluster/serve/local.yaml              # import_path: pipelines.serve.app:app_builder, args: {model: ...}
    serve deploy cluster/serve/local.yaml           # onto a running cluster (RAY_ADDRESS / KubeRay RayService)

then
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x").videos.create_and_poll(prompt="a red circle moving left")`.

Job flow: POST validates against the limits (global, then the caller's tier and key), writes a `queued`
row to the job database (db.py) and wakes this replica's dispatcher (dispatch.py). Every ingress
replica's dispatcher claims jobs from the database with leases (higher tiers first, at most
`queue.max_in_flight` each) and hands them to the generator deployment, retrying on a dead replica or
Serve backpressure. The generator moves the job through `in_progress` to `completed` and writes the clip
to the store (store.py, fsspec); everything a client sees is read back from the database, and downloads
stream from the store in chunks with HTTP Range support. Run any number of ingress replicas.

The routes are VideoAPI's methods here; the FastAPI app they are bound to, its OpenAI-shaped error handlers and its
request counters are web.py's.
"""

# No `from __future__ import annotations`: FastAPI must see the real parameter types through serve.ingress.

import asyncio
import logging
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from . import api, auth
from .admission import Admission
from .api import ApiError, ModelCard, params_to_doc, result_cache_key
from .config import (
    APP_NAME,
    GENERATOR_NAME,
    INGRESS_NAME,
    MODEL_ENV,
    RUNTIME_KEYS,
    STORE_ENV,
    ServeSettings,
    apply_user_config,
    load_settings,
    settings_to_dict,
)
from .db import JobDB
from .dispatch import Dispatcher, replica_id
from .files import FileServer, store_key
from .generator import Generator
from .schema import TERMINAL, new_token
from .store import CONTENT_SUFFIX, MEDIA_TYPE, ContentStore
from .streaming import StoreStream, StreamSlots
from .web import fastapi_app, serve_metrics

logger = logging.getLogger("ray.serve")
IMAGE_DECODES = 2
"""Reference images one ingress replica decodes at once (each up to ~64 MiB of pixels while it is checked)."""


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
    """HTTP in, jobs to the database, a dispatcher to the generator. Holds nothing a restart would lose:
    job state is in the database, clips in the store, leases lapse and are re-claimed (see dispatch.py)."""

    def __init__(self, generator: DeploymentHandle, settings: dict[str, Any]) -> None:
        from sora_model.config import from_dict

        self.base_settings = from_dict(ServeSettings, settings)
        self.settings = self.base_settings
        auth.refuse_open_replica(self.base_settings)  # serve run/deploy: beyond loopback without keys, no start
        self.generator = generator
        self.db = JobDB(self.settings.db_url)
        self.content = ContentStore(self.settings.store_uri, self.settings.storage_options)
        self.files = self._file_server()
        self.card: ModelCard | None = None
        self.identity: dict[str, Any] | None = None  # the generator's export digest, LoRA, precision
        self.metrics = serve_metrics()
        self.stats: Counter[str] = Counter()
        self.worker = f"{replica_id()}-{uuid.uuid4().hex[:8]}"
        path = self.settings.model
        self.model_created = int(os.path.getmtime(path)) if "://" not in path and os.path.exists(path) else 0
        self.dispatcher: Dispatcher | None = None
        self._loops: list[asyncio.Task] = []
        self._admission = asyncio.Lock()
        self._decodes = asyncio.Semaphore(IMAGE_DECODES)
        self.streams = StreamSlots()  # downloads streaming through Serve now (streaming.py)
        self.admission = Admission(self.db, self.metrics, self.stats, lambda: self.settings)

    def _file_server(self) -> FileServer | None:
        """A folder store's download server (files.py), or None (object stores presign; or turned off)."""
        if not self.content.local or self.settings.download_port is None:
            return None
        media = {CONTENT_SUFFIX[v]: MEDIA_TYPE[v] for v in CONTENT_SUFFIX}
        server = FileServer(
            self.content.content_dir,
            store_key(self.content.root),
            self.settings.download_port,
            media,
            self.settings.download_host,
        )
        return server if server.start() is not None else None

    # -- lifecycle --------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` (limits, tiers, api_keys, queue, ...) replaces those settings on the live replica."""
        settings = apply_user_config(self.base_settings, user_config, RUNTIME_KEYS)
        auth.check_exposure(settings, auth.serve_host())
        self.settings = settings
        if self.dispatcher is not None:
            self.dispatcher.wake()  # max_in_flight may have grown
        logger.info("reconfigured: %s", sorted((user_config or {}).keys()))

    async def check_health(self) -> None:
        self._ensure_started()
        await asyncio.to_thread(self.db.ping)
        await asyncio.to_thread(self.content.ping)
        for loop in self._loops:
            if loop.done():
                raise RuntimeError(f"job dispatcher stopped: {loop.exception()!r}")

    def _ensure_started(self) -> None:
        """Start the dispatcher on the replica's event loop (the constructor runs outside it)."""
        if self.dispatcher is None:
            self.dispatcher = Dispatcher(
                self.db, self.content, self.generator, lambda: self.settings, self.worker, self.stats, self.metrics
            )
            self._loops = self.dispatcher.start()

    async def _model_card(self) -> ModelCard:
        if self.card is None:
            self.card = ModelCard(
                **{
                    k: tuple(v) if isinstance(v, list) else v
                    for k, v in (await self.generator.describe.remote()).items()
                }
            )
        return self.card

    async def _identity(self) -> dict[str, Any]:
        if self.identity is None:
            self.identity = await self.generator.identity.remote()
        return self.identity

    # -- auth ---------------------------------------------------------------------------------------

    def _caller(self, request: Request) -> tuple[str, str]:
        """(tier, owner) of a request. Keys off: the default tier, owner "". Keys on: 401 unless a known key;
        the owner is the key's owner id (kept across key rotation), not the key."""
        return auth.authenticate(self.settings, request.headers.get("authorization", "")).tier_owner

    def _reader(self, request: Request) -> str | None:
        """Whose videos a request may read or delete: the caller's owner, or None (all) for an admin key."""
        return auth.authenticate(self.settings, request.headers.get("authorization", "")).scope

    async def _job_for(self, job_id: str, owner: str | None) -> dict[str, Any]:
        job = await asyncio.to_thread(self.db.get, job_id) if api.VIDEO_ID.match(job_id) else None
        if job is None or (owner is not None and job["_owner"] != owner):
            raise ApiError(404, f"Video '{job_id[:80]}' not found.", param="video_id", code="video_not_found")
        return job

    # -- endpoints ----------------------------------------------------------------------------------

    @fastapi_app.post("/v1/videos")
    async def create_video(self, request: Request) -> JSONResponse:
        self._ensure_started()
        tier_name, owner = self._caller(request)
        tier = self.settings.tiers[tier_name]
        self.stats["create_requests"] += 1
        fields, is_json = await api.read_create_fields(request)
        req = api.parse_create(fields, strict=is_json)
        card = await self._model_card()
        refs = api.resolve_references(req, card)  # the model takes them, within the byte limit
        params = api.resolve(
            req, card, self.settings, tier, random_seed=random.SystemRandom().randrange(2**31), references=refs
        )
        if refs:  # decoded in full before admission: a bad image is a 400 naming its field, never a failed job
            async with self._decodes:
                await asyncio.to_thread(api.check_images, refs)
        # Result cache: a repeated (prompt, parameters, seed) request of this owner is answered from a stored clip.
        use_cache = self.settings.result_cache and req.seed is not None
        cache_key = result_cache_key(params, owner, await self._identity()) if use_cache else None
        job = api.new_job(params)
        # Reference images go to the store before the row exists (a claimed job finds them), and away again
        # unless the row is inserted (a cache hit, a refusal, a failed insert).
        inserted = False
        try:
            for name, data in refs.items():
                await asyncio.to_thread(self.content.put_input, data, job["id"], name)
            answer = await self._admit(job, params, tier_name, tier, owner, cache_key)
            inserted = answer is None
        finally:
            if refs and not inserted:
                await asyncio.to_thread(self.content.remove_inputs, job["id"], tuple(refs))
        if answer is not None:
            return answer
        self.dispatcher.wake()
        return JSONResponse(api.video_object(job))

    async def _admit(
        self,
        job: dict[str, Any],
        params: api.GenerationParams,
        tier_name: str,
        tier: Any,
        owner: str,
        cache_key: str | None,
    ) -> JSONResponse | None:
        """Admit a new job and insert its row (None), or answer from the result cache; 429/503 past a limit."""
        deadline = None if tier.job_deadline_s is None else job["_created_ns"] + int(tier.job_deadline_s * 1e9)
        # Admission comes first, cache hit or not: a hit costs tiers.*.cache_hit_weight of the hourly quota.
        # Count and insert under one lock, so a burst on this replica cannot all pass the same count.
        # Replicas admit independently: together they can overshoot a limit by at most one job each.
        async with self._admission:
            await asyncio.to_thread(
                self.admission.check_quota, tier_name, tier, owner, tier.cache_hit_weight if cache_key else 1.0
            )
            if cache_key:
                cached = await asyncio.to_thread(self._from_cache, cache_key, params, owner, tier.cache_hit_weight)
                if cached is not None:
                    self.metrics.cache_hits.labels(cache="result").inc()
                    self.stats["result_cache_hits"] += 1
                    return JSONResponse(api.video_object(cached))
                self.metrics.cache_misses.labels(cache="result").inc()
            await asyncio.to_thread(self.admission.admit, tier_name, tier, owner)
            await asyncio.to_thread(self.db.insert, job, owner, tier_name, tier.priority, deadline, cache_key, 1.0)
        return None

    @fastapi_app.get("/v1/videos")
    async def list_videos(
        self, request: Request, limit: int = 20, after: str | None = None, order: str = "desc"
    ) -> JSONResponse:
        owner = self._reader(request)
        try:
            q = api.ListQuery(limit=limit, after=after, order=order)
        except ValidationError as err:
            raise api.from_validation_error(err) from None
        if q.after is not None and not api.VIDEO_ID.match(q.after):
            raise api.invalid("after", f"'after' must be a video id (video_ + 32 hex digits), got {q.after[:80]!r}.")
        jobs, has_more = await asyncio.to_thread(self.db.list, owner, q.limit, q.after, q.order)
        data = [api.video_object(j) for j in jobs]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    @fastapi_app.get("/v1/videos/{video_id}")
    async def retrieve_video(self, video_id: str, request: Request) -> JSONResponse:
        owner = self._reader(request)
        job = await self._job_for(video_id, owner)
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
        """The clip: a 307 to a presigned URL on object stores that sign; else streamed from the store a chunk at
        a time, where `Range: bytes=...` answers 206 with that part."""
        owner = self._reader(request)
        if variant not in api.VIDEO_VARIANTS:
            raise api.invalid(
                "variant", f"'variant' must be one of {', '.join(api.VIDEO_VARIANTS)}, got {variant[:40]!r}."
            )
        job = await self._job_for(video_id, owner)
        if job["status"] != "completed":
            raise ApiError(
                409,
                f"Video '{video_id}' is {job['status']}; its content is available once it is completed.",
                param="video_id",
                code="video_not_ready",
            )
        ref = job["_content_ref"]
        if ref and self.settings.download_redirect_s is not None:
            signed = await asyncio.to_thread(
                self.content.sign, video_id, ref, variant, self.settings.download_redirect_s
            )
            if signed is None and self.files is not None:  # a folder: this machine's file server plays the object store
                name = os.path.basename(self.content.path(video_id, ref, variant))
                signed = await asyncio.to_thread(
                    self.files.url, request.url.scheme, request.url.hostname, name, self.settings.download_redirect_s
                )
            if signed is not None:  # the object store (or the file server) serves the bytes and Range itself
                return RedirectResponse(signed, status_code=307, headers={"Cache-Control": "private, no-store"})
        size = await asyncio.to_thread(self.content.size, video_id, ref, variant) if ref else None
        if size is None:
            raise ApiError(
                404,
                f"Content of video '{video_id}' is missing from the store.",
                param="video_id",
                code="content_not_found",
            )
        span = api.parse_range(request.headers.get("range"), size)
        start, end = span or (0, size - 1)
        headers = {
            "Content-Length": str(end - start + 1),
            "Accept-Ranges": "bytes",
            "ETag": f'"{ref}"',
            "Content-Disposition": f'attachment; filename="{video_id}{CONTENT_SUFFIX[variant]}"',
        }
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        slot = self.streams.acquire(self.settings.max_streaming_downloads)  # 503 + Retry-After past the bound
        body = StoreStream(self.content, (video_id, ref, variant), start, end - start + 1, slot)
        return StreamingResponse(
            body, status_code=206 if span else 200, media_type=MEDIA_TYPE[variant], headers=headers
        )

    @fastapi_app.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str, request: Request) -> JSONResponse:
        owner = self._reader(request)
        await self._job_for(video_id, owner)
        # Expire-and-fence the row, remove the files, then the row: a crash between leaves an expired row
        # whose files and row the expiry sweep (dispatch.py) removes, never files without a row.
        found, ref = await asyncio.to_thread(self.db.mark_deleted, video_id, owner)
        if not found:
            raise ApiError(404, f"Video '{video_id[:80]}' not found.", param="video_id", code="video_not_found")
        await asyncio.to_thread(self.content.remove, video_id, ref)
        await asyncio.to_thread(self.content.remove_inputs, video_id, api.IMAGE_FIELDS)
        await asyncio.to_thread(self.db.purge, [video_id])
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self._caller(request)
        name = self.settings.model_name
        loras = sorted(self.settings.loras)  # our extension: the adapters a request may name in `lora`
        data = [
            {"id": m, "object": "model", "created": self.model_created, "owned_by": "sora-ray", "loras": loras}
            for m in (name, name + api.PREVIEW_SUFFIX)
        ]
        return JSONResponse({"object": "list", "data": data})

    @fastapi_app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        self._ensure_started()
        try:
            generator = await asyncio.wait_for(self.generator.get_stats.remote(), timeout=5)
        except Exception as err:  # noqa: BLE001 - report, do not fail: the ingress itself is up
            generator = {"error": f"{type(err).__name__}: {err}"}
        pending = await asyncio.to_thread(self.db.count_unfinished)
        d = self.dispatcher
        return JSONResponse(
            {
                "status": "ok",
                "model": self.settings.model_name,
                "api_keys": bool(self.settings.keys),
                "pid": os.getpid(),
                "worker": self.worker,
                "db": self.db.dialect,
                "limits": asdict(self.settings.limits),
                "queue": {
                    "pending": pending,
                    "in_flight": len(d.held),
                    "max_pending_jobs": self.settings.queue.max_pending_jobs,
                },
                "stats": {
                    **self.stats,
                    "pipeline_calls": len(d.batch_ids),
                    "batch_sizes": {str(k): v for k, v in sorted(d.batch_sizes.items())},
                },
                "generator": generator,
            }
        )

    @fastapi_app.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        """The schema, only while API keys are off (a local server); with keys it is a 404 like any unknown route."""
        auth.docs_allowed(self.settings)
        return JSONResponse(fastapi_app.openapi())

    @fastapi_app.get("/docs", include_in_schema=False)
    async def docs(self) -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        auth.docs_allowed(self.settings)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=fastapi_app.title)

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text format (metrics.py); with API keys on, scrape with `authorization: Bearer KEY`."""
        self._caller(request)
        self._ensure_started()
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    # -- jobs ---------------------------------------------------------------------------------------

    def _from_cache(self, key: str, params: api.GenerationParams, owner: str, weight: float) -> dict[str, Any] | None:
        """A completed job of this owner with the same key: its clip copied (server-side on object stores) into
        a new completed job, `weight` written to the usage ledger. None when there is none, or its files are gone."""
        source = self.db.cache_lookup(key, owner)
        if source is None or source.get("_params") != params_to_doc(params) or source["_owner"] != owner:
            return None
        job = api.new_job(params)
        ref = new_token()
        if not self.content.copy((source["id"], source["_content_ref"]), (job["id"], ref)):
            return None
        now = int(time.time())
        retention = self.settings.retention_s
        job.update(
            status="completed",
            progress=100,
            completed_at=now,
            expires_at=None if retention is None else now + int(retention),
            _content_ref=ref,
        )
        self.db.insert(job, owner, "cache", 0, None, key, weight, "cache_hit")
        return job


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
"""`serve run pipelines.serve.app:app` with SORA_MODEL=EXPORT_DIR (and optionally SORA_SERVE_STORE; SORA_SERVE_DB is
read by every replica)."""

__all__ = ["APP_NAME", "Generator", "VideoAPI", "app", "app_builder", "build_app"]
