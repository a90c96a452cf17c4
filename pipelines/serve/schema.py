"""The job database's tables, its SQL dialects and its migrations (db.py runs the queries on them).

`sora_jobs` holds one row per job (indexed for every query JobDB makes: nothing reads every job), `sora_usage`
the quota ledger. `make_engine` opens SQLite (WAL, one file per machine, a busy timeout) or PostgreSQL (psycopg 3)
from one URL; `db_now_ns` is each dialect's clock, the one every lease time is measured against; `create_tables`
makes the tables and gives a database made by an earlier release the (nullable) columns added since.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    inspect,
    literal_column,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.sql.elements import ColumnElement

UNFINISHED = ("queued", "in_progress")
TERMINAL = ("completed", "failed")

metadata = MetaData()
jobs = Table(
    "sora_jobs",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("owner", String(64), nullable=False),  # "" when API keys are off; else the key's owner id
    Column("tier", String(64), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("created_ns", BigInteger, nullable=False),
    Column("completed_at", BigInteger),
    Column("expires_at", BigInteger),  # unix seconds; the row and its files are purged after it
    Column("deadline_ns", BigInteger),  # not finished by then: failed with `deadline_exceeded`
    Column("cache_key", String(64)),
    Column("lease_token", String(32)),
    Column("lease_owner", String(96)),
    Column("lease_until_ns", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),  # claims so far (a lapsed lease or a dead generator adds one)
    Column("runs", Integer, nullable=False),  # times a generator started sampling it (exactly-once checks)
    Column("started_ns", BigInteger),
    Column("eta_ns", BigInteger),
    Column("content_ref", String(32)),  # the token whose clip is stored: content/<id>-<ref>.mp4
    Column("heartbeat_ns", BigInteger),  # database clock: claimed, started, a step or a stored file (stall checks)
    Column("retries", JSON),  # [{"attempt", "code", "message"}]: why earlier attempts were given up
    Column("error", JSON),
    Column("doc", JSON, nullable=False),  # the public fields fixed at creation, and the GenerationParams
    Column("extra", JSON),  # timing, batch, replica: monitoring only
    Index("ix_sora_jobs_owner_created", "owner", "created_ns", "id"),  # list pages (keyset), quotas
    Index("ix_sora_jobs_owner_status", "owner", "status"),  # per-key in-flight counts
    Index("ix_sora_jobs_claim", "status", "priority", "created_ns"),  # claims, admission counts
    Index("ix_sora_jobs_expires", "expires_at"),  # retention sweeps
    Index("ix_sora_jobs_cache", "cache_key"),  # result cache
)
usage = Table(
    "sora_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(64), nullable=False),
    Column("created_ns", BigInteger, nullable=False),
    Column("weight", Float, nullable=False),  # 1 per generated job; tiers.*.cache_hit_weight per cache hit
    Column("kind", String(16), nullable=False),  # "job" or "cache_hit"
    Column("job_id", String(48)),
    Index("ix_sora_usage_owner_created", "owner", "created_ns"),  # quota sums over a rolling hour
    Index("ix_sora_usage_created", "created_ns"),  # pruning what no quota window reads any more
)
USAGE_KEEP_S = 2 * 3600
"""Ledger rows are pruned this long after they were written: past every quota window (an hour)."""


def db_now_ns(dialect: str) -> ColumnElement:
    """The database's clock in ns, as an SQL expression: what every lease time is measured against."""
    if dialect == "postgresql":
        return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)", BigInteger)
    return literal_column("CAST((julianday('now') - 2440587.5) * 86400000000000.0 AS INTEGER)", BigInteger)


def engine_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy would otherwise pick psycopg2, not installed)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    u = make_url(engine_url(url))
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
            # Job state (prompts, owners) readable by its user only; SQLite gives -wal/-shm the file's mode.
            os.close(os.open(u.database, os.O_RDWR | os.O_CREAT, 0o600))
        # One file shared by the processes of one machine: WAL lets readers run beside the writer, and a
        # writer waits (busy_timeout) rather than failing while another commits.
        engine = create_engine(u, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=8)

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(u, pool_size=8, max_overflow=8, pool_pre_ping=True)


def new_token() -> str:
    return secrets.token_hex(16)


def create_tables(engine: Engine, lock: threading.Lock) -> None:
    """The tables, made when missing, and the columns added since an earlier release (`add_missing_columns`)."""
    # Several replicas start at once: a CREATE that loses the race to another is fine.
    for attempt in range(5):
        try:
            with lock:
                metadata.create_all(engine, checkfirst=True)
                add_missing_columns(engine)
            return
        except (IntegrityError, ProgrammingError, OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def add_missing_columns(engine: Engine) -> None:
    """A database made by an earlier release gains the (nullable) columns added since; nothing else changes."""
    have = {c["name"] for c in inspect(engine).get_columns(jobs.name)}
    missing = [c for c in jobs.columns if c.name not in have]
    with engine.begin() as conn:
        for col in missing:
            kind = col.type.compile(dialect=engine.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {jobs.name} ADD COLUMN {col.name} {kind}")


def job_from_row(row: Any) -> dict[str, Any]:
    """A row as the job dict the API renders: public fields plus `_`-prefixed internal ones."""
    r = row._mapping
    job = dict(r["doc"])
    job.update(
        status=r["status"],
        progress=r["progress"],
        completed_at=r["completed_at"],
        expires_at=r["expires_at"],
        error=r["error"],
        _owner=r["owner"],
        _tier=r["tier"],
        _priority=r["priority"],
        _created_ns=r["created_ns"],
        _deadline_ns=r["deadline_ns"],
        _cache_key=r["cache_key"],
        _lease_token=r["lease_token"],
        _attempts=r["attempts"],
        _runs=r["runs"],
        _started_ns=r["started_ns"],
        _eta_ns=r["eta_ns"],
        _content_ref=r["content_ref"],
        _extra=r["extra"],
        _heartbeat_ns=r["heartbeat_ns"],
        _retries=r["retries"] or [],
    )
    return job
