"""Python clients for the Shardline client plane (ZeroMQ DEALER -> coordinator ROUTER).

    from shardline import Client, AsyncClient
    with Client() as c:                      # tcp://127.0.0.1:7450, or $SHARDLINE_ADDRESS
        r = c.generate("Hello", max_tokens=32)
        print(r.text, r.finish_reason, r.usage)
        for d in c.stream("Tell me a story", max_tokens=64):
            print(d.text, end="", flush=True)

    async with AsyncClient() as c:           # asyncio; one client serves many tasks at once
        r = await c.generate("Hello", max_tokens=32, n=2, seed=1)
        async for d in c.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(d.text, end="")

One socket per client. Every reply carries the request id it answers (GENERATE, CANCEL, and
HEALTH/STATS/MODELS, whose request id the coordinator echoes), so replies are routed to the call
waiting for them: a `Client` may be used from several threads, an `AsyncClient` from several
tasks of its event loop. A reply for a call that is no longer waiting (cancelled, timed out) is
dropped.

Exceptions (all subclasses of `ShardlineError`):

    InvalidRequestError (also a ValueError)  a parameter out of range (`param` names it), a
                                             prompt longer than the context, a malformed request
    UnavailableError                         the cluster is starting, degraded or shutting down
    RequestTimeoutError (also a TimeoutError) no reply within `timeout_s`
    ClientClosedError                        the client was closed
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import msgspec
import zmq
import zmq.asyncio

from shardline import messages as M
from shardline import protocol as P
from shardline.config import DEFAULT_CLIENT_ADDRESS
from shardline.protocol import ErrorCode, MsgType
from shardline.sampling import MAX_TOKENS, SamplingParams, check_num_logprobs

log = logging.getLogger("shardline.client")

POLL_MS = 100  # Client: longest a thread holds the socket before letting another one look
CLOSE_LINGER_MS = 200  # on close, time left to deliver queued messages (a last CANCEL) to the coordinator


# ---- exceptions ---------------------------------------------------------------------------------
class ShardlineError(Exception):
    """An error reported by the coordinator or the client; `code` is a `protocol.ErrorCode`."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL):
        super().__init__(message)
        self.code = code


class InvalidRequestError(ShardlineError, ValueError):
    """The request was refused: a field out of range, a prompt too long for the context.
    `param` names the offending field when the message starts with `field=...` (None otherwise)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST, param: str | None = None):
        super().__init__(message, code)
        m = re.match(r"^([a-z_]+)[=:]", message)
        self.param = param or (m.group(1) if m else None)


class UnavailableError(ShardlineError):
    """The cluster cannot serve now: starting, a worker lost, shutting down."""


class RequestTimeoutError(ShardlineError, TimeoutError):
    """No reply within the client's timeout."""


class ClientClosedError(ShardlineError):
    """The client was closed (or closed while a call was waiting)."""


def _error(body: M.Error) -> ShardlineError:
    try:
        code = ErrorCode(body.code)
    except ValueError:
        code = ErrorCode.INTERNAL
    message = body.message
    if code in (ErrorCode.INVALID_REQUEST, ErrorCode.BAD_FRAME):
        return InvalidRequestError(message, code)
    if code in (ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED):
        return UnavailableError(message, code)
    return ShardlineError(message, code)


