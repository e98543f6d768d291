"""Offline throughput and latency under load, continuous batching against static batching.

    python bench/throughput.py                       # 2 workers PP=2; concurrency 1,8,32,64; Poisson 0.5 req/s
    python bench/throughput.py --compare-static      # the same loads with static batching as a baseline
    python bench/throughput.py --quick --compare-static   # concurrency 1,8, 32-token outputs, < 4 minutes

Phases, all on one cluster configuration (`--workers/--pp/--tp/--threads`):

1. Closed loop, per concurrency level c: 2*c requests (128-token prompts of pseudo-random token ids,
   no shared prefix; greedy; max_tokens with ignore_eos) from c client tasks on one asyncio
   `AsyncClient`, each starting its next request when its last one ends. Prompt and generated tokens/s over the wall
   time of the level, and TTFT / ITL / e2e percentiles.
2. Open loop: `--poisson-requests` requests arriving as a Poisson process of `--rate` req/s, each
   sent at its arrival time whatever is still running; TTFT / ITL / e2e percentiles. Every request
   stops at the phase deadline.
3. With --compare-static, the same loads with static batching, emulated client-side on a cluster
   with max_num_seqs = the batch size: a whole batch is sent together and the next one only after
   the longest member of the current one has finished. Closed loop: batches of c. Open loop:
   arrivals queue client-side and each batch takes up to `--static-batch` of the queued requests.
   The ratio continuous/static of generated tokens/s is reported per level.

Writes bench/results/throughput.json and bench/results/throughput.png.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WARMUP_INDEX = 1_000_000
POISSON_BASE = 900_000  # prompt indices of the open-loop phase; level c uses c * 10_000 + i
STATIC_OFFSET = 2_000_000  # added to the prompt indices of the static runs


class Load:
    """The requests of one phase: prompt indices and per-request max_tokens (same for both modes)."""

    def __init__(self, base: int, n: int, args):
        self.indices = [base + i for i in range(n)]
        rng = random.Random(args.seed * 7919 + base)
        if args.vary_output:
            lo = max(1, args.max_tokens // 4)
            self.max_tokens = [rng.randint(lo, args.max_tokens) for _ in range(n)]
        else:
            self.max_tokens = [args.max_tokens] * n
        self.prompts = [common.make_prompt(i, args.prompt_len, args.seed) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)


def phase_metrics(records: list[common.RequestRecord], wall_s: float) -> dict:
    good = [r for r in records if r.ok]
    prompt = sum((r.usage or {}).get("prompt_tokens", r.prompt_tokens) for r in good)
    gen = sum(r.n_tokens for r in good)
    itl = [x for r in good for x in r.itl_s]
    return {
        "requests": len(records), "completed": len(good),
        "errors": sorted(collections.Counter(r.error or "no DONE" for r in records if not r.ok).items()),
        "wall_s": wall_s, "prompt_tokens": prompt, "generated_tokens": gen,
        "prompt_tokens_per_s": prompt / wall_s if wall_s > 0 else None,
        "generated_tokens_per_s": gen / wall_s if wall_s > 0 else None,
        "total_tokens_per_s": (prompt + gen) / wall_s if wall_s > 0 else None,
        "requests_per_s": len(good) / wall_s if wall_s > 0 else None,
        "cached_tokens": sum((r.usage or {}).get("cached_tokens", 0) for r in good),
        "ttft_s": common.summarize([r.ttft_s for r in good]),
        "itl_s": common.summarize(itl),
        "e2e_s": common.summarize([r.e2e_s for r in good]),
        "server_queue_s": common.summarize([(r.server_timings or {}).get("queue_s") for r in good]),
        "server_ttft_s": common.summarize([(r.server_timings or {}).get("ttft_s") for r in good]),
    }


def run_closed(address: str, load: Load, concurrency: int, static: bool, timeout_s: float,
               request_timeout_s: float, on_done=lambda: None):
    """Continuous: `concurrency` client tasks each take the next request when done. Static:
    batches of `concurrency` sent together; the next batch starts when the whole current one has
    finished. One `AsyncClient` on one event loop carries every stream: with a thread and a
    blocking `Client` per request, as before, the benchmark process spent ~150 us of CPU per
    streamed token (64 threads woken per step), CPU the cluster under test shares on a small
    host. `on_done()` is called as each request ends."""
    import asyncio

    from shardline.client import AsyncClient

    async def main():
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        records: list = [None] * len(load)
        async with AsyncClient(address, timeout_s=request_timeout_s) as client:
            async def one(i: int) -> None:
                if time.perf_counter() > deadline:
                    rec = common.RequestRecord(load.indices[i], len(load.prompts[i]), load.max_tokens[i])
                    rec.error = "not started: level deadline"
                else:
                    rec = await common.timed_stream_async(client, load.indices[i], load.prompts[i],
                                                          load.max_tokens[i], deadline=deadline, phase_t0=t0)
                    on_done()
                records[i] = rec

            if static:
                for b in range(0, len(load), concurrency):
                    await asyncio.gather(*(one(i) for i in range(b, min(b + concurrency, len(load)))))
            else:
                todo = iter(range(len(load)))

                async def slot() -> None:
                    for i in todo:
                        await one(i)

                await asyncio.gather(*(slot() for _ in range(concurrency)))
        return records, time.perf_counter() - t0

    return asyncio.run(main())


def run_poisson(pool: common.ClientPool, load: Load, rate: float, static_batch: int | None, timeout_s: float,
                seed: int, on_done=lambda: None):
    """Open loop: request i is released at its Poisson arrival time. Continuous: sent at once.
    Static: queued client-side; a dispatcher sends up to `static_batch` queued requests together
    and waits for the whole batch before taking the next. TTFT counts from the arrival."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(len(load)):
        t += rng.expovariate(rate)
        arrivals.append(t)
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    records: list[common.RequestRecord | None] = [None] * len(load)

    def one(i: int) -> None:
        rec = common.timed_stream(pool.get(), load.indices[i], load.prompts[i], load.max_tokens[i],
                                  deadline=deadline, phase_t0=t0)
        wait = (t0 + rec.start_s) - (t0 + arrivals[i])  # time queued client-side (static only)
        rec.start_s = arrivals[i]
        for name in ("ttft_s", "e2e_s", "t_first_s", "t_last_s"):
            if getattr(rec, name) is not None:
                setattr(rec, name, getattr(rec, name) + wait)
        records[i] = rec
        on_done()

    def unsent(i: int, why: str) -> None:
        rec = common.RequestRecord(load.indices[i], len(load.prompts[i]), load.max_tokens[i], start_s=arrivals[i])
        rec.error = why
        records[i] = rec

    if static_batch is None:
        with ThreadPoolExecutor(max_workers=len(load)) as ex:
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if t0 + at > deadline:
                    unsent(i, "not sent: phase deadline")
                    continue
                if delay > 0:
                    time.sleep(delay)
                ex.submit(one, i)
    else:
        queue: collections.deque[int] = collections.deque()
        cond = threading.Condition()
        released = [0]

        def releaser() -> None:
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(min(delay, max(0.0, deadline - time.perf_counter())))
                with cond:
                    queue.append(i)
                    released[0] += 1
                    cond.notify()

        th = threading.Thread(target=releaser, daemon=True)
        th.start()
        with ThreadPoolExecutor(max_workers=static_batch) as ex:
            done = 0
            while done < len(load):
                with cond:
                    while not queue and time.perf_counter() < deadline:
                        cond.wait(timeout=0.05)
                    batch = [queue.popleft() for _ in range(min(static_batch, len(queue)))]
                if time.perf_counter() >= deadline:
                    th.join()
                    for i in batch + list(queue):
                        unsent(i, "not sent: phase deadline")
                    break
                list(ex.map(one, batch))
                done += len(batch)
        th.join()
    for i in range(len(load)):
        if records[i] is None:
            unsent(i, "not sent: phase deadline")
    end = max((r.start_s + (r.e2e_s or 0.0) for r in records), default=0.0)
    return records, end


