"""Shared helpers of the Shardline benchmarks (bench/latency.py, bench/throughput.py).

Everything here is client-side: named cluster configurations, exact-length prompts made of token
ids, one timed streaming request, percentiles, tables and the JSON results file. Clusters are
started with `shardline.local.LocalCluster` on free loopback ports.

Timing of one streamed request (client clock, `time.perf_counter`):

    t_submit            first Delta with tokens          ...        last Delta with tokens   DONE
       |------ TTFT ------|--- ITL ---|--- ITL ---| ... |--- ITL ---|                        |
                          t_first                                   t_last
    decode tokens/s = (n_tokens - 1) / (t_last - t_first)

A Delta may carry k > 1 tokens; its gap is then split into k equal ITL samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shardline.client import AsyncClient, Client
from shardline.local import LocalCluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Ordinary (non-special) token ids of the SmolLM2 vocabulary the prompts are drawn from.
PROMPT_TOKEN_LOW = 1000
PROMPT_TOKEN_HIGH = 20000

# Named configurations: (workers, pipeline_parallel, tensor_parallel).
NAMED_CONFIGS: dict[str, tuple[int, int, int]] = {
    "pp1": (1, 1, 1),
    "pp2": (2, 2, 1),
    "pp3": (3, 3, 1),
    "tp3": (3, 1, 3),
    "tp3pp2": (6, 2, 3),
}


@contextlib.contextmanager
def request_progress(label: str, total: int):
    """A progress bar over `total` requests (rich), drawn on stderr only when it is a terminal so
    redirected benchmark output stays clean. Yields `advance()`, safe to call from any thread."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task(escape(label), total=total)  # "[continuous] ..." is not rich markup
        yield lambda: bar.advance(task)


def cluster_overrides(workers: int, pp: int, tp: int = 1, threads: int = 1, max_num_seqs: int | None = None,
                      max_num_batched_tokens: int | None = None, gemm_weights: str = "packed",
                      kv_cache_gb: float | None = None, micro_batches: int | None = None,
                      kv_cache_dtype: str | None = None) -> dict:
    """A LocalCluster override dict (cluster.yaml schema)."""
    over: dict = {"workers": {"count": workers, "threads": threads, "gemm_weights": gemm_weights},
                  "parallel": {"pipeline_parallel": pp, "tensor_parallel": tp}}
    sched = {}
    if max_num_seqs is not None:
        sched["max_num_seqs"] = max_num_seqs
    if max_num_batched_tokens is not None:
        sched["max_num_batched_tokens"] = max_num_batched_tokens
    if micro_batches is not None:
        sched["pipeline_micro_batches"] = micro_batches
    if sched:
        over["scheduler"] = sched
    if kv_cache_gb is not None:
        over["workers"]["kv_cache_gb"] = kv_cache_gb
    if kv_cache_dtype is not None:
        over["workers"]["kv_cache_dtype"] = kv_cache_dtype
    return over


def named_config(name: str, threads: int = 1) -> dict:
    if name not in NAMED_CONFIGS:
        raise SystemExit(f"unknown config {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    workers, pp, tp = NAMED_CONFIGS[name]
    return cluster_overrides(workers, pp, tp, threads)


def make_prompt(index: int, length: int, seed: int = 0) -> list[int]:
    """`length` pseudo-random ordinary token ids, a different sequence per `index`, so prompts share
    no prefix (no prefix-cache hits) and their length is exact (no tokenizer involved)."""
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(PROMPT_TOKEN_LOW, PROMPT_TOKEN_HIGH) for _ in range(length)]


# ---- one timed request -----------------------------------------------------------------------
@dataclass
class RequestRecord:
    """Client-side timings (seconds, from t_submit) and the server's own report of one request."""

    index: int
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0             # submit time relative to the phase start
    ttft_s: float | None = None      # submit -> first Delta with tokens
    e2e_s: float | None = None       # submit -> DONE (or the stop)
    t_first_s: float | None = None
    t_last_s: float | None = None
    n_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    server_timings: dict | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.n_tokens < 2 or self.t_last_s is None or self.t_last_s <= self.t_first_s:
            return None
        return (self.n_tokens - 1) / (self.t_last_s - self.t_first_s)

    def to_dict(self, with_itl: bool = False) -> dict:
        d = asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        if not with_itl:
            d.pop("itl_s")
        return d


def _begin(index: int, prompt_ids: list[int], max_tokens: int, phase_t0: float | None,
           params: dict) -> tuple[RequestRecord, float, dict]:
    """A new record, its start time (perf_counter) and the stream call's keyword arguments
    (greedy and ignore_eos unless `params` says otherwise)."""
    rec = RequestRecord(index, len(prompt_ids), max_tokens)
    t0 = time.perf_counter()
    if phase_t0 is not None:
        rec.start_s = t0 - phase_t0
    kwargs = {"temperature": 0.0, "ignore_eos": True, **params}
    return rec, t0, dict(prompt_token_ids=prompt_ids, max_tokens=max_tokens, **kwargs)