# ---- results --------------------------------------------------------------------------------------
@dataclass
class CompletionChoice:
    """One of the n outputs of a request. logprobs: per generated token (logprob of the token,
    [(token, logprob) x k]) (the raw distribution, natural log) when asked for."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list | None = None


@dataclass
class GenerationResult:
    """A finished generation. Top-level fields are choice 0's; `choices` has all n.

    usage: prompt_tokens, completion_tokens (all choices), cached_tokens, num_preemptions;
    timings (seconds): queue_s, ttft_s, e2e_s, decode_tokens_per_s. prompt_logprobs: one entry
    per prompt token (None for the first), when asked for, with `prompt_token_ids`. token_bytes:
    {token id: raw bytes} of every token the logprobs name."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    logprobs: list | None = None  # per token: (logprob of the token, [(token, logprob) top-k])
    request_id: str = ""
    choices: list[CompletionChoice] = field(default_factory=list)
    prompt_logprobs: list | None = None
    token_bytes: dict[int, bytes] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs

    def to_dict(self) -> dict:
        d = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
             "stop_reason": self.stop_reason, "usage": self.usage, "timings": self.timings}
        if self.logprobs is not None:
            d["logprobs"] = self.logprobs
        if self.prompt_logprobs is not None:
            d["prompt_logprobs"] = self.prompt_logprobs
        if len(self.choices) > 1:
            d["choices"] = [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                             **({"logprobs": c.logprobs} if c.logprobs is not None else {})} for c in self.choices]
        return d


@dataclass
class Delta:
    """One streamed piece of choice `index`. The last Delta of a stream has `finish_reason`
    (choice 0's), `usage`, `timings` and `choices` (every choice's finish_reason and whole
    text) set, and no text. `prompt_logprobs` comes with choice 0's first Delta."""

    text: str
    token_ids: list[int]
    logprobs: list | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    index: int = 0
    prompt_logprobs: list | None = None
    token_bytes: dict[int, bytes] | None = None
    choices: list[CompletionChoice] | None = None
    prompt_token_ids: list[int] | None = None


def _token_bytes(token_bytes: dict[str, bytes] | None) -> dict[int, bytes]:
    return {int(k): v for k, v in (token_bytes or {}).items()}


def _ids_or_none(data: bytes | None) -> list[int] | None:
    return None if data is None else P.unpack_ids(data)


def _choices(body: M.Done) -> list[CompletionChoice]:
    if body.choices is not None:
        return [CompletionChoice(c.index, c.text, P.unpack_ids(c.token_ids), c.finish_reason, c.stop_reason,
                                 c.logprobs) for c in body.choices]
    return [CompletionChoice(0, body.text, P.unpack_ids(body.token_ids), body.finish_reason, body.stop_reason,
                             body.logprobs)]


def _result(body: M.Done, request_id: str) -> GenerationResult:
    return GenerationResult(body.text, P.unpack_ids(body.token_ids), body.finish_reason, body.stop_reason,
                            msgspec.structs.asdict(body.usage), msgspec.structs.asdict(body.timings),
                            body.logprobs, request_id, _choices(body), body.prompt_logprobs,
                            _token_bytes(body.token_bytes), _ids_or_none(body.prompt_token_ids))


def _delta(body: M.Delta) -> Delta:
    return Delta(body.text, P.unpack_ids(body.token_ids), body.logprobs, index=body.index,
                 prompt_logprobs=body.prompt_logprobs,
                 token_bytes=None if body.token_bytes is None else _token_bytes(body.token_bytes),
                 prompt_token_ids=_ids_or_none(body.prompt_token_ids))


def _final_delta(body: M.Done) -> Delta:
    return Delta("", [], None, body.finish_reason, msgspec.structs.asdict(body.usage),
                 msgspec.structs.asdict(body.timings), choices=_choices(body))


def _reply_dict(body: M.Message) -> dict:
    """A reply as the plain dict the API returns (HEALTH_REPLY, STATS_REPLY, DRAIN_WORKER_REPLY)."""
    return msgspec.to_builtins(body, builtin_types=(bytes,))