def bench_cluster(label: str, overrides: dict, jobs: list[tuple[str, list[int], bool]], args) -> dict:
    """Start one cluster and run `jobs`: (mode, closed-loop levels, run the open-loop phase?) with
    mode "continuous" or "static". Returns {"cluster": start-up facts, mode: {"levels", "poisson"}}."""
    info: dict = {"label": label, "overrides": overrides, "start_failures": []}
    out: dict = {"cluster": info}
    print(f"[{label}] starting cluster {overrides} ...", flush=True)
    try:
        with common.cluster(overrides, args.ready_timeout_s, args.start_attempts, info["start_failures"]) as (cl, st):
            info["startup_s"] = st
            with common.ClientPool(cl.address, timeout_s=args.request_timeout_s) as pool:
                client = pool.get()
                info["plan"] = common.plan_summary(client.stats())
                warm = common.timed_stream(client, WARMUP_INDEX, common.make_prompt(WARMUP_INDEX, args.prompt_len),
                                           8, deadline=time.perf_counter() + args.request_timeout_s)
                if not warm.ok:
                    raise RuntimeError(f"warm-up request failed: {warm.error or 'no DONE'}")
                for mode, levels, poisson in jobs:
                    static = mode == "static"
                    res = out.setdefault(mode, {"levels": {}})
                    offset = STATIC_OFFSET if static else 0  # no prefix shared across modes
                    for c in levels:
                        load = Load(offset + c * 10_000, args.requests_per_slot * c, args)
                        before = client.stats()
                        with common.request_progress(f"[{mode}] c={c}", len(load)) as advance:
                            records, wall = run_closed(cl.address, load, c, static, args.level_timeout_s,
                                                       args.request_timeout_s, advance)
                        m = phase_metrics(records, wall)
                        m["concurrency"] = c
                        m["server_counters"] = common.counter_diff(before, client.stats())
                        res["levels"][str(c)] = m
                        print(f"[{mode}] c={c}: {m['completed']}/{m['requests']} ok in {wall:.1f} s, "
                              f"gen {common.fmt(m['generated_tokens_per_s'], 1)} tok/s, "
                              f"prompt {common.fmt(m['prompt_tokens_per_s'], 1)} tok/s, "
                              f"TTFT p50 {common.fmt(m['ttft_s']['p50'])} s, ITL p50 {common.fmt(m['itl_s']['p50'])} s"
                              + (f", errors {m['errors']}" if m["errors"] else ""), flush=True)
                    if poisson:
                        load = Load(offset + POISSON_BASE, args.poisson_requests, args)
                        batch = args.static_batch if static else None
                        before = client.stats()
                        with common.request_progress(f"[{mode}] poisson {args.rate} req/s", len(load)) as advance:
                            records, wall = run_poisson(pool, load, args.rate, batch, args.poisson_deadline_s,
                                                        args.seed, advance)
                        m = phase_metrics(records, wall)
                        m.update(rate_req_s=args.rate, static_batch=batch,
                                 server_counters=common.counter_diff(before, client.stats()))
                        res["poisson"] = m
                        print(f"[{mode}] poisson {args.rate} req/s: {m['completed']}/{m['requests']} ok in {wall:.1f} s, "
                              f"TTFT p50/p90/p99 {common.fmt(m['ttft_s']['p50'])}/{common.fmt(m['ttft_s']['p90'])}/"
                              f"{common.fmt(m['ttft_s']['p99'])} s, ITL p50/p90/p99 {common.fmt(m['itl_s']['p50'])}/"
                              f"{common.fmt(m['itl_s']['p90'])}/{common.fmt(m['itl_s']['p99'])} s"
                              + (f", errors {m['errors']}" if m["errors"] else ""), flush=True)
    except Exception as exc:  # noqa: BLE001 - record and go on
        info["error"] = common.error_text(exc)
        print(f"[{label}] FAILED: {info['error'][:2000]}", flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for mode, style, color in (("continuous", "o-", "C0"), ("static", "s--", "C1")):
        lv = result.get(mode, {}).get("levels", {})
        cs = sorted(int(c) for c in lv if lv[c]["completed"])
        if cs:
            ax.plot(cs, [lv[str(c)]["generated_tokens_per_s"] for c in cs], style, color=color,
                    label=f"{mode}: generated")
            ax.plot(cs, [lv[str(c)]["total_tokens_per_s"] for c in cs], style, color=color, alpha=0.35,
                    label=f"{mode}: prompt + generated")
    for c, ratio in (result.get("ratio_continuous_over_static") or {}).items():
        y = result["continuous"]["levels"][c]["generated_tokens_per_s"]
        ax.annotate(f"x{ratio:.2f}", (int(c), y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("tokens/s")
    ax.set_title("closed-loop throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    ps = ("p50", "p90", "p99")
    for ax, key, title in ((axes[1], "ttft_s", "TTFT"), (axes[2], "itl_s", "inter-token latency")):
        modes = [m for m in ("continuous", "static") if result.get(m, {}).get("poisson", {}).get("completed")]
        width = 0.8 / max(1, len(modes))
        for j, mode in enumerate(modes):
            s = result[mode]["poisson"][key]
            vals = [1000 * (s[p] or 0.0) for p in ps]
            bars = ax.bar([i + j * width for i in range(len(ps))], vals, width, label=mode,
                          color="C0" if mode == "continuous" else "C1")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(ps))], ps)
        ax.set_ylabel("ms")
        rate = result["params"]["rate"]
        ax.set_title(f"{title}, Poisson {rate} req/s" if modes else f"{title}: open-loop phase not run")
        ax.grid(True, axis="y", alpha=0.3)
        if modes:
            ax.legend(fontsize=8)
    p = result["params"]
    fig.suptitle(f"Shardline {result['cluster']['name']}: prompt {p['prompt_len']} + output {p['max_tokens']} tokens"
                 f"{' (varied)' if p['vary_output'] else ''}, {result['env']['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--pp", type=int, default=None, help="pipeline stages (default workers / tp)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    ap.add_argument("--gemm-weights", choices=("packed", "bf16"), default="packed",
                    help="workers.gemm_weights: packed (tiles dequantized per call) or a resident bf16 copy")
    ap.add_argument("--kv-cache-gb", type=float, default=None,
                    help="workers.kv_cache_gb (default cluster.yaml's; one worker holding every layer needs ~1 for 64 x 256 tokens)")
    ap.add_argument("--kv-cache-dtype", choices=("float16", "float32"), default=None,
                    help="workers.kv_cache_dtype (default cluster.yaml's: float16)")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="scheduler.pipeline_micro_batches: step plans in flight (default: the pipeline stages)")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="scheduler max_num_seqs of the continuous cluster")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="scheduler token budget per step")
    ap.add_argument("--concurrency", default=None, help="closed-loop levels (default 1,8,32,64; 1,8 with --quick)")
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests per level = this x concurrency")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 128; 32 with --quick)")
    ap.add_argument("--vary-output", action="store_true",
                    help="draw each request's max_tokens uniformly from [max_tokens/4, max_tokens] (same draws in both modes)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, req/s (0 skips; default 0.5, 1.0 with --quick)")
    ap.add_argument("--poisson-requests", type=int, default=None, help="requests of the open-loop phase (default 32; 12 with --quick)")
    ap.add_argument("--poisson-deadline-s", type=float, default=None, help="open-loop phase limit (default 300; 60 with --quick)")
    ap.add_argument("--compare-static", action="store_true", help="also run static batching as the baseline")
    ap.add_argument("--static-cluster", choices=("per-batch", "shared"), default=None,
                    help="static runs on their own cluster per batch size b with max_num_seqs=b (default), or on the "
                         "continuous cluster (default with --quick; equivalent, the client bounds the batch)")
    ap.add_argument("--static-batch", type=int, default=8, help="batch size of static batching in the open-loop phase")
    ap.add_argument("--level-timeout-s", type=float, default=None, help="limit of one closed-loop level (default 600; 90 with --quick)")
    ap.add_argument("--request-timeout-s", type=float, default=120.0, help="client wait for any one reply message")
    ap.add_argument("--ready-timeout-s", type=float, default=None, help="cluster start-up limit (default 240; 120 with --quick)")
    ap.add_argument("--start-attempts", type=int, default=3, help="cluster start-up tries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="concurrency 1,8, 32-token outputs, shorter phases (< 4 minutes)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "throughput.json")
    ap.add_argument("--plot", type=Path, default=common.RESULTS_DIR / "throughput.png")
    args = ap.parse_args(argv)
    q = args.quick
    args.concurrency = args.concurrency or ("1,8" if q else "1,8,32,64")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        ap.error("--concurrency needs positive integers")
    args.max_tokens = args.max_tokens or (32 if q else 128)
    args.static_cluster = args.static_cluster or ("shared" if q else "per-batch")
    args.rate = args.rate if args.rate is not None else (1.0 if q else 0.5)
    args.poisson_requests = args.poisson_requests or (12 if q else 32)
    args.poisson_deadline_s = args.poisson_deadline_s or (60.0 if q else 300.0)
    args.level_timeout_s = args.level_timeout_s or (90.0 if q else 600.0)
    args.ready_timeout_s = args.ready_timeout_s or (120.0 if q else 240.0)
    pp = args.pp or max(1, args.workers // args.tp)
    name = f"{args.workers}w-pp{pp}-tp{args.tp}-t{args.threads}" + ("-bf16" if args.gemm_weights == "bf16" else "")

    def overrides(max_num_seqs: int) -> dict:
        return common.cluster_overrides(args.workers, pp, args.tp, args.threads, max_num_seqs,
                                        args.max_num_batched_tokens, args.gemm_weights, args.kv_cache_gb,
                                        args.micro_batches, args.kv_cache_dtype)

    t0 = time.perf_counter()
    result = {"benchmark": "throughput", "env": common.environment(),
              "cluster": {"name": name, "workers": args.workers, "pipeline_parallel": pp, "tensor_parallel": args.tp,
                          "threads": args.threads, "max_num_batched_tokens": args.max_num_batched_tokens,
                          "gemm_weights": args.gemm_weights, "kv_cache_gb": args.kv_cache_gb,
                          "kv_cache_dtype": args.kv_cache_dtype or "float16",
                          "pipeline_micro_batches": args.micro_batches},
              "params": {"concurrency": levels, "requests_per_slot": args.requests_per_slot,
                         "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "vary_output": args.vary_output,
                         "rate": args.rate, "poisson_requests": args.poisson_requests,
                         "static_batch": args.static_batch, "static_cluster": args.static_cluster, "quick": q, "seed": args.seed}}
    result["continuous"] = {"levels": {}}
    clusters = []
    run_poisson_phase = args.rate > 0
    static_jobs = []
    if args.compare_static:
        # static batching: a batch of b needs max_num_seqs = b; the open-loop phase runs on the
        # cluster of --static-batch. "shared": everything on the continuous cluster, where
        # max_num_seqs does not bind because the client never has more than b requests in flight.
        sizes = sorted(set(levels) | ({args.static_batch} if run_poisson_phase else set()))
        static_jobs = [(b, [("static", [b] if b in levels else [], run_poisson_phase and b == args.static_batch)])
                       for b in sizes]
        result["static"] = {"levels": {}}
    main_jobs = [("continuous", levels, run_poisson_phase)]
    if args.static_cluster == "shared":
        main_jobs += [job for _, jobs in static_jobs for job in jobs]
        static_jobs = []
    plan = [("continuous", overrides(args.max_num_seqs), main_jobs)]
    plan += [(f"static b={b}", overrides(b), jobs) for b, jobs in static_jobs]
    for label, over, jobs in plan:
        part = bench_cluster(label, over, jobs, args)
        clusters.append(part.pop("cluster"))
        for mode, res in part.items():
            result[mode]["levels"].update(res["levels"])
            if "poisson" in res:
                result[mode]["poisson"] = res["poisson"]
        result["clusters"] = clusters
        common.write_json(args.out, result)
    if args.compare_static:
        ratios = {}
        for c, m in result["continuous"]["levels"].items():
            s = result["static"]["levels"].get(c)
            if s and s["completed"] and m["completed"] and s["generated_tokens_per_s"]:
                ratios[c] = m["generated_tokens_per_s"] / s["generated_tokens_per_s"]
        result["ratio_continuous_over_static"] = ratios
    result["elapsed_s"] = time.perf_counter() - t0
    common.write_json(args.out, result)
    try:
        plot(result, args.plot)
        plotted = str(args.plot)
    except Exception as exc:  # noqa: BLE001
        plotted = f"plot failed: {common.error_text(exc)}"

    # ---- report ----
    print()
    print(f"throughput on {name}: prompt {args.prompt_len} tokens, output {args.max_tokens} tokens"
          f"{' (varied)' if args.vary_output else ''} (ignore_eos, greedy), {args.requests_per_slot} x c requests/level")
    rows = []
    for mode in ("continuous", "static"):
        for c in levels:
            m = result.get(mode, {}).get("levels", {}).get(str(c))
            if not m:
                continue
            ratio = result.get("ratio_continuous_over_static", {}).get(str(c)) if mode == "continuous" else None
            rows.append([mode, c, f"{m['completed']}/{m['requests']}", common.fmt(m["wall_s"], 1),
                         common.fmt(m["prompt_tokens_per_s"], 1), common.fmt(m["generated_tokens_per_s"], 1),
                         common.fmt(m["ttft_s"]["p50"]), common.fmt(m["ttft_s"]["p90"]),
                         common.fmt(m["itl_s"]["p50"]), common.fmt(m["itl_s"]["p90"]),
                         m["server_counters"].get("num_preemptions_total", "-"), common.fmt(ratio, 2)])
    print(common.table(rows, ["mode", "conc", "ok", "wall s", "prompt tok/s", "gen tok/s", "TTFT p50", "TTFT p90",
                              "ITL p50", "ITL p90", "preempt", "cont/static"]))
    rows = []
    for mode in ("continuous", "static"):
        m = result.get(mode, {}).get("poisson")
        if not m:
            continue
        rows.append([mode, m["rate_req_s"], f"{m['completed']}/{m['requests']}",
                     common.fmt(m["generated_tokens_per_s"], 1),
                     *[common.fmt(m["ttft_s"][p]) for p in ("p50", "p90", "p99")],
                     *[common.fmt(m["itl_s"][p]) for p in ("p50", "p90", "p99")],
                     common.fmt(m["e2e_s"]["p50"], 2)])
    if rows:
        print()
        print(f"open loop: {args.poisson_requests} Poisson arrivals (seconds; static: batches of up to {args.static_batch})")
        print(common.table(rows, ["mode", "req/s", "ok", "gen tok/s", "TTFT p50", "TTFT p90", "TTFT p99",
                                  "ITL p50", "ITL p90", "ITL p99", "e2e p50"]))
    failed = [p for p in result["clusters"] if p.get("error")]
    for p in failed:
        print(f"\n{p['label']} cluster {p.get('overrides')} failed: {p['error'][:1500]}")
    print(f"\nwrote {args.out} and {plotted} ({result['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
