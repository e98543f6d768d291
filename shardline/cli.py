"""`shardline` command line (click): launch, coordinator, worker, generate, plan, status, drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

from shardline.config import ClusterConfig, ConfigError, load_config

DEFAULT_CONFIG = "cluster.yaml"


class _Layout(click.ParamType):
    """--pp / --tp: a positive count or `auto` (the planner chooses)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or (isinstance(value, int) and value > 0):
            return value
        if isinstance(value, str) and value.isdigit() and int(value) > 0:
            return int(value)
        self.fail(f"{value!r} is neither a positive integer nor auto", param, ctx)


_LAYOUT = _Layout()


def _load(path: str | None, overrides: dict | None = None) -> ClusterConfig:
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _overrides(model, workers, pp, tp, port) -> dict:
    o: dict = {}
    if model:
        o["model"] = model
    if workers:
        o.setdefault("workers", {})["count"] = workers
    if pp:
        o.setdefault("parallel", {})["pipeline_parallel"] = pp
    if tp:
        o.setdefault("parallel", {})["tensor_parallel"] = tp
    if port:
        o.setdefault("coordinator", {}).update(client_port=port, worker_port=port + 1, rendezvous_port=port + 2)
    return o


def _local_memory_bytes(cfg: ClusterConfig) -> int:
    if cfg.workers.memory_gb:
        return int(cfg.workers.memory_gb * 2**30)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * 0.8 / cfg.workers.count)


