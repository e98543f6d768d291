"""Request options end to end on the real model, against transformers' logits (tests/reference.py):
penalties, min_p, prompt logprobs (across chunked prefill), min_tokens, stop token ids, n with
seeds; the AsyncClient from many tasks; and every field the coordinator sends is in the spec."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import zmq

from shardline import AsyncClient
from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import MsgType
from shardline.sampling import SamplingParams, choice_seed
from tests.integration.conftest import NEAR_TIE, assert_same_greedy, pp_config
from tests.reference import LOGPROB_ATOL
from tests.protocol_doc import message_table

pytestmark = pytest.mark.integration

PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"
EOS = 2


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters.get(pp_config(2))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def vllm_penalties(logits, prompt, output, rep, pres, freq):
    """vLLM's apply_penalties (vllm/model_executor/layers/utils.py) in NumPy, one row."""
    x = logits.astype(np.float64).copy()
    seen = np.zeros(len(x), bool)
    seen[list(prompt) + list(output)] = True
    x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=len(x))
    return x - freq * counts - pres * (counts > 0)


@pytest.mark.parametrize("rep, pres, freq", [(1.5, 0.0, 0.0), (1.2, 0.6, 0.4)])
def test_penalized_greedy_equals_vllm_formula_on_reference_logits(cluster, rep, pres, freq):
    """Greedy decoding with penalties picks, at every step, the argmax of vLLM's penalized
    transformers logits (until a near tie, where fp32 rounding may choose either)."""
    from tests.reference import reference_logits

    n = 10
    r = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=n, ignore_eos=True, repetition_penalty=rep,
                                presence_penalty=pres, frequency_penalty=freq)
    plain = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=n, ignore_eos=True)
    assert r.token_ids != plain.token_ids  # the penalties change this output
    logits = reference_logits(PROMPT + r.token_ids[:-1])
    for i, tok in enumerate(r.token_ids):
        pen = vllm_penalties(logits[len(PROMPT) - 1 + i], PROMPT, r.token_ids[:i], rep, pres, freq)
        best = int(pen.argmax())
        if tok != best:
            assert pen[best] - pen[tok] < NEAR_TIE, f"token {i}: {tok} vs reference {best}"
            break


def test_min_p_keeps_only_tokens_above_the_threshold(cluster):
    """16 seeded choices of one sampled token at temperature 1.5 with min_p 0.2: every token has
    probability >= 0.2 x the top one under softmax(reference logits / 1.5)."""
    from tests.reference import reference_logits

    t, min_p = 1.5, 0.2
    r = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=1, temperature=t, min_p=min_p, n=16, seed=5)
    probs = np.exp(log_softmax(reference_logits(PROMPT)[-1] / t))
    ratio = probs / probs.max()
    tokens = [c.token_ids[0] for c in r.choices]
    assert all(ratio[tok] >= min_p - 1e-3 for tok in tokens), [(tok, ratio[tok]) for tok in tokens]
    free = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=1, temperature=t, n=16, seed=5)
    assert any(ratio[c.token_ids[0]] < min_p for c in free.choices)  # without min_p such tokens are drawn


def test_prompt_logprobs_equal_reference(cluster):
    """Prompt logprobs and their top-3 equal log_softmax of transformers' logits at the previous
    position, within LOGPROB_ATOL nats (tests/reference.py)."""
    from tests.reference import reference_logits

    r = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=1, prompt_logprobs=3)
    assert r.prompt_token_ids == PROMPT and r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(PROMPT)
    ref = log_softmax(reference_logits(PROMPT))
    for i in range(1, len(PROMPT)):
        lp, top = r.prompt_logprobs[i]
        assert lp == pytest.approx(ref[i - 1, PROMPT[i]], abs=LOGPROB_ATOL)
        want = np.argsort(-ref[i - 1])[:3]
        assert [t for t, _ in top] == want.tolist()
        np.testing.assert_allclose([v for _, v in top], ref[i - 1, want], atol=LOGPROB_ATOL)
    assert set(r.token_bytes) >= set(PROMPT[1:])


