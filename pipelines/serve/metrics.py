"""Prometheus metrics of the service, served by the ingress at `GET /metrics` on the API port.

    curl -s http://127.0.0.1:8000/metrics | grep sora_serve_
    (Grafana: cluster/serve/grafana-dashboard.json reads these series)

How series measured in other processes reach the API port: the generator replicas (other Ray actors, maybe on
other nodes) time their part of each job (text encode, each denoising step, VAE decode, encode + upload) and count
their text-cache hits, and send those figures back with the job's result over the call the dispatcher already
awaits (`JobReport`); the dispatcher, in the ingress process, observes them into this process's registry. So no
scrape has to reach a generator process, nothing depends on a shared folder (prometheus_client's multiprocess
mode works on one machine only) and nothing waits on Ray's metrics agents (each node's own port, exported every
few seconds). What one ingress replica dispatched is what its `/metrics` shows: with several ingress replicas
each has its own counts, told apart by the `replica` label (the Serve replica id) every sample carries: scrape every
replica (one target each), and sum across them, as every query of the Grafana dashboard does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""One denoising step: milliseconds for the CPU demo model, tens of seconds for a 14B model at 720p."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
ORPHAN_REASONS = ("no_row", "expired", "failed", "superseded", "finished", "temp")
"""Why the orphan sweep (sweep.py) deleted a store object: its `orphans_swept` label values."""


@dataclass
class JobReport:
    """What a generator measured for one job, sent back with its result (a plain dataclass: it crosses the
    Ray call as a pickled value). Figures of the shared pipeline call (text encode, steps, decode, cache counts)
    ride on one job of the call only, so a batch of four is not counted four times."""

    queue_wait_s: float | None = None  # accepted -> its generator started sampling it
    encode_upload_s: float | None = None  # MP4 + thumbnail encoded and stored
    call: bool = False  # this report carries the pipeline call's figures below
    batch_size: int = 0
    text_encode_s: list[float] = field(default_factory=list)  # one per encoder call (prompts, negative prompts)
    step_s: list[float] = field(default_factory=list)  # one per denoising step
    vae_decode_s: float | None = None
    text_cache_hits: int = 0
    text_cache_misses: int = 0
    text_cache_bytes: int | None = None


class ServeMetrics:
    """The registry of one ingress process and its series."""

    def __init__(self, replica: str) -> None:
        self.registry = CollectorRegistry()
        kw = {"registry": self.registry, "namespace": "sora_serve"}
        self.replica = replica
        self._http_series(kw)
        self._job_series(kw)
        self._queue_series(kw)
        for cache in ("result", "text"):  # series exist (at 0) before the first hit, so rates and panels start at once
            self.cache_hits.labels(cache=cache)
            self.cache_misses.labels(cache=cache)
        for reason in ("stalled", "lapsed"):
            self.lease_expiries.labels(reason=reason)
        for reason in ORPHAN_REASONS:
            self.orphans_swept.labels(reason=reason)

    def _http_series(self, kw: dict[str, Any]) -> None:
        """Requests, their latency and the error answers, as the ingress sees them."""
        self.requests = Counter("requests", "HTTP requests by route and status code.", ("route", "status"), **kw)
        self.request_seconds = Histogram(
            "request_seconds",
            "HTTP request latency (the response, not the job).",
            ("route",),
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.errors = Counter(
            "errors",
            "4xx and 5xx answers by status and reason (the error code, or the admission limit for 429/503).",
            ("status", "reason"),
            **kw,
        )

    def _job_series(self, kw: dict[str, Any]) -> None:
        """Where a job's time goes (metrics.JobReport): queue wait, text encode, steps, decode, encode + upload, end to
        end; the batch sizes and the caches of the pipeline calls."""
        self.queue_wait = Histogram(
            "queue_wait_seconds", "Accepted to sampling started, per job.", buckets=LATENCY_BUCKETS, **kw
        )
        self.text_encode = Histogram(
            "text_encode_seconds", "Text encoder calls (cache misses only reach the model).", buckets=STEP_BUCKETS, **kw
        )
        self.denoise_step = Histogram(
            "denoise_step_seconds",
            "Seconds per denoising step of a pipeline call (the whole batch).",
            buckets=STEP_BUCKETS,
            **kw,
        )
        self.vae_decode = Histogram(
            "vae_decode_seconds", "Autoencoder decode per pipeline call.", buckets=STEP_BUCKETS, **kw
        )
        self.encode_upload = Histogram(
            "encode_upload_seconds", "MP4 + thumbnail encoded and stored, per job.", buckets=LATENCY_BUCKETS, **kw
        )
        self.end_to_end = Histogram(
            "end_to_end_seconds",
            "Accepted to finished, per job, by how it ended.",
            ("status",),
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.batch_size = Histogram("batch_size", "Clips sampled per pipeline call.", buckets=BATCH_BUCKETS, **kw)
        self.cache_hits = Counter(
            "cache_hits", "Lookups answered from a cache, by cache (result, text).", ("cache",), **kw
        )
        self.cache_misses = Counter("cache_misses", "Lookups a cache could not answer, by cache.", ("cache",), **kw)
        self.text_cache_bytes = Gauge(
            "text_cache_bytes",
            "Bytes held by the text-embedding cache of the generator replica that last reported.",
            **kw,
        )

    def _queue_series(self, kw: dict[str, Any]) -> None:
        """The dispatcher's work: leases given up, jobs by how they ended, admission refusals, orphan sweeps, jobs
        in flight."""
        self.lease_expiries = Counter(
            "lease_expiries",
            "Leases given up: stalled (no step progress within queue.stall_timeout_s) "
            "or lapsed (the holder stopped renewing, e.g. died).",
            ("reason",),
            **kw,
        )
        self.jobs = Counter("jobs", "Jobs this replica dispatched, by how the generator call ended.", ("status",), **kw)
        self.rejected = Counter("rejected", "Creates refused by admission (429/503), by limit.", ("reason",), **kw)
        self.orphans_swept = Counter(
            "orphans_swept",
            "Store objects the orphan sweep deleted, by why: no_row, expired, "
            "failed, superseded (an attempt whose lease was taken over), temp.",
            ("reason",),
            **kw,
        )
        self.in_flight = Gauge("in_flight_jobs", "Jobs this replica holds leases on (handed to the generator).", **kw)

    def observe_report(self, report: JobReport) -> None:
        if report.queue_wait_s is not None:
            self.queue_wait.observe(report.queue_wait_s)
        if report.encode_upload_s is not None:
            self.encode_upload.observe(report.encode_upload_s)
        if not report.call:
            return
        self.batch_size.observe(report.batch_size)
        for s in report.text_encode_s:
            self.text_encode.observe(s)
        for s in report.step_s:
            self.denoise_step.observe(s)
        if report.vae_decode_s is not None:
            self.vae_decode.observe(report.vae_decode_s)
        if report.text_cache_hits:
            self.cache_hits.labels(cache="text").inc(report.text_cache_hits)
        if report.text_cache_misses:
            self.cache_misses.labels(cache="text").inc(report.text_cache_misses)
        if report.text_cache_bytes is not None:
            self.text_cache_bytes.set(report.text_cache_bytes)

    def collect(self) -> Iterator[Metric]:
        """The registry's families, each sample labelled with this replica."""
        for family in self.registry.collect():
            family.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield family

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of every series, and its content type."""
        return generate_latest(self), CONTENT_TYPE_LATEST