# OpenMP threads spin this many iterations after a parallel region before they sleep (libgomp;
# ~25 ms of one core on the development machine): the next region of a step starts at once.
OMP_SPIN_COUNT = 1_000_000


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _omp_wait_policy(threads: int) -> None:
    """How the worker's OpenMP threads (torch's and Numba's, libgomp) wait between parallel regions;
    read when the library loads, so set before torch is imported. With a core per thread they spin
    a while (GOMP_SPINCOUNT) then sleep: a sleeping waiter takes tens of microseconds to wake, and a
    decode step has ~150 regions (one worker, 2 threads, 30 layers, one sequence: 12.0 ms per token
    sleeping, 7.4 ms spinning; 32 sequences: 93 -> 70 ms). With more threads than cores (several
    workers on one host: `shardline launch` sets OMP_WAIT_POLICY=PASSIVE for them) spinning
    threads steal the cores that others need, so they sleep at once. An OMP_WAIT_POLICY or
    GOMP_SPINCOUNT already in the environment wins."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if threads > _usable_cpus():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)


def _curve_options(f):
    """--server-key / --key: CurveZMQ keys of a client or worker (cluster.yaml `security:`)."""
    f = click.option("--key", "key_file", envvar="SHARDLINE_KEY", type=click.Path(dir_okay=False),
                     help="This peer's secret key file (NAME.key_secret from `shardline keygen`; "
                          "$SHARDLINE_KEY).")(f)
    return click.option("--server-key", "server_key_file", envvar="SHARDLINE_SERVER_KEY",
                        type=click.Path(dir_okay=False),
                        help="The coordinator's public key file (NAME.key), when the cluster has CurveZMQ keys "
                             "($SHARDLINE_SERVER_KEY).")(f)


def _curve_kwargs(server_key_file, key_file) -> dict:
    """Client keyword arguments (server_public_key, public_key, secret_key) from the two files."""
    from shardline.security import SecurityError, client_credentials

    try:
        return client_credentials(server_key_file, key_file)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None


def _die_with_parent() -> None:
    """In a child: get SIGTERM when the launcher dies, so no process outlives it (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@click.group()
@click.version_option(package_name="shardline")
def main() -> None:
    """Shardline: serve an LLM split over several workers (pipeline and tensor parallel)."""


# ---- launch -----------------------------------------------------------------------------------
@main.command()
@click.argument("cluster_yaml", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Override `model` (packaged name, .gguf path or safetensors checkpoint directory).")
@click.option("--workers", type=int, help="Override workers.count.")
@click.option("--pp", type=_LAYOUT, help="Override parallel.pipeline_parallel (a number or auto).")
@click.option("--tp", type=_LAYOUT, help="Override parallel.tensor_parallel (a number or auto).")
@click.option("--port", type=int, help="Client port (worker plane and rendezvous use the next two).")
@click.option("--prompt", help="Answer this prompt once the cluster is ready, print it, and stop.")
@click.option("--max-tokens", type=int, default=64, show_default=True, help="With --prompt: tokens to generate.")
@click.option("--ready-timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for workers.")
def launch(cluster_yaml, model, workers, pp, tp, port, prompt, max_tokens, ready_timeout):
    """Start the coordinator and the local workers in the foreground; Ctrl-C/SIGTERM stops all."""
    cfg = _load(cluster_yaml, _overrides(model, workers, pp, tp, port))
    client_curve, worker_curve = _launch_keys(cfg)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="shardline-", delete=False) as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f)
        cfg_path = f.name
    exe = [sys.executable, "-m", "shardline.cli"]
    procs: list[subprocess.Popen] = []
    worker_names: dict[subprocess.Popen, str] = {}  # local workers not yet seen to exit
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    rc = 0
    try:
        procs.append(subprocess.Popen(exe + ["coordinator", cfg_path], preexec_fn=_die_with_parent))
        if cfg.workers.launch_local:
            mem_gb = _local_memory_bytes(cfg) / 2**30
            env = None
            if (cfg.workers.threads > 1 and cfg.workers.count * cfg.workers.threads > _usable_cpus()
                    and "OMP_WAIT_POLICY" not in os.environ):
                env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # more threads than cores: no spinning
            for i in range(cfg.workers.count):
                procs.append(subprocess.Popen(
                    exe + ["worker", "--coordinator", cfg.worker_address, "--device", cfg.workers.device,
                           "--threads", str(cfg.workers.threads), "--memory-gb", f"{mem_gb:.3f}",
                           "--worker-id", f"local-{i}"] + worker_curve, preexec_fn=_die_with_parent, env=env))
                worker_names[procs[-1]] = f"local-{i}"
        serve_gateway = cfg.gateway.enabled and prompt is None
        if serve_gateway:  # the OpenAI-compatible HTTP gateway, a child like the others
            try:
                cfg.gateway.resolve_api_key()
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            procs.append(subprocess.Popen(exe + ["gateway", cfg_path], preexec_fn=_die_with_parent))
        from shardline.client import Client, ShardlineError

        with Client(cfg.client_address, **client_curve) as client:
            deadline = time.monotonic() + ready_timeout
            ready = False
            while not stopping and not ready:
                exited = [p for p in procs if p.poll() is not None]
                if any(p.returncode != 0 for p in exited):
                    raise click.ClickException("a cluster process exited during start-up (see its log above)")
                if exited:  # rc 0: the coordinator was stopped (SIGTERM) and told its workers to shut down
                    try:
                        rc = procs[0].wait(cfg.coordinator.shutdown_timeout_s + 10)
                    except subprocess.TimeoutExpired:
                        raise click.ClickException("a worker exited during start-up (see its log above)") from None
                    click.echo(f"shardline: coordinator exited during start-up (rc={rc}); stopping", err=True)
                    stopping = True
                    break
                if time.monotonic() > deadline:
                    raise click.ClickException(f"cluster not ready after {ready_timeout} s")
                try:
                    ready = client.health(timeout_s=1.0).get("status") == "ok"
                except ShardlineError:
                    pass
                if not ready:
                    time.sleep(0.2)  # poll interval
            if ready:
                click.echo(f"shardline: serving {cfg.model} at {cfg.client_address} "
                           f"({cfg.workers.count} workers, pipeline {cfg.pipeline_parallel or 'auto'} x tensor "
                           f"{cfg.tensor_parallel or 'auto'})", err=True)
                if serve_gateway:
                    gw = cfg.gateway
                    click.echo(f"shardline: OpenAI-compatible gateway at http://{gw.host}:{gw.port}/v1", err=True)
            if ready and prompt is not None:
                click.echo(f"> {prompt}", err=True)
                for d in client.stream(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens):
                    click.echo(d.text, nl=False)
                    if d.finish_reason:
                        click.echo()
                        t = d.timings or {}
                        click.echo(f"[{d.usage['completion_tokens']} tokens, finish_reason={d.finish_reason}, "
                                   f"TTFT {t.get('ttft_s', 0) * 1000:.0f} ms, "
                                   f"{t.get('decode_tokens_per_s') or 0:.1f} tokens/s]", err=True)
                return
        while not stopping:
            if procs[0].poll() is not None:  # e.g. shut down after a SIGTERM of its own: its rc is ours
                rc = procs[0].returncode
                click.echo(f"shardline: coordinator exited (rc={rc}); stopping workers", err=True)
                break
            for p in [p for p in worker_names if p.poll() is not None]:  # drained (rc 0), or failed
                click.echo(f"shardline: worker {worker_names.pop(p)} exited (rc={p.returncode})", err=True)
            time.sleep(0.2)  # poll interval
    finally:
        _stop_all(procs, shutdown_timeout_s=cfg.coordinator.shutdown_timeout_s)
        os.unlink(cfg_path)
        # Everything is stopped: ignore SIGINT/SIGTERM until the process is gone, so that one
        # arriving now (a supervisor, or LocalCluster.stop right after the coordinator shut down)
        # cannot turn a clean exit into death by signal (rc -15). Keeping on_signal is not
        # enough: CPython's finalization resets Python-level handlers to SIG_DFL (not SIG_IGN)
        # before the interpreter is gone, and that window was hit in CI.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    sys.exit(rc)


