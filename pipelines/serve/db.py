"""Job state in a database: SQLAlchemy Core, one code path for SQLite (the embedded default) and PostgreSQL.

    sora serve --model EXPORT [--db sqlite:////var/sora/jobs.db | --db postgresql://user:pw@host/sora]

The tables, the dialects' engines and clocks, and the migrations are schema.py's; this module is the queries.
Every query is by primary key or along an index (see `schema.jobs`): a status poll, a list page, an admission
count or a claim costs the same with 100 jobs as with millions. Nothing reads every job.

Work is handed out with leases. A dispatcher (any ingress replica) claims queued jobs: one statement
sets `lease_token` (a fresh random token), `lease_owner` and `lease_until_ns`. On PostgreSQL the rows are
picked with `FOR UPDATE SKIP LOCKED`, so concurrent dispatchers never wait on or take the same row; on
SQLite the same `UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING` is atomic because SQLite has one
writer at a time. Every write about a running job names its token in the UPDATE's WHERE (a fencing token):
once a lease lapses and another dispatcher re-claims the job, the old holder's writes match no row, so a
job never runs to completion twice and a stale replica can never overwrite a newer result (its clip is
stored under its own token's name, and dropped when its completion is refused). A job whose holder died
is claimable again as soon as `lease_until_ns` passes.

Leases follow progress, not time alone. `heartbeat_ns` is when the job last moved: claimed, started, a
sampling step, a stored file. The holder's renewals extend a running job's lease only while that heartbeat
is younger than the stall timeout (`queue.stall_timeout_s`), so a hung generator cannot hold a job forever:
its holder puts it back in the queue with the reason recorded (`retries`), or fails it after
`queue.max_attempts`. Lease times are read from the database's clock (`db_now_ns`), one clock for every
node, so a replica whose clock runs ahead cannot take leases early.

Usage for quotas goes to a ledger (`sora_usage`) that deleting a job does not touch: a create, download,
delete loop spends quota like any other.

Why not Ray Serve's own asynchronous inference (`ray.serve.task_consumer`, Ray 2.60, alpha): it puts
tasks in a Celery broker (Redis or RabbitMQ) and scales consumers on the broker's queue length. Here
(1) the job record must live in a database anyway (retrieve, list by owner, retention, per-key counts),
so a broker would be a second source of truth to keep in step; (2) Celery redelivers a long task once
its visibility timeout passes with no renewal while it runs, so a generation longer than the timeout
runs twice at once, which leases renewed from the progress callback rule out; (3) it needs a broker
server, where `sora serve` and the demo must need nothing but pip packages (SQLite). Its queue-length
autoscaling idea is kept: the generator deployment scales on the requests the dispatchers keep in flight.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from .schema import (
    TERMINAL,
    UNFINISHED,
    USAGE_KEEP_S,
    create_tables,
    db_now_ns,
    engine_url,
    job_from_row,
    jobs,
    make_engine,
    new_token,
    usage,
)

__all__ = ["TERMINAL", "UNFINISHED", "USAGE_KEEP_S", "JobDB", "engine_url", "jobs", "new_token", "usage"]


class JobDB:
    """Thread-safe (a connection per call from the engine's pool): the ingress calls it from worker
    threads (`asyncio.to_thread`), the generator from its sampling thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.now = db_now_ns(self.dialect)
        self._create_lock = threading.Lock()
        create_tables(self.engine, self._create_lock)

    def clock_ns(self) -> int:
        """The database's clock now (what lease times compare against)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(self.now)).scalar())

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    _job = staticmethod(job_from_row)
    """A row as the job dict the API renders: public fields plus `_`-prefixed internal ones (schema.py)."""

    def insert(
        self,
        job: dict[str, Any],
        owner: str,
        tier: str,
        priority: int,
        deadline_ns: int | None,
        cache_key: str | None,
        usage_weight: float = 0.0,
        usage_kind: str = "job",
    ) -> None:
        """A new job: `job` holds the public fields and `_params`; `status`, `progress`... start here. With a
        `usage_weight`, the owner's usage ledger gains a row in the same transaction."""
        doc = {k: v for k, v in job.items() if k not in ("status", "progress", "completed_at", "expires_at", "error")}
        values = dict(
            id=job["id"],
            owner=owner,
            tier=tier,
            priority=priority,
            status=job["status"],
            progress=job["progress"],
            created_ns=job["_created_ns"],
            completed_at=job.get("completed_at"),
            expires_at=job.get("expires_at"),
            deadline_ns=deadline_ns,
            cache_key=cache_key,
            lease_until_ns=0,
            attempts=0,
            runs=0,
            error=job.get("error"),
            content_ref=job.get("_content_ref"),
            doc={k: v for k, v in doc.items() if not k.startswith("_") or k == "_params"},
        )
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(**values))
            if usage_weight > 0:
                conn.execute(
                    insert(usage).values(
                        owner=owner, created_ns=time.time_ns(), weight=usage_weight, kind=usage_kind, job_id=job["id"]
                    )
                )

    def get(self, job_id: str, now: float | None = None) -> dict[str, Any] | None:
        """The job, or None when unknown or past its `expires_at` (a sweep removes it soon after)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            return None
        expires = row._mapping["expires_at"]
        if expires is not None and expires <= (now or time.time()):
            return None
        return self._job(row)

    def list(
        self, owner: str | None, limit: int, after: str | None = None, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of the owner's jobs (every owner's for None: an admin key), newest first (or oldest), after
        the id `after`: a keyset walk of (owner, created_ns, id), so page N costs what page 1 does."""
        now = int(time.time())
        desc = order == "desc"
        mine = jobs.c.owner == owner if owner is not None else jobs.c.id.is_not(None)
        q = select(jobs).where(mine, or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now))
        if after is not None:
            with self.engine.connect() as conn:
                anchor = conn.execute(select(jobs.c.created_ns).where(jobs.c.id == after, mine)).scalar()
            if anchor is None:
                return [], False
            before = (jobs.c.created_ns < anchor) | and_(jobs.c.created_ns == anchor, jobs.c.id < after)
            later = (jobs.c.created_ns > anchor) | and_(jobs.c.created_ns == anchor, jobs.c.id > after)
            q = q.where(before if desc else later)
        keys = (jobs.c.created_ns.desc(), jobs.c.id.desc()) if desc else (jobs.c.created_ns.asc(), jobs.c.id.asc())
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(*keys).limit(limit + 1)).fetchall()
        return [self._job(r) for r in rows[:limit]], len(rows) > limit

    def mark_deleted(self, job_id: str, owner: str | None) -> tuple[bool, str | None]:
        """Step 1 of a delete, one statement: the job expires now (hidden from get/list, its files and row
        left to the expiry sweep if this replica dies before finishing) and loses its lease token (a running
        generator's writes are fenced out, and it removes its own files). (found, content ref)."""
        mine = jobs.c.owner == owner if owner is not None else jobs.c.id.is_not(None)
        with self.engine.begin() as conn:
            ref = conn.execute(select(jobs.c.content_ref).where(jobs.c.id == job_id, mine)).scalar()
            stmt = (
                update(jobs)
                .where(jobs.c.id == job_id, mine)
                .values(
                    expires_at=0,
                    lease_token=None,
                    lease_until_ns=0,  # never claimable again, never completed
                    status=case((jobs.c.status.in_(UNFINISHED), "failed"), else_=jobs.c.status),
                )
            )
            found = bool(conn.execute(stmt).rowcount)
        return found, ref if found else None

    def delete(self, job_id: str) -> str | None:
        """Remove the row; the content ref its files are stored under (None if it had none or was gone)."""
        with self.engine.begin() as conn:
            ref = conn.execute(select(jobs.c.content_ref).where(jobs.c.id == job_id)).scalar()
            gone = conn.execute(delete(jobs).where(jobs.c.id == job_id)).rowcount
        return ref if gone else None

    # -- admission --------------------------------------------------------------------------------

    def count_unfinished(self, owner: str | None = None, tier: str | None = None) -> int:
        """Jobs queued or running (all, one owner's, or one tier's): walks the unfinished part of an index."""
        q = select(func.count()).select_from(jobs).where(jobs.c.status.in_(UNFINISHED))
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        if tier is not None:
            q = q.where(jobs.c.tier == tier)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def count_created_since(self, owner: str, since_ns: int) -> int:
        """Jobs the owner still has that were created since `since_ns` (deleted ones not counted: quotas read
        `usage_since`)."""
        q = select(func.count()).select_from(jobs).where(jobs.c.owner == owner, jobs.c.created_ns >= since_ns)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    def usage_since(self, owner: str, since_ns: int) -> float:
        """The owner's ledger total since `since_ns`: jobs (1 each) and cache hits (their weight), deleted or not."""
        q = select(func.coalesce(func.sum(usage.c.weight), 0.0)).where(
            usage.c.owner == owner, usage.c.created_ns >= since_ns
        )
        with self.engine.connect() as conn:
            return float(conn.execute(q).scalar() or 0.0)

    def prune_usage(self, before_ns: int) -> int:
        """Drop ledger rows older than every quota window."""
        with self.engine.begin() as conn:
            return conn.execute(delete(usage).where(usage.c.created_ns < before_ns)).rowcount

    def cache_lookup(self, key: str, owner: str | None = None) -> dict[str, Any] | None:
        """A completed, unexpired job made with these exact parameters (the result cache), the owner's own
        when `owner` is given (the key itself includes the owner too)."""
        now = int(time.time())
        q = (
            select(jobs)
            .where(jobs.c.cache_key == key, jobs.c.status == "completed", jobs.c.content_ref.is_not(None))
            .where(or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > now + 60))
            .limit(1)
        )
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return self._job(row) if row is not None else None

    # -- leases -------------------------------------------------------------------------------------
    # Every lease time (`lease_until_ns`, `heartbeat_ns`) is the database's clock (`self.now`), never a replica's.

    def _until(self, ttl_s: float) -> ColumnElement:
        return self.now + int(ttl_s * 1e9)

    def claim(self, worker: str, n: int, ttl_s: float) -> list[dict[str, Any]]:
        """Lease up to `n` claimable jobs (queued, or unfinished with a lapsed lease), highest priority then
        oldest first; each gets a fresh token. Never the same job to two callers while a lease holds."""
        if n < 1:
            return []
        claimable = and_(jobs.c.status.in_(UNFINISHED), jobs.c.lease_until_ns < self.now)
        pick = (
            select(jobs.c.id)
            .where(claimable)
            .order_by(jobs.c.priority.desc(), jobs.c.created_ns.asc())
            .limit(n)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite has one writer, so the UPDATE is atomic
        )
        token = new_token()
        stmt = (
            update(jobs)
            .where(jobs.c.id.in_(pick), claimable)  # re-checked on the locked row (PostgreSQL READ COMMITTED)
            .values(
                lease_token=token,
                lease_owner=worker,
                lease_until_ns=self._until(ttl_s),
                heartbeat_ns=self.now,
                attempts=jobs.c.attempts + 1,
            )
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(stmt).fetchall()
        claimed = sorted((self._job(r) for r in rows), key=lambda j: (-j["_priority"], j["_created_ns"]))
        return claimed

    def renew(self, tokens: list[str], ttl_s: float, stall_s: float | None = None) -> set[str]:
        """Extend the leases of unfinished jobs held under `tokens`; the tokens renewed. With `stall_s`, a
        running job is renewed only while it moved (`heartbeat_ns`) within the last `stall_s` seconds; a job
        still waiting for a generator (`queued`) is renewed while its holder waits."""
        if not tokens:
            return set()
        cond = and_(jobs.c.lease_token.in_(tokens), jobs.c.status.in_(UNFINISHED))
        if stall_s is not None:
            moving = and_(jobs.c.status == "in_progress", jobs.c.heartbeat_ns >= self.now - int(stall_s * 1e9))
            cond = and_(cond, or_(jobs.c.status == "queued", moving))
        stmt = update(jobs).where(cond).values(lease_until_ns=self._until(ttl_s)).returning(jobs.c.lease_token)
        with self.engine.begin() as conn:
            return {r[0] for r in conn.execute(stmt)}

    def give_up_stalled(
        self, job_id: str, token: str, stall_s: float, max_attempts: int, retention_s: float | None
    ) -> str | None:
        """A running job held under `token` whose heartbeat is older than `stall_s`: back to `queued` for another
        attempt (its lease and token gone, so the hung attempt's writes are refused), or `failed` once it has had
        `max_attempts`. The reason goes to `retries`. The new status, or None when the token no longer holds it or
        it moved meanwhile."""
        stalled = and_(
            jobs.c.id == job_id,
            jobs.c.lease_token == token,
            jobs.c.status == "in_progress",
            jobs.c.heartbeat_ns < self.now - int(stall_s * 1e9),
        )
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.attempts, jobs.c.retries).where(stalled).with_for_update()).first()
            if row is None:
                return None
            attempts, retries = int(row[0]), list(row[1] or [])
            message = f"attempt {attempts} stalled: no sampling progress for {stall_s:g}s (queue.stall_timeout_s)"
            retries.append({"attempt": attempts, "code": "stalled", "message": message})
            values: dict[str, Any] = dict(lease_token=None, lease_owner=None, lease_until_ns=0, retries=retries)
            if attempts >= max_attempts:
                now = int(time.time())
                error = {
                    "code": "stalled",
                    "message": f"generation failed: {attempts} attempts stalled (queue.max_attempts); last: {message}",
                }
                values.update(status="failed", completed_at=now, error=error, expires_at=_expiry(now, retention_s))
            else:
                values.update(status="queued", progress=0, eta_ns=None)
            done = conn.execute(update(jobs).where(stalled).values(**values)).rowcount
        return values["status"] if done else None

    def add_retry(self, job_id: str, token: str, attempt: int, code: str, message: str) -> None:
        """Record why attempt `attempt` was given up (e.g. its holder's lease lapsed), while `token` holds the job."""
        held = and_(jobs.c.id == job_id, jobs.c.lease_token == token)
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.retries).where(held).with_for_update()).first()
            if row is not None:
                entry = {"attempt": attempt, "code": code, "message": message}
                conn.execute(update(jobs).where(held).values(retries=[*(row[0] or []), entry]))

    def release(self, job_id: str, token: str) -> None:
        """Give a lease back early (the holder is stopping): another dispatcher can claim it at once."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status.in_(UNFINISHED))
                .values(lease_until_ns=0)
            )

    def start(self, job_id: str, token: str, replica: str, ttl_s: float) -> dict[str, Any] | None:
        """A generator begins sampling: `in_progress`, one more run. None when the lease was lost, the job
        was deleted, or it already finished (then the generator skips it)."""
        stmt = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status.in_(UNFINISHED))
            .values(
                status="in_progress",
                progress=0,
                started_ns=time.time_ns(),
                eta_ns=None,
                runs=jobs.c.runs + 1,
                lease_until_ns=self._until(ttl_s),
                heartbeat_ns=self.now,
                lease_owner=replica,
            )
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return self._job(row) if row is not None else None

    def progress(self, held: dict[str, str], pct: int, eta_ns: int | None, ttl_s: float) -> set[str]:
        """Progress of the jobs {id: token} of one pipeline call: a heartbeat that renews their leases; the ids still
        held."""
        kept: set[str] = set()
        with self.engine.begin() as conn:
            for job_id, token in held.items():
                stmt = update(jobs).where(
                    jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status == "in_progress"
                )
                if conn.execute(
                    stmt.values(progress=pct, eta_ns=eta_ns, lease_until_ns=self._until(ttl_s), heartbeat_ns=self.now)
                ).rowcount:
                    kept.add(job_id)
        return kept

    def heartbeat(self, job_id: str, token: str, ttl_s: float, pct: int | None = None) -> bool:
        """The job moved outside sampling (its clip encoded, a file stored): renew, if `token` still holds it."""
        values: dict[str, Any] = dict(lease_until_ns=self._until(ttl_s), heartbeat_ns=self.now)
        if pct is not None:
            values["progress"] = pct
        stmt = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status == "in_progress")
            .values(**values)
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def complete(self, job_id: str, token: str, retention_s: float | None, extra: dict[str, Any]) -> bool:
        """`completed` with the clip stored under `token`, if this token still holds the lease."""
        now = int(time.time())
        stmt = (
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.lease_token == token, jobs.c.status.in_(UNFINISHED))
            .values(
                status="completed",
                progress=100,
                completed_at=now,
                error=None,
                content_ref=token,
                lease_until_ns=0,
                expires_at=_expiry(now, retention_s),
                extra=extra,
            )
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def fail(self, job_id: str, token: str | None, code: str, message: str, retention_s: float | None) -> bool:
        """`failed` with an error, only while `token` holds the lease; without a token only while nobody holds
        one (a sweep), so a sweep never overrides a holder that claimed the job meanwhile."""
        now = int(time.time())
        stmt = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(UNFINISHED))
        stmt = (
            stmt.where(jobs.c.lease_token == token)
            if token is not None
            else stmt.where(jobs.c.lease_until_ns < self.now)
        )
        values = dict(
            status="failed",
            completed_at=now,
            error={"code": code, "message": message},
            lease_until_ns=0,
            expires_at=_expiry(now, retention_s),
        )
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt.values(**values)).rowcount)

    # -- sweeps -------------------------------------------------------------------------------------

    def fail_past_deadline(self, retention_s: float | None, limit: int = 100) -> list[str]:
        """Jobs past their deadline that nobody holds (queued, or their holder died): failed. Running ones
        are stopped by their generator, which checks the deadline at every step."""
        now_ns = time.time_ns()  # deadlines are the ingress's clock (set at creation), leases the database's
        with self.engine.connect() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.status.in_(UNFINISHED), jobs.c.lease_until_ns < self.now, jobs.c.deadline_ns < now_ns)
                    .limit(limit)
                )
            ]
        failed = []
        for job_id in ids:
            if self.fail(
                job_id,
                None,
                "deadline_exceeded",
                "The job was not finished by its deadline (tiers.*.job_deadline_s).",
                retention_s,
            ):
                failed.append(job_id)
        return failed

    def expired(self, limit: int = 500) -> list[tuple[str, str | None]]:
        """(id, content_ref) of jobs past `expires_at`, oldest first, along the expiry index."""
        now = int(time.time())
        q = (
            select(jobs.c.id, jobs.c.content_ref)
            .where(jobs.c.expires_at <= now)
            .order_by(jobs.c.expires_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(q)]

    def purge(self, ids: list[str]) -> int:
        if not ids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(delete(jobs).where(jobs.c.id.in_(ids))).rowcount


def _expiry(now: int, retention_s: float | None) -> int | None:
    return None if retention_s is None else now + int(retention_s)