def _generate_body(request_id: str, prompt, messages, prompt_token_ids, stream: bool, logprobs, prompt_logprobs,
                   params: dict) -> M.Generate:
    """The GENERATE body; validates locally so a bad field fails before anything is sent.

    Raises:
        InvalidRequestError: a field out of range (named), or no prompt.
    """
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(SamplingParams)})
    if unknown:
        raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(unknown)}", param=unknown[0])
    try:
        sp = SamplingParams(**params)
        num_logprobs = check_num_logprobs("logprobs", logprobs)
        num_prompt_logprobs = check_num_logprobs("prompt_logprobs", prompt_logprobs)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    body = M.Generate(request_id=request_id, params=sp.to_dict(), stream=stream, logprobs=num_logprobs,
                      prompt_logprobs=num_prompt_logprobs or None)
    if prompt_token_ids is not None:
        if not isinstance(prompt_token_ids, (list, tuple)) or not all(
                type(t) is int and 0 <= t <= MAX_TOKENS for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt_token_ids must be a list of integers in [0, {MAX_TOKENS}]",
                                      param="prompt_token_ids")
        body.prompt_token_ids = P.pack_ids(prompt_token_ids)
    elif messages is not None:
        try:
            body.messages = msgspec.convert(list(messages), list[M.ChatMessage])
        except (msgspec.ValidationError, TypeError) as exc:
            raise InvalidRequestError(f"messages: must be a list of {{role: str, content: str}} ({exc})",
                                      param="messages") from None
    elif isinstance(prompt, str):
        body.prompt = prompt
    else:
        raise InvalidRequestError("give a prompt (str), messages, or prompt_token_ids", param="prompt")
    try:  # what msgpack cannot carry: lone surrogates in text, sets, objects
        P.encode(body)
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        field = "messages" if body.messages is not None else "prompt" if body.prompt is not None else "params"
        raise InvalidRequestError(f"{field}: cannot be sent ({exc})", param=field) from None
    return body


def _route(msg_type: MsgType, body: M.Message) -> str:
    """The key a reply is delivered under: its request id (HEALTH/STATS/MODELS replies from a
    coordinator that does not echo one: the reply type's name)."""
    return getattr(body, "request_id", "") or msg_type.name


def _new_socket(ctx, curve: tuple | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, uuid.uuid4().bytes)
    if curve is not None:
        from shardline.security import configure_curve_client

        configure_curve_client(sock, *curve)
    return sock


_NOT_SENT = ("could not send to {} within {} s: no connection (is the coordinator up, and are this client's "
             "CurveZMQ keys allowed?)")


