"""Several ingress replicas, one /metrics each (pipelines/serve/metrics.py), no Ray: every sample a replica exposes
carries its `replica` label, so two replicas' scrapes never collide as one series, and every query of the Grafana
dashboard aggregates over replicas (a sum, a max, or a quantile of summed buckets), so a panel shows the service."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from pipelines.serve.metrics import JobReport, ServeMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "serve" / "grafana-dashboard.json"


def _samples(m: ServeMetrics) -> list:
    return [s for fam in text_string_to_metric_families(m.exposition()[0].decode()) for s in fam.samples]


def test_each_replica_labels_every_sample_with_itself():
    a, b = ServeMetrics("replica-a"), ServeMetrics("replica-b")
    for m in (a, b):
        m.requests.labels(route="/healthz", status="200").inc()
        m.observe_report(JobReport(queue_wait_s=0.5, call=True, batch_size=2, step_s=[0.1], vae_decode_s=0.2))
        m.orphans_swept.labels(reason="no_row").inc(3)
    sa, sb = _samples(a), _samples(b)
    assert sa and all(s.labels.get("replica") == "replica-a" for s in sa)
    assert all(s.labels.get("replica") == "replica-b" for s in sb)
    key = lambda s: (s.name, tuple(sorted(s.labels.items())))  # noqa: E731
    assert not {key(s) for s in sa} & {key(s) for s in sb}  # one Prometheus, two targets: no series in common
    requests = [s for s in sa if s.name == "sora_serve_requests_total"]
    assert [(s.labels["route"], s.value) for s in requests] == [("/healthz", 1.0)]


def test_every_dashboard_query_aggregates_over_replicas():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and any("orphans_swept" in e for e in exprs)
    for expr in exprs:
        # Every series a query names sits inside sum(...)/max(...) (directly or through rate/increase) and no
        # aggregation keeps the replica label: what a panel shows does not depend on how many replicas there are.
        assert "replica" not in expr, expr
        for name in re.findall(r"sora_serve_\w+", expr):
            inner = re.search(r"(sum|max)( by \([^)]*\))? ?\((rate|increase)?\(?" + name, expr)
            assert inner is not None, (name, expr)
