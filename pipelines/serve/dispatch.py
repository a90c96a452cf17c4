"""The dispatcher each ingress replica runs: claim jobs from the database, run them on the generator
deployment, hold their leases meanwhile, and sweep expired and overdue jobs and orphaned store objects (sweep.py).

    accepted job (queued row) ──claim (lease, token)──► generator.generate.remote(LeasedJob) ──► completed row + clip
                  ▲                                            │ renew every ttl/3 while the job waits for a
                  │                                            │ generator or its heartbeat (a step, a stored
                  │                                            │ file) is younger than queue.stall_timeout_s
                  └── stalled: given up (reason recorded) ◄────┤
                  └── lease lapses (this replica died) ◄───────┘

Any number of ingress replicas run one each against the same database: they share the queue, never take
the same job while a lease holds (see db.py), and pick up the jobs of a replica that died once its
leases lapse. A running job whose generator stops making steps is not renewed: its holder gives it up (a
new attempt, the stall recorded in `retries`, or `failed` after queue.max_attempts), and the hung attempt's
writes are refused by its token. Nothing here blocks the event loop: every database and storage call runs in
a thread. What each job cost goes to the ingress's Prometheus registry (metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .config import ServeSettings
from .db import USAGE_KEEP_S, JobDB
from .jobs import JobOutcome, LeasedJob
from .metrics import ServeMetrics
from .requests import IMAGE_FIELDS
from .store import ContentStore
from .sweep import SWEPT, sweep_orphans

logger = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
"""Waits between tries when the generator pushes back or a replica died (then the last one, repeated)."""


def replica_id() -> str:
    """The Serve replica's id (what `serve status` shows); the process id outside Serve."""
    import os

    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit use)
        return f"local-{os.getpid()}"