def _curve(server_public_key, public_key, secret_key) -> tuple | None:
    """The CurveZMQ client keys (all three Z85, or none of them)."""
    given = [k is not None for k in (server_public_key, public_key, secret_key)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("server_public_key, public_key and secret_key: give all three (CurveZMQ) or none")
    return server_public_key, public_key, secret_key


# ---- synchronous client ---------------------------------------------------------------------------
class Client:
    """Synchronous client. `Client()` reaches the default local cluster; `Client(address)` any
    other (`tcp://HOST:PORT`). `timeout_s` bounds the wait for each reply message (seconds).
    With a cluster that has CurveZMQ keys (cluster.yaml `security:`), give `server_public_key`
    (the coordinator's) and this client's `public_key` and `secret_key` (Z85 str or bytes, e.g.
    from `shardline.security.load_keypair`); a client whose key is not allowed gets no reply at
    all, so its calls end in RequestTimeoutError.

    Thread-safe: sends and receives are serialized by a lock, and whichever waiting thread holds
    it reads the socket and files each message under its request id."""

    def __init__(self, address: str | None = None, timeout_s: float = 120.0, *,
                 server_public_key: str | bytes | None = None, public_key: str | bytes | None = None,
                 secret_key: str | bytes | None = None):
        self.address = address or os.environ.get("SHARDLINE_ADDRESS", DEFAULT_CLIENT_ADDRESS)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = _new_socket(self._ctx, _curve(server_public_key, public_key, secret_key))
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        self._sock.connect(self.address)
        self._lock = threading.Lock()
        self._inbox: dict[str, deque] = {}  # request id -> replies not yet taken (waiting calls only)
        self._closed = False

    # ---- plumbing ------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._lock:
                self._sock.close(linger=CLOSE_LINGER_MS)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, body: M.Message, flags: int = 0) -> None:
        with self._lock:
            if self._closed:
                raise ClientClosedError("the client is closed")
            try:  # SNDTIMEO = timeout_s: with no connection (coordinator down, CURVE keys refused) a
                self._sock.send(P.encode(body), flags)  # DEALER send would block forever
            except zmq.Again:
                raise RequestTimeoutError(_NOT_SENT.format(self.address, self.timeout_s), ErrorCode.UNAVAILABLE) from None

    def _recv(self, key: str, timeout_s: float | None = None) -> tuple[MsgType, M.Message]:
        """Next message for `key` (registered in `_inbox`), waiting at most `timeout_s`."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            box = self._inbox.get(key)
            if box:
                return box.popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(f"no reply from {self.address} within {timeout_s} s", ErrorCode.UNAVAILABLE)
            with self._lock:
                if self._closed:
                    raise ClientClosedError("the client was closed")
                if self._inbox.get(key):
                    continue
                if not self._sock.poll(min(int(left * 1000) + 1, POLL_MS)):
                    continue
                frame = self._sock.recv()
            try:
                msg_type, body = P.decode(frame, P.MAX_FRAME_BYTES)
            except P.ProtocolError as exc:
                log.warning("dropping a malformed reply: %s", exc)
                continue
            dest = self._inbox.get(_route(msg_type, body))
            if dest is not None:
                dest.append((msg_type, body))

    def _request(self, request: type[M.Health | M.Stats | M.Models], timeout_s: float | None = None) -> dict:
        """Send HEALTH, STATS or MODELS and return the reply as a dict."""
        key = uuid.uuid4().hex
        self._inbox[key] = deque()
        try:
            self._send(request(request_id=key))
            _, body = self._recv(key, timeout_s)
            return _reply_dict(body)
        finally:
            self._inbox.pop(key, None)

    # ---- API -----------------------------------------------------------------------------
    def health(self, timeout_s: float | None = None) -> dict:
        """{status: ok|waiting_for_workers|loading|degraded: ..., workers_up, workers_expected, model}."""
        return self._request(M.Health, timeout_s)

    def stats(self, timeout_s: float | None = None) -> dict:
        """Counters, queue and KV state, workers, plan (see docs/protocol.md, STATS_REPLY)."""
        return self._request(M.Stats, timeout_s)

    def models(self, timeout_s: float | None = None) -> list[dict]:
        """[{id, name, context_length (tokens), architecture}]."""
        return self._request(M.Models, timeout_s)["models"]

    def drain_worker(self, worker_id: str, timeout_s: float | None = None) -> dict:
        """Take one worker out of service: the coordinator re-plans onto the other workers
        (unfinished sequences are recomputed from their tokens, so no request fails), then shuts
        the worker down (it exits 0). Waits until the new plan serves, at most `timeout_s`
        (default: the client's); the drain goes on if the wait ends first.

        Returns the DRAIN_WORKER_REPLY: {worker_id, plan_id, plan, requests_resumed, drain_s
        (seconds), request_id}.

        Raises:
            ShardlineError (code NOT_FOUND): no such live worker. InvalidRequestError: no plan
            fits the other workers (nothing changed). UnavailableError: the cluster is not
            serving, another drain is in progress, or no plan serves after the worker left.
            RequestTimeoutError: no answer within `timeout_s`.
        """
        key = uuid.uuid4().hex
        self._inbox[key] = deque()
        try:
            self._send(M.DrainWorker(request_id=key, worker_id=worker_id))
            msg_type, body = self._recv(key, timeout_s)
        finally:
            self._inbox.pop(key, None)
        if msg_type is MsgType.ERROR:
            raise _error(body)
        return _reply_dict(body)

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

    def _submit(self, body: M.Generate) -> str:
        request_id = body.request_id
        self._inbox[request_id] = deque()
        try:
            self._send(body)
            msg_type, reply = self._recv(request_id)
        except BaseException:
            self._inbox.pop(request_id, None)
            if not self._closed:
                self._cancel_quietly(request_id)
            raise
        if msg_type is MsgType.ERROR:
            self._inbox.pop(request_id, None)
            raise _error(reply)
        assert msg_type is MsgType.ACCEPTED, msg_type
        return request_id

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 prompt_token_ids: list[int] | None = None, logprobs: int = 0, prompt_logprobs: int = 0,
                 **params) -> GenerationResult:
        """Generate a completion and wait for it.

        prompt (str), messages ([{role, content}], the model's chat template is applied by the
        coordinator) or prompt_token_ids. logprobs=k: top-k logprobs per generated token;
        prompt_logprobs=k: per prompt token (k in [0, 20]). params: the `SamplingParams` fields
        (n, max_tokens, min_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed, stop, stop_token_ids, ignore_eos,
        include_stop_str_in_output).

        Raises:
            InvalidRequestError: a parameter out of range, a prompt longer than the context.
            UnavailableError: the cluster cannot serve. RequestTimeoutError: no reply in time
            (the request is cancelled).
        """
        body = _generate_body(uuid.uuid4().hex, prompt, messages, prompt_token_ids, False, logprobs,
                              prompt_logprobs, params)
        request_id = self._submit(body)
        done = False
        try:
            msg_type, reply = self._recv(request_id)
            done = True
            if msg_type is MsgType.ERROR:
                raise _error(reply)
            return _result(reply, request_id)
        finally:
            if not done and not self._closed:
                self._cancel_quietly(request_id)
            self._inbox.pop(request_id, None)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, logprobs: int = 0, prompt_logprobs: int = 0,
               **params) -> Iterator[Delta]:
        """Generate and yield text deltas as the tokens arrive; the last Delta has finish_reason
        and usage. Closing the iterator early cancels the request. Same parameters and errors as
        `generate`."""
        body = _generate_body(uuid.uuid4().hex, prompt, messages, prompt_token_ids, True, logprobs,
                              prompt_logprobs, params)
        request_id = self._submit(body)
        done = False
        try:
            while True:
                msg_type, reply = self._recv(request_id)
                if msg_type is MsgType.DELTA:
                    yield _delta(reply)
                elif msg_type is MsgType.DONE:
                    done = True
                    yield _final_delta(reply)
                    return
                elif msg_type is MsgType.ERROR:
                    done = True
                    raise _error(reply)
        finally:
            if not done and not self._closed:
                self._cancel_quietly(request_id)
            self._inbox.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        """Ask the coordinator to stop a request; its KV blocks are freed within one step.
        Raises RequestTimeoutError when it cannot be sent within `timeout_s` (no connection)."""
        self._send(M.Cancel(request_id=request_id))

    def _cancel_quietly(self, request_id: str) -> None:
        """Best-effort CANCEL on the way out of a failed or abandoned call (never blocks)."""
        try:
            self._send(M.Cancel(request_id=request_id), zmq.NOBLOCK)
        except ShardlineError:  # no connection: the coordinator will drop the client's requests
            pass


# ---- asyncio client -------------------------------------------------------------------------------
class AsyncClient:
    """asyncio client with the same API as `Client` (coroutines; `stream` is an async
    iterator). Any number of tasks of one event loop may share it: one reader task receives
    every reply and hands it to the queue of the call waiting for it. Cancelling a task that
    awaits `generate` or iterates `stream` cancels the request on the coordinator.
    `timeout_s` bounds the wait for each reply message (seconds); `server_public_key`,
    `public_key`, `secret_key`: CurveZMQ keys, as for `Client`."""

    def __init__(self, address: str | None = None, timeout_s: float = 120.0, *,
                 server_public_key: str | bytes | None = None, public_key: str | bytes | None = None,
                 secret_key: str | bytes | None = None):
        self.address = address or os.environ.get("SHARDLINE_ADDRESS", DEFAULT_CLIENT_ADDRESS)
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = _new_socket(self._ctx, _curve(server_public_key, public_key, secret_key))
        self._sock.connect(self.address)
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> replies for the waiting call
        self._reader: asyncio.Task | None = None
        self._closed = False

    # ---- plumbing ------------------------------------------------------------------------
    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._sock.close(linger=CLOSE_LINGER_MS)
        for q in self._queues.values():  # wake every waiting call
            q.put_nowait(None)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg_type, body = P.decode(frame, P.MAX_FRAME_BYTES)
            except P.ProtocolError as exc:
                log.warning("dropping a malformed reply: %s", exc)
                continue
            q = self._queues.get(_route(msg_type, body))
            if q is not None:
                q.put_nowait((msg_type, body))

    def _open(self, key: str) -> asyncio.Queue:
        if self._closed:
            raise ClientClosedError("the client is closed")
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        q = self._queues[key] = asyncio.Queue()
        return q

    async def _send(self, body: M.Message) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")
        try:  # with no connection (coordinator down, CURVE keys refused) the send would wait forever
            await asyncio.wait_for(self._sock.send(P.encode(body)), self.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(_NOT_SENT.format(self.address, self.timeout_s), ErrorCode.UNAVAILABLE) from None

    async def _get(self, q: asyncio.Queue, timeout_s: float | None = None) -> tuple[MsgType, M.Message]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            item = await asyncio.wait_for(q.get(), timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"no reply from {self.address} within {timeout_s} s",
                                      ErrorCode.UNAVAILABLE) from None
        if item is None:
            raise ClientClosedError("the client was closed")
        return item

    async def _request(self, request: type[M.Health | M.Stats | M.Models], timeout_s: float | None = None) -> dict:
        """Send HEALTH, STATS or MODELS and return the reply as a dict."""
        key = uuid.uuid4().hex
        q = self._open(key)
        try:
            await self._send(request(request_id=key))
            _, body = await self._get(q, timeout_s)
            return _reply_dict(body)
        finally:
            self._queues.pop(key, None)

    def _cancel_soon(self, request_id: str) -> None:
        """Send CANCEL without waiting (from `finally` blocks of cancelled tasks)."""
        if self._closed:
            return

        def check(fut) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                log.warning("could not cancel %s: %s", request_id, fut.exception())

        try:  # resolves at once unless earlier sends are queued; never blocks
            self._sock.send(P.encode(M.Cancel(request_id=request_id)), zmq.NOBLOCK).add_done_callback(check)
        except (zmq.ZMQError, RuntimeError) as exc:  # RuntimeError: the event loop is gone
            log.warning("could not cancel %s: %s", request_id, exc)

    async def _submit(self, body: M.Generate) -> asyncio.Queue:
        request_id = body.request_id
        q = self._open(request_id)
        try:
            await self._send(body)
            msg_type, reply = await self._get(q)
        except BaseException:
            self._queues.pop(request_id, None)
            self._cancel_soon(request_id)
            raise
        if msg_type is MsgType.ERROR:
            self._queues.pop(request_id, None)
            raise _error(reply)
        assert msg_type is MsgType.ACCEPTED, msg_type
        return q

    # ---- API -----------------------------------------------------------------------------
    async def health(self, timeout_s: float | None = None) -> dict:
        """See `Client.health`."""
        return await self._request(M.Health, timeout_s)

    async def stats(self, timeout_s: float | None = None) -> dict:
        """See `Client.stats`."""
        return await self._request(M.Stats, timeout_s)

    async def models(self, timeout_s: float | None = None) -> list[dict]:
        """See `Client.models`."""
        return (await self._request(M.Models, timeout_s))["models"]

    async def wait_ready(self, timeout_s: float = 300.0) -> dict:
        """See `Client.wait_ready`."""
        deadline = time.monotonic() + timeout_s
        status = {}
        while time.monotonic() < deadline:
            try:
                status = await self.health(timeout_s=1.0)
            except RequestTimeoutError:
                continue
            if status.get("status") == "ok":
                return status
            if str(status.get("status", "")).startswith(("plan_failed", "degraded")):
                raise UnavailableError(f"cluster cannot serve: {status['status']}", ErrorCode.UNAVAILABLE)
            await asyncio.sleep(0.2)  # poll interval
        raise UnavailableError(f"cluster at {self.address} not ready after {timeout_s} s (last status: {status})",
                               ErrorCode.UNAVAILABLE)

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       prompt_token_ids: list[int] | None = None, logprobs: int = 0, prompt_logprobs: int = 0,
                       **params) -> GenerationResult:
        """See `Client.generate`. Cancelling the awaiting task cancels the request."""
        request_id = uuid.uuid4().hex
        body = _generate_body(request_id, prompt, messages, prompt_token_ids, False, logprobs, prompt_logprobs,
                              params)
        q = await self._submit(body)
        done = False
        try:
            msg_type, reply = await self._get(q)
            done = True
            if msg_type is MsgType.ERROR:
                raise _error(reply)
            return _result(reply, request_id)
        finally:
            if not done:
                self._cancel_soon(request_id)
            self._queues.pop(request_id, None)

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_token_ids: list[int] | None = None, logprobs: int = 0, prompt_logprobs: int = 0,
               **params) -> "DeltaStream":
        """See `Client.stream`: `async for d in client.stream(...)`. The request is sent on the
        first iteration (or by `await stream.start()`). Leaving the loop early, `aclose()`, or
        cancelling the iterating task cancels the request.

        Raises:
            InvalidRequestError: at once, for a parameter out of range (nothing is sent).
        """
        request_id = uuid.uuid4().hex
        body = _generate_body(request_id, prompt, messages, prompt_token_ids, True, logprobs, prompt_logprobs,
                              params)
        return DeltaStream(self, body)

    async def start_stream(self, prompt: str | None = None, **kwargs) -> "DeltaStream":
        """`stream(...)`, sent and accepted: errors of admission (a prompt longer than the
        context, the cluster unavailable) are raised here, before any Delta is read."""
        s = self.stream(prompt, **kwargs)
        await s.start()
        return s

    async def cancel(self, request_id: str) -> None:
        """See `Client.cancel`."""
        await self._send(M.Cancel(request_id=request_id))


class DeltaStream:
    """Async iterator over the Deltas of one streaming request of an `AsyncClient`."""

    def __init__(self, client: AsyncClient, body: M.Generate):
        self.client = client
        self.request_id: str = body.request_id
        self._body = body
        self._queue: asyncio.Queue | None = None
        self._done = False

    async def start(self) -> None:
        """Send the request and wait for ACCEPTED. Raises the coordinator's refusal."""
        if self._queue is None and not self._done:
            try:
                self._queue = await self.client._submit(self._body)
            except BaseException:
                self._done = True
                raise

    def __aiter__(self) -> "DeltaStream":
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        try:
            msg_type, reply = await self.client._get(self._queue)
        except BaseException:  # timeout, closed client, or the task was cancelled
            self._end(cancel=True)
            raise
        if msg_type is MsgType.DELTA:
            return _delta(reply)
        self._end(cancel=False)
        if msg_type is MsgType.DONE:
            return _final_delta(reply)
        raise _error(reply)

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it has not finished."""
        self._end(cancel=True)

    def _end(self, cancel: bool) -> None:
        if self._done:
            return
        self._done = True
        if self._queue is not None:
            self.client._queues.pop(self.request_id, None)
            if cancel:
                self.client._cancel_soon(self.request_id)

    def __del__(self):
        if not self._done and self._queue is not None:
            try:
                self._end(cancel=True)
            except Exception:  # interpreter or event loop shutting down
                pass
