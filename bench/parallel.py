"""Tensor and pipeline parallel layouts on one host, measured in one run: single-stream decode
tokens/s, the throughput of 32 concurrent requests, and per step the time workers spend in the
data plane (all-reduce, stage-to-stage send and receive).

    python bench/parallel.py                       # pp1, pp2, tp3, tp3pp2; ~3 minutes on 2 cores
    python bench/parallel.py --configs pp1,tp3 --single-tokens 32 --batch-tokens 16

Per layout (bench/common.py's named configurations, one thread per worker): start the cluster,
one warm-up request, then

1. single stream: one greedy request of `--prompt-len` prompt ids and `--single-tokens` output
   tokens; decode tokens/s = (n - 1) / (t_last - t_first), client clock;
2. throughput: `--requests` (32) such requests at once with `--batch-tokens` each; generated
   tokens / wall time from the first submit to the last DONE;
3. data plane per step: every worker reports its cumulative `all_reduce_s`, `send_s` and `recv_s`
   in heartbeats (shardline/worker/comm.py `StageComm.stats`); the difference over a phase divided by the
   steps the coordinator ran in it is the time per step (every worker runs every step). Reported
   per worker and as the mean over the workers that make such calls (a stage's senders, the next
   stage's receivers, the TP ranks). `recv_s` includes waiting for the previous stage to
   finish its part of the step, not only the transfer; `all_reduce_s` includes waiting for the
   slowest TP rank of the stage.

Writes bench/results/parallel.json. The figures depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DEFAULT_CONFIGS = "pp1,pp2,tp3,tp3pp2"
COMM_FIELDS = ("all_reduce_s", "send_s", "recv_s")


def comm_snapshot(client, settle_s: float) -> dict:
    """Coordinator stats after `settle_s` (so every worker's latest heartbeat has come in)."""
    time.sleep(settle_s)
    return client.stats()


def comm_per_step(before: dict, after: dict) -> dict:
    """Per worker and mean over workers: data-plane seconds per step (and calls per step) between
    two STATS replies."""
    steps = after.get("steps_total", 0) - before.get("steps_total", 0)
    if steps <= 0:
        return {"steps": 0}
    prev = {w["worker_id"]: w.get("comm") or {} for w in before.get("workers", [])}
    workers = {}
    for w in after.get("workers", []):
        now, old = w.get("comm") or {}, prev.get(w["worker_id"], {})
        if not now:
            continue
        workers[w["worker_id"]] = {
            **{f"{k}_per_step": (now.get(k, 0.0) - old.get(k, 0.0)) / steps for k in COMM_FIELDS},
            **{f"{k}_calls_per_step": (now.get(f"num_{k}", 0) - old.get(f"num_{k}", 0)) / steps
               for k in ("all_reduce", "send", "recv")}}
    # mean over the workers that make such calls (stage 0 receives nothing, the last stage sends nothing)
    mean = {}
    for k in ("all_reduce", "send", "recv"):
        active = [v for v in workers.values() if v[f"{k}_calls_per_step"] > 0]
        mean[f"{k}_s_per_step"] = sum(v[f"{k}_s_per_step"] for v in active) / len(active) if active else None
    return {"steps": steps, "mean": mean, "workers": workers}


def run_config(name: str, args) -> dict:
    out: dict = {"config": name, "layout": dict(zip(("workers", "pipeline_parallel", "tensor_parallel"),
                                                      common.NAMED_CONFIGS[name]))}
    over = common.named_config(name)
    over["scheduler"] = {"num_kv_blocks": args.kv_blocks}
    failures: list = []
    try:
        with common.cluster(over, failures=failures) as (c, start_s):
            out["start_s"] = start_s
            client = c.client
            stats = client.stats()
            out["plan"] = common.plan_summary(stats)
            common.timed_stream(client, -1, common.make_prompt(10_000, args.prompt_len), 4)  # warm-up
            # 1. single stream
            s0 = comm_snapshot(client, args.settle_s)
            rec = common.timed_stream(client, 0, common.make_prompt(0, args.prompt_len), args.single_tokens,
                                      deadline=time.perf_counter() + args.phase_timeout)
            s1 = comm_snapshot(client, args.settle_s)
            out["single"] = {"decode_tokens_per_s": rec.decode_tokens_per_s, "ttft_s": rec.ttft_s,
                             "tokens": rec.n_tokens, "error": rec.error,
                             "comm": comm_per_step(s0, s1)}
            # 2. throughput of concurrent requests
            deadline = time.perf_counter() + args.phase_timeout
            with common.ClientPool(c.address, timeout_s=120.0) as pool, \
                    ThreadPoolExecutor(args.requests) as ex:
                t0 = time.perf_counter()
                futs = [ex.submit(lambda i: common.timed_stream(pool.get(), i, common.make_prompt(i + 1, args.prompt_len),
                                                                args.batch_tokens, deadline=deadline, phase_t0=t0), i)
                        for i in range(args.requests)]
                recs = [f.result() for f in futs]
                wall = time.perf_counter() - t0
            s2 = comm_snapshot(client, args.settle_s)
            tokens = sum(r.n_tokens for r in recs)
            out["batch"] = {"requests": args.requests, "tokens": tokens, "wall_s": wall,
                            "tokens_per_s": tokens / wall if wall > 0 else None,
                            "errors": sorted({r.error for r in recs if r.error}),
                            "comm": comm_per_step(s1, s2), "server": common.counter_diff(s1, s2)}
    except Exception as exc:  # noqa: BLE001 - report the layout as failed and go on
        out["error"] = common.error_text(exc)
    if failures:
        out["start_failures"] = failures
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated among {','.join(common.NAMED_CONFIGS)}")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt token ids per request")
    ap.add_argument("--single-tokens", type=int, default=24, help="output tokens of the single-stream request")
    ap.add_argument("--batch-tokens", type=int, default=8, help="output tokens of each concurrent request")
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests of the throughput phase")
    ap.add_argument("--kv-blocks", type=int, default=256, help="KV pool per worker (blocks of 16 tokens)")
    ap.add_argument("--phase-timeout", type=float, default=60.0, help="seconds after which a phase is cut short")
    ap.add_argument("--settle-s", type=float, default=1.5, help="wait for the workers' next heartbeat (seconds)")
    ap.add_argument("--out", type=Path, default=common.RESULTS_DIR / "parallel.json")
    args = ap.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        common.named_config(n)  # unknown names exit here, before anything starts
    t0 = time.perf_counter()
    results = []
    for n in names:
        print(f"{n}: starting", flush=True)
        r = run_config(n, args)
        results.append(r)
        if "error" in r:
            print(f"{n}: FAILED {r['error'].splitlines()[0]}", flush=True)
    rows = []
    for r in results:
        single, batch = r.get("single", {}), r.get("batch", {})
        cs, cb = single.get("comm", {}).get("mean", {}), batch.get("comm", {}).get("mean", {})
        ms = lambda d, k: None if d.get(k) is None else d[k] * 1e3  # noqa: E731
        rows.append([r["config"], common.fmt(single.get("decode_tokens_per_s"), 1), common.fmt(batch.get("tokens_per_s"), 1),
                     common.fmt(ms(cs, "all_reduce_s_per_step"), 2), common.fmt(ms(cs, "send_s_per_step"), 2),
                     common.fmt(ms(cs, "recv_s_per_step"), 2), common.fmt(ms(cb, "all_reduce_s_per_step"), 2),
                     common.fmt(ms(cb, "send_s_per_step"), 2), common.fmt(ms(cb, "recv_s_per_step"), 2),
                     "error" if "error" in r else ""])
    print(common.table(rows, ["config", "single tok/s", f"{args.requests}-req tok/s", "AR ms/step (1)",
                              "send ms/step (1)", "recv ms/step (1)", f"AR ms/step ({args.requests})",
                              f"send ms/step ({args.requests})", f"recv ms/step ({args.requests})", ""]))
    print("(1): single stream; AR: all-reduce; per-step times: mean over the workers that make the calls")
    path = common.write_json(args.out, {"env": common.environment(), "params": vars(args) | {"out": str(args.out)},
                                        "elapsed_s": time.perf_counter() - t0, "results": results})
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
