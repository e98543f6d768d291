"""Prometheus exporter of the coordinator: the only module that imports `prometheus_client`.

The serving loop keeps plain data (counters in `CoordinatorStats`, `WorkerInfo` fields, the
scheduler's queues) and calls the small `on_*` hooks below at the events that feed histograms
and counters; gauges are copied from `Coordinator.stats_snapshot()` a few times a second
(`set_state`), so `shardline status` and Prometheus read the same numbers.

Series (prefix `shardline:`, label `model` on every series; `worker`, `stage`, `finished_reason`,
`code` where listed). Histogram buckets are vLLM's (v1 `PrometheusStatLogger`), so quantile
queries written for vLLM's dashboards carry over with the prefix changed:

    gauges      num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1), workers_up,
                cost_per_million_generation_tokens, price_per_hour (cluster, summed over workers alive)
    counters    prompt_tokens_total, generation_tokens_total, request_success_total{finished_reason},
                request_errors_total{code}, num_preemptions_total, worker_failures_total
    histograms  time_to_first_token_seconds, inter_token_latency_seconds,
                e2e_request_latency_seconds, request_queue_time_seconds, request_prompt_tokens,
                request_generation_tokens, iteration_tokens, step_duration_seconds{worker, stage}
    per worker  worker_heartbeat_age_seconds, worker_step_time_seconds, worker_busy_fraction,
                worker_busy_seconds_total, worker_rss_bytes, worker_weight_bytes,
                worker_kv_cache_bytes, worker_price_per_hour   (all {worker})

The exposition is served over HTTP (`start_http_server`, one daemon thread, text format 0.0.4) from a registry of
this coordinator's own (never the process-global one), so two coordinators in one process (tests)
do not collide.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shardline.messages import StatsReply

log = logging.getLogger("shardline.coordinator.metrics")

PREFIX = "shardline:"

# Bucket boundaries copied from vLLM v1 (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# vLLM has no per-stage step histogram; these cover a GPU micro-step (1 ms) to a slow CPU prefill.
STEP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                         0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

FINISHED_REASONS = ("stop", "length", "abort")
ERROR_CODES = ("BAD_FRAME", "VERSION_MISMATCH", "UNKNOWN_TYPE", "INVALID_REQUEST", "OVERLOADED", "UNAVAILABLE",
               "INTERNAL", "CANCELLED", "NOT_FOUND")  # shardline.protocol.ErrorCode names


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including `max_value` (vLLM's token-count buckets).

    >>> build_1_2_5_buckets(100)
    [1, 2, 5, 10, 20, 50, 100]
    """
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def _or_nan(x: float | None) -> float:
    """None (not known: no price configured, no samples yet) is exported as NaN, never as 0."""
    return math.nan if x is None else x


@dataclass
class CoordinatorStats:
    """The serving loop's counters since start (plain data: STATS_REPLY carries them as they are,
    and `set_state` copies them to Prometheus)."""

    requests_total: int = 0  # requests accepted (a request with n > 1 choices counts once)
    requests_finished: int = 0  # requests answered with DONE
    generation_tokens_total: int = 0
    prompt_tokens_total: int = 0
    steps_total: int = 0  # steps whose result came back
    step_time_s_total: float = 0.0  # seconds from dispatch to result, summed over those steps


