"""Load with real processes: 1,000 short requests at 64 concurrency with random cancels, client
timeouts and invalid requests (bench/load.py's driver, seeded), on a 2-worker PP=2 cluster.

Asserts correctness only, never timing: every request has a known outcome that fits its kind
(completed in full, cancelled mid-stream, timed out at the client, or refused with the
coordinator's reason), no request is left running or waiting, every KV block is free again, the
file descriptors of the coordinator, the workers and the launcher are back within a small margin
of their count before the load, and every process is still up and serves a normal request. The
figures are printed (quote bench/load.py's, which runs the same load and writes JSON).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.integration.conftest import pp_config

_spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).resolve().parents[2] / "bench" / "load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = load  # its dataclasses look their module up
_spec.loader.exec_module(load)

NUM_REQUESTS = 1000
CONCURRENCY = 64
SEED = 0


def test_thousand_requests_with_cancels_leak_nothing():
    figures, outcomes = load.run_on_local_cluster(pp_config(2), NUM_REQUESTS, CONCURRENCY, SEED)
    load.print_figures(figures)

    # every request accounted for, with the outcome its kind allows
    assert len(outcomes) == NUM_REQUESTS and all(o is not None for o in outcomes)
    for o in outcomes:
        assert o.outcome in load.OUTCOMES, o
        if o.outcome == "completed":
            assert o.kind != "invalid" and o.finish_reason == "length" and o.num_tokens == o.max_tokens, o
        elif o.outcome == "cancelled":
            assert o.kind == "cancel" and 1 <= o.num_tokens < o.max_tokens, o
        elif o.outcome == "timed_out":
            assert o.kind == "timeout" and o.reason.startswith("RequestTimeoutError"), o
        else:  # errored: only the invalid requests, each with the coordinator's reason
            assert o.kind == "invalid" and "prompt_token_ids" in o.reason, o
    assert all(o.outcome == "errored" for o in outcomes if o.kind == "invalid")
    counts = figures["outcomes"]
    assert counts["completed"] and counts["cancelled"] and counts["errored"], counts  # the mix reached each

    # the coordinator: every accepted request ended, every block free
    server = figures["server"]
    assert server["running_after"] == 0 and server["waiting_after"] == 0, server
    assert counts["completed"] + counts["cancelled"] <= server["requests_total"] <= NUM_REQUESTS - counts["errored"]
    kv = figures["kv"]
    assert kv["free_after"] == kv["num_kv_blocks"] == kv["free_before"], kv

    # no descriptor growth, nothing died, still serving
    assert figures["processes_gone"] == [], figures["processes_gone"]
    assert {"coordinator", "local-0", "local-1", "launcher"} <= set(figures["fds"]), figures["fds"]
    for role, fd in figures["fds"].items():
        assert fd["after"] <= fd["before"] + load.FD_MARGIN, (role, fd)
    assert figures["served_after"] == "length"
