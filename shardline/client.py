"""Python client for the Shardline client plane (ZeroMQ DEALER -> coordinator ROUTER).

    from shardline import Client
    with Client() as c:                      # tcp://127.0.0.1:7450, or $SHARDLINE_ADDRESS
        r = c.generate("Hello", max_tokens=32)
        print(r.text, r.finish_reason, r.usage)
        for d in c.stream("Tell me a story", max_tokens=64):
            print(d.text, end="", flush=True)

One socket per Client; calls from several threads are safe (sends and receives are serialized by
a lock and replies are routed to the waiting call by request id).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Iterator

import zmq

from shardline import protocol as P
from shardline.config import DEFAULT_CLIENT_ADDRESS
from shardline.protocol import ErrorCode, MsgType
from shardline.sampling import SamplingParams


class ShardlineError(Exception):
    """An error reported by the coordinator; `code` is a `protocol.ErrorCode`."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL):
        super().__init__(message)
        self.code = code


class InvalidRequestError(ShardlineError):
    """The request was refused: a field out of range, a prompt too long for the context."""


class UnavailableError(ShardlineError):
    """The cluster cannot serve now: starting, a worker lost, shutting down."""


class RequestTimeoutError(ShardlineError, TimeoutError):
    """No reply within the client's timeout."""


def _error(body: dict) -> ShardlineError:
    code = ErrorCode(body.get("code", ErrorCode.INTERNAL))
    cls = {ErrorCode.INVALID_REQUEST: InvalidRequestError, ErrorCode.BAD_FRAME: InvalidRequestError,
           ErrorCode.UNAVAILABLE: UnavailableError, ErrorCode.OVERLOADED: UnavailableError}.get(code, ShardlineError)
    return cls(str(body.get("message", "error")), code)


@dataclass
class GenerationResult:
    """A finished generation. usage: prompt_tokens, completion_tokens, cached_tokens;
    timings (seconds): queue_s, ttft_s, e2e_s, decode_tokens_per_s."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    logprobs: list | None = None  # per token: [logprob of the token, [[token, logprob] top-k]]
    request_id: str = ""

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stop_reason": self.stop_reason, "usage": self.usage, "timings": self.timings,
                **({"logprobs": self.logprobs} if self.logprobs is not None else {})}


@dataclass
class Delta:
    """One streamed piece. The last one has `finish_reason` set (and usage, timings)."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None