def _launch_keys(cfg: ClusterConfig) -> tuple[dict, list[str]]:
    """With `security.server_key`: the launcher's own Client keyword arguments (its
    `security.client_key`) and the `--server-key/--key` arguments of the local workers
    (`security.worker_key`). Without: ({}, [])."""
    sec = cfg.security
    if sec.server_key is None:
        return {}, []
    from shardline.security import server_public_file

    missing = [f for f, v in (("client_key", sec.client_key),
                              ("worker_key", sec.worker_key if cfg.workers.launch_local else "-")) if v is None]
    if missing:
        raise click.ClickException(f"security.server_key is set, so `shardline launch` needs security.{missing[0]} "
                                   f"(a secret key file on the {missing[0][:-4]} allow-list) for the processes it runs")
    server_public = server_public_file(sec.server_key)
    workers = ["--server-key", server_public, "--key", sec.worker_key] if cfg.workers.launch_local else []
    return _curve_kwargs(server_public, sec.client_key), workers


def _stop_all(procs: list[subprocess.Popen], timeout_s: float = 10.0, shutdown_timeout_s: float = 0.0) -> None:
    """SIGTERM the coordinator first (it stops admission, lets running requests finish for up to
    `shutdown_timeout_s`, then tells the workers to shut down), then the rest; SIGKILL whatever is
    still running `timeout_s` seconds (plus the shutdown time, for the coordinator) later."""
    for group, limit in ((procs[:1], timeout_s + shutdown_timeout_s), (procs[1:], timeout_s)):
        for p in group:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + limit
        for p in group:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---- keygen -----------------------------------------------------------------------------------
@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="File name stem: writes NAME.key (public) and NAME.key_secret (0600).")
@click.option("--force", is_flag=True, help="Overwrite existing key files of that name.")
def keygen(directory, name, force):
    """Create a CurveZMQ keypair for the coordinator, a worker or a client (cluster.yaml `security:`)."""
    from shardline.security import SecurityError, generate_keypair

    try:
        public, secret = generate_keypair(directory, name, overwrite=force)
    except (SecurityError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it on this host)")


# ---- coordinator / worker ---------------------------------------------------------------------
@main.command()
@click.argument("cluster_yaml", required=False, type=click.Path(dir_okay=False))
@click.option("--host", help="Override coordinator.host (bind address).")
@click.option("--port", type=int, help="Client port (worker plane and rendezvous use the next two).")
@click.option("--workers", type=int, help="Override workers.count.")
def coordinator(cluster_yaml, host, port, workers):
    """Run the coordinator alone (workers join with `shardline worker`)."""
    o = _overrides(None, workers, None, None, port)
    if host:
        o.setdefault("coordinator", {})["host"] = host
    cfg = _load(cluster_yaml, o)
    from shardline.coordinator.server import main as run

    sys.exit(run(cfg))