def test_prompt_logprobs_across_prefill_chunks(cluster):
    """A 600-token prompt runs as two chunks (512-token step budget); the first chunk's last row
    scores the second chunk's first token. Many-token chunks multiply bf16-rounded tiles
    (shardline.kernels.dispatch.TILE_BF16, ~3 significant digits), so each value may be off by up to 0.25
    nats (measured: at most 0.16, median 0.02); the median error must stay below 0.05, which a
    misaligned position (scoring an unrelated token, off by nats) would break."""
    from tests.reference import reference_logits

    rng = np.random.default_rng(0)
    prompt = PROMPT + rng.integers(100, 20000, size=595).tolist()
    r = cluster.client.generate(prompt_token_ids=prompt, max_tokens=1, prompt_logprobs=2)
    assert r.prompt_token_ids == prompt and len(r.prompt_logprobs) == len(prompt)
    assert r.prompt_logprobs[0] is None and all(e is not None for e in r.prompt_logprobs[1:])
    ref = log_softmax(reference_logits(prompt))
    ours = np.array([e[0] for e in r.prompt_logprobs[1:]])
    want = ref[np.arange(len(prompt) - 1), prompt[1:]]
    err = np.abs(ours - want)
    assert np.all(err <= 0.25), (err.max(), int(err.argmax()) + 1, np.median(err))
    assert np.median(err) < 0.05
    # the top-1 entry: its value against the reference at the same token (near ties may swap it)
    top_ids = [e[1][0][0] for e in r.prompt_logprobs[1:]]
    tops, ref_tops = np.array([e[1][0][1] for e in r.prompt_logprobs[1:]]), ref[np.arange(len(prompt) - 1), top_ids]
    top_err = np.abs(tops - ref_tops)
    assert np.all(top_err <= 0.25) and np.median(top_err) < 0.05, (top_err.max(), int(top_err.argmax()) + 1)
    assert r.usage["cached_tokens"] == 0
    # asked again: computed in full again (prompt logprobs bypass the prefix cache)
    again = cluster.client.generate(prompt_token_ids=prompt, max_tokens=1, prompt_logprobs=1)
    assert again.usage["cached_tokens"] == 0 and all(e is not None for e in again.prompt_logprobs[1:])


def test_min_tokens_stop_token_ids_and_stop_strings(cluster):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    short = cluster.client.generate(messages=messages, max_tokens=40)
    assert short.finish_reason == "stop" and short.stop_reason == EOS and len(short.token_ids) < 30
    forced = cluster.client.generate(messages=messages, max_tokens=40, min_tokens=30)
    assert len(forced.token_ids) >= 30 and EOS not in forced.token_ids[:30]
    assert forced.token_ids[: len(short.token_ids) - 1] == short.token_ids[:-1]  # same until the EOS
    base = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=8, ignore_eos=True)
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)
    r = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=8, stop_token_ids=[stop_id])
    assert r.finish_reason == "stop" and r.stop_reason == stop_id and r.token_ids == base.token_ids[: first + 1]
    late = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=8, stop_token_ids=[stop_id],
                                   min_tokens=first + 1)
    assert stop_id not in late.token_ids[: first + 1]
    word = base.text.split()[1]
    cut = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=8, ignore_eos=True, stop=[word])
    kept = cluster.client.generate(prompt_token_ids=PROMPT, max_tokens=8, ignore_eos=True, stop=[word],
                                   include_stop_str_in_output=True)
    at = base.text.index(word)
    assert cut.text == base.text[:at] and kept.text == base.text[: at + len(word)] and cut.stop_reason == word


def test_n_choices_equal_single_requests_with_derived_seeds(cluster):
    params = dict(prompt_token_ids=PROMPT, max_tokens=6, temperature=1.0, ignore_eos=True, seed=2024)
    r = cluster.client.generate(n=3, logprobs=1, **params)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage["completion_tokens"] == 18
    for c in r.choices:
        alone = cluster.client.generate(**{**params, "seed": choice_seed(2024, c.index)})
        assert alone.token_ids == c.token_ids and alone.text == c.text and len(c.logprobs) == 6
    deltas = list(cluster.client.stream(n=3, **params))
    for c in r.choices:
        assert "".join(d.text for d in deltas if d.index == c.index and d.usage is None) == c.text
    assert [c.finish_reason for c in deltas[-1].choices] == ["length"] * 3


