"""The Prometheus monitors and the Grafana dashboard fit the manifests and llmray's metric names.

That the series really exist on a running Ray is checked in test_local_cluster.py (scrape).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "cluster" / "monitoring"
DASHBOARD = json.loads((MONITORING / "grafana-dashboard-llmray.json").read_text())
EXPRS = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def _base_metric(series: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", series.removeprefix("ray_"))


def test_dashboard_queries_exactly_llmrays_metrics():
    from llmray.serve.metrics import METRIC_NAMES

    used = {_base_metric(m) for e in EXPRS for m in re.findall(r"\bray_llmray_[a-z0-9_]+", e)}
    assert used == set(METRIC_NAMES), (
        f"unknown: {used - set(METRIC_NAMES)}; not shown: {set(METRIC_NAMES) - used}"
    )


def test_dashboard_panels_cover_the_issue():
    titles = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in DASHBOARD["panels"]}
    needs = {
        "TTFT": "ray_llmray_time_to_first_token_seconds_bucket",
        "ITL": "ray_llmray_inter_token_latency_seconds_bucket",
        "Throughput": "rate(ray_llmray_generation_tokens_total",
        "KV-cache": "ray_llmray_kv_cache_usage_perc",
        "queue": "ray_llmray_num_requests_waiting",
        "replicas": "ray_serve_deployment_replica_healthy",
    }
    for word, expr in needs.items():
        panels = [t for t, e in titles.items() if word.lower() in t.lower() and expr in e]
        assert panels, f"no panel about {word} querying {expr}"
    for expr in EXPRS:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        if "_bucket" in expr:
            assert expr.startswith("histogram_quantile(") and "sum by (le" in expr, expr


def test_dashboard_layout_and_variables():
    assert DASHBOARD["uid"] == "llmray-serving"
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']} overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= mine
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    used = {v for e in EXPRS for v in re.findall(r"\$(\w+)", e)} - {"__rate_interval"}
    assert used <= variables, used - variables


def test_monitors_select_ray_pods_on_the_metrics_port():
    monitors = {d["kind"]: d for d in yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text()) if d}
    assert set(monitors) == {"ServiceMonitor", "PodMonitor"}
    for m in monitors.values():
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "prometheus"  # kube-prometheus-stack's selector
    assert monitors["ServiceMonitor"]["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert monitors["PodMonitor"]["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "worker"
    (endpoint,) = monitors["ServiceMonitor"]["spec"]["endpoints"]
    (pod_endpoint,) = monitors["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == pod_endpoint["port"] == "metrics"
    # Every pod of every manifest exposes that port name on its metrics-export-port.
    for path in [REPO / "ray-cluster.yaml", REPO / "cluster" / "rayservice.yaml"]:
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        spec = doc["spec"].get("rayClusterConfig", doc["spec"])
        worker_labels = set()
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            container = group["template"]["spec"]["containers"][0]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert str(ports["metrics"]) == group["rayStartParams"]["metrics-export-port"]
            worker_labels |= set(group["template"]["metadata"]["labels"].items())
        assert ("app.kubernetes.io/name", "llmray") in worker_labels


def test_kustomization_references_exist():
    kust = yaml.safe_load((REPO / "cluster" / "kustomization.yaml").read_text())
    files = kust["resources"] + [f for g in kust["configMapGenerator"] for f in g["files"]]
    for f in files:
        assert (REPO / "cluster" / f).is_file(), f
    (gen,) = kust["configMapGenerator"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