class Client:
    """Synchronous client. `Client()` reaches the default local cluster; `Client(address)` any
    other (`tcp://HOST:PORT`). `timeout_s` bounds the wait for each reply message."""

    def __init__(self, address: str | None = None, timeout_s: float = 120.0):
        self.address = address or os.environ.get("SHARDLINE_ADDRESS", DEFAULT_CLIENT_ADDRESS)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
        self._sock.connect(self.address)
        self._lock = threading.Lock()
        self._inbox: dict[str, deque] = defaultdict(deque)
        self._closed = False

    # ---- plumbing ------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, msg_type: MsgType, body: dict) -> None:
        with self._lock:
            self._sock.send(P.encode(msg_type, body))

    def _recv(self, key: str, timeout_s: float | None = None) -> tuple[MsgType, dict]:
        """Next message for `key` (a request id, or the reply type name for HEALTH/STATS/MODELS)."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            box = self._inbox.get(key)
            if box:
                return box.popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(f"no reply from {self.address} within {self.timeout_s} s")
            with self._lock:
                if self._inbox.get(key):
                    continue
                if not self._sock.poll(min(int(left * 1000) + 1, 100)):
                    continue
                msg_type, body = P.decode(self._sock.recv(), P.MAX_FRAME_BYTES)
            if msg_type in (MsgType.HEALTH_REPLY, MsgType.STATS_REPLY, MsgType.MODELS_REPLY):
                dest = msg_type.name
            else:
                dest = body.get("request_id", "")
            self._inbox[dest].append((msg_type, body))

    def _request(self, msg_type: MsgType, reply: MsgType, timeout_s: float | None = None) -> dict:
        self._send(msg_type, {})
        got, body = self._recv(reply.name, timeout_s)
        return body

    # ---- API -----------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> dict:
        """{status: ok|waiting_for_workers|loading|degraded..., workers_up, workers_expected}."""
        return self._request(MsgType.HEALTH, MsgType.HEALTH_REPLY, timeout_s)

    def stats(self) -> dict:
        return self._request(MsgType.STATS, MsgType.STATS_REPLY)

    def models(self) -> list[dict]:
        return self._request(MsgType.MODELS, MsgType.MODELS_REPLY)["models"]

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        """Poll HEALTH until the cluster serves. Raises UnavailableError on timeout or a failed plan."""
        deadline = time.monotonic() + timeout_s
        status = {}
        while time.monotonic() < deadline:
            try:
                status = self.health(timeout_s=1.0)
            except RequestTimeoutError:
                continue
            if status.get("status") == "ok":
                return status
            if str(status.get("status", "")).startswith(("plan_failed", "degraded")):
                raise UnavailableError(f"cluster cannot serve: {status['status']}", ErrorCode.UNAVAILABLE)
            time.sleep(0.2)  # poll interval
        raise UnavailableError(f"cluster at {self.address} not ready after {timeout_s} s (last status: {status})",
                               ErrorCode.UNAVAILABLE)

    def _submit(self, prompt, messages, prompt_token_ids, stream: bool, logprobs: int, params: dict) -> str:
        sp = SamplingParams(**params)  # validates locally, names the bad field
        request_id = uuid.uuid4().hex
        body = {"request_id": request_id, "params": sp.to_dict(), "stream": stream, "logprobs": logprobs}
        if prompt_token_ids is not None:
            body["prompt_token_ids"] = P.pack_ids(prompt_token_ids)
        elif messages is not None:
            body["messages"] = list(messages)
        elif isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            raise InvalidRequestError("give a prompt (str), messages, or prompt_token_ids", ErrorCode.INVALID_REQUEST)
        self._send(MsgType.GENERATE, body)
        msg_type, reply = self._recv(request_id)
        if msg_type is MsgType.ERROR:
            self._inbox.pop(request_id, None)
            raise _error(reply)
        assert msg_type is MsgType.ACCEPTED, msg_type
        return request_id

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 prompt_token_ids: list[int] | None = None, logprobs: int = 0, **params) -> GenerationResult:
        """Generate a completion and wait for it.

        params: the `SamplingParams` fields (max_tokens, temperature, top_k, top_p, min_p, seed,
        stop, stop_token_ids, ignore_eos, min_tokens, include_stop_str_in_output).

        Raises:
            InvalidRequestError: a parameter out of range, a prompt longer than the context.
            UnavailableError: the cluster cannot serve. RequestTimeoutError: no reply in time.
        """
        request_id = self._submit(prompt, messages, prompt_token_ids, False, logprobs, params)
        try:
            msg_type, body = self._recv(request_id)
            if msg_type is MsgType.ERROR:
                raise _error(body)
            return GenerationResult(body["text"], P.unpack_ids(body["token_ids"]), body["finish_reason"],
                                    body.get("stop_reason"), body.get("usage", {}), body.get("timings", {}),
                                    body.get("logprobs"), request_id)
        finally:
            self._inbox.pop(request_id, None)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, logprobs: int = 0, **params) -> Iterator[Delta]:
        """Generate and yield text deltas as the tokens arrive; the last Delta has finish_reason.
        Closing the iterator early cancels the request. Same parameters and errors as generate."""
        request_id = self._submit(prompt, messages, prompt_token_ids, True, logprobs, params)
        done = False
        try:
            while True:
                msg_type, body = self._recv(request_id)
                if msg_type is MsgType.DELTA:
                    yield Delta(body["text"], P.unpack_ids(body["token_ids"]), body.get("logprobs"))
                elif msg_type is MsgType.DONE:
                    done = True
                    yield Delta("", [], None, body["finish_reason"], body.get("usage"), body.get("timings"))
                    return
                elif msg_type is MsgType.ERROR:
                    done = True
                    raise _error(body)
        finally:
            if not done and not self._closed:
                self.cancel(request_id)
            self._inbox.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        """Ask the coordinator to stop a request; its KV blocks are freed within one step."""
        self._send(MsgType.CANCEL, {"request_id": request_id})
