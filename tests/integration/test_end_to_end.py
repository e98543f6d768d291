"""End to end on the real SmolLM2 model: CLI lifecycle, logprobs against transformers, greedy
output identical across pipeline sizes, bad input refused while the cluster keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import numpy as np
import pytest
import yaml
import zmq

from shardline import Client, InvalidRequestError
from shardline import protocol as P
from shardline.local import free_port_block
from tests.frames import raw_frame
from tests.integration.conftest import NEAR_TIE, pp_config
from tests.reference import LOGPROB_ATOL

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def tokenizer():
    from shardline.coordinator.tokenizer import Tokenizer
    from shardline.model_file import resolve_model_path

    return Tokenizer.from_gguf(resolve_model_path("smollm2-135m"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_cli_launch_generate_and_clean_shutdown(tmp_path):
    port = free_port_block(3)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"coordinator": {"client_port": port, "worker_port": port + 1,
                                                   "rendezvous_port": port + 2}}))
    log = open(tmp_path / "launch.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "shardline.cli", "launch", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    address = f"tcp://127.0.0.1:{port}"
    try:
        with Client(address) as c:
            c.wait_ready(timeout_s=300)
            pids = [w["pid"] for w in c.stats()["workers"]]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        out = subprocess.run([sys.executable, "-m", "shardline.cli", "generate", "The capital of France is",
                              "--address", address, "--max-tokens", "8", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert set(result) >= {"text", "token_ids", "finish_reason", "usage", "timings"}
        assert result["finish_reason"] in ("length", "stop")
        assert 1 <= len(result["token_ids"]) <= 8 and result["usage"]["completion_tokens"] == len(result["token_ids"])
        assert result["usage"]["prompt_tokens"] == 5
        assert "Paris" in result["text"]
        assert result["timings"]["ttft_s"] > 0
        # streaming through the CLI prints the same greedy text
        out2 = subprocess.run([sys.executable, "-m", "shardline.cli", "generate", "The capital of France is",
                               "--address", address, "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
        assert out2.returncode == 0 and out2.stdout.rstrip("\n") == result["text"]
    finally:
        launcher.send_signal(signal.SIGTERM)
        rc = launcher.wait(60)
        log.close()
    assert rc == 0, (tmp_path / "launch.log").read_text()[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    assert not any(_alive(p) for p in pids), "a worker outlived the launcher"
    assert all(_port_free(p) for p in (port, port + 1, port + 2))


def test_logprobs_match_transformers(default_cluster, tokenizer):
    """Greedy tokens and their top-5 logprobs equal transformers' fp32 forward on the same GGUF.

    Tolerance: LOGPROB_ATOL (tests/reference.py) absolute on logprobs. Both sides use the same
    dequantized weights in fp32; the order of floating-point operations differs (~1e-5 with a
    float32 KV cache) and the default float16 KV cache rounds K and V (up to 6.4e-3 seen).
    """
    from tests.reference import reference_logits

    prompt = tokenizer.encode("The quick brown fox jumps over the")
    r = default_cluster.client.generate(prompt_token_ids=prompt, max_tokens=8, ignore_eos=True, logprobs=5)
    assert len(r.token_ids) == 8 and len(r.logprobs) == 8
    logits = reference_logits(prompt + r.token_ids[:-1])
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    for i, (tok, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert tok == int(row.argmax()), f"token {i}: {tok} vs reference argmax {int(row.argmax())}"
        assert abs(lp - row[tok]) < LOGPROB_ATOL
        ref_top = np.argsort(-row)[:5]
        assert [t for t, _ in top] == ref_top.tolist()
        np.testing.assert_allclose([v for _, v in top], row[ref_top], atol=LOGPROB_ATOL)


def test_greedy_identical_across_pipeline_sizes(clusters, tokenizer):
    """PP=1, 2, 3 produce the same greedy tokens, and each token is transformers' greedy choice
    given the same prefix (teacher forcing), up to a near tie of NEAR_TIE nats."""
    from tests.reference import reference_logits

    outputs = {}
    for pp in (1, 2, 3):
        c = clusters.get(pp_config(pp))
        outputs[pp] = [c.client.generate(p, max_tokens=24, ignore_eos=True).token_ids for p in PROMPTS]
    assert outputs[1] == outputs[2] == outputs[3]
    for p, ours in zip(PROMPTS, outputs[1]):
        ids = tokenizer.encode(p)
        logits = reference_logits(ids + ours[:-1])
        for i, tok in enumerate(ours):
            row = logits[len(ids) - 1 + i]
            assert row.max() - row[tok] < NEAR_TIE, f"{p!r} token {i}: {tok} is not the reference's greedy choice"


def test_stop_strings_eos_and_chat(default_cluster):
    c = default_cluster.client
    full = c.generate("The capital of France is", max_tokens=16, ignore_eos=True)
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    r = c.generate("The capital of France is", max_tokens=16, stop=[stop], ignore_eos=True)
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert stop not in r.text and full.text.startswith(r.text)
    # chat template: the model answers and ends with <|im_end|> (EOS), which is not in the text
    chat = c.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=48)
    assert chat.finish_reason == "stop" and chat.token_ids[-1] == 2
    assert "Paris" in chat.text and "<|im_end|>" not in chat.text


def test_bad_input_is_refused_and_cluster_keeps_serving(default_cluster):
    c = default_cluster.client
    with pytest.raises(InvalidRequestError, match="exceeds the maximum sequence length"):
        c.generate(prompt_token_ids=[100] * 9000, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        c.generate("hi", temperature=-1.0)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(default_cluster.address)
    try:
        cases = [
            b"gar",
            b"XX" + bytes(4),
            P.HEADER.pack(P.MAGIC, 9, 0, int(P.MsgType.GENERATE)) + b"\x80",
            raw_frame(P.MsgType.GENERATE, {"request_id": "r1", "prompt": "hi", "params": {"temperature": "hot"}}),
            raw_frame(P.MsgType.GENERATE, {"request_id": "r2", "prompt": "hi", "params": {"bogus": 1}}),
            raw_frame(P.MsgType.GENERATE, {"request_id": "r3", "prompt_token_ids": P.pack_ids([10**6])}),
            raw_frame(P.MsgType.GENERATE, {"request_id": "r4", "prompt": "hi", "stream": "yes"}),
            raw_frame(P.MsgType.STEP, {}),
        ]
        expect = ["shorter than", "bad magic", "protocol version 9.0", "temperature", "bogus", "prompt_token_ids",
                  "GENERATE: Expected `bool`, got `str` - at `$.stream`", "STEP"]
        for frame, needle in zip(cases, expect, strict=True):
            raw.send(frame)
            assert raw.poll(10_000), f"no reply to {frame[:16]!r}"
            msg_type, body = P.decode(raw.recv())
            assert msg_type is P.MsgType.ERROR and needle in body.message, body
            if b"request_id" in frame:  # the refusal names the request, even one whose body did not decode
                assert body.request_id == msgpack.unpackb(frame[P.HEADER_BYTES:])["request_id"], body
    finally:
        raw.close()
    assert c.generate("The capital of France is", max_tokens=4).usage["completion_tokens"] == 4
    assert c.health()["status"] == "ok"


def test_unknown_model_and_bad_config_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.gguf"
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "plan"], input="", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "layers" in out.stdout  # defaults work without a cluster.yaml
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(missing)}))
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "plan", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "model file not found" in out.stderr and str(missing) in out.stderr
    cfg.write_text(yaml.safe_dump({"parallel": {"tensor_parallel": 2}, "workers": {"count": 2}}))
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "plan", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "tensor_parallel=2 does not divide num_heads=9" in out.stderr
    cfg.write_text("workers: {count: 2, colour: blue}\n")
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "plan", str(cfg)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "workers.colour" in out.stderr
