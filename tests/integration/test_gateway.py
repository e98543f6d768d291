"""The OpenAI-compatible HTTP gateway, driven by the official `openai` Python package, against
the default cluster: completion, chat (the model's chat template, checked against
transformers'), streaming, stop, max_tokens, n, logprobs (against transformers' logits), echo,
logit_bias, error statuses, API key, /health, disconnect cancels, and `shardline launch`
starting the gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import yaml

from shardline.local import free_port_block
from tests.integration.conftest import NEAR_TIE, pp_config
from tests.reference import LOGPROB_ATOL

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
API_KEY = "test-key-4f1c"


def start_gateway(tmp_path, address: str, api_key_env: str | None = None) -> tuple[subprocess.Popen, str]:
    """`shardline gateway` as a child process on a free port; returns (process, base URL)."""
    port = free_port_block(1)
    cfg = tmp_path / f"gateway-{port}.yaml"
    cfg.write_text(yaml.safe_dump({"gateway": {"host": "127.0.0.1", "port": port}}))
    cmd = [sys.executable, "-m", "shardline.cli", "gateway", str(cfg), "--address", address]
    env = dict(os.environ)
    if api_key_env:
        cmd += ["--api-key-env", api_key_env]
        env[api_key_env] = API_KEY
    log = open(tmp_path / f"gateway-{port}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / f"gateway-{port}.log").read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # poll interval
    proc.kill()
    raise RuntimeError("gateway did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters.get(pp_config(2))


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    proc, url = start_gateway(tmp_path_factory.mktemp("gw"), cluster.address)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(oai, gateway):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    r = httpx.get(f"{gateway}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["workers_up"] == 2


def test_completion_equals_the_zeromq_client_and_max_tokens(oai, cluster):
    prompt = "The capital of France is"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ref = cluster.client.generate(prompt, max_tokens=8)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.usage["prompt_tokens"] and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    short = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert ref.text.startswith(short.choices[0].text)


def test_several_prompts_and_token_id_prompts(oai, cluster):
    prompts = ["Water boils at", "def fibonacci(n):"]
    r = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [cluster.client.generate(p, max_tokens=5).text for p in prompts]
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == cluster.client.generate(prompt_token_ids=ids, max_tokens=5).text


def test_chat_renders_the_chat_template_like_transformers(oai):
    from tests.reference import load_reference_tokenizer

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ids = load_reference_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert r.usage.prompt_tokens == len(ids)
    # the same tokens through the completions route give the same greedy answer
    same = oai.completions.create(model=MODEL, prompt=list(ids), max_tokens=12, temperature=0)
    assert r.choices[0].message.content == same.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12


def test_streaming_completion_and_chat(oai):
    prompt = "Once upon a time"
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] and chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices

    messages = [{"role": "user", "content": "Name a colour."}]
    full = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    events = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                              stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == full.choices[0].message.content
    assert events[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_strings(oai):
    prompt = "The capital of France is"
    text = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    word = text.split()[2]  # a word from the middle of the greedy answer
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(word)]
    kept = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=word,
                                  extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: text.index(word) + len(word)]
    streamed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[word],
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_n_choices_are_seeded_and_reproducible(oai):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, n=3, seed=11,
              extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**kw), oai.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 3 * 8
    one = oai.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == a.choices[0].text  # choice 0 keeps the request's seed
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                       max_tokens=6, temperature=1.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = list(oai.completions.create(**kw, stream=True))
    for i in range(3):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == a.choices[i].text


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_logprobs_equal_transformers_log_softmax(oai):
    """Generated tokens' logprobs and top-3 equal log_softmax of transformers' logits (within
    LOGPROB_ATOL nats, the tolerance of test_end_to_end's comparison of the same weights)."""
    from tests.reference import reference_logits

    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    gen = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert len(gen) == 6
    ref = log_softmax(reference_logits(prompt + gen))
    for i, t in enumerate(gen):
        row = ref[len(prompt) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(row[t], abs=LOGPROB_ATOL)
        top = {int(k.removeprefix("token_id:")): v for k, v in lp.top_logprobs[i].items()}
        want = np.argsort(-row)[:3]
        for tok in set(top) ^ set(want.tolist()):  # the same top-3 but for near ties at the third
            assert abs(row[tok] - row[want[-1]]) < NEAR_TIE
        for tok, v in top.items():
            assert v == pytest.approx(row[tok], abs=LOGPROB_ATOL)
        assert t == int(want[0]) or row[want[0]] - row[t] < NEAR_TIE  # greedy
    text = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    tl = text.choices[0].logprobs
    assert "".join(tl.tokens) == text.choices[0].text == r.choices[0].text
    assert tl.text_offset == [sum(len(t) for t in tl.tokens[:i]) for i in range(len(tl.tokens))]
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert bytes(b for e in content for b in e.bytes).decode() == chat.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=NEAR_TIE)
               for e in content)


