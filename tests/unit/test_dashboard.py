"""monitoring/: the Grafana dashboard is valid and queries only series the coordinator exports;
the exporter's series (names from DESIGN.md), exposition and rate windows, read back with
prometheus_client's own text-format parser."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shardline import messages as M
from shardline.coordinator.metrics import CoordinatorMetrics, RateWindow, build_1_2_5_buckets

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
SCRAPE_CONFIG = ROOT / "monitoring" / "prometheus.yml"

# A PromQL metric name with our prefix: [a-zA-Z_:][a-zA-Z0-9_:]* (Prometheus data model).
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])shardline:[A-Za-z0-9_:]+")


def load_dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template-variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The `shardline:` series names an expression reads (histogram series keep their suffix)."""
    return set(METRIC_NAME.findall(expr))


def substitute_variables(expr: str, model: str = ".*", worker: str = ".*", rate_interval: str = "5m") -> str:
    """Grafana's variables replaced by values, so Prometheus itself can evaluate the expression."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$model", model).replace("$worker", worker))


def exported_names() -> set[str]:
    return CoordinatorMetrics("smollm2-135m", 8192).exported_names()


def test_dashboard_is_valid_grafana_json():
    d = load_dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"], p["title"]
            assert t["datasource"]["uid"] == "${datasource}"
        # every Grafana variable an expression uses is defined (or built in)
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), f"{p['title']}: ${var} undefined"


def test_dashboard_has_the_panels_the_issue_lists():
    titles = " | ".join(p["title"].lower() for p in load_dashboard()["panels"])
    for word in ("throughput", "time to first token", "inter-token latency", "queue", "kv cache", "step time",
                 "heartbeat age", "preemptions", "errors", "busy", "cost", "memory"):
        assert word in titles, f"no panel about {word!r}"


def test_every_dashboard_metric_is_exported():
    exprs = dashboard_expressions(load_dashboard())
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(used) >= 20, used  # the parser found the expressions' names
    missing = used - exported_names()
    assert not missing, f"the dashboard queries series the coordinator does not export: {sorted(missing)}"


def test_metric_name_parser():
    e = ('histogram_quantile(0.99, sum by (le) (rate(shardline:time_to_first_token_seconds_bucket{model=~"$model"}'
         '[$__rate_interval]))) / shardline:workers_up')
    assert metric_names(e) == {"shardline:time_to_first_token_seconds_bucket", "shardline:workers_up"}
    assert metric_names("label_values(shardline:workers_up, model)") == {"shardline:workers_up"}
    assert metric_names('sum(rate(vllm:generation_tokens_total[5m]))') == set()


def test_design_metric_names_are_exported():
    """The names DESIGN.md fixes (prefix `shardline:`), with Prometheus's suffixes."""
    names = exported_names()
    gauges = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "workers_up"]
    counters = ["prompt_tokens_total", "generation_tokens_total", "request_success_total", "num_preemptions_total",
                "worker_failures_total"]
    histograms = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                  "request_queue_time_seconds", "step_duration_seconds", "iteration_tokens"]
    per_worker = ["worker_heartbeat_age_seconds", "worker_step_time_seconds", "worker_rss_bytes",
                  "worker_busy_fraction", "worker_kv_cache_bytes", "worker_price_per_hour"]
    for n in gauges + counters + per_worker:
        assert "shardline:" + n in names, n
    for n in histograms:
        for suffix in ("_bucket", "_count", "_sum"):
            assert "shardline:" + n + suffix in names, n + suffix