def process_stats() -> dict:
    """This process: `pid`, resident memory `rss_bytes` and open file descriptors `num_fds`
    (Linux /proc; zeros elsewhere), for leak checks under load and fuzzing."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        rss = fds = 0
    return {"pid": os.getpid(), "rss_bytes": rss, "num_fds": fds}


class RateWindow:
    """Rate of change of a cumulative quantity (tokens, busy seconds) over the last `window_s`
    seconds, from timestamped samples `(t, value)`: (v_newest - v_oldest) / (t_newest - t_oldest),
    where the oldest sample kept is the last one at or before `t_newest - window_s`.
    Units: value units per second. None until two samples span a positive time."""

    def __init__(self, window_s: float):
        if window_s <= 0:
            raise ValueError(f"window_s={window_s}: must be > 0")
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        if self.samples and value < self.samples[-1][1]:  # the source restarted: start over
            self.samples.clear()
        self.samples.append((t, value))
        while len(self.samples) >= 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


class CoordinatorMetrics:
    """The coordinator's Prometheus series, in a registry of its own.

    `model` labels every series; `max_model_len` (tokens) bounds the token-count buckets.
    """

    def __init__(self, model: str, max_model_len: int):
        prometheus_client.disable_created_metrics()  # no `_created` series (vLLM disables them too)
        self.model = model
        self.registry = CollectorRegistry()
        self._server = self._thread = None
        r, m = self.registry, ["model"]
        p = PREFIX
        w = ["model", "worker"]
        # gauges: scheduler and cluster state
        self.num_requests_running = Gauge(p + "num_requests_running", "Requests in the running queue.", m, registry=r)
        self.num_requests_waiting = Gauge(p + "num_requests_waiting", "Requests in the waiting queue.", m, registry=r)
        self.kv_cache_usage = Gauge(p + "kv_cache_usage_perc", "KV-cache usage: blocks in use / blocks (1 = 100%).",
                                    m, registry=r)
        self.workers_up = Gauge(p + "workers_up", "Workers registered and not lost.", m, registry=r)
        self.cost_per_million = Gauge(
            p + "cost_per_million_generation_tokens",
            "Cluster cost (sum of worker hourly prices x hours since each registered) per million generated "
            "tokens, in the price's currency; NaN before the first token.", m, registry=r)
        self.price_per_hour = Gauge(p + "price_per_hour", "Hourly price of the workers alive, summed; NaN when no "
                                    "price is configured.", m, registry=r)
        # counters
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of accepted requests.", m, registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter(p + "request_success", "Requests finished with DONE, by finish reason.",
                                       m + ["finished_reason"], registry=r)
        self.request_errors = Counter(p + "request_errors", "ERROR replies on the client plane, by error code.",
                                      m + ["code"], registry=r)
        self.num_preemptions = Counter(p + "num_preemptions", "Sequences preempted (KV blocks freed, recomputed "
                                       "later).", m, registry=r)
        self.worker_failures = Counter(p + "worker_failures", "Workers declared lost (missed heartbeats, failed "
                                       "sends).", m, registry=r)
        # histograms: requests
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              m, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive generated tokens of a "
                             "request.", m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from arrival to DONE.", m,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time from arrival to first scheduled.", m,
                                    buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(p + "request_prompt_tokens", "Prompt tokens per finished request.",
                                               m, buckets=token_buckets, registry=r)
        self.request_generation_tokens = Histogram(p + "request_generation_tokens", "Generated tokens per finished "
                                                   "request.", m, buckets=token_buckets, registry=r)
        # histograms: steps
        self.iteration_tokens = Histogram(p + "iteration_tokens", "Tokens computed per step (prompt chunks + "
                                          "decodes).", m, buckets=ITERATION_TOKENS_BUCKETS, registry=r)
        self.step_duration = Histogram(p + "step_duration_seconds", "One worker's forward pass of one step "
                                       "(after its input arrived), as reported in heartbeats.",
                                       w + ["stage"], buckets=STEP_DURATION_BUCKETS, registry=r)
        # per worker
        self.worker_heartbeat_age = Gauge(p + "worker_heartbeat_age_seconds", "Seconds since the worker was last "
                                          "heard from.", w, registry=r)
        self.worker_step_time = Gauge(p + "worker_step_time_seconds", "The worker's last forward pass.", w,
                                      registry=r)
        self.worker_busy_fraction = Gauge(p + "worker_busy_fraction", "Time in forward passes / wall time over the "
                                          "recent window (0..1).", w, registry=r)
        self.worker_busy_seconds = Counter(p + "worker_busy_seconds", "Seconds the worker spent in forward passes.",
                                           w, registry=r)
        self.worker_rss = Gauge(p + "worker_rss_bytes", "Resident memory of the worker process.", w, registry=r)
        self.worker_weight_bytes = Gauge(p + "worker_weight_bytes", "Bytes of the worker's weights as kept.", w,
                                         registry=r)
        self.worker_kv_bytes = Gauge(p + "worker_kv_cache_bytes", "Bytes of the worker's KV-cache pool.", w,
                                     registry=r)
        self.worker_price = Gauge(p + "worker_price_per_hour", "Hourly price of the worker (NaN: none given).", w,
                                  registry=r)
        # Series that exist from the start (at 0), so rate() and increase() see the first event.
        for metric in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage, self.workers_up,
                       self.cost_per_million, self.price_per_hour, self.prompt_tokens, self.generation_tokens,
                       self.num_preemptions, self.worker_failures, self.ttft, self.itl, self.e2e, self.queue_time,
                       self.request_prompt_tokens, self.request_generation_tokens, self.iteration_tokens):
            metric.labels(model)
        for reason in FINISHED_REASONS:
            self.request_success.labels(model, reason)
        for code in ERROR_CODES:
            self.request_errors.labels(model, code)
        self.cost_per_million.labels(model).set(math.nan)
        self.price_per_hour.labels(model).set(math.nan)
        self._busy_seen: dict[str, float] = {}  # worker id -> cumulative busy seconds already counted

    # ---- events from the serving loop ---------------------------------------------------
    def on_request_accepted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self.model).inc(num_prompt_tokens)

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        """One generated token: its TTFT (first token) or the gap since the previous token."""
        self.generation_tokens.labels(self.model).inc()
        if ttft_s is not None:
            self.ttft.labels(self.model).observe(ttft_s)
        if itl_s is not None:
            self.itl.labels(self.model).observe(itl_s)

    def on_request_finished(self, finished_reason: str, e2e_s: float, queue_s: float | None,
                            num_prompt_tokens: int, num_generation_tokens: int) -> None:
        self.request_success.labels(self.model, finished_reason).inc()
        self.e2e.labels(self.model).observe(e2e_s)
        if queue_s is not None:
            self.queue_time.labels(self.model).observe(queue_s)
        self.request_prompt_tokens.labels(self.model).observe(num_prompt_tokens)
        self.request_generation_tokens.labels(self.model).observe(num_generation_tokens)

    def on_error(self, code_name: str) -> None:
        self.request_errors.labels(self.model, code_name).inc()

    def on_step(self, num_batched_tokens: int, num_preempted: int) -> None:
        """A step plan dispatched: its token count and the preemptions its scheduling caused."""
        if num_batched_tokens:
            self.iteration_tokens.labels(self.model).observe(num_batched_tokens)
        if num_preempted:
            self.num_preemptions.labels(self.model).inc(num_preempted)

    def on_worker_failure(self) -> None:
        self.worker_failures.labels(self.model).inc()

    def on_worker_steps(self, worker_id: str, stage: int | None, busy_s: float, step_times_s: list[float]) -> None:
        """A heartbeat's step report: cumulative busy seconds and the forward-pass durations since
        the previous heartbeat (seconds)."""
        seen = self._busy_seen.get(worker_id, 0.0)
        busy = self.worker_busy_seconds.labels(self.model, worker_id)  # exported at 0 before any step
        if busy_s > seen:
            busy.inc(busy_s - seen)
        self._busy_seen[worker_id] = busy_s
        if stage is not None:
            h = self.step_duration.labels(self.model, worker_id, str(stage))  # likewise
            for t in step_times_s:
                h.observe(t)

    def set_state(self, snapshot: StatsReply) -> None:
        """Copy the gauges from a `Coordinator.stats_snapshot()` (a STATS_REPLY body)."""
        m = self.model
        self.num_requests_running.labels(m).set(snapshot.num_requests_running or 0)
        self.num_requests_waiting.labels(m).set(snapshot.num_requests_waiting or 0)
        self.kv_cache_usage.labels(m).set(snapshot.kv_cache_usage or 0.0)
        workers = snapshot.workers
        self.workers_up.labels(m).set(sum(1 for w in workers if w.alive))
        self.cost_per_million.labels(m).set(_or_nan(snapshot.cost_per_million_tokens))
        self.price_per_hour.labels(m).set(_or_nan(snapshot.price_per_hour))
        for w in workers:
            wid = w.worker_id
            self.worker_heartbeat_age.labels(m, wid).set(w.heartbeat_age_s)
            self.worker_step_time.labels(m, wid).set(w.step_time_s)
            self.worker_busy_fraction.labels(m, wid).set(_or_nan(w.busy_fraction))
            self.worker_rss.labels(m, wid).set(w.rss_bytes)
            self.worker_weight_bytes.labels(m, wid).set(w.weight_bytes)
            self.worker_kv_bytes.labels(m, wid).set(w.kv_bytes)
            self.worker_price.labels(m, wid).set(_or_nan(w.price_per_hour))

    # ---- exposition ----------------------------------------------------------------------
    def exported_names(self) -> set[str]:
        """Every series name this registry can expose (`X_total` for counters; `X_bucket`,
        `X_count`, `X_sum` for histograms; `X` for gauges), whether or not it has a sample yet."""
        names = set()
        for family in self.registry.collect():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
            else:
                names.add(family.name)
        return names

    def exposition(self) -> bytes:
        """The Prometheus text format of every series (what the HTTP endpoint serves)."""
        return prometheus_client.generate_latest(self.registry)

    def start_http_server(self, host: str, port: int) -> bool:
        """Serve the exposition at http://host:port/metrics on a daemon thread. Returns False (and
        logs why) when the address cannot be bound; the coordinator keeps serving without it.

        Always the Prometheus text format 0.0.4, never OpenMetrics: prometheus_client (0.26)
        answers a scraper that accepts OpenMetrics with `escaping=underscores` and then rewrites
        `shardline:x` to `shardline_x` in the samples but not in HELP/TYPE
        (prometheus/client_python#1177), which renames every series. The text format keeps the
        colons, as vLLM's `vllm:` series are served."""

        app = prometheus_client.make_wsgi_app(self.registry)

        def text_format_only(environ, start_response):
            environ["HTTP_ACCEPT"] = "text/plain; version=0.0.4"
            return app(environ, start_response)

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, *args) -> None:  # one line per scrape would flood the log
                pass

        try:
            self._server = make_server(host, port, text_format_only, Server, QuietHandler)
        except OSError as exc:
            log.error("metrics endpoint %s:%d not started: %s", host, port, exc.strerror or exc)
            return False
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics", host, port)
        return True

    def stop_http_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5.0)
            self._server = self._thread = None

