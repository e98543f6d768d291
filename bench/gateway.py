"""Latency the HTTP gateway adds per request, against the ZeroMQ client.

    python bench/gateway.py                     # pp1 cluster, 20 requests per path, max_tokens 4
    python bench/gateway.py --address tcp://127.0.0.1:7450 --requests 50   # a running cluster

The same request (the same prompt of `--prompt-len` token ids, greedy, `ignore_eos`, exactly
`--max-tokens` tokens) goes, alternately, through

    zmq      shardline.Client.generate                    (ZeroMQ client plane)
    http     POST /v1/completions with httpx, one kept-alive connection
    openai   the official openai package's completions.create (its own client overhead included)

and the end-to-end wall time of each is taken on the client (time.perf_counter). Alternating the
paths request by request spreads any drift of the machine over all of them. The gateway's added
latency is reported as median(http) - median(zmq) and as the median of the per-round differences.
Results: bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import yaml  # noqa: E402

from common import (RESULTS_DIR, cluster, environment, fmt, make_prompt, named_config, summarize,  # noqa: E402
                    table, write_json)
from shardline.client import Client  # noqa: E402
from shardline.local import free_port_block  # noqa: E402


@contextlib.contextmanager
def gateway_process(address: str):
    """`shardline gateway` against `address` on a free port; yields its base URL."""
    port = free_port_block(1)
    fd, cfg = tempfile.mkstemp(suffix=".yaml", prefix="shardline-gw-bench-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"gateway": {"host": "127.0.0.1", "port": port}}, f)
    proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "gateway", cfg, "--address", address],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited (rc={proc.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("gateway not healthy after 60 s")
            time.sleep(0.2)  # poll interval
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(cfg)


def measure(address: str, url: str, model: str, prompt: list[int], max_tokens: int, rounds: int) -> dict:
    import openai

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    times: dict[str, list[float]] = {"zmq": [], "http": [], "openai": []}
    with Client(address) as zc, httpx.Client(base_url=url, timeout=120) as hc:
        oc = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def zmq_once():
            r = zc.generate(prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
            assert r.usage["completion_tokens"] == max_tokens

        def http_once():
            r = hc.post("/v1/completions", json=body)
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == max_tokens

        def openai_once():
            r = oc.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == max_tokens

        paths = {"zmq": zmq_once, "http": http_once, "openai": openai_once}
        for f in paths.values():  # warm-up: connections, the prefix cache, first-call costs
            f()
        for _ in range(rounds):
            for name, f in paths.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="pp1", help="named cluster layout to start (bench/common.py)")
    ap.add_argument("--address", help="use a running cluster at this client-plane address instead")
    ap.add_argument("--requests", type=int, default=20, help="requests per path")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output", type=Path, default=RESULTS_DIR / "gateway.json")
    args = ap.parse_args()
    prompt = make_prompt(0, args.prompt_len)

    with contextlib.ExitStack() as stack:
        address, start_s = args.address, None
        if address is None:
            c, start_s = stack.enter_context(cluster(named_config(args.config)))
            address = c.address
        with Client(address) as cl:
            model = cl.models()[0]["id"]
        url = stack.enter_context(gateway_process(address))
        times = measure(address, url, model, prompt, args.max_tokens, args.requests)

    stats = {k: summarize(v) for k, v in times.items()}
    diffs = {k: [b - a for a, b in zip(times["zmq"], times[k])] for k in ("http", "openai")}
    added = {k: {"median_minus_median_s": stats[k]["p50"] - stats["zmq"]["p50"],
                 "median_of_round_differences_s": summarize(diffs[k])["p50"]} for k in diffs}
    rows = [[k, stats[k]["n"], fmt(stats[k]["p50"] * 1e3, 2), fmt(stats[k]["p90"] * 1e3, 2),
             fmt(stats[k]["mean"] * 1e3, 2),
             "-" if k == "zmq" else fmt(added[k]["median_of_round_differences_s"] * 1e3, 2)]
            for k in times]
    print(table(rows, ["path", "n", "p50 ms", "p90 ms", "mean ms", "added (median of diffs) ms"]))
    out = {"env": environment(), "params": {"config": None if args.address else args.config,
                                            "address": args.address, "requests": args.requests,
                                            "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
                                            "cluster_start_s": start_s},
           "latency_s": stats, "added_latency_s": added, "raw_s": times}
    print(f"wrote {write_json(args.output, out)}")


if __name__ == "__main__":
    main()