def test_scrape_config_targets_the_default_metrics_port():
    from shardline.config import ClusterConfig

    cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())
    job = cfg["scrape_configs"][0]
    m = ClusterConfig().metrics
    assert job["static_configs"][0]["targets"] == [f"{m.host}:{m.port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


# ---- the exporter itself -------------------------------------------------------------------------
def _families(m: CoordinatorMetrics) -> dict:
    """name -> {(sample name, labels as sorted tuple): value}, parsed by prometheus_client's parser."""
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        out[fam.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    return out


def test_exposition_counts_events_with_vllm_buckets():
    m = CoordinatorMetrics("tiny", 100)
    m.on_request_accepted(7)
    m.on_token(ttft_s=0.03, itl_s=None)
    m.on_token(ttft_s=None, itl_s=0.02)
    m.on_token(ttft_s=None, itl_s=0.2)
    m.on_request_finished("length", e2e_s=0.4, queue_s=0.001, num_prompt_tokens=7, num_generation_tokens=3)
    m.on_step(8, 2)
    m.on_error("INVALID_REQUEST")
    m.on_worker_steps("w0", 0, busy_s=0.5, step_times_s=[0.01, 0.02])
    m.on_worker_steps("w0", 0, busy_s=0.75, step_times_s=[0.25])
    m.on_worker_failure()
    f = _families(m)
    model = (("model", "tiny"),)
    assert f["shardline:prompt_tokens"][("shardline:prompt_tokens_total", model)] == 7
    assert f["shardline:generation_tokens"][("shardline:generation_tokens_total", model)] == 3
    ttft = f["shardline:time_to_first_token_seconds"]
    assert ttft[("shardline:time_to_first_token_seconds_count", model)] == 1
    assert ttft[("shardline:time_to_first_token_seconds_sum", model)] == pytest.approx(0.03)
    # cumulative buckets at vLLM's TTFT bounds: 0.03 falls in (0.02, 0.04]
    le = {dict(k[1])["le"]: v for k, v in ttft.items() if k[0].endswith("_bucket")}
    assert le["0.02"] == 0 and le["0.04"] == 1 and le["+Inf"] == 1 and "2560.0" in le
    itl = f["shardline:inter_token_latency_seconds"]
    assert itl[("shardline:inter_token_latency_seconds_count", model)] == 2
    success = f["shardline:request_success"]
    assert success[("shardline:request_success_total", (("finished_reason", "length"), ("model", "tiny")))] == 1
    assert success[("shardline:request_success_total", (("finished_reason", "stop"), ("model", "tiny")))] == 0
    assert f["shardline:num_preemptions"][("shardline:num_preemptions_total", model)] == 2
    assert f["shardline:request_errors"][("shardline:request_errors_total",
                                          (("code", "INVALID_REQUEST"), ("model", "tiny")))] == 1
    assert f["shardline:worker_failures"][("shardline:worker_failures_total", model)] == 1
    steps = f["shardline:step_duration_seconds"]
    w = (("model", "tiny"), ("stage", "0"), ("worker", "w0"))
    assert steps[("shardline:step_duration_seconds_count", w)] == 3
    assert steps[("shardline:step_duration_seconds_sum", w)] == pytest.approx(0.28)
    busy = f["shardline:worker_busy_seconds"]
    assert busy[("shardline:worker_busy_seconds_total", (("model", "tiny"), ("worker", "w0")))] == pytest.approx(0.75)
    tokens = f["shardline:request_prompt_tokens"]
    assert {dict(k[1])["le"] for k in tokens if k[0].endswith("_bucket")} == {
        "1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "+Inf"}
    # no `_created` series
    assert not any(name.endswith("_created") for fam in f.values() for name, _ in fam)


def test_worker_series_exist_at_zero_from_the_first_heartbeat():
    """A worker's busy-seconds counter and step-duration histogram are exported at 0 from its first
    heartbeat, before any step, so a scrape of an idle new cluster already has their baselines
    (the Prometheus integration test took one and found no series when it ran first)."""
    m = CoordinatorMetrics("tiny", 100)
    m.on_worker_steps("w0", 1, busy_s=0.0, step_times_s=[])
    f = _families(m)
    w = (("model", "tiny"), ("stage", "1"), ("worker", "w0"))
    assert f["shardline:worker_busy_seconds"][("shardline:worker_busy_seconds_total", (("model", "tiny"), ("worker", "w0")))] == 0
    assert f["shardline:step_duration_seconds"][("shardline:step_duration_seconds_count", w)] == 0
    assert f["shardline:step_duration_seconds"][("shardline:step_duration_seconds_sum", w)] == 0


def test_gauges_follow_the_stats_snapshot():
    m = CoordinatorMetrics("tiny", 100)
    worker = dict(host="h", pid=1, ready=True, drained=False, speed=1.0, comm=None, stage=0, layer_start=0,
                  layer_end=30, tp_rank=0, num_steps=0, busy_s=0.0)
    snap = M.StatsReply(
        requests_total=0, requests_finished=0, generation_tokens_total=0, prompt_tokens_total=0, steps_total=0,
        step_time_s_total=0.0, state="serving", coordinator=M.ProcessStats(pid=1, rss_bytes=1, num_fds=1),
        num_requests_running=3, num_requests_waiting=5, kv_cache_usage=0.25, worker_drain=None,
        throughput_window_s=30.0, generation_tokens_per_s=None, price_per_hour=3.0, cost_total=1.0,
        cost_per_million_tokens=None, recent_cost_per_million_tokens=None,
        workers=[M.WorkerStats(worker_id="a", alive=True, heartbeat_age_s=0.4, step_time_s=0.02, busy_fraction=0.5,
                               rss_bytes=100, weight_bytes=50, kv_bytes=10, price_per_hour=3.0, **worker),
                 M.WorkerStats(worker_id="b", alive=False, heartbeat_age_s=9.0, step_time_s=0.0, busy_fraction=None,
                               rss_bytes=0, weight_bytes=0, kv_bytes=0, price_per_hour=None, **worker)])
    m.set_state(snap)
    f = _families(m)
    model = (("model", "tiny"),)
    assert f["shardline:num_requests_waiting"][("shardline:num_requests_waiting", model)] == 5
    assert f["shardline:kv_cache_usage_perc"][("shardline:kv_cache_usage_perc", model)] == 0.25
    assert f["shardline:workers_up"][("shardline:workers_up", model)] == 1
    assert math.isnan(f["shardline:cost_per_million_generation_tokens"][
        ("shardline:cost_per_million_generation_tokens", model)])
    age = f["shardline:worker_heartbeat_age_seconds"]
    assert age[("shardline:worker_heartbeat_age_seconds", (("model", "tiny"), ("worker", "b")))] == 9.0
    busy = f["shardline:worker_busy_fraction"]
    assert math.isnan(busy[("shardline:worker_busy_fraction", (("model", "tiny"), ("worker", "b")))])


def test_two_coordinators_in_one_process_do_not_collide():
    a, b = CoordinatorMetrics("x", 100), CoordinatorMetrics("x", 100)
    a.on_request_accepted(5)
    assert b"prompt_tokens_total{model=\"x\"} 0.0" in b.exposition()


def test_rate_window():
    r = RateWindow(10.0)
    assert r.rate() is None
    r.add(0.0, 0.0)
    assert r.rate() is None
    for t in range(1, 31):
        r.add(float(t), 5.0 * t if t <= 20 else 100.0)  # 5/s for 20 s, then idle
    # window: samples from t=20 (the last at or before 30-10) to t=30: no change
    assert r.rate() == 0.0
    r2 = RateWindow(4.0)
    for t, v in [(0, 0), (1, 2), (2, 4), (3, 10), (4, 12), (5, 14)]:
        r2.add(float(t), float(v))
    assert r2.rate() == pytest.approx((14 - 2) / (5 - 1))
    r2.add(6.0, 1.0)  # the source restarted
    assert r2.rate() is None
    with pytest.raises(ValueError, match="window_s"):
        RateWindow(0)


def test_one_two_five_buckets():
    assert build_1_2_5_buckets(1) == [1]
    assert build_1_2_5_buckets(8192) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def test_http_endpoint_keeps_colons_for_an_openmetrics_scraper():
    """Prometheus asks for OpenMetrics first; the endpoint must still answer in the text format with
    the `shardline:` names intact (prometheus/client_python#1177 renames them otherwise)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = CoordinatorMetrics("x", 100)
    assert m.start_http_server("127.0.0.1", port)
    try:
        m.on_request_accepted(3)
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # Prometheus 2.42's scrape Accept header
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = r.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert fams["shardline:prompt_tokens"].samples[0].value == 3
        assert "shardline_" not in body
        assert not CoordinatorMetrics("x", 100).start_http_server("127.0.0.1", port)  # taken: False, no raise
    finally:
        m.stop_http_server()