@main.command()
@click.argument("cluster_yaml", required=False, type=click.Path(dir_okay=False))
@click.option("--address", help="Client-plane address of the coordinator (default: from the config, "
                                "coordinator.host and client_port).")
@click.option("--host", help="Override gateway.host (bind address).")
@click.option("--port", type=int, help="Override gateway.port.")
@click.option("--api-key-env", help="Override gateway.api_key_env: the environment variable holding the API key.")
@click.option("--timeout", type=float, help="Override gateway.timeout_s (seconds per coordinator reply).")
def gateway(cluster_yaml, address, host, port, api_key_env, timeout):
    """Run the OpenAI-compatible HTTP gateway (/v1/completions, /v1/chat/completions, /v1/models,
    /health) in front of a running coordinator."""
    g = {k: v for k, v in dict(host=host, port=port, api_key_env=api_key_env, timeout_s=timeout).items()
         if v is not None}
    if api_key_env:
        g["api_key"] = None
    cfg = _load(cluster_yaml, {"gateway": g} if g else None)
    try:
        key = cfg.gateway.resolve_api_key()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    client_kwargs = {}
    sec = getattr(cfg, "security", None)
    if sec is not None and getattr(sec, "server_key", None) and getattr(sec, "client_key", None):
        from shardline.security import client_credentials, server_public_file  # CurveZMQ keys

        client_kwargs = client_credentials(server_public_file(sec.server_key), sec.client_key)
    from shardline.gateway import serve

    serve(address or cfg.client_address, cfg.gateway.host, cfg.gateway.port, key, cfg.gateway.timeout_s,
          **client_kwargs)


@main.command()
@click.option("--coordinator", "address", required=True, help="Worker-plane address, tcp://HOST:PORT.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="Compute threads (torch and Numba).")
@click.option("--memory-gb", type=float, help="Memory offered for weights and KV cache (default: 80% of RAM).")
@click.option("--worker-id", help="Stable name of this worker (default: hostname-pid).")
@click.option("--host", help="Address this worker is reached at and torch.distributed binds to (default: the one "
                             "routing to the coordinator).")
@click.option("--price-per-hour", type=click.FloatRange(min=0), help="Hourly price of this worker (overrides workers.price_per_hour).")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Relative speed declared to the planner (2 = twice as fast as the reference worker).")
@click.option("--model-path", type=click.Path(exists=True), help="This host's copy of the model; its digest must "
              "match the coordinator's (default: use the coordinator's path if the same file is here).")
@click.option("--no-local-model", is_flag=True, help="Never read a model file on this host: receive the shard's "
              "tensors from the coordinator.")
@_curve_options
def worker(address, device, threads, memory_gb, worker_id, host, price_per_hour, speed, model_path, no_local_model,
           server_key_file, key_file):
    """Run one worker that joins a coordinator."""
    curve = _curve_kwargs(server_key_file, key_file)
    if threads > 1:
        _omp_wait_policy(threads)
    from shardline.worker.worker import main as run

    sys.exit(run(address, device, threads, int(memory_gb * 2**30) if memory_gb else None, worker_id, host,
                 price_per_hour, speed=speed, model_path=model_path, use_local_model=not no_local_model,
                 curve_keys=(curve["server_public_key"], curve["public_key"], curve["secret_key"]) if curve else None))


# ---- generate ---------------------------------------------------------------------------------
@main.command()
@click.argument("prompt")
@click.option("--address", help="Client-plane address (default: $SHARDLINE_ADDRESS or tcp://127.0.0.1:7450).")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Stop token id (repeatable).")
@click.option("--min-tokens", type=int, default=0, show_default=True, help="No EOS/stop token before this many.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True, help="vLLM's; 1 = off.")
@click.option("--presence-penalty", type=float, default=0.0, show_default=True, help="OpenAI's; 0 = off.")
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True, help="OpenAI's; 0 = off.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as a user message.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token_ids, finish_reason, usage, timings).")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for each reply.")
@_curve_options
def generate(prompt, address, max_tokens, temperature, top_p, top_k, min_p, seed, stop, stop_token_ids, min_tokens,
             repetition_penalty, presence_penalty, frequency_penalty, ignore_eos, chat, as_json, timeout,
             server_key_file, key_file):
    """Generate a completion from a running cluster."""
    from shardline.client import Client, ShardlineError

    params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                  stop=list(stop), stop_token_ids=list(stop_token_ids), min_tokens=min_tokens,
                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, ignore_eos=ignore_eos)
    kw = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    curve = _curve_kwargs(server_key_file, key_file)
    try:
        with Client(address, timeout_s=timeout, **curve) as c:
            _wait_for_cluster(c, timeout)
            if as_json:
                r = c.generate(**kw, **params)
                click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
                return
            for d in c.stream(**kw, **params):
                click.echo(d.text, nl=False)
            click.echo()
    except ValueError as exc:  # SamplingParams validation
        raise click.BadParameter(str(exc)) from None
    except ShardlineError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


