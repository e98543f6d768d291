"""Load: many short requests at high concurrency with random cancels; every request accounted for.

    python bench/load.py                                  # 1000 requests, 64 at once, pp2, seed 0
    python bench/load.py --requests 200 --concurrency 16 --config pp1
    python bench/load.py --address tcp://127.0.0.1:7450   # a running cluster (no fd figures)

Each request is drawn from one seeded generator: a prompt of 4-16 ordinary token ids, max_tokens
4-12 with ignore_eos, greedy or seeded temperature 0.8, and one of five kinds:

    stream    read every Delta                              -> completed
    generate  non-streaming call                            -> completed
    cancel    close the stream after 1..max_tokens-1 Deltas -> cancelled (completed if DONE came first)
    timeout   a fresh client with a 5-100 ms timeout        -> timed_out (the client cancels), or completed
    invalid   a token id outside the vocabulary             -> errored (the coordinator's INVALID_REQUEST)

`concurrency` threads each hold one client and take the next request until none is left. The
outcome of every request is recorded (completed, cancelled, timed_out or errored, with the
reason). Against a LocalCluster the file descriptors of its processes (coordinator, workers,
launcher: /proc/PID/fd) are counted after a warm-up round and again after the load, once they
settle, and the coordinator's KV blocks must all be free again. Prints the figures and writes
bench/results/load.json. tests/integration/test_load.py runs the same load and asserts its
correctness only (never its timing).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shardline.client import Client, RequestTimeoutError, ShardlineError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = (("stream", 0.45), ("generate", 0.20), ("cancel", 0.25), ("timeout", 0.05), ("invalid", 0.05))
OUTCOMES = ("completed", "cancelled", "timed_out", "errored")
PROMPT_TOKEN_LOW, PROMPT_TOKEN_HIGH = 1000, 20000  # ordinary (non-special) SmolLM2 token ids
OUT_OF_VOCAB = 10_000_000  # the `invalid` kind's bad token id
FD_MARGIN = 4  # descriptors a process may hold beyond its count before the load (allocator, lazily opened files)


@dataclass(frozen=True)
class LoadRequest:
    index: int
    kind: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    seed: int | None
    cancel_after: int  # kind cancel: Deltas read before the stream is closed
    timeout_s: float  # kind timeout: the client's timeout per reply, seconds


@dataclass
class Outcome:
    index: int
    kind: str
    outcome: str  # one of OUTCOMES
    reason: str = ""  # errored/timed_out: the exception's type and message
    finish_reason: str | None = None  # completed: the DONE's
    num_tokens: int = 0  # completed: generated tokens (usage.completion_tokens); cancelled: tokens seen
    max_tokens: int = 0
    latency_s: float = 0.0  # submit to outcome, client clock


def make_requests(n: int, seed: int = 0, min_tokens: int = 4, max_tokens: int = 12) -> list[LoadRequest]:
    """`n` requests drawn from `random.Random(seed)` (same seed, same requests)."""
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS)
    out = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        m = rng.randint(min_tokens, max_tokens)
        greedy = rng.random() < 0.5
        out.append(LoadRequest(
            i, kind, tuple(rng.randrange(PROMPT_TOKEN_LOW, PROMPT_TOKEN_HIGH) for _ in range(rng.randint(4, 16))),
            m, 0.0 if greedy else 0.8, None if greedy else rng.randrange(2**31), rng.randint(1, m - 1),
            rng.uniform(0.005, 0.1)))
    return out


def run_one(client: Client, req: LoadRequest) -> Outcome:
    """Send one request as its kind says and record how it ended (never raises ShardlineError)."""
    params = dict(max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed, ignore_eos=True)
    ids = list(req.prompt_token_ids)
    o = Outcome(req.index, req.kind, "errored", max_tokens=req.max_tokens)
    t0 = time.perf_counter()
    try:
        if req.kind == "invalid":
            client.generate(prompt_token_ids=ids + [OUT_OF_VOCAB], **params)
            o.outcome, o.reason = "completed", "an out-of-vocabulary id was accepted"
        elif req.kind == "generate":
            r = client.generate(prompt_token_ids=ids, **params)
            o.outcome, o.finish_reason, o.num_tokens = "completed", r.finish_reason, r.usage["completion_tokens"]
        elif req.kind == "timeout":
            with Client(client.address, timeout_s=req.timeout_s) as quick:
                r = quick.generate(prompt_token_ids=ids, **params)
            o.outcome, o.finish_reason, o.num_tokens = "completed", r.finish_reason, r.usage["completion_tokens"]
        else:  # stream, cancel
            stream = client.stream(prompt_token_ids=ids, **params)
            seen = 0
            for d in stream:
                seen += len(d.token_ids)
                if d.finish_reason is not None:
                    o.outcome, o.finish_reason, o.num_tokens = "completed", d.finish_reason, d.usage["completion_tokens"]
                    break
                if req.kind == "cancel" and seen >= req.cancel_after:
                    stream.close()  # sends CANCEL
                    o.outcome, o.num_tokens = "cancelled", seen
                    break
            else:
                o.reason = "the stream ended without a final Delta"
    except RequestTimeoutError as exc:
        o.outcome, o.reason = "timed_out", f"{type(exc).__name__}: {exc}"
    except ShardlineError as exc:
        o.outcome, o.reason = "errored", f"{type(exc).__name__}: {exc}"
    o.latency_s = time.perf_counter() - t0
    return o


def run_load(address: str, requests: list[LoadRequest], concurrency: int, client_kwargs: dict | None = None,
             timeout_s: float = 120.0) -> tuple[list[Outcome], float]:
    """Run `requests` with `concurrency` threads, each with its own Client. Returns the outcomes
    in request order and the wall time in seconds. Raises RuntimeError if a thread failed
    outside the protocol (a bug in the driver or the client)."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            with Client(address, timeout_s=timeout_s, **(client_kwargs or {})) as client:
                while True:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    outcomes[i] = run_one(client, requests[i])
        except BaseException as exc:  # reported below: a request would be left unaccounted for
            failures.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"load-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} load threads failed: {failures[0]!r}") from failures[0]
    return outcomes, wall_s