def test_echo_returns_the_prompt_first_with_its_logprobs(oai, cluster):
    prompt = "The capital of France is"
    ids = [504, 3575, 282, 4649, 314]  # its tokens
    plain = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    c, gen = r.choices[0], plain.choices[0]
    assert c.text == prompt + gen.text and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert "".join(lp.tokens[:5]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = cluster.client.generate(prompt, max_tokens=1, prompt_logprobs=2)
    assert lp.token_logprobs[1:5] == pytest.approx([e[0] for e in ref.prompt_logprobs[1:]], abs=1e-5)
    assert lp.token_logprobs[5:] == pytest.approx(gen.logprobs.token_logprobs, abs=1e-5)
    assert lp.tokens[5:] == gen.logprobs.tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert not hasattr(c, "prompt_logprobs") or c.prompt_logprobs is None  # not asked for
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                         echo=True, stream=True))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert texts[0] == prompt and "".join(texts) == c.text
    streamed = [v for ch in chunks if ch.choices and ch.choices[0].logprobs
                for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    chunks = list(oai.completions.create(model=MODEL, prompt=[prompt, "Water boils at"], max_tokens=3,
                                         temperature=0.8, seed=5, echo=True, stream=True, n=2, logprobs=1))
    firsts = {}
    for ch in chunks:
        for choice in ch.choices:
            if choice.index not in firsts:
                firsts[choice.index] = (choice.text, choice.logprobs.token_logprobs[0])
    assert firsts == {0: (prompt, None), 1: (prompt, None), 2: ("Water boils at", None), 3: ("Water boils at", None)}
    with pytest.raises(openai.BadRequestError) as e:  # a token-id prompt has no text to echo here
        oai.completions.create(model=MODEL, prompt=ids, max_tokens=4, echo=True)
    assert e.value.body["param"] == "echo"


def test_logit_bias_bans_and_forces_tokens(oai, cluster):
    prompt = "The capital of France is"
    ref = cluster.client.generate(prompt, max_tokens=1, logprobs=2)
    best, second = ref.logprobs[0][1][0][0], ref.logprobs[0][1][1][0]
    banned = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                    logit_bias={str(best): -100}, extra_body={"return_tokens_as_token_ids": True},
                                    logprobs=1)
    assert banned.choices[0].logprobs.tokens == [f"token_id:{second}"]
    forced = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.7, seed=1,
                                    logit_bias={"1000": 100}, extra_body={"return_tokens_as_token_ids": True},
                                    logprobs=1)
    assert forced.choices[0].logprobs.tokens == ["token_id:1000"] * 3
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0, logit_bias={"1000": 100}, logprobs=True)
    assert chat.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logit_bias={"1000": 101})
    assert e.value.body["param"] == "logit_bias" and "[-100, 100]" in e.value.body["message"]


def test_errors_are_openai_shaped(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=0,
                                    max_tokens=2)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"repetition_penalty": 0})
    assert e.value.body["param"] == "repetition_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", n=99)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", logprobs=50)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    long_prompt = "hello " * 9000  # more tokens than the 8192-token context
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert e.value.body["param"] == "prompt" and "exceeds" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}],
                                    max_tokens=2, stream=True)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # a type error caught by the body schema
        oai.chat.completions.create(model=MODEL, messages="not a list", max_tokens=2)
    assert e.value.body["param"] == "messages"
    # the gateway and the cluster keep serving
    assert oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_api_key(cluster, tmp_path):
    proc, url = start_gateway(tmp_path, cluster.address, api_key_env="SHARDLINE_TEST_GATEWAY_KEY")
    try:
        no_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            no_key.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    finally:
        stop(proc)


def test_client_disconnect_cancels_the_request(gateway, cluster):
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert json.loads(line[6:])["object"] == "text_completion"
                break
    deadline = time.monotonic() + 15
    while cluster.client.stats()["num_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval
    stats = cluster.client.stats()
    assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0


def test_client_disconnect_cancels_a_non_streaming_request(gateway, cluster):
    """uvicorn does not cancel a handler whose client left: the gateway watches the connection."""
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/completions", json=body, timeout=2)
    # the request leaves the running set at once; its blocks come back when its step in flight
    # returns, so wait for both
    deadline = time.monotonic() + 15
    stats = cluster.client.stats()
    while ((stats["num_requests_running"] or stats["num_free_blocks"] != stats["num_kv_blocks"])
           and time.monotonic() < deadline):
        time.sleep(0.1)  # poll interval
        stats = cluster.client.stats()
    assert stats["num_requests_running"] == 0 and stats["num_free_blocks"] == stats["num_kv_blocks"]


def test_launch_starts_the_gateway_and_health_reports_missing_workers(tmp_path):
    """`shardline launch` with gateway.enabled and no local workers: the gateway answers /health
    with 503 while the coordinator waits for its worker; SIGTERM stops every process."""
    port, gw_port = free_port_block(3), free_port_block(1)
    cfg = {"coordinator": {"client_port": port, "worker_port": port + 1, "rendezvous_port": port + 2},
           "workers": {"count": 1, "launch_local": False}, "metrics": {"enabled": False},
           "gateway": {"enabled": True, "port": gw_port}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "launch.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "shardline.cli", "launch", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, r = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=10)
                if r.json().get("status") == "waiting_for_workers":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)  # poll interval
        assert r is not None and r.status_code == 503, (tmp_path / "launch.log").read_text()
        assert r.json()["workers_up"] == 0 and r.json()["workers_expected"] == 1
        children = subprocess.run(["pgrep", "-g", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 3  # launcher, coordinator, gateway
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-g", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left after SIGTERM: {left}"
