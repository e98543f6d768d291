"""Client and AsyncClient against a scripted coordinator socket (a real ZeroMQ ROUTER speaking the
protocol): reply routing under concurrency, cancellation, timeouts, the exception hierarchy.
The real coordinator is exercised in tests/integration/test_client_options.py."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zmq

from shardline import messages as M
from shardline import protocol as P
from shardline.client import (AsyncClient, Client, ClientClosedError, InvalidRequestError, RequestTimeoutError,
                              ShardlineError, UnavailableError)
from shardline.protocol import ErrorCode, MsgType


class ScriptedCoordinator:
    """Answers GENERATE with ACCEPTED, one DELTA per character of the reversed prompt (stream)
    and DONE, after `delay_s`; prompts starting with "silent" get no reply, "bad" an
    INVALID_REQUEST error, "down" UNAVAILABLE. Records CANCELs."""

    def __init__(self, delay_s: float = 0.01):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.delay_s = delay_s
        self.cancelled: list[str] = []
        self.pending: list[tuple[float, bytes, M.Message]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _later(self, t, ident, body):
        self.pending.append((t, ident, body))

    def _run(self):
        while not self._stop:
            if self.sock.poll(5):
                ident, frame = self.sock.recv_multipart()
                mtype, body = P.decode(frame)
                rid = body.request_id
                now = time.monotonic()
                if mtype is MsgType.CANCEL:
                    self.cancelled.append(rid)
                elif mtype is MsgType.HEALTH:
                    self._later(now + self.delay_s, ident, M.HealthReply(status="ok", workers_up=1, workers_expected=1,
                                                                         model="scripted", request_id=rid))
                elif mtype is MsgType.GENERATE:
                    prompt = body.prompt
                    if prompt.startswith("silent"):
                        continue
                    if prompt.startswith("bad"):
                        self._later(now, ident, P.error(ErrorCode.INVALID_REQUEST,
                                                        "temperature=-1: must be a number in [0, 100]", request_id=rid))
                        continue
                    if prompt.startswith("down"):
                        self._later(now, ident, P.error(ErrorCode.UNAVAILABLE, "cluster not serving", request_id=rid))
                        continue
                    out = prompt[::-1]
                    self._later(now, ident, M.Accepted(request_id=rid, prompt_tokens=len(prompt)))
                    t = now
                    if body.stream:
                        for ch in out:
                            t += self.delay_s
                            self._later(t, ident, M.Delta(request_id=rid, index=0, text=ch,
                                                          token_ids=P.pack_ids([ord(ch)])))
                    self._later(t + self.delay_s, ident, M.Done(
                        request_id=rid, text=out, token_ids=P.pack_ids([ord(c) for c in out]), finish_reason="length",
                        stop_reason=None, usage=M.Usage(prompt_tokens=len(prompt), completion_tokens=len(out),
                                                        cached_tokens=0, num_preemptions=0),
                        timings=M.Timings(queue_s=0.0, ttft_s=0.0, e2e_s=0.0)))
            now = time.monotonic()
            due = [m for m in self.pending if m[0] <= now]
            self.pending = [m for m in self.pending if m[0] > now]
            for _, ident, body in sorted(due, key=lambda m: m[0]):
                self.sock.send_multipart([ident, P.encode(body)])

    def close(self):
        self._stop = True
        self.thread.join()
        self.sock.close(linger=0)


@pytest.fixture
def coord():
    c = ScriptedCoordinator()
    yield c
    c.close()


def test_async_client_serves_many_tasks_at_once(coord):
    async def main():
        async with AsyncClient(coord.address, timeout_s=10) as c:
            prompts = [f"prompt number {i}" for i in range(40)]

            async def one_stream(p):
                return "".join([d.text async for d in c.stream(p, max_tokens=4)])

            results = await asyncio.gather(*(c.generate(p, max_tokens=4) for p in prompts),
                                           *(one_stream(p) for p in prompts[:10]),
                                           *(c.health() for _ in range(10)))
            assert [r.text for r in results[:40]] == [p[::-1] for p in prompts]
            assert results[40:50] == [p[::-1] for p in prompts[:10]]
            assert all(h["status"] == "ok" for h in results[50:])
            assert results[0].choices[0].text == prompts[0][::-1] and results[0].usage["completion_tokens"] == 15
            assert not c._queues  # nothing left registered
    asyncio.run(main())


def test_async_stream_left_early_or_task_cancelled_cancels_the_request(coord):
    async def main():
        async with AsyncClient(coord.address, timeout_s=10) as c:
            agen = c.stream("a long enough prompt", max_tokens=4)
            first = await agen.__anext__()
            assert first.text == "t"
            await agen.aclose()
            task = asyncio.create_task(c.generate("silent forever", max_tokens=4))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)
            assert len(coord.cancelled) == 2
            assert not c._queues
    asyncio.run(main())


def test_async_timeout_error_and_closed_client(coord):
    async def main():
        c = AsyncClient(coord.address, timeout_s=0.3)
        with pytest.raises(RequestTimeoutError) as e:
            await c.generate("silent", max_tokens=2)
        assert isinstance(e.value, TimeoutError) and isinstance(e.value, ShardlineError)
        with pytest.raises(InvalidRequestError) as e:
            await c.generate("bad request", max_tokens=2)
        assert e.value.param == "temperature" and isinstance(e.value, ValueError)
        with pytest.raises(UnavailableError):
            await c.generate("down", max_tokens=2)
        with pytest.raises(InvalidRequestError, match=r"^top_p=1.5") as e:  # refused before sending
            await c.generate("x", top_p=1.5)
        assert e.value.param == "top_p"
        with pytest.raises(InvalidRequestError, match="^prompt_logprobs=") as e:
            await c.generate("x", prompt_logprobs=21)
        waiting = asyncio.create_task(c.generate("silent", max_tokens=2))
        await asyncio.sleep(0.1)
        await c.close()
        with pytest.raises(ClientClosedError):
            await waiting
        with pytest.raises(ClientClosedError):
            await c.health()
    asyncio.run(main())
    _wait_for(lambda: len(coord.cancelled) >= 1)
    assert len(coord.cancelled) == 1  # the timed-out request was cancelled


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    """Poll `condition` until it holds or `timeout_s` passes (the assertion after it then fails)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval


def test_sync_client_from_many_threads(coord):
    with Client(coord.address, timeout_s=10) as c:
        prompts = [f"thread prompt {i}" for i in range(32)]

        def streamed(p):
            return "".join(d.text for d in c.stream(p))

        with ThreadPoolExecutor(8) as pool:
            gen = list(pool.map(lambda p: c.generate(p).text, prompts))
            st = list(pool.map(streamed, prompts[:8]))
            hs = list(pool.map(lambda _: c.health()["status"], range(8)))
        assert gen == [p[::-1] for p in prompts] and st == [p[::-1] for p in prompts[:8]] and hs == ["ok"] * 8
        it = c.stream("abcdef")
        next(it)
        it.close()
        c.timeout_s = 0.3
        with pytest.raises(RequestTimeoutError):
            c.generate("silent", max_tokens=1)
        c.timeout_s = 10
        _wait_for(lambda: len(coord.cancelled) >= 2)
        assert len(coord.cancelled) == 2
        c.health()  # late replies of the stream closed above are dropped, not kept
        assert not c._inbox


@pytest.mark.parametrize("kwargs, param", [
    (dict(prompt_token_ids=[1099511627776]), "prompt_token_ids"), (dict(prompt_token_ids=[None]), "prompt_token_ids"),
    (dict(prompt_token_ids=5), "prompt_token_ids"), (dict(prompt_token_ids=[1.7, 2]), "prompt_token_ids"),
    (dict(prompt_token_ids=[True, False]), "prompt_token_ids"), (dict(prompt="\ud800"), "prompt"),
    (dict(messages=[{"role": "user", "content": "\ud800"}]), "messages"), (dict(prompt="x", frobnicate=1), "frobnicate"),
    (dict(prompt="x", max_tokens=2**64), "max_tokens"),
])
def test_inputs_the_wire_cannot_carry_are_refused_before_sending(kwargs, param):
    """Found by adversarial testing: these raised OverflowError / TypeError / UnicodeEncodeError
    out of the client (a plain-text 500 from the gateway), or were silently converted."""
    coord = ScriptedCoordinator()
    try:
        with Client(coord.address, timeout_s=5) as c:
            with pytest.raises(InvalidRequestError) as exc:
                c.generate(**kwargs)
            assert exc.value.param == param, exc.value
            assert c.generate("ok", max_tokens=4).text == "ko"  # the client still works
    finally:
        coord.close()
