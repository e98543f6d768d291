"""Metrics against a real Prometheus server: it scrapes the coordinator during a short load, and
its query API must show every series the Grafana dashboard reads, each one moved, with counts that
agree with what the clients were told (usage and timings in DONE). Also `shardline status`.

The cluster here is private (one stage, 2 seats, a 24-block KV pool, a price per hour): the load
is shaped so that requests wait, sequences are preempted and one request is refused, and the test
ends by killing the worker, so worker failures move too. Prometheus (Debian package `prometheus`)
runs on loopback with a temporary config derived from monitoring/prometheus.yml and a temporary
data directory; it is stopped in teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shardline import InvalidRequestError
from shardline.cli import main as cli
from shardline.local import LocalCluster, free_port_block
from tests.unit.test_dashboard import (SCRAPE_CONFIG, dashboard_expressions, load_dashboard, metric_names,
                                       substitute_variables)

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
PRICE = 1.5  # per worker-hour
NUM_KV_BLOCKS = 24
BLOCK_SIZE = 16
LONG = ["Write a long story about a lighthouse keeper.", "List every prime number you know, one per line:"]
SHORT = ["The capital of France is", "2 + 2 =", "A haiku about rain:", "def fibonacci(n):"]
LONG_TOKENS = 300  # ~315 tokens = 20 blocks each: if the two overlap at all (the second past 4 blocks) they
# overflow the 24-block pool and one is preempted (at 200 tokens, 14 blocks each, a CI run saw none)
SHORT_TOKENS = 16
POLL_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster():
    """A private cluster: the last test kills its worker."""
    overrides = {"workers": {"count": 1, "threads": 1, "price_per_hour": PRICE},
                 "parallel": {"pipeline_parallel": 1},
                 "scheduler": {"max_num_seqs": 2, "num_kv_blocks": NUM_KV_BLOCKS, "block_size": BLOCK_SIZE,
                               "enable_prefix_caching": False},
                 "heartbeat": {"interval_s": 0.5, "misses": 6}}
    c = LocalCluster(overrides)
    c.launched_at = time.time()
    c.start()
    c.ready_at = time.time()
    yield c
    c.stop()


class Prometheus:
    """A `prometheus` process on loopback and its HTTP query API."""

    def __init__(self, exe: str, target: str, workdir: Path):
        cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())  # the shipped scrape config, retargeted
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
        self.job = cfg["scrape_configs"][0]["job_name"]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        port = free_port_block(1)
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.output()}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {self.output()}"
            time.sleep(0.2)  # poll interval

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """/api/v1/query at time `at` (Unix seconds; default now); the result vector (fails the test
        on a PromQL error)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query {expr!r} failed: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of `expr` (None when the vector is empty)."""
        res = self.query(expr, at)
        assert len(res) <= 1, f"{expr}: {res}"
        return float(res[0]["value"][1]) if res else None

    def wait_for(self, expr: str, predicate, what: str) -> float:
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while True:
            v = self.value(expr)
            if v is not None and predicate(v):
                return v
            assert time.monotonic() < deadline, f"{what}: {expr} = {v}"
            time.sleep(0.25)  # poll interval

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus_exe() -> str:
    """The prometheus binary; a skip outside CI when it is missing, a failure in CI (`CI` set)."""
    exe = shutil.which("prometheus")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but the prometheus binary is missing (.ci/run installs the Debian package)")
        pytest.skip("the prometheus binary is not installed (Debian package `prometheus`; .ci/run installs it)")
    return exe


@pytest.fixture(scope="module")
def prometheus(prometheus_exe, cluster, tmp_path_factory):
    p = Prometheus(prometheus_exe, f"{cluster.config.metrics.host}:{cluster.config.metrics.port}",
                   tmp_path_factory.mktemp("prometheus"))
    yield p
    p.stop()


def _wait_idle(client, timeout_s: float = POLL_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = client.stats()
        if s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0 and s["num_steps_in_flight"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)  # poll interval


def test_status_command_shows_workers_kv_queue_and_cost(cluster):
    c = cluster.client
    r = c.generate("Hello there", max_tokens=8, ignore_eos=True)
    assert len(r.token_ids) == 8
    _wait_idle(c)
    _wait_until(lambda: c.stats()["workers"][0]["num_steps"] >= 8, "a heartbeat reporting the steps")
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "--json", "--address", cluster.address])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["state"] == "serving"
    assert s["generation_tokens_total"] >= 8 and s["num_kv_blocks"] == NUM_KV_BLOCKS
    [w] = s["workers"]
    assert (w["worker_id"], w["stage"], w["layer_start"], w["layer_end"], w["tp_rank"]) == ("local-0", 0, 0, 30, 0)
    assert w["price_per_hour"] == PRICE and s["price_per_hour"] == PRICE
    assert w["rss_bytes"] > 0 and w["weight_bytes"] > 0 and w["num_steps"] >= 8
    assert s["cost_per_million_tokens"] > 0
    res = runner.invoke(cli, ["status", "--address", cluster.address])
    assert res.exit_code == 0, res.output
    for text in ("local-0", "[0, 30)", f"/ {NUM_KV_BLOCKS} blocks", "requests running / waiting", "1.50",
                 "cost per 1M generated tokens"):
        assert text in res.output, (text, res.output)
    # nothing listens there: a clear error, not a hang
    res = runner.invoke(cli, ["status", "--address", f"tcp://127.0.0.1:{free_port_block(1)}", "--timeout", "1"])
    assert res.exit_code != 0 and "Timeout" in res.output


def _sum(prom: Prometheus, name: str) -> float:
    v = prom.value(f"sum({name})")
    assert v is not None, f"{name}: no series"
    return v


def test_prometheus_sees_every_dashboard_metric_move(prometheus, cluster):
    prom, c = prometheus, cluster.client
    dashboard = load_dashboard()
    exprs = dashboard_expressions(dashboard)
    names = sorted(set().union(*(metric_names(e) for e in exprs)))
    gauges = [n for n in names if not n.endswith(("_total", "_bucket", "_count", "_sum"))]
    cumulative = [n for n in names if n not in gauges]

    # 1. a scrape of the idle cluster: the baseline of every cumulative series
    _wait_idle(c)
    idle_since = time.time()
    prom.wait_for(f'timestamp(up{{job="{prom.job}"}})', lambda t: t > idle_since + 0.1, "a scrape after idle")
    assert prom.value(f'up{{job="{prom.job}"}}') == 1
    scraped = {r["metric"]["__name__"] for r in prom.query('count by (__name__) ({__name__=~"shardline:.+"})')}
    before = {n: _sum(prom, n) for n in scraped if n.endswith(("_total", "_bucket", "_count", "_sum"))}

    # 2. the load: two long requests hold both seats and preempt each other; four short ones wait
    with ThreadPoolExecutor(6) as pool:
        longs = [pool.submit(c.generate, p, max_tokens=LONG_TOKENS, ignore_eos=True) for p in LONG]
        _wait_until(lambda: c.stats()["num_requests_running"] == 2, "both long requests running")
        shorts = [pool.submit(c.generate, p, max_tokens=SHORT_TOKENS, ignore_eos=True) for p in SHORT]
        with pytest.raises(InvalidRequestError):
            c.generate(prompt_token_ids=[10**6], max_tokens=1)  # outside the vocabulary
        results = [f.result() for f in longs + shorts]
    _wait_idle(c)
    n = len(results)
    prompt_tokens = sum(r.usage["prompt_tokens"] for r in results)
    gen_tokens = sum(r.usage["completion_tokens"] for r in results)
    assert gen_tokens == 2 * LONG_TOKENS + 4 * SHORT_TOKENS
    preemptions = sum(r.usage["num_preemptions"] for r in results)
    assert preemptions > 0, "the 24-block pool was meant to force preemption"

    # 3. Prometheus has scraped the end of the load, and the worker's step report has arrived
    ttft = "shardline:time_to_first_token_seconds"
    prom.wait_for(f"sum({ttft}_count)", lambda v: v == before[f"{ttft}_count"] + n, "TTFT count")
    prom.wait_for("sum(shardline:step_duration_seconds_count) - sum(shardline:iteration_tokens_count)",
                  lambda v: v == 0, "every dispatched step timed by the worker")

    def delta(name: str) -> float:
        return _sum(prom, name) - before[name]

    # exact agreement with what the clients were told
    assert delta(f"{ttft}_count") == n  # TTFT count == number of requests
    assert delta("shardline:e2e_request_latency_seconds_count") == n
    assert delta("shardline:request_success_total") == n
    assert delta("shardline:prompt_tokens_total") == prompt_tokens
    assert delta("shardline:generation_tokens_total") == gen_tokens
    assert delta("shardline:inter_token_latency_seconds_count") == gen_tokens - n
    assert delta("shardline:num_preemptions_total") == preemptions
    assert delta(f"{ttft}_sum") == pytest.approx(sum(r.timings["ttft_s"] for r in results), rel=1e-6)
    assert delta("shardline:e2e_request_latency_seconds_sum") == pytest.approx(
        sum(r.timings["e2e_s"] for r in results), rel=1e-6)
    assert delta("shardline:request_queue_time_seconds_sum") == pytest.approx(
        sum(r.timings["queue_s"] for r in results), rel=1e-6, abs=1e-9)
    assert prom.value('sum(shardline:request_errors_total{code="INVALID_REQUEST"})') >= 1
    # every computed token is in some step (recomputation after preemption adds more)
    assert delta("shardline:iteration_tokens_sum") >= prompt_tokens + gen_tokens - n
    # per-worker facts: the KV pool is 2 (K, V) x layers x blocks x block_size x kv heads x head dim x fp32
    assert prom.value("shardline:worker_kv_cache_bytes") == 2 * 30 * NUM_KV_BLOCKS * BLOCK_SIZE * 3 * 64 * 2  # float16
    assert prom.value("shardline:worker_price_per_hour") == PRICE == prom.value("shardline:price_per_hour")
    assert prom.value("shardline:workers_up") == 1
    busy_s = delta("shardline:worker_busy_seconds_total")
    assert busy_s == pytest.approx(delta("shardline:step_duration_seconds_sum"), rel=1e-6)
    assert 0 < prom.value("max_over_time(shardline:worker_busy_fraction[10m])") <= 1
    # queue and KV gauges were seen up during the load
    assert prom.value("max_over_time(shardline:num_requests_running[10m])") == 2
    assert prom.value("max_over_time(shardline:num_requests_waiting[10m])") >= 1
    assert 0 < prom.value("max_over_time(shardline:kv_cache_usage_perc[10m])") <= 1
    # cost per 1M tokens = price x hours since the worker registered / generated tokens x 1e6, read
    # from one scrape. The worker registered between the launch and the cluster being ready; the
    # coordinator computed the gauge at most one refresh (0.5 s) before the scrape.
    at = time.time()
    cost = prom.value("shardline:cost_per_million_generation_tokens", at)
    t_scrape = prom.value("timestamp(shardline:cost_per_million_generation_tokens)", at)
    tokens = prom.value("shardline:generation_tokens_total", at)  # idle: the same as when the gauge was set
    lo = PRICE * (t_scrape - 1.0 - cluster.ready_at) / 3600 / tokens * 1e6
    hi = PRICE * (t_scrape - cluster.launched_at) / 3600 / tokens * 1e6
    assert lo <= cost <= hi, (lo, cost, hi)

    # 4. every dashboard expression evaluates to data in Prometheus (variables filled in)
    for e in exprs:
        q = substitute_variables(e, model=MODEL, worker="local-0", rate_interval="10m")
        if q.startswith("label_values("):  # a Grafana function: check the series it lists instead
            q = "count by (model) (" + q[len("label_values("):].rsplit(",", 1)[0] + ")"
        assert prom.query(q), f"no data for the dashboard expression {q}"

    # 5. a worker failure: kill the worker; the coordinator counts it and workers_up drops
    [w] = c.stats()["workers"]
    os.kill(w["pid"], signal.SIGKILL)
    prom.wait_for("sum(shardline:worker_failures_total)", lambda v: v == 1, "worker failure counted")
    prom.wait_for("sum(shardline:workers_up)", lambda v: v == 0, "workers_up after the kill")
    assert prom.value("shardline:worker_heartbeat_age_seconds") > 0.5 * 6

    # 6. generic: every series the dashboard reads exists and moved
    for name in cumulative:
        after = _sum(prom, name)
        assert after > before[name], f"{name} did not rise ({before[name]} -> {after})"
    for name in gauges:
        assert prom.query(name), f"{name}: no series"
        assert prom.value(f"max(max_over_time({name}[10m]))") > 0, f"{name} never left 0"
        if name == "shardline:workers_up":
            assert prom.value(f"min(min_over_time({name}[10m]))") < prom.value(f"max(max_over_time({name}[10m]))")


def _wait_until(predicate, what: str, timeout_s: float = POLL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)  # poll interval