# ---- processes and descriptors (Linux /proc; no psutil) -----------------------------------------
def _ppid_and_name(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()  # the name (field 2) may contain spaces and parentheses
    return int(rest[1]), stat[stat.index("(") + 1:stat.rindex(")")]


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (pids), from /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_name(int(entry))
            if info is not None:
                parents.setdefault(info[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return sorted(out)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fd_counts(pids: list[int]) -> dict[int, int]:
    """Open file descriptors per pid (/proc/PID/fd); a process that is gone is left out."""
    out = {}
    for pid in pids:
        try:
            out[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return out


def wait_settled(pids: list[int], before: dict[int, int], margin: int = FD_MARGIN,
                 bound_s: float = 15.0) -> dict[int, int]:
    """Descriptor counts once every process is back within `margin` of `before` (closed
    connections are reaped by ZeroMQ's I/O thread asynchronously), or the last counts after
    `bound_s` seconds."""
    deadline = time.monotonic() + bound_s
    while True:
        now = fd_counts(pids)
        if all(now.get(p, 0) <= before[p] + margin for p in before) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)  # poll interval


def wait_idle(client: Client, bound_s: float = 30.0) -> dict:
    """STATS once no request runs or waits and every KV block is free (cancelled requests free
    theirs within a step), or the last STATS after `bound_s` seconds."""
    deadline = time.monotonic() + bound_s
    while True:
        s = client.stats()
        if (s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0
                and s["num_free_blocks"] == s["num_kv_blocks"]) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)  # poll interval


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """Counts per outcome and per kind, wall time, requests/s, generated tokens/s (completed
    requests' tokens plus the tokens cancelled streams saw), completed latency percentiles."""
    counts = {k: sum(1 for o in outcomes if o.outcome == k) for k in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, dict.fromkeys(OUTCOMES, 0))[o.outcome] += 1
    lat = sorted(o.latency_s for o in outcomes if o.outcome == "completed")
    tokens = sum(o.num_tokens for o in outcomes if o.outcome in ("completed", "cancelled"))

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"requests": len(outcomes), "outcomes": counts, "by_kind": by_kind, "wall_s": wall_s,
            "requests_per_s": len(outcomes) / wall_s if wall_s > 0 else None, "tokens_seen": tokens,
            "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
            "completed_latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "error_reasons": sorted({o.reason.split(":")[0] for o in outcomes if o.outcome == "errored"})}


def run_on_local_cluster(overrides: dict, num_requests: int, concurrency: int, seed: int,
                         warmup: int | None = None) -> tuple[dict, list[Outcome]]:
    """Start a LocalCluster, warm it up with `warmup` requests (default: `concurrency`), count
    descriptors, run the load, wait until idle and settled. Returns (figures, outcomes); the
    figures hold the summary, KV and request counters before/after and fds per process."""
    from shardline.local import LocalCluster

    with LocalCluster(overrides) as cluster:
        client = cluster.client
        run_load(cluster.address, make_requests(warmup or concurrency, seed + 1), concurrency)
        start = wait_idle(client)
        pids = process_tree(cluster.proc.pid)
        names = {p: (_ppid_and_name(p) or (0, "?"))[1] for p in pids}
        fds_before = fd_counts(pids)
        requests = make_requests(num_requests, seed)
        outcomes, wall_s = run_load(cluster.address, requests, concurrency)
        end = wait_idle(client)
        fds_after = wait_settled(pids, fds_before)
        workers = {w["pid"]: w["worker_id"] for w in end["workers"]}
        role = {p: ("coordinator" if p == end["coordinator"]["pid"] else workers.get(p)
                    or ("launcher" if p == cluster.proc.pid else names[p])) for p in pids}
        gone = [p for p in pids if not _running(p)]
        alive_after = client.generate(prompt_token_ids=[1000, 2000, 3000], max_tokens=4).finish_reason
        figures = {
            "config": overrides, "seed": seed, "concurrency": concurrency, **summarize(outcomes, wall_s),
            "kv": {"num_kv_blocks": end["num_kv_blocks"], "free_before": start["num_free_blocks"],
                   "free_after": end["num_free_blocks"]},
            "server": {"requests_total": end["requests_total"] - start["requests_total"],
                       "requests_finished": end["requests_finished"] - start["requests_finished"],
                       "running_after": end["num_requests_running"], "waiting_after": end["num_requests_waiting"],
                       "coordinator_rss_before": start["coordinator"]["rss_bytes"],
                       "coordinator_rss_after": end["coordinator"]["rss_bytes"]},
            "fds": {role[p]: {"pid": p, "before": fds_before[p], "after": fds_after.get(p)} for p in pids},
            "fd_margin": FD_MARGIN, "processes_gone": [role[p] for p in gone], "served_after": alive_after,
        }
    return figures, outcomes


def print_figures(f: dict) -> None:
    o = f["outcomes"]
    print(f"{f['requests']} requests at concurrency {f['concurrency']} (seed {f['seed']}): "
          f"{o['completed']} completed, {o['cancelled']} cancelled, {o['timed_out']} timed out, "
          f"{o['errored']} errored ({', '.join(f['error_reasons']) or '-'})")
    print(f"wall {f['wall_s']:.1f} s, {f['requests_per_s']:.1f} requests/s, {f['tokens_per_s']:.0f} tokens/s "
          f"({f['tokens_seen']} tokens); completed latency p50 {f['completed_latency_s']['p50']:.2f} s, "
          f"p99 {f['completed_latency_s']['p99']:.2f} s")
    if "kv" in f:
        print(f"KV blocks free: {f['kv']['free_before']} before, {f['kv']['free_after']} after, "
              f"of {f['kv']['num_kv_blocks']}; server: {f['server']['requests_total']} accepted, "
              f"{f['server']['running_after']} running / {f['server']['waiting_after']} waiting after")
        print("file descriptors: " + ", ".join(f"{r} {v['before']} -> {v['after']}" for r, v in f["fds"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="pp2", choices=["pp1", "pp2"], help="LocalCluster layout.")
    ap.add_argument("--address", help="Load a running cluster instead (no descriptor or KV figures).")
    ap.add_argument("--output", default=str(RESULTS_DIR / "load.json"))
    ap.add_argument("--per-request", action="store_true", help="Also store every request's outcome in the JSON.")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # bench/common.py: environment facts, JSON writer
    if args.address:
        outcomes, wall_s = run_load(args.address, make_requests(args.requests, args.seed), args.concurrency)
        figures = {"address": args.address, "seed": args.seed, "concurrency": args.concurrency,
                   **summarize(outcomes, wall_s)}
    else:
        pp = int(args.config[2:])
        overrides = {"workers": {"count": pp, "threads": 1}, "parallel": {"pipeline_parallel": pp,
                                                                         "tensor_parallel": 1}}
        figures, outcomes = run_on_local_cluster(overrides, args.requests, args.concurrency, args.seed)
    figures["env"] = {**common.environment(), "load_avg_1m_after": os.getloadavg()[0]}  # a shared host shows here
    print_figures(figures)
    if args.per_request:
        figures["outcomes_per_request"] = [asdict(o) for o in outcomes]
    print(f"wrote {common.write_json(Path(args.output), figures)}")


if __name__ == "__main__":
    sys.exit(main())
