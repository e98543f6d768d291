"""Tensor and pipeline parallel layouts on the real SmolLM2 (9 query heads, 3 KV heads, so TP is 1
or 3): TP=3, TP=3 x PP=2 and PP=3 give the greedy tokens of TP=1, and their log-probabilities
match transformers' fp32 forward on the same GGUF.

Tolerances: greedy tokens may part only at a near tie (`assert_same_greedy`, PATH_NEAR_TIE nats:
a TP rank sums its 1/3 of each row-parallel matmul and the all-reduce adds the three partial
sums, a different floating-point order than TP=1); logprobs within LOGPROB_ATOL (tests/reference.py) of the
reference (measured differences are ~1e-5, as for pipeline layouts in test_end_to_end.py).
Six worker processes on two cores are slow, so outputs are short.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.conftest import assert_same_greedy, pp_config
from tests.reference import LOGPROB_ATOL

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 6
TOP_K = 5
KV_BLOCKS = 64  # small pools: six workers share this machine's memory

LAYOUTS = {
    "tp3": {"workers": {"count": 3, "threads": 1}, "parallel": {"pipeline_parallel": 1, "tensor_parallel": 3},
            "scheduler": {"num_kv_blocks": KV_BLOCKS}},
    "tp3xpp2": {"workers": {"count": 6, "threads": 1}, "parallel": {"pipeline_parallel": 2, "tensor_parallel": 3},
                "scheduler": {"num_kv_blocks": KV_BLOCKS}},
    "pp3": pp_config(3),
}


@pytest.fixture(scope="module")
def tokenizer():
    from shardline.coordinator.tokenizer import Tokenizer
    from shardline.model_file import resolve_model_path

    return Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def tp1_outputs(clusters, tokenizer):
    c = clusters.get(pp_config(1))
    return [c.client.generate(prompt_token_ids=tokenizer.encode(p), max_tokens=MAX_TOKENS, ignore_eos=True,
                              logprobs=TOP_K) for p in PROMPTS], c.client.stats()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1_and_transformers(layout, clusters, tokenizer, tp1_outputs):
    from tests.reference import reference_logits

    reference, tp1_stats = tp1_outputs
    c = clusters.get(LAYOUTS[layout])
    stats = c.client.stats()
    plan = stats["plan"]
    want = LAYOUTS[layout]["parallel"]
    assert (plan["pp_size"], plan["tp_size"]) == (want["pipeline_parallel"], want["tensor_parallel"])
    if plan["tp_size"] == 3:  # each rank holds a third of every layer and of the embedding/head rows
        full = tp1_stats["workers"][0]["weight_bytes"]
        assert all(w["weight_bytes"] < 0.4 * full for w in stats["workers"])
    for prompt, ref in zip(PROMPTS, reference):
        ids = tokenizer.encode(prompt)
        r = c.client.generate(prompt_token_ids=ids, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_K)
        assert len(r.token_ids) == MAX_TOKENS
        assert_same_greedy(ref, r)
        # every step's logprobs against transformers, teacher-forced on this layout's tokens
        logits = reference_logits(ids + r.token_ids[:-1])
        for i, (tok, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
            row = logits[len(ids) - 1 + i].astype(np.float64)
            row = row - row.max() - np.log(np.exp(row - row.max()).sum())
            assert abs(lp - row[tok]) < LOGPROB_ATOL, f"{layout} {prompt!r} token {i}: {lp} vs {row[tok]}"
            ref_top = np.argsort(-row)[:TOP_K]
            got = dict((t, v) for t, v in top)
            np.testing.assert_allclose([got.get(int(t), -np.inf) for t in ref_top], row[ref_top], atol=LOGPROB_ATOL,
                                       err_msg=f"{layout} {prompt!r} token {i}")


def _rank_main(rank: int, world: int, port: int, impl: str | None, shapes, q) -> None:
    """One TP rank with StageComm(all_reduce_impl=impl): all-reduce tensors seeded by its rank,
    then all-gather each of them; put (rank, inputs, results, calls, gathered, the impl in use)
    on q."""
    import torch

    from shardline.worker.comm import StageComm

    torch.set_num_threads(1)
    comm = StageComm(rank, world, 0, 1, rank, world, "127.0.0.1", port, f"{impl}/", "gloo", "127.0.0.1",
                     all_reduce_impl=impl)
    try:
        ins = [torch.randn(*shape, generator=torch.Generator().manual_seed(100 * rank + i))
               for i, shape in enumerate(shapes)]
        outs = [comm.all_reduce(x.clone()) for x in ins]  # several in a row: messages must not mix
        gathered = [comm.all_gather(x.clone()).numpy() for x in ins]
        assert comm.stats()["num_all_gather"] == len(shapes)
        q.put((rank, [x.numpy() for x in ins], [o.numpy() for o in outs], comm.stats()["num_all_reduce"], gathered,
               comm.all_reduce_impl))
    finally:
        comm.close()


@pytest.mark.parametrize("impl, used", [(None, "p2p"), ("collective", "collective")], ids=["default", "collective"])
def test_tp_all_reduce_sums_over_the_group(impl, used):
    """The data plane's all-reduce against NumPy: three ranks, decode- and prefill-sized tensors;
    the point-to-point version (gloo's default) gives every rank bit-identical sums. The
    all-gather (the vocabulary-parallel logits) puts the ranks' tensors side by side in rank
    order on every rank."""
    import datetime
    import multiprocessing as mp

    import torch.distributed as dist

    from shardline.local import free_port_block

    shapes = [(1, 576), (37, 576), (1, 576)]
    port = free_port_block(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 3, port, impl, shapes, q)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        got = sorted((q.get(timeout=120) for _ in range(3)), key=lambda g: g[0])
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert [g[5] for g in got] == [used] * 3
    for i in range(len(shapes)):
        want = sum(np.float64(g[1][i]) for g in got)
        for rank, _, outs, calls, gathered, _ in got:
            assert calls == len(shapes)
            np.testing.assert_allclose(outs[i], want, rtol=0, atol=1e-5)
            assert np.array_equal(gathered[i], np.concatenate([g[1][i] for g in got], axis=-1))
        if used == "p2p":
            assert all(np.array_equal(got[0][2][i], g[2][i]) for g in got)
    del store


def _stage_main(stage: int, pp: int, port: int, shapes, connect_delay_s: float, q) -> None:
    """One pipeline stage of a TP=1 group: stage 0 sends seeded tensors, a middle stage adds 1
    and passes each on, the last one puts what it received on q; then the last stage receives
    with a wrong shape (the stream must say it is out of step, not mis-read). connect_delay_s:
    stage 0 waits that long before connecting to stage 1 (so a stranger can be first)."""
    import time

    import torch

    import shardline.worker.comm as comm_mod
    from shardline.worker.comm import StageComm

    if stage == 0 and connect_delay_s:
        connect = comm_mod.socket.create_connection

        def late_connect(*a, **k):
            time.sleep(connect_delay_s)
            return connect(*a, **k)

        comm_mod.socket.create_connection = late_connect
    torch.set_num_threads(1)
    comm = StageComm(stage, pp, stage, pp, 0, 1, "127.0.0.1", port, "pp/", "gloo", "127.0.0.1", timeout_s=30)
    try:
        assert (comm._send_sock is not None) == (stage < pp - 1)
        assert (comm._recv_sock is not None) == (stage > 0)
        got = []
        for i, shape in enumerate(shapes):
            if stage == 0:
                comm.send_hidden(torch.randn(*shape, generator=torch.Generator().manual_seed(i)))
            elif stage < pp - 1:
                comm.send_hidden(comm.recv_hidden(shape, torch.float32) + 1)
            else:
                got.append(comm.recv_hidden(shape, torch.float32).numpy())
        if stage == pp - 2:
            comm.send_hidden(torch.zeros(3, 4))
        if stage == pp - 1:
            try:
                comm.recv_hidden((4, 4), torch.float32)
                got.append("no error")
            except ConnectionError as exc:
                got.append(str(exc))
            q.put(got)
        if stage == pp - 2:  # the last stage's error first, then this side closes
            comm.store.wait(["done"])
    finally:
        if stage == pp - 1:
            comm.store.set("done", "1")
        comm.close()


def _run_stages(target, pp: int, *args):
    """Run `target(stage, pp, port, *args, q)` in one spawned process per stage around a fresh
    TCPStore; returns what a stage put on q, once every process has exited with 0."""
    import datetime
    import multiprocessing as mp

    import torch.distributed as dist

    from shardline.local import free_port_block

    port = free_port_block(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(s, pp, port, *args, q)) for s in range(pp)]
    for p in procs:
        p.start()
    try:
        got = q.get(timeout=120)
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    del store
    return got


def test_pipeline_stream_moves_hidden_states_in_order():
    """The CPU pipeline hand-off (a TCP stream per stage pair): three stages; decode- and
    prefill-sized tensors, an empty one, and one larger than the socket buffers arrive bit for
    bit and in order (the middle stage adds 1), and a receive of the wrong size fails with a
    clear error instead of reading part of the next tensor."""
    import torch

    shapes = [(1, 576), (0, 576), (512, 576), (4096, 576), (32, 576)]
    got = _run_stages(_stage_main, 3, shapes, 0.0)
    for i, shape in enumerate(shapes):
        want = torch.randn(*shape, generator=torch.Generator().manual_seed(i)).numpy() + 1
        assert got[i].shape == shape and np.array_equal(got[i], want)
    assert "out of step" in got[-1] and "48 bytes sent, 64 expected" in got[-1]


def test_pipeline_stream_refuses_a_stranger_that_connects_first():
    """A connection to a stage's stream listener that does not open with the plan's HELLO (here
    one that sends junk, before the real previous stage connects) is dropped, and the real
    stream still carries the tensors."""
    import datetime
    import multiprocessing as mp
    import socket

    import torch
    import torch.distributed as dist

    from shardline.local import free_port_block

    shapes = [(3, 576), (32, 576)]
    port = free_port_block(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_stage_main, args=(s, 2, port, shapes, 2.0, q)) for s in range(2)]
    for p in procs:
        p.start()
    try:
        # stage 1's listener address, read as stage 0 reads it (its StageComm's PrefixStore)
        host, lport = dist.PrefixStore("pp/", store).get("pp_stream/1").decode().rsplit(":", 1)
        with socket.create_connection((host, int(lport)), timeout=10) as stranger:
            stranger.sendall(b"\x10\x00\x00\x00" + b"GET / HTTP/1.1\r\n\r\n")
            got = q.get(timeout=120)
            try:  # closed by the stage without a word (a reset: it left our junk unread)
                closed = stranger.recv(1) == b""
            except ConnectionResetError:
                closed = True
            assert closed
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    for i, shape in enumerate(shapes):
        want = torch.randn(*shape, generator=torch.Generator().manual_seed(i)).numpy()
        assert np.array_equal(got[i], want)
    assert "out of step" in got[-1]
    del store


def _token_stream_main(stage: int, pp: int, port: int, q) -> None:
    """A TP=1 pipeline with the token stream: the last stage sends three token messages (one
    empty) after a hidden-state tensor has passed down the stages; stage 0 reads them back."""
    import torch

    from shardline.worker.comm import StageComm

    torch.set_num_threads(1)
    comm = StageComm(stage, pp, stage, pp, 0, 1, "127.0.0.1", port, "tokens/", "gloo", "127.0.0.1", timeout_s=30,
                     token_stream=True)
    try:
        assert comm.has_token_stream == (stage in (0, pp - 1))
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        if stage == 0:
            comm.send_hidden(x)
            msgs = []
            while len(msgs) < 3:  # blocking once, then what has arrived
                msgs += comm.recv_sampled_tokens(block=not msgs)
            q.put(msgs + comm.recv_sampled_tokens(block=False))
        else:
            y = comm.recv_hidden((3, 4), torch.float32)
            if stage < pp - 1:
                comm.send_hidden(y)
            else:
                assert torch.equal(y, x)
                comm.send_sampled_tokens(7, [1001, 1002], [42, 43])
                comm.send_sampled_tokens(8, [], [])
                comm.send_sampled_tokens(9, [1003], [2 ** 31 - 1])
            comm.store.wait(["done"])  # stage 0 has read everything
    finally:
        if stage == 0:
            comm.store.set("done", "1")
        comm.close()


@pytest.mark.parametrize("pp", [2, 3])
def test_token_stream_carries_samples_from_the_last_stage_to_the_first(pp):
    """Async scheduling's token stream (last stage -> first stage TCP stream) next to the
    pipeline streams: messages arrive whole, in order, with their step ids; a non-blocking read
    with nothing pending returns nothing."""
    got = _run_stages(_token_stream_main, pp)
    assert got == [(7, [1001, 1002], [42, 43]), (8, [], []), (9, [1003], [2 ** 31 - 1])]