def test_async_client_many_tasks_equal_the_sync_client(cluster):
    prompts = ["Water boils at", "def fibonacci(n):", "The capital of France is", "Once upon a time"]
    sync = [cluster.client.generate(p, max_tokens=6, ignore_eos=True, logprobs=2) for p in prompts]

    async def main():
        async with AsyncClient(cluster.address, timeout_s=120) as c:
            async def streamed(p):
                ds = [d async for d in c.stream(p, max_tokens=6, ignore_eos=True, logprobs=2)]
                return SimpleNamespace(token_ids=[t for d in ds for t in d.token_ids],
                                       logprobs=[e for d in ds for e in d.logprobs or []],
                                       text="".join(d.text for d in ds))

            results = await asyncio.gather(*(c.generate(p, max_tokens=6, ignore_eos=True, logprobs=2)
                                             for p in prompts * 3),
                                           *(streamed(p) for p in prompts), c.health(), c.models(), c.stats())
            # a task cancelled mid-stream cancels its request
            task = asyncio.create_task(c.generate("Count to a thousand:", max_tokens=2000, ignore_eos=True))
            await asyncio.sleep(1.0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for _ in range(100):
                if (await c.stats())["num_requests_running"] == 0:
                    break
                await asyncio.sleep(0.1)
            return results, await c.stats()

    results, stats = asyncio.run(main())
    for i, r in enumerate(results[:12]):
        assert_same_greedy(sync[i % 4], r)
    for s, streamed in zip(sync, results[12:16]):
        assert_same_greedy(s, streamed)
    assert results[16]["status"] == "ok" and results[17][0]["id"] == "smollm2-135m"
    assert stats["num_requests_running"] == 0


def test_coordinator_bodies_use_only_documented_fields(cluster):
    """Raw frames on a DEALER: every key of every reply the coordinator sends (as the msgpack map
    carries it) is named in that message's row of docs/protocol.md."""
    table = message_table()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.address)
    try:
        rid = uuid.uuid4().hex
        sock.send(P.encode(M.Generate(request_id=rid, prompt_token_ids=P.pack_ids(PROMPT), stream=True, logprobs=2,
                                      prompt_logprobs=1,
                                      params=SamplingParams(n=2, max_tokens=3, stop=["zzz"]).to_dict())))
        for request in (M.Health, M.Stats, M.Models):
            sock.send(P.encode(request(request_id=request.__name__)))
        sock.send(P.encode(M.Generate(request_id="bad", prompt="x", params={"top_p": 7})))
        sock.send(P.encode(M.Generate(request_id="plain", prompt="Hi", params={"max_tokens": 2})))
        seen: dict[MsgType, set[str]] = {}
        done = 0
        while done < 2 or len(seen) < 7:
            assert sock.poll(60_000), f"no reply; seen {seen}"
            frame = sock.recv()
            t = P.decode(frame)[0]  # a valid body of its type
            body = msgspec.msgpack.decode(frame[P.HEADER_BYTES:])  # the keys as sent
            seen.setdefault(t, set()).update(body)
            if t is MsgType.DONE:
                done += 1
                if body["request_id"] == rid:
                    assert len(body["choices"]) == 2 and body["prompt_logprobs"][0] is None
                    for c in body["choices"]:
                        assert set(c) <= table[MsgType.DONE][1]
            if t is MsgType.STATS_REPLY:
                for w in body["workers"]:
                    assert set(w) <= table[MsgType.STATS_REPLY][1], set(w) - table[MsgType.STATS_REPLY][1]
        assert set(seen) == {MsgType.ACCEPTED, MsgType.DELTA, MsgType.DONE, MsgType.ERROR, MsgType.HEALTH_REPLY,
                             MsgType.STATS_REPLY, MsgType.MODELS_REPLY}
        for t, keys in seen.items():
            assert keys <= table[int(t)][1], f"{t.name} sends undocumented fields {sorted(keys - table[int(t)][1])}"
    finally:
        sock.close(linger=0)


def test_a_prompt_too_long_to_fit_is_refused_by_its_length_alone(cluster):
    """Tokenizing runs on the coordinator's event loop: a multi-megabyte prompt once stalled it
    for 16 s, no heartbeat was read, both workers were declared lost and the cluster stayed
    down. Such a prompt is now refused by its character count before tokenizing."""
    from shardline.client import InvalidRequestError

    c = cluster.client
    before = c.stats()
    with pytest.raises(InvalidRequestError, match="characters cannot fit the maximum sequence length"):
        c.generate("1" * 4_000_000, max_tokens=1)
    with pytest.raises(InvalidRequestError, match="characters cannot fit"):
        c.generate(messages=[{"role": "user", "content": "x" * 4_000_000}], max_tokens=1)
    after = c.stats()
    assert [w["alive"] for w in after["workers"]] == [w["alive"] for w in before["workers"]]
    assert after["plan"] == before["plan"]
    assert c.generate("The capital of France is", max_tokens=4, ignore_eos=True).usage["completion_tokens"] == 4