def _record_delta(rec: RequestRecord, d, t0: float, prev: float | None,
                  deadline: float | None) -> tuple[float | None, bool]:
    """Account one Delta, received now, into rec. Returns (time of the latest token arrival,
    stop reading: the deadline passed before the request finished)."""
    now = time.perf_counter()
    k = len(d.token_ids)
    if k:
        if prev is None:
            rec.ttft_s = now - t0
            rec.t_first_s = now - t0  # tokens arriving with the first one give no ITL
        else:
            rec.itl_s.extend([(now - prev) / k] * k)
        prev = now
        rec.t_last_s = now - t0
        rec.n_tokens += k
    if d.finish_reason is not None:
        rec.finish_reason = d.finish_reason
        rec.usage = d.usage
        rec.server_timings = d.timings
    elif deadline is not None and now > deadline:
        rec.error = "stopped at the deadline"
        return prev, True
    return prev, False


def timed_stream(client: Client, index: int, prompt_ids: list[int], max_tokens: int, deadline: float | None = None,
                 phase_t0: float | None = None, **params) -> RequestRecord:
    """Stream one greedy request with ignore_eos and time it. Stops (cancelling the request) at
    `deadline` (a perf_counter time); errors are recorded, not raised."""
    rec, t0, kwargs = _begin(index, prompt_ids, max_tokens, phase_t0, params)
    prev = None
    try:
        it = client.stream(**kwargs)
        try:
            for d in it:
                prev, stop = _record_delta(rec, d, t0, prev, deadline)
                if stop:
                    break
        finally:
            it.close()  # cancels the request if it is still running
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.e2e_s = time.perf_counter() - t0
    return rec


async def timed_stream_async(client: AsyncClient, index: int, prompt_ids: list[int], max_tokens: int,
                             deadline: float | None = None, phase_t0: float | None = None,
                             **params) -> RequestRecord:
    """`timed_stream` on an `AsyncClient` (one event loop serves every request of a level)."""
    rec, t0, kwargs = _begin(index, prompt_ids, max_tokens, phase_t0, params)
    prev = None
    try:
        it = client.stream(**kwargs)
        try:
            async for d in it:
                prev, stop = _record_delta(rec, d, t0, prev, deadline)
                if stop:
                    break
        finally:
            await it.aclose()  # cancels the request if it is still running
    except Exception as exc:  # noqa: BLE001 - a benchmark records failures and goes on
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.e2e_s = time.perf_counter() - t0
    return rec


class ClientPool:
    """One Client per thread (no lock shared between the threads that time requests)."""

    def __init__(self, address: str, timeout_s: float = 60.0):
        self.address = address
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[Client] = []
        self._lock = threading.Lock()

    def get(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = Client(self.address, timeout_s=self.timeout_s)
            self._local.client = c
            with self._lock:
                self._all.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- clusters --------------------------------------------------------------------------------
@contextlib.contextmanager
def cluster(overrides: dict, ready_timeout_s: float = 240.0, start_attempts: int = 2, failures: list | None = None):
    """Start a LocalCluster; yields (cluster, start_s) and always stops it on exit.

    A start-up that fails is retried up to `start_attempts` times in all (the error texts are
    appended to `failures`), because a busy host can make a worker give up on a slow coordinator.
    start_s is the time of the successful attempt only."""
    c = None
    for attempt in range(1, start_attempts + 1):
        t0 = time.perf_counter()
        c = LocalCluster(overrides, ready_timeout_s=ready_timeout_s)
        try:
            c.start()
            break
        except RuntimeError as exc:
            with contextlib.suppress(OSError):  # start() may have stopped it already
                c.stop()
            if failures is not None:
                failures.append(error_text(exc))
            if attempt == start_attempts:
                raise
            print(f"  cluster start-up failed (attempt {attempt}/{start_attempts}), retrying: "
                  f"{str(exc).splitlines()[0]}", flush=True)
    try:
        yield c, time.perf_counter() - t0
    finally:
        c.stop()


def plan_summary(stats: dict) -> dict:
    plan = stats.get("plan") or {}
    return {"pp_size": plan.get("pp_size"), "tp_size": plan.get("tp_size"), "num_kv_blocks": plan.get("num_kv_blocks"),
            "block_size": plan.get("block_size"),
            "stages": [[a.get("stage"), a.get("tp_rank"), a.get("layer_start"), a.get("layer_end")]
                       for a in plan.get("assignments", [])]}


COUNTERS = ("requests_total", "requests_finished", "generation_tokens_total", "prompt_tokens_total", "steps_total",
            "step_time_s_total", "num_preemptions_total", "prefix_cache_hit_blocks",
            "num_continuations_total")


def counter_diff(before: dict, after: dict) -> dict:
    """Server counters accumulated between two `Client.stats()` snapshots."""
    out = {}
    for k in COUNTERS:
        if k in before and k in after:
            v = after[k] - before[k]
            out[k] = round(v, 6) if isinstance(v, float) else v
    return out


# ---- statistics and output -------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in [0, 100]) of the non-None values; None if empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float], ps=(50, 90, 99)) -> dict:
    xs = [v for v in values if v is not None]
    out = {"n": len(xs), "mean": (sum(xs) / len(xs)) if xs else None}
    for p in ps:
        out[f"p{p}"] = percentile(xs, p)
    out["max"] = max(xs) if xs else None
    return out


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def environment() -> dict:
    """Host and code facts stored with every result."""
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        pass
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "git_commit": commit, "argv": sys.argv[1:]}


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def error_text(exc: BaseException, head: int = 4000, tail: int = 8000) -> str:
    """An exception as text, keeping its head and tail (a LocalCluster error carries the launcher
    output: the first failure is near the top, the traceback at the end)."""
    s = f"{type(exc).__name__}: {exc}"
    return s if len(s) <= head + tail else s[:head] + "\n...\n" + s[-tail:]
