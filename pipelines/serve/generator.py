"""The generator deployment: one `TextToVideoPipeline` per replica, dynamic batching, results to the store.

Each call carries one leased job (jobs.LeasedJob: its id, lease token, parsed GenerationParams, deadline; see
dispatch.py) and answers a jobs.JobOutcome; `@serve.batch` collects concurrent calls and the batch is split by shape
(frames, size, steps, sampler, negative prompt or not, LoRA adapter, step cache, reference images: image-to-video
conditions a whole call on one first/last frame, read from the store by digest). Each group is one pipeline call:
prompts, seeds and guidance scales stay per request (the pipeline gives every prompt its own noise, so a clip is the
same batched or alone). The replica moves the job to `in_progress`, reports progress while sampling, and hands each
clip back to its own call, which writes the MP4 and thumbnail to the store and marks the job `completed` (finish.py;
where each call's time went is timing.py's). That last part runs outside the batch: the next batch starts sampling
while the previous one's clips are encoded and uploaded, and the clips of one batch are encoded side by side rather
than one after another. A group's LoRA adapter (the
config's `loras:`) is applied unmerged for its call only (`sora_model.adapters`: resident in an LRU bounded by
`lora_cache_bytes`).

Every write names the job's lease token (db.py): starting a job counts a run and beats its heartbeat, each
progress write beats it again, encoding and each stored file too, and the completion only lands while the
token still holds. A job whose lease was given up (this replica stalled, or was thought dead) is dropped, its
files removed; a call whose jobs are all lost or past their deadline stops sampling at the next step. A batch
that makes no step for HUNG_FACTOR x `queue.stall_timeout_s` fails the replica's health check, so Serve
replaces a hung replica (its jobs were already retried elsewhere, see dispatch.py).

What a job cost (queue wait, text encode, each step, decode, encode + upload) and the text cache's hits go
back to the ingress with its result (metrics.JobReport), which turns them into Prometheus series.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ray import serve

from pipelines.parallel.replica import ParallelRanks

from .config import GENERATOR_NAME, MODEL_ENV, ServeSettings, apply_user_config
from .db import JobDB
from .finish import REFERENCE_ARGS, SAMPLING_SHARE, ClipFinisher, SampledClip
from .identity import model_identity
from .jobs import JobOutcome, LeasedJob
from .metrics import JobReport
from .params import GenerationParams, model_card
from .requests import open_image
from .store import ContentStore
from .timing import CallTimer, time_parts

logger = logging.getLogger("ray.serve")
PROGRESS_WRITE_INTERVAL_S = 0.25
"""Progress is written to the store at most this often: enough for a poller, cheap for an object store."""
HUNG_FACTOR = 3
"""A batch with no sampling step for this many stall timeouts fails the health check: the replica is replaced."""
STALL_ENV = "SORA_SERVE_TEST_STALL_S"
"""Tests only: a job on its first attempt sleeps this many seconds in its last sampling step (a hung generator)."""


class StopSampling(Exception):
    """Raised from the progress callback: every job of the call lost its lease or passed its deadline."""


def replica_memory_bytes() -> int:
    """Memory this replica may use: its Ray `memory` request, else its cgroup's limit, else the machine's."""
    from sora_model.text import machine_memory_bytes

    machine = machine_memory_bytes()
    try:
        import ray

        requested = ray.get_runtime_context().get_assigned_resources().get("memory")
        if requested:
            return int(requested)
    except Exception:  # noqa: BLE001 - outside Ray: no request
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < machine:
            return int(text)
    return machine


@serve.deployment(
    name=GENERATOR_NAME,
    max_ongoing_requests=8,
    max_queued_requests=32,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 4,
        "upscale_delay_s": 10,
        "downscale_delay_s": 120,
    },
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=60,
)
class Generator:
    """Loads the export once; samples batches of same-shape requests."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = _from_dict(settings)
        if not self.settings.model:
            raise ValueError(f"no export to serve: set {MODEL_ENV}=EXPORT_DIR or give the application's args a 'model'")
        started = time.perf_counter()
        device = self._load_pipeline()
        lora_errors = self._load_adapters()
        # What the result cache keys on besides the request (api.result_cache_key): computed once, here.
        self.ident = model_identity(self.settings, [n for n in self.settings.loras if n not in lora_errors])
        cache = self.pipe.text_encoder.cache
        budget = self.settings.text_cache_bytes
        cache.set_max_bytes(
            budget if budget is not None else int(replica_memory_bytes() * self.settings.text_cache_memory_fraction)
        )
        self._timer = threading.local()
        time_parts(self.pipe, self._timer)
        self._busy_since: float | None = None  # monotonic time of the running batch's last step; None when idle
        self._stall_s = float(os.environ.get(STALL_ENV) or 0)
        self.db = JobDB(self.settings.db_url)
        self.content = ContentStore(self.settings.store_uri, self.settings.storage_options)
        self.replica = _replica_id()
        self.load_s = time.perf_counter() - started
        self.stats: Counter[str] = Counter()
        self.finisher = ClipFinisher(self.db, self.content, self.replica, self.stats)
        self.batch_sizes: Counter[int] = Counter()
        self._fatal: str | None = None
        self._idle: asyncio.Event | None = None  # set while no batch is sampling; made on the replica's loop
        self._apply_batching()
        logger.info(
            "generator %s loaded %s on %s (%s) in %.1fs",
            self.replica,
            self.settings.model,
            device,
            self.settings.precision,
            self.load_s,
        )

    def _load_pipeline(self) -> str:
        """Load the export (`self.pipe`): in this process, or across this replica's rank actors with `parallel`
        (`self.ranks`, called like the pipeline: parallel/replica.py). -> the device it was asked on."""
        import torch

        from sora_model.pipeline import TextToVideoPipeline

        s = self.settings
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ranks = None
        if s.parallel.enabled:
            self.pipe = self.ranks = ParallelRanks.start(
                s.model, s.parallel, s.device, s.precision, s.lora, _replica_id()
            )
        else:
            self.pipe = TextToVideoPipeline.load(s.model, device=device, precision=s.precision, lora=s.lora)
        return device

    def _load_adapters(self) -> dict[str, str]:
        """Per-request adapters (`loras:`), applied unmerged on the loaded model: checked now from their headers, loaded
        when first asked for. A bad one is reported in the card (its requests answer 400), the others serve.
        -> adapter name -> why it cannot be used."""
        from sora_model.adapters import AdapterCache

        self.adapters = AdapterCache(self.pipe.model, self.settings.loras, self.settings.lora_cache_bytes)
        lora_errors = self.adapters.check_all()
        for name, problem in lora_errors.items():
            logger.warning("generator: LoRA '%s' cannot be used: %s", name, problem)
        self.card = model_card(self.pipe, tuple(n for n in self.settings.loras if n not in lora_errors), lora_errors)
        return lora_errors

    def _apply_batching(self) -> None:
        b = self.settings.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {batching: {max_batch_size, batch_wait_timeout_s}}` applies without a restart."""
        self.settings = apply_user_config(self.settings, user_config, ("batching",))
        self._apply_batching()

    def check_health(self) -> None:
        if self._fatal:
            raise RuntimeError(f"generator is unhealthy: {self._fatal}")
        if self.ranks is not None:
            self.ranks.check()  # every rank of a parallel replica answers, else Serve replaces the replica
        busy = self._busy_since
        limit = HUNG_FACTOR * self.settings.queue.stall_timeout_s
        if busy is not None and time.monotonic() - busy > limit:
            raise RuntimeError(
                f"generator is hung: no sampling step for over {limit:g}s ({HUNG_FACTOR} x queue.stall_timeout_s)"
            )

    def describe(self) -> dict[str, Any]:
        return asdict(self.card)

    def identity(self) -> dict[str, Any]:
        """What besides the request decides a clip: the export's digest, the LoRA (name:digest), the precision."""
        return dict(self.ident)

    def get_stats(self) -> dict[str, Any]:
        cache = self.pipe.text_encoder.cache
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "load_s": round(self.load_s, 3),
            **self.stats,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "max_batch_size": self.settings.batching.max_batch_size,
            "torch_threads": _torch_threads(),
            "text_cache": {
                "hits": cache.hits,
                "misses": cache.misses,
                "size": len(cache),
                "bytes": cache.bytes,
                "max_bytes": cache.max_bytes,
                "evictions": cache.evictions,
            },
            "adapters": self.adapters.stats(),
        }

    async def generate(self, job: LeasedJob) -> JobOutcome:
        """One job -> how it ended (jobs.JobOutcome); the clip itself goes to the store."""
        # Hold new requests while a batch samples, then let them all in together: what queued during a
        # batch becomes the next batch (up to max_batch_size). `@serve.batch` alone forms the next batch as
        # soon as the current one starts, from whatever arrives within its wait, so under steady load it
        # would mostly sample batches of one.
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        await self._idle.wait()
        if job.alone:
            # The ingress has nothing else queued: do not hold this job for company that is not coming
            # (the batch it starts restores the configured wait, see _batched).
            self._batched.set_batch_wait_timeout_s(0.0)
        result = await self._batched(job)
        if isinstance(result, JobOutcome):  # failed, or deleted before it was sampled
            return result
        return await asyncio.to_thread(self.finisher.finish, job, result)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, jobs: list[LeasedJob]) -> list[JobOutcome | SampledClip]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.params.shape_key].append(i)
        results: list[Any] = [None] * len(jobs)
        self._batched.set_batch_wait_timeout_s(self.settings.batching.batch_wait_timeout_s)
        if self._idle is not None:
            self._idle.clear()
        try:
            for idxs in groups.values():
                out = await asyncio.to_thread(self._run_group, [jobs[i] for i in idxs])
                for i, r in zip(idxs, out, strict=True):
                    results[i] = r
        finally:
            if self._idle is not None:
                self._idle.set()
        return results

    def _run_group(self, items: list[LeasedJob]) -> list[JobOutcome | SampledClip]:
        """Sample one same-shape group in one pipeline call (runs in a worker thread)."""
        ids = [it.id for it in items]
        ttl = items[0].lease_ttl_s
        run, queued_s, results = self._start_group(items, ttl)
        if not run:
            return [results[i] for i in ids]
        first = run[0].params
        held = {it.id: it.token for it in run}
        started = time.perf_counter()
        timer = CallTimer()
        cache = self.pipe.text_encoder.cache
        hits, misses = cache.hits, cache.misses
        # A group shares its adapter, step cache and reference images (GenerationParams.shape_key); the cache and
        # image options go to the pipeline only when asked for, so a pipeline without them still serves the rest.
        options = {"step_cache": first.step_cache, "cache_threshold": first.cache_threshold} if first.step_cache else {}
        try:
            options.update(self._references(run, first))
        except LookupError as err:
            return self._fail(ids, run, results, f"generation failed: {err}", "input_missing")
        try:
            clips = self._sample(run, first, self._on_step(ids, run, held, timer, started, ttl), timer, options)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: fail these jobs, keep the replica serving
            return self._sampling_failed(err, ids, run, results)
        seconds = time.perf_counter() - started
        self.stats["pipeline_calls"] += 1
        self.stats["clips"] += len(run)
        self.batch_sizes[len(run)] += 1
        call_report: JobReport | None = JobReport(
            call=True,
            batch_size=len(run),
            text_encode_s=timer.text_encode_s,
            step_s=timer.step_s,
            vae_decode_s=timer.vae_decode_s,
            text_cache_hits=cache.hits - hits,
            text_cache_misses=cache.misses - misses,
            text_cache_bytes=cache.bytes,
        )
        for it, clip in zip(run, clips, strict=True):
            if it.id not in held:  # lost its lease mid-call: another replica owns it now
                continue
            report = call_report if call_report is not None else JobReport()
            call_report = None  # the call's figures ride on one job only
            report.queue_wait_s = queued_s[it.id]
            batch_id = results[it.id].batch_id
            results[it.id] = SampledClip(clip, batch_id, len(run), seconds, queued_s[it.id], report)
        return [results[i] for i in ids]

    def _start_group(
        self, items: list[LeasedJob], ttl: float
    ) -> tuple[list[LeasedJob], dict[str, float], dict[str, Any]]:
        """Move the group's jobs to `in_progress` under their tokens. Those deleted, finished elsewhere or taken over
        while waiting drop out of the call. -> the jobs that run, each one's queue wait, and every job's result so far
        (skipped, until its clip is sampled)."""
        started_ns = time.time_ns()
        live = [self.db.start(it.id, it.token, self.replica, ttl) for it in items]
        run = [it for it, job in zip(items, live, strict=True) if job is not None]
        queued_s = {job["id"]: (started_ns - job["_created_ns"]) / 1e9 for job in live if job is not None}
        batch_id = uuid.uuid4().hex[:12]
        skipped = JobOutcome(ok=True, batch_id=batch_id, batch_size=len(run), skipped=True)
        results = {it.id: skipped for it in items}
        return run, queued_s, results

    def _on_step(
        self,
        ids: list[str],
        run: list[LeasedJob],
        held: dict[str, str],
        timer: CallTimer,
        started: float,
        ttl: float,
    ) -> Callable[[int, int], None]:
        """The call's progress callback: times each step; at most every PROGRESS_WRITE_INTERVAL_S writes progress and
        an ETA (a heartbeat that renews the leases, dropping from `held` the jobs whose lease is gone); stops the call
        once every job passed its deadline or lost its lease."""
        deadlines = [it.deadline_ns for it in run]
        # Tests only (STALL_ENV): a first attempt hangs in its last step, as a wedged device would.
        stall_s = self._stall_s if self._stall_s and all(it.attempt == 1 for it in run) else 0.0
        lock, last = threading.Lock(), [0.0]

        def on_step(step: int, total: int) -> None:
            timer.step()
            self._busy_since = time.monotonic()
            now_s = time.monotonic()
            with lock:
                if now_s - last[0] < PROGRESS_WRITE_INTERVAL_S and step + 1 < total:
                    return
                last[0] = now_s
            if all(d is not None and time.time_ns() > d for d in deadlines):
                raise StopSampling("deadline")
            pct = int(SAMPLING_SHARE * (step + 1) / max(total, 1))
            # When sampling will end at the pace so far: the ingress tells pollers to come back then.
            left_s = (time.perf_counter() - started) / (step + 1) * (total - step - 1)
            kept = self.db.progress(dict(held), pct, time.time_ns() + int(left_s * 1e9), ttl)
            for job_id in set(held) - kept:
                held.pop(job_id)
            if not held:
                raise StopSampling("lease")
            if stall_s and step + 1 == total:
                logger.warning(
                    "generator %s: %s set, hanging %gs in the last step of %s", self.replica, STALL_ENV, stall_s, ids
                )
                time.sleep(stall_s)

        return on_step

    def _sample(
        self,
        run: list[LeasedJob],
        first: GenerationParams,
        on_step: Callable[[int, int], None],
        timer: CallTimer,
        options: dict[str, Any],
    ) -> Any:
        """The group's one pipeline call, under its LoRA adapter, timed by `timer` -> (B, T, H, W, 3) uint8 clips."""
        self._timer.call = timer
        self._busy_since = time.monotonic()
        try:
            with self.adapters.applied(first.lora):
                return self.pipe(
                    [it.params.prompt for it in run],
                    num_frames=first.num_frames,
                    height=first.height,
                    width=first.width,
                    steps=first.steps,
                    guidance_scale=[it.params.guidance_scale for it in run],
                    seed=[it.params.seed for it in run],
                    sampler=first.sampler,
                    negative_prompt=[it.params.negative_prompt for it in run]
                    if first.negative_prompt is not None
                    else None,
                    callback=on_step,
                    **options,
                )
        finally:
            self._timer.call = None
            self._busy_since = None

    def _sampling_failed(
        self,
        err: Exception,
        ids: list[str],
        run: list[LeasedJob],
        results: dict[str, Any],
    ) -> list[JobOutcome | SampledClip]:
        """What a call that raised means for its jobs: stopped (deadline, leases gone), refused by the model, or
        failed (a broken CUDA device, not out of memory, also marks the replica unhealthy so Serve replaces it)."""
        if isinstance(err, StopSampling):
            if str(err) == "deadline":
                message = "generation stopped: the job passed its deadline (tiers.*.job_deadline_s)"
                return self._fail(ids, run, results, message, "deadline_exceeded")
            logger.warning(
                "generator %s: leases of %s were given up or taken over; stopped sampling", self.replica, ids
            )
            return [results[i] for i in ids]
        if isinstance(err, (ValueError, TypeError)):  # a request the limits let through but the model refuses
            return self._fail(ids, run, results, f"generation failed: {err}", "invalid_request")
        if "CUDA" in str(err) and "out of memory" not in str(err):
            self._fatal = str(err)  # a broken device: let Serve replace the replica
        logger.exception("generation failed for %s", ids, exc_info=err)
        return self._fail(ids, run, results, f"generation failed: {type(err).__name__}: {err}", "generation_failed")

    def _references(self, run: list[LeasedJob], first: GenerationParams) -> dict[str, Any]:
        """The group's reference images as the pipeline's `image`/`last_image` (RGB PIL images): every job of the group
        sent the same bytes (their digests are in the shape key). LookupError when none is left in the store."""
        out: dict[str, Any] = {}
        for arg, field in REFERENCE_ARGS:
            digest = getattr(first, arg)
            data = None if digest is None else self.content.find_input([it.id for it in run], field, digest)
            if digest is not None and data is None:
                raise LookupError(f"the '{field}' image of {[it.id for it in run]} is no longer in the store")
            if data is not None:
                out[arg] = open_image(data, field)
        return out

    def _fail(
        self, ids: list[str], run: list[LeasedJob], results: dict[str, Any], message: str, code: str
    ) -> list[JobOutcome | SampledClip]:
        """Mark the jobs that run failed (each under its token), in `results`; their reference images are dropped."""
        for it in run:
            if self.db.fail(it.id, it.token, code, message, it.retention_s):
                self.finisher.drop_inputs(it)
            results[it.id] = JobOutcome.failed(message, code)
        return [results[i] for i in ids]


def _from_dict(settings: dict[str, Any]) -> ServeSettings:
    from sora_model.config import from_dict

    return from_dict(ServeSettings, settings)


def _torch_threads() -> int:
    """Intra-op threads sampling uses: Ray sets OMP_NUM_THREADS to the replica's num_cpus, which torch follows."""
    import torch

    return torch.get_num_threads()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit use)
        return f"local-{os.getpid()}"
