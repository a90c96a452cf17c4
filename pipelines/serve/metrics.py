"""Ray metrics of the service (exported on each node's metrics port, so Prometheus scrapes them).

Created lazily inside a replica: `ray.util.metrics` needs a connected worker.
"""

from __future__ import annotations

from functools import cache

LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 32]


@cache
def ingress_metrics() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "requests": Counter("sora_serve_requests_total", "HTTP requests by route and status code.", tag_keys=("route", "status")),
        "latency": Histogram("sora_serve_request_latency_s", "HTTP request latency.", LATENCY_BOUNDARIES, tag_keys=("route",)),
        "job_latency": Histogram("sora_serve_job_latency_s", "Accepted to finished, per job.", LATENCY_BOUNDARIES, tag_keys=("status",)),
        "queue_depth": Gauge("sora_serve_queue_depth", "Jobs accepted and not finished (waiting or running).", tag_keys=("state",)),
        "cache_hits": Counter("sora_serve_cache_hits_total", "Requests answered from a cache.", tag_keys=("cache",)),
        "rejected": Counter("sora_serve_rejected_total", "Creates refused for overload.", tag_keys=("reason",)),
    }


@cache
def generator_metrics() -> dict:
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "batch_size": Histogram("sora_serve_batch_size", "Clips sampled per pipeline call.", BATCH_BOUNDARIES),
        "generation": Histogram("sora_serve_generation_s", "Seconds per pipeline call.", LATENCY_BOUNDARIES),
        "clips": Counter("sora_serve_clips_total", "Clips generated.", tag_keys=("status",)),
        "text_cache": Gauge("sora_serve_text_cache", "Text-embedding LRU lookups (cumulative per replica).", tag_keys=("result",)),
    }