def _wait_for_cluster(c, timeout_s: float, probe_s: float = 5.0) -> None:
    """First contact of a one-shot command: fail within `probe_s` seconds when nothing answers
    (ZeroMQ connects lazily, so a missing cluster would otherwise look like a slow one), and wait
    up to `timeout_s` while the cluster is still loading or recovering.

    Raises:
        click.ClickException: no answer (with the likely causes), or not serving in time.
    """
    from shardline.client import RequestTimeoutError

    try:
        h = c.health(timeout_s=min(timeout_s, probe_s))
    except RequestTimeoutError:
        raise click.ClickException(
            f"no cluster answered at {c.address} within {min(timeout_s, probe_s):.0f} s: is one running "
            "(`shardline launch`)? With security keys configured, pass --server-key and --key.") from None
    if h.get("status") != "ok":
        click.echo(f"waiting for the cluster ({h.get('status')}) ...", err=True)
        c.wait_ready(timeout_s)


# ---- batch ------------------------------------------------------------------------------------
@main.command()
@click.argument("input_jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Results JSONL (appended; a rerun skips lines already there).")
@click.option("--address", help="Client-plane address (default: $SHARDLINE_ADDRESS or tcp://127.0.0.1:7450).")
@click.option("--concurrency", type=int, default=32, show_default=True, help="Requests in flight at once.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def batch(input_jsonl, output, address, concurrency, no_progress):
    """Offline batch inference: every line of INPUT_JSONL (prompt/messages/prompt_token_ids and
    sampling parameters) through a running cluster; results in input order."""
    from shardline.batch import run_batch
    from shardline.client import ShardlineError

    try:
        stats = run_batch(input_jsonl, output, address, concurrency, progress=not no_progress)
    except (ValueError, ShardlineError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(stats), err=True)


# ---- status -----------------------------------------------------------------------------------
@main.command()
@click.option("--address", help="Client-plane address (default: $SHARDLINE_ADDRESS or tcp://127.0.0.1:7450).")
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's STATS reply as one JSON object.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the reply.")
@_curve_options
def status(address, as_json, timeout, server_key_file, key_file):
    """Workers, stages, KV usage, queue depth, recent throughput and cost of a running cluster."""
    from shardline.client import Client, ShardlineError

    curve = _curve_kwargs(server_key_file, key_file)
    try:
        with Client(address, timeout_s=timeout, **curve) as c:
            stats = c.stats()
    except ShardlineError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    if as_json:
        click.echo(json.dumps(stats))
        return
    from shardline.status import print_status

    print_status(stats)


# ---- drain ----------------------------------------------------------------------------------
@main.command()
@click.argument("worker_id")
@click.option("--address", help="Client-plane address (default: $SHARDLINE_ADDRESS or tcp://127.0.0.1:7450).")
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's DRAIN_WORKER_REPLY as one JSON object.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the new plan to serve (the drain goes on if the wait ends first).")
@_curve_options
def drain(worker_id, address, as_json, timeout, server_key_file, key_file):
    """Move WORKER_ID's work to the other workers, then shut it down (it exits 0).

    The coordinator stops scheduling, lets the steps in flight finish, re-plans onto the other
    workers (running requests are recomputed from their tokens: none fails) and tells the worker
    to leave. Refused, changing nothing, when no plan fits without it. WORKER_ID is a name from
    `shardline status`."""
    from shardline.client import Client, ShardlineError

    curve = _curve_kwargs(server_key_file, key_file)
    try:
        with Client(address, timeout_s=timeout, **curve) as c:
            reply = c.drain_worker(worker_id)
    except ShardlineError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    if as_json:
        click.echo(json.dumps(reply))
        return
    plan = reply.get("plan") or {}
    click.echo(f"worker {reply['worker_id']} drained in {reply['drain_s']:.1f} s: serving on "
               f"{', '.join(a['worker_id'] for a in plan.get('assignments', [])) or '?'} "
               f"(plan {reply['plan_id']}, pipeline {plan.get('pp_size', '?')} x tensor "
               f"{plan.get('tp_size', '?')}); {reply['requests_resumed']} sequences resumed")


# ---- plan -------------------------------------------------------------------------------------
@main.command()
@click.argument("cluster_yaml", required=False, type=click.Path(dir_okay=False))
@click.option("--workers", type=int, help="Override workers.count.")
@click.option("--pp", type=_LAYOUT, help="Override parallel.pipeline_parallel (a number or auto).")
@click.option("--tp", type=_LAYOUT, help="Override parallel.tensor_parallel (a number or auto).")
@click.option("--memory-gb", help="Memory each worker offers, GiB: one value, or one per worker (8,8,4); default "
                                   "workers.memory_gb or a RAM share.")
@click.option("--speed", help="Relative speed of each worker (1,1,1.5), as `shardline worker --speed` declares it.")
@click.option("--hosts", help="Host of each worker (for the table), comma-separated.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Device of the workers (default workers.device).")
def plan(cluster_yaml, workers, pp, tp, memory_gb, speed, hosts, device):
    """Print which worker holds which layers and the bytes it needs (fails with the reason when
    no plan fits: the same planner the coordinator runs)."""
    from shardline.coordinator.planner import ModelSizes, PlanError, WorkerOffer, format_plan, plan_for_config
    from shardline.model_file import ModelError, read_model_spec, resolve_model_path

    cfg = _load(cluster_yaml, _overrides(None, workers, pp, tp, None))
    try:
        path = resolve_model_path(cfg.model)
        spec = read_model_spec(path)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    n = cfg.workers.count
    mems = [int(g * 2**30) for g in _per_worker(memory_gb, n, "--memory-gb", float)] if memory_gb else \
        [_local_memory_bytes(cfg)] * n
    speeds = _per_worker(speed, n, "--speed", float) if speed else [1.0] * n
    host_names = _per_worker(hosts, n, "--hosts", str) if hosts else [cfg.coordinator.host] * n
    if any(s <= 0 for s in speeds):
        raise click.BadParameter(f"speeds must be > 0, got {speed}", param_hint="--speed")
    offers = [WorkerOffer(f"worker-{i}", host_names[i], mems[i], device or cfg.workers.device, speeds[i])
              for i in range(n)]
    sizes = ModelSizes.from_model(str(path), spec, cfg.quantization, cfg.quantization_group_size, cfg.dtype)
    try:
        p = plan_for_config(cfg, spec, sizes, offers)
    except PlanError as exc:
        raise click.ClickException(f"no plan fits: {exc}") from None
    quant = f", weights {cfg.quantization} (group {cfg.quantization_group_size})" if cfg.quantization != "none" else ""
    click.echo(f"model {cfg.model}: {spec.name}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
               f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads ({path}){quant}")
    click.echo(format_plan(p))
    click.echo(f"KV pool: {p.num_kv_blocks} blocks x {p.block_size} tokens = {p.num_kv_blocks * p.block_size} tokens; "
               f"pipeline {p.pp_size} x tensor {p.tp_size}, layer split {cfg.parallel.layer_split}, "
               f"slowest stage ~{p.est_step_s * 1e3:.1f} ms per decode step (planner estimate)")


def _per_worker(value: str, n: int, option: str, kind) -> list:
    """'a' or 'a,b,c' (one per worker) -> a list of n values of `kind`."""
    try:
        items = [kind(v.strip()) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}", param_hint=option)
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise click.BadParameter(f"{len(items)} values for {n} workers", param_hint=option)
    return items


if __name__ == "__main__":
    main()
