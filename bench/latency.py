"""Single-stream latency: time to first token and decode tokens/s per cluster configuration.

    python bench/latency.py                          # pp1, pp2; 5 requests of 128 + 128 tokens
    python bench/latency.py --configs pp1,pp2,pp3,tp3,tp3pp2
    python bench/latency.py --quick                  # 3 requests of 128 + 32 tokens, < 3 minutes

For each configuration: start a LocalCluster, send one warm-up request, then N requests one after
another, each a different 128-token prompt of pseudo-random ordinary token ids (exact length, no
shared prefix, so no prefix-cache hits), greedy, max_tokens with ignore_eos. Each request is
streamed and timed client-side (see bench/common.py); the server's own timings are kept too.
A configuration that fails (start-up or requests) is reported and the next one runs.
Writes bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

WARMUP_INDEX = 1_000_000  # prompt index of the warm-up request (never reused by a measured one)


def bench_config(name: str, args) -> dict:
    workers, pp, tp = common.NAMED_CONFIGS[name]
    out: dict = {"config": name, "workers": workers, "pipeline_parallel": pp, "tensor_parallel": tp,
                 "threads": args.threads, "ok": False}
    print(f"[{name}] starting {workers} worker(s), pp={pp} tp={tp} ...", flush=True)
    try:
        out["start_failures"] = []
        with common.cluster(common.named_config(name, args.threads), args.ready_timeout_s, args.start_attempts,
                            out["start_failures"]) as (cl, start_s):
            out["startup_s"] = start_s
            with common.ClientPool(cl.address, timeout_s=args.request_timeout_s) as pool:
                client = pool.get()
                before = client.stats()
                out["plan"] = common.plan_summary(before)
                warm = common.timed_stream(client, WARMUP_INDEX, common.make_prompt(WARMUP_INDEX, args.prompt_len),
                                           min(args.max_tokens, 16),
                                           deadline=time.perf_counter() + args.request_timeout_s)
                out["warmup"] = warm.to_dict()
                if not warm.ok:
                    raise RuntimeError(f"warm-up request failed: {warm.error or 'no DONE'}")
                records = []
                for i in range(args.requests):
                    rec = common.timed_stream(client, i, common.make_prompt(i, args.prompt_len), args.max_tokens,
                                              deadline=time.perf_counter() + args.request_timeout_s)
                    records.append(rec)
                    print(f"[{name}]   request {i}: ttft {common.fmt(rec.ttft_s)} s, "
                          f"{common.fmt(rec.decode_tokens_per_s, 1)} tok/s, {rec.n_tokens} tokens"
                          + (f", error: {rec.error}" if rec.error else ""), flush=True)
                out["server_counters"] = common.counter_diff(before, client.stats())
        out["requests"] = [r.to_dict() for r in records]
        good = [r for r in records if r.ok]
        out["errors"] = [r.error or "no DONE" for r in records if not r.ok]
        out["ttft_s"] = common.summarize([r.ttft_s for r in good], (10, 50, 90))
        out["decode_tokens_per_s"] = common.summarize([r.decode_tokens_per_s for r in good], (10, 50, 90))
        out["e2e_s"] = common.summarize([r.e2e_s for r in good], (10, 50, 90))
        st = [r.server_timings or {} for r in good]
        out["server"] = {"ttft_s": common.summarize([t.get("ttft_s") for t in st], (10, 50, 90)),
                         "queue_s": common.summarize([t.get("queue_s") for t in st], (10, 50, 90)),
                         "e2e_s": common.summarize([t.get("e2e_s") for t in st], (10, 50, 90)),
                         "decode_tokens_per_s": common.summarize([t.get("decode_tokens_per_s") for t in st],
                                                                 (10, 50, 90))}
        out["cached_tokens"] = sum((r.usage or {}).get("cached_tokens", 0) for r in good)
        out["ok"] = len(good) == len(records) and len(good) > 0
        if not out["ok"]:
            out["error"] = f"{len(records) - len(good)} of {len(records)} requests failed: {out['errors'][:3]}"
    except Exception as exc:  # noqa: BLE001 - report the failure, go on with the next configuration
        out["error"] = common.error_text(exc)
        print(f"[{name}] FAILED: {out['error'][:2000]}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="pp1,pp2",
                    help=f"comma-separated names among {','.join(common.NAMED_CONFIGS)} (tpN = tensor_parallel N)")
    ap.add_argument("--requests", type=int, default=None, help="measured requests per configuration (default 5; 3 with --quick)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--max-tokens", type=int, default=None, help="generated tokens per request (default 128; 32 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (under 3 minutes)")
    ap.add_argument("--ready-timeout-s", type=float, default=None, help="cluster start-up limit (default 240; 120 with --quick)")
    ap.add_argument("--start-attempts", type=int, default=3, help="cluster start-up tries per configuration")
    ap.add_argument("--request-timeout-s", type=float, default=120.0, help="limit of one request")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "latency.json")
    args = ap.parse_args(argv)
    args.requests = args.requests or (3 if args.quick else 5)
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    args.ready_timeout_s = args.ready_timeout_s or (120.0 if args.quick else 240.0)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in common.NAMED_CONFIGS:
            ap.error(f"unknown config {n!r}; known: {', '.join(common.NAMED_CONFIGS)}")

    t0 = time.perf_counter()
    results = []
    for name in names:
        results.append(bench_config(name, args))
        common.write_json(args.out, {"benchmark": "latency", "env": common.environment(), "params": {
            "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "threads": args.threads, "quick": args.quick}, "results": results})

    rows = []
    for r in results:
        ok = r["ok"]
        g = (lambda k, p: r.get(k, {}).get(p)) if ok else (lambda k, p: None)
        rows.append([r["config"], r["workers"], common.fmt(r.get("startup_s"), 1),
                     common.fmt(g("ttft_s", "p50")), common.fmt(g("ttft_s", "p90")),
                     common.fmt(g("decode_tokens_per_s", "p50"), 2), common.fmt(g("decode_tokens_per_s", "p10"), 2),
                     common.fmt(r.get("server", {}).get("ttft_s", {}).get("p50") if ok else None),
                     common.fmt(r.get("server", {}).get("decode_tokens_per_s", {}).get("p50") if ok else None, 2),
                     "ok" if ok else "FAILED"])
    print()
    print(f"latency: {args.requests} requests/config, prompt {args.prompt_len} tokens, {args.max_tokens} generated "
          f"(ignore_eos, greedy), {args.threads} thread(s)/worker; client-side unless 'srv'")
    print(common.table(rows, ["config", "workers", "start s", "TTFT p50 s", "TTFT p90 s", "tok/s p50",
                              "tok/s p10(slow)", "srv TTFT p50", "srv tok/s p50", "status"]))
    for r in results:
        if not r["ok"]:
            print(f"\n{r['config']} failed: {r.get('error', '')[:1500]}")
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