class Dispatcher:
    def __init__(
        self,
        db: JobDB,
        content: ContentStore,
        generator: Any,
        settings: Callable[[], ServeSettings],
        worker: str,
        stats: Counter,
        metrics: ServeMetrics,
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.content = content
        self.generator = generator
        self.settings = settings
        self.worker = worker
        self.stats = stats
        self.batch_sizes: Counter[int] = Counter()
        self.batch_ids: set[str] = set()
        self.held: dict[str, str] = {}  # job id -> lease token, claimed here and not finished
        self.abandoned: set[str] = set()  # tokens of stalled attempts given up while their generator call hangs on
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._last_sweep = 0.0
        # replicas spread out
        self._last_orphan_sweep = time.monotonic() - random.uniform(0, settings().orphan_sweep_interval_s)
        self._orphan_task: asyncio.Task | None = None

    def wake(self) -> None:
        """Look for work now (a job was just accepted here, or a slot freed)."""
        self._wake.set()

    def start(self) -> list[asyncio.Task]:
        loops = [asyncio.create_task(self._claim_loop()), asyncio.create_task(self._renew_loop())]
        for t in loops:
            self._tasks.add(t)
        return loops

    # -- loops --------------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            s = self.settings()
            free = s.queue.max_in_flight - len(self.held)
            try:
                if free > 0:
                    claimed = await asyncio.to_thread(self.db.claim, self.worker, free, s.queue.lease_ttl_s)
                    alone = len(claimed) == 1 and not self.held and len(claimed) < free
                    for job in claimed:
                        self._spawn(job, alone)
                if time.monotonic() - self._last_sweep >= s.sweep_interval_s:
                    self._last_sweep = time.monotonic()
                    await self._sweep(s)
            except RuntimeError as err:
                if "after shutdown" in str(err):  # the replica is stopping: its leases lapse, others re-claim
                    return
                logger.exception("dispatcher: claim or sweep failed; trying again")
            except Exception:  # noqa: BLE001 - a database hiccup must not stop dispatching for good
                logger.exception("dispatcher: claim or sweep failed; trying again")
            self._update_depth()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=s.queue.claim_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _renew_loop(self) -> None:
        while True:
            q = self.settings().queue
            ttl = q.lease_ttl_s
            await asyncio.sleep(ttl / 3)
            tokens = list(self.held.values())
            try:
                kept = await asyncio.to_thread(self.db.renew, tokens, ttl, q.stall_timeout_s)
                await self._give_up_stalled(
                    [(i, t) for i, t in list(self.held.items()) if t in tokens and t not in kept]
                )
            except RuntimeError as err:
                if "after shutdown" in str(err):  # the replica is stopping
                    return
                logger.exception("dispatcher: lease renewal failed")
                continue
            except Exception:  # noqa: BLE001 - the next renewal (a third of the TTL later) may succeed
                logger.exception("dispatcher: lease renewal failed")
                continue

    async def _give_up_stalled(self, lost: list[tuple[str, str]]) -> None:
        """Leases not renewed: a stalled job goes back to the queue (or fails), its slot here is freed at once and
        its hung call left to end on its own (its writes are refused). The others finished meanwhile, or a
        lapse let another replica take them (their writes are fenced too)."""
        s = self.settings()
        for job_id, token in lost:
            status = await asyncio.to_thread(
                self.db.give_up_stalled, job_id, token, s.queue.stall_timeout_s, s.queue.max_attempts, s.retention_s
            )
            if status is None:
                continue
            self.metrics.lease_expiries.labels(reason="stalled").inc()
            self.stats["stalled"] += 1
            logger.warning(
                "dispatcher: %s made no progress for %gs: %s",
                job_id,
                s.queue.stall_timeout_s,
                "queued for another attempt" if status == "queued" else "failed after queue.max_attempts",
            )
            self.abandoned.add(token)
            if self.held.get(job_id) == token:
                del self.held[job_id]
            self.wake()

    async def _sweep(self, s: ServeSettings) -> None:
        """Fail jobs past their deadline that nobody holds; purge expired jobs and their files (reference images
        too)."""
        failed = await asyncio.to_thread(self.db.fail_past_deadline, s.retention_s)
        if failed:
            self.stats["deadline_exceeded"] += len(failed)
        expired = await asyncio.to_thread(self.db.expired)
        for job_id, ref in expired:
            await asyncio.to_thread(self.content.remove, job_id, ref)
            await asyncio.to_thread(self.content.remove_inputs, job_id, IMAGE_FIELDS)  # a failed image job's
        purged = await asyncio.to_thread(self.db.purge, [i for i, _ in expired])
        await asyncio.to_thread(self.db.prune_usage, time.time_ns() - USAGE_KEEP_S * 10**9)
        if purged:
            self.stats["expired_purged"] += purged
            logger.info("dispatcher: purged %d expired jobs", purged)
        due = time.monotonic() - self._last_orphan_sweep >= s.orphan_sweep_interval_s
        if due and (self._orphan_task is None or self._orphan_task.done()):
            # Beside the claim loop, not in it: listing a big bucket takes a while and claims must not wait for it.
            self._last_orphan_sweep = time.monotonic()
            self._orphan_task = asyncio.create_task(self._sweep_orphans(s))

    async def _sweep_orphans(self, s: ServeSettings) -> None:
        """Store objects no job row holds (a generator that crashed after uploading, ...): deleted past the grace."""
        try:
            counts = await asyncio.to_thread(sweep_orphans, self.db, self.content, s.orphan_grace_s)
        except Exception as err:  # noqa: BLE001 - a store or database hiccup: the next interval tries again
            if "after shutdown" not in str(err):  # else the replica is stopping
                logger.exception("dispatcher: orphan sweep failed; trying again in orphan_sweep_interval_s")
            return
        swept = {k: v for k, v in counts.items() if k in SWEPT}
        for reason, n in swept.items():
            self.metrics.orphans_swept.labels(reason=reason).inc(n)
        self.stats["orphans_swept"] += sum(swept.values())
        logger.info(
            "dispatcher: orphan sweep: deleted %d objects %s; kept %d live, %d inside orphan_grace_s, %d not ours",
            sum(swept.values()),
            swept,
            counts["kept_live"],
            counts["kept_fresh"],
            counts["kept_unknown"],
        )

    # -- one job ------------------------------------------------------------------------------------

    def _spawn(self, job: dict[str, Any], alone: bool) -> None:
        self.held[job["id"]] = job["_lease_token"]
        task = asyncio.create_task(self._run_job(job, alone))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job: dict[str, Any], alone: bool) -> None:
        s = self.settings()
        job_id, token = job["id"], job["_lease_token"]
        status = "failed"
        try:
            if not await self._check_attempts(job, token, s):
                return
            result = await self._generate(LeasedJob.claimed(job, s.queue.lease_ttl_s, s.retention_s, alone), s)
            if isinstance(result, str):  # no answer came: "abandoned" or "failed"
                status = result
                return
            status = self._record(result, token)
        except Exception as err:  # noqa: BLE001 - one job's failure never stops the dispatcher
            logger.exception("job %s failed", job_id)
            self.stats["failed"] += 1
            await asyncio.to_thread(
                self.db.fail,
                job_id,
                token,
                "generation_failed",
                f"generation failed: {type(err).__name__}",
                s.retention_s,
            )
        finally:
            self._job_done(job, token, status)

    async def _check_attempts(self, job: dict[str, Any], token: str, s: ServeSettings) -> bool:
        """Before an attempt runs: record an earlier attempt that nobody gave up (its lease lapsed), and fail the job
        once it has had queue.max_attempts. False when the job failed here."""
        job_id, attempt = job["id"], job["_attempts"]
        if attempt > 1 and not any(r.get("attempt") == attempt - 1 for r in job["_retries"]):
            # Nobody gave the last attempt up: its holder stopped renewing (died, or its loop was stuck).
            self.metrics.lease_expiries.labels(reason="lapsed").inc()
            message = f"attempt {attempt - 1}: its holder's lease lapsed (queue.lease_ttl_s) before it finished"
            await asyncio.to_thread(self.db.add_retry, job_id, token, attempt - 1, "lease_lapsed", message)
            job["_retries"] = [
                *job["_retries"],
                {"attempt": attempt - 1, "code": "lease_lapsed", "message": message},
            ]
        if attempt > s.queue.max_attempts:
            reasons = "; ".join(r.get("message", "") for r in job["_retries"][-s.queue.max_attempts :])
            message = f"generation failed: {attempt - 1} attempts did not finish (queue.max_attempts): {reasons}"
            await asyncio.to_thread(self.db.fail, job_id, token, "retries_exhausted", message, s.retention_s)
            return False
        if attempt > 1:
            self.stats["reclaimed"] += 1
            logger.info("dispatcher: re-claimed %s (attempt %d)", job_id, attempt)
        return True

    async def _generate(self, item: LeasedJob, s: ServeSettings) -> JobOutcome | str:
        """Call the generator until it answers: a full queue (back-pressure) is waited out, a lost replica is tried
        again up to queue.max_attempts. -> its answer, or the job's status when none came ("abandoned": a stalled
        attempt already retried; "failed": the replicas kept dying, the job is failed here)."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

        job_id, token = item.id, item.token
        tries, waits = 0, 0
        while True:
            try:
                return await self.generator.generate.remote(item)
            except BackPressureError:
                self.stats["generator_backpressure"] += 1  # the job keeps its lease; it was accepted
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as err:
                if token in self.abandoned:  # a stalled attempt whose hung replica was replaced: retried already
                    return "abandoned"
                tries += 1
                self.stats["generator_retries"] += 1
                logger.warning("generator replica lost under %s (try %d): %s", job_id, tries, type(err).__name__)
                if tries >= s.queue.max_attempts:
                    message = (
                        f"generation failed after {tries} tries: the generator replica died ({type(err).__name__})"
                    )
                    await asyncio.to_thread(self.db.fail, job_id, token, "replica_failed", message, s.retention_s)
                    return "failed"
            await asyncio.sleep(RETRY_BACKOFF_S[min(waits, len(RETRY_BACKOFF_S) - 1)])
            waits += 1

    def _job_done(self, job: dict[str, Any], token: str, status: str) -> None:
        """Free the job's slot here and count how it ended."""
        job_id = job["id"]
        if self.held.get(job_id) == token:  # a newer attempt of the same job may be held here now
            del self.held[job_id]
        self.abandoned.discard(token)
        self.wake()
        self.metrics.jobs.labels(status=status).inc()
        if status in ("completed", "failed"):
            self.metrics.end_to_end.labels(status=status).observe(max(0.0, (time.time_ns() - job["_created_ns"]) / 1e9))

    def _record(self, result: JobOutcome, token: str) -> str:
        if result.report is not None:
            self.metrics.observe_report(result.report)
        if token in self.abandoned:  # a stalled attempt's late answer: the job was retried meanwhile
            self.stats["abandoned_finished"] += 1
            return "abandoned"
        if not result.ok:
            self.stats["failed"] += 1
            return "failed"
        if result.skipped:  # deleted, finished elsewhere, or its lease was taken over
            self.stats["skipped"] += 1
            return "skipped"
        self.stats["completed"] += 1
        self.batch_ids.add(result.batch_id)
        if len(self.batch_ids) > 100_000:
            self.batch_ids.clear()
        self.batch_sizes[result.batch_size] += 1
        return "completed"

    def _update_depth(self) -> None:
        self.metrics.in_flight.set(len(self.held))
