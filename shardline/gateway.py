"""OpenAI-compatible HTTP gateway (FastAPI + uvicorn) in front of the client plane.

    shardline gateway --address tcp://127.0.0.1:7450 --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8}'

Routes (request and response bodies follow OpenAI's API reference, with vLLM's extra sampling
fields; https://platform.openai.com/docs/api-reference):

    POST /v1/completions        prompt: str | [str] | [int] | [[int]]; stream (server-sent events)
    POST /v1/chat/completions   messages rendered with the model's chat template by the coordinator
    GET  /v1/models
    GET  /health                200 when the cluster serves with every worker up, else 503

Sampling fields: n, max_tokens (chat: also max_completion_tokens), temperature (default 1),
top_p, stop, seed, presence_penalty, frequency_penalty, logit_bias, logprobs (completions: int;
chat: bool with top_logprobs), stream_options.include_usage, and vLLM's top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos, include_stop_str_in_output,
prompt_logprobs. Completions take `echo` (text prompts): each choice's text starts with its
prompt, and with `logprobs` the prompt's tokens lead the logprobs (the first with none), as
OpenAI returns them.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad field
(named in `param`) or a prompt longer than the context, 401 for a missing or wrong API key, 404
for an unknown model, 503 when the cluster cannot serve, 504 when it does not answer in time.
Every request is one AsyncClient call (one per prompt); a client that disconnects cancels it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from shardline.client import (AsyncClient, Delta, DeltaStream, GenerationResult, InvalidRequestError,
                              RequestTimeoutError, ShardlineError, UnavailableError)
from shardline.sampling import check_num_logprobs

log = logging.getLogger("shardline.gateway")

HEALTH_TIMEOUT_S = 5.0  # /health waits this long for the coordinator before answering 503
DISCONNECT_POLL_S = 0.5  # a non-streaming request checks this often whether its HTTP client left


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_shardline(exc: ShardlineError, prompt_param: str) -> APIError:
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param or prompt_param)
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error")
    if isinstance(exc, UnavailableError):
        return APIError(503, str(exc), "service_unavailable")
    return APIError(500, str(exc), "internal_error")


# ---- request bodies: numbers stay loosely typed so SamplingParams names the field out of range --
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: Any = None
    temperature: Any = None
    top_p: Any = None
    stop: str | list[str] | None = None
    seed: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    stream: bool = False
    stream_options: dict | None = None
    logit_bias: dict | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    min_tokens: Any = None
    stop_token_ids: list | None = None
    ignore_eos: Any = None
    include_stop_str_in_output: Any = None
    prompt_logprobs: Any = None
    return_tokens_as_token_ids: bool = False  # vLLM: logprob tokens as "token_id:{id}"


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Any = 16
    logprobs: Any = None
    echo: bool = False
    suffix: str | None = None
    best_of: Any = None


class ChatBody(_Body):
    messages: list[dict]
    max_tokens: Any = None
    max_completion_tokens: Any = None
    logprobs: bool = False
    top_logprobs: Any = None
    tools: list | None = None
    response_format: dict | None = None


_PASS_THROUGH = ("n", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
                 "logit_bias")


def _sampling(body: _Body, max_tokens) -> dict:
    """SamplingParams keyword arguments from an OpenAI body (OpenAI's default temperature is 1)."""
    params = {k: getattr(body, k) for k in _PASS_THROUGH if getattr(body, k) is not None}
    params.setdefault("temperature", 1.0)
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return params


def _num_logprobs(name: str, value) -> int | None:
    if value is None:
        return None
    try:
        return check_num_logprobs(name, value)
    except ValueError as exc:
        raise APIError(400, str(exc), param=name) from None


def _token_text(token_bytes: dict[int, bytes] | None, token: int) -> str:
    """A token's text (invalid UTF-8, e.g. part of a character, as U+FFFD); with
    `token_bytes=None`, vLLM's `token_id:{id}` form."""
    if token_bytes is None:
        return f"token_id:{token}"
    return token_bytes.get(token, b"").decode("utf-8", errors="replace")


def _completion_logprobs(entries: list, token_ids: list[int], token_bytes: dict[int, bytes], k: int,
                         offset: int = 0) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs (the sampled token and
    the k most likely, as vLLM reports them), text_offset (characters from the start of the
    output). `token_bytes=None`: tokens as `token_id:{id}` (vLLM's return_tokens_as_token_ids).
    An entry None (the first prompt token, echoed) has null token_logprobs and top_logprobs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, entry in zip(token_ids, entries):
        text = _token_text(token_bytes, tok)
        lp, top = entry if entry is not None else (None, None)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else
                                   {text: lp, **{_token_text(token_bytes, t): v for t, v in top[:k]}})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _echo_logprobs(prompt: str, entries: list, prompt_ids: list[int], token_bytes: dict[int, bytes] | None,
                   k: int, then: dict | None = None) -> dict:
    """Completions logprobs of an echoed prompt (its first token has none), followed by `then`
    (the completion's logprobs, whose offsets already count the prompt). The first token, which
    no logprob entry names, is spelled by the part of `prompt` the others leave."""
    if token_bytes is not None and prompt_ids:
        rest = b"".join(token_bytes.get(t, b"") for t in prompt_ids[1:]).decode("utf-8", errors="replace")
        if prompt.endswith(rest):
            token_bytes = {**token_bytes, prompt_ids[0]: prompt[: len(prompt) - len(rest)].encode()}
    out = _completion_logprobs(entries, prompt_ids, token_bytes, k)
    for key, values in (then or {}).items():
        out[key] += values
    return out


def _chat_logprobs(entries: list, token_ids: list[int], token_bytes: dict[int, bytes], k: int) -> dict:
    """OpenAI chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for tok, (lp, top) in zip(token_ids, entries):
        b = token_bytes.get(tok, b"")
        content.append({"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b),
                        "top_logprobs": [{"token": _token_text(token_bytes, t), "logprob": v,
                                          "bytes": list(token_bytes.get(t, b""))} for t, v in top[:k]]})
    return {"content": content}


def _prompt_logprobs(entries: list | None, prompt_ids: list[int] | None, token_bytes: dict[int, bytes]
                     ) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id: {logprob,
    decoded_token}} for the prompt's token and the k most likely."""
    if entries is None or prompt_ids is None:
        return None
    out = []
    for tok, e in zip(prompt_ids, entries):
        if e is None:
            out.append(None)
            continue
        d = {str(tok): {"logprob": e[0], "decoded_token": _token_text(token_bytes, tok)}}
        d.update({str(t): {"logprob": v, "decoded_token": _token_text(token_bytes, t)} for t, v in e[1]})
        out.append(d)
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _merged(streams: list[DeltaStream]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several streams as they arrive, tagged with the stream's index. Leaving early
    cancels every stream."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, s: DeltaStream) -> None:
        try:
            async for d in s:
                await queue.put((i, d, None))
            await queue.put((i, end, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, d, exc = await queue.get()
            if exc is not None:
                raise exc
            if d is end:
                left -= 1
                continue
            yield i, d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


class Gateway:
    """The app's state: one AsyncClient to the coordinator, the served model ids, the API key."""

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.address = address
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.client: AsyncClient | None = None
        self._models: list[dict] | None = None

    async def models(self) -> list[dict]:
        if self._models is None:
            self._models = await self.client.models(timeout_s=HEALTH_TIMEOUT_S)
        return self._models

    async def check_model(self, name: str) -> dict:
        """The coordinator's model entry for `name` (its id or its name). Raises APIError 404."""
        try:
            models = await self.models()
        except ShardlineError as exc:
            raise _from_shardline(exc, "model") from None
        for m in models:
            if name in (m["id"], m.get("name")):
                return m
        raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(m['id'] for m in models)}",
                       "invalid_request_error", "model", "model_not_found")

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           "invalid_request_error", None, "invalid_api_key")


def create_app(address: str, api_key: str | None = None, timeout_s: float = 300.0, **client_kwargs) -> FastAPI:
    """The FastAPI application serving the cluster whose client plane is at `address`
    (tcp://HOST:PORT). `api_key`: required as a Bearer token on /v1/* when set. `timeout_s`:
    seconds to wait for each reply of the coordinator. `client_kwargs` go to `AsyncClient`
    (CurveZMQ keys of a secured cluster)."""
    gw = Gateway(address, api_key, timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw.client = AsyncClient(address, timeout_s=timeout_s, **client_kwargs)
        yield
        await gw.client.close()

    app = FastAPI(title="Shardline OpenAI-compatible gateway", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        return APIError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}", param=param).response()

    def auth(request: Request) -> None:
        gw.authorize(request)

    @app.get("/health")
    async def health():
        try:
            h = await gw.client.health(timeout_s=HEALTH_TIMEOUT_S)
        except ShardlineError as exc:
            return JSONResponse({"status": "unreachable", "error": str(exc)}, status_code=503)
        h.pop("request_id", None)
        ok = h.get("status") == "ok" and h.get("workers_up") == h.get("workers_expected")
        return JSONResponse(h, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        try:
            ms = await gw.models()
        except ShardlineError as exc:
            raise _from_shardline(exc, "model") from None
        return {"object": "list", "data": [{"id": m["id"], "object": "model", "created": 0, "owned_by": "shardline",
                                             "root": m.get("name"), "max_model_len": m.get("context_length")}
                                            for m in ms]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionBody, request: Request):
        await gw.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.echo and not isinstance(body.prompt, str) and not all(isinstance(p, str) for p in body.prompt):
            raise APIError(400, "echo is supported for text prompts only", param="echo")
        if body.best_of is not None and body.best_of != (body.n if body.n is not None else 1):
            raise APIError(400, "best_of must equal n (no server-side reranking)", param="best_of")
        prompts = _prompts(body.prompt)
        params = _sampling(body, body.max_tokens)
        k = _num_logprobs("logprobs", body.logprobs)
        num_prompt_logprobs = body.prompt_logprobs or 0
        if body.echo and k is not None:  # the echoed prompt's logprobs
            num_prompt_logprobs = max(_num_logprobs("prompt_logprobs", num_prompt_logprobs) or 0, k or 1)
        kwargs = dict(params, prompt_logprobs=num_prompt_logprobs)
        if k is not None:
            kwargs["logprobs"] = max(k, 1)  # logprobs=0: the sampled token's only
        calls = [dict(kwargs, **p) for p in prompts]
        n = params.get("n", 1)
        as_ids = body.return_tokens_as_token_ids
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            streams = await _start_streams(gw.client, calls, "prompt")
            return _sse_response(_completion_events(streams, rid, created, body.model, n, k, body.stream_options,
                                                    as_ids, calls if body.echo else None,
                                                    show_prompt_logprobs=bool(body.prompt_logprobs)))
        results = await _generate_all(gw.client, calls, "prompt", request)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for i, r in enumerate(results):
            usage["prompt_tokens"] += r.usage.get("prompt_tokens", 0)
            usage["completion_tokens"] += r.usage.get("completion_tokens", 0)
            echo = calls[i]["prompt"] if body.echo else ""
            tb = None if as_ids else r.token_bytes
            for c in r.choices:
                lp = None
                if k is not None:
                    lp = _completion_logprobs(c.logprobs or [], c.token_ids, tb, k, len(echo))
                    if body.echo:
                        lp = _echo_logprobs(echo, r.prompt_logprobs, r.prompt_token_ids, tb, k, lp)
                choices.append({"index": i * n + c.index, "text": echo + c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                **({"prompt_logprobs": _prompt_logprobs(r.prompt_logprobs, r.prompt_token_ids,
                                                                        r.token_bytes)}
                                   if c.index == 0 and body.prompt_logprobs and r.prompt_logprobs is not None
                                   else {})})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, "usage": usage}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatBody, request: Request):
        model = await gw.check_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type text is supported", param="response_format")
        messages = _messages(body.messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # until EOS or the end of the context
            max_tokens = model.get("context_length") or 2048
        params = _sampling(body, max_tokens)
        k = _num_logprobs("top_logprobs", body.top_logprobs) or 0
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        call = dict(params, messages=messages, prompt_logprobs=body.prompt_logprobs or 0)
        if body.logprobs:
            call["logprobs"] = max(k, 1)
        n = params.get("n", 1)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            streams = await _start_streams(gw.client, [call], "messages")
            return _sse_response(_chat_events(streams[0], rid, created, body.model, n,
                                              k if body.logprobs else None, body.stream_options))
        (r,) = await _generate_all(gw.client, [call], "messages", request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs or [], c.token_ids, r.token_bytes, k) if body.logprobs
                    else None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in r.choices]
        usage = {"prompt_tokens": r.usage.get("prompt_tokens", 0),
                 "completion_tokens": r.usage.get("completion_tokens", 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        out = {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
               "choices": choices, "usage": usage}
        if r.prompt_logprobs is not None:
            out["prompt_logprobs"] = _prompt_logprobs(r.prompt_logprobs, r.prompt_token_ids, r.token_bytes)
        return out

    return app


def _prompts(prompt) -> list[dict]:
    """OpenAI's prompt forms -> one client keyword set per prompt."""
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": p} for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of those",
                   param="prompt")


def _messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> [{role, content: str}] (text content parts are joined)."""
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise APIError(400, f"messages[{i}].role must be a string", param="messages")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        out.append({"role": role, "content": content})
    return out


async def _generate_all(client: AsyncClient, calls: list[dict], prompt_param: str,
                        request: Request | None = None) -> list[GenerationResult]:
    """Every call's result (non-streaming). With `request`, the HTTP client's connection is
    checked every DISCONNECT_POLL_S seconds: uvicorn does not cancel a handler whose client
    left, so without this a timed-out client's request would run to max_tokens."""
    tasks = [asyncio.ensure_future(client.generate(**c)) for c in calls]
    gathered = asyncio.gather(*tasks)
    try:
        while request is not None:
            done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                raise APIError(499, "the client disconnected", "client_closed_request")  # read by no one
        return list(await gathered)
    except ShardlineError as exc:
        raise _from_shardline(exc, prompt_param) from None
    finally:
        for t in tasks:  # a failed sibling, or the HTTP client gone: cancel the rest
            t.cancel()
        gathered.cancel()


async def _start_streams(client: AsyncClient, calls: list[dict], prompt_param: str) -> list[DeltaStream]:
    """Send every streaming request and wait until all are accepted, so a refusal becomes an
    HTTP error status instead of an event in a 200 stream."""
    try:
        streams = [client.stream(**c) for c in calls]
    except ShardlineError as exc:
        raise _from_shardline(exc, prompt_param) from None
    results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for s in streams:
            await s.aclose()
        if isinstance(errors[0], ShardlineError):
            raise _from_shardline(errors[0], prompt_param)
        raise errors[0]
    return streams


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _usage(final: list[Delta]) -> dict:
    u = {"prompt_tokens": sum((d.usage or {}).get("prompt_tokens", 0) for d in final),
         "completion_tokens": sum((d.usage or {}).get("completion_tokens", 0) for d in final)}
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    return u


async def _completion_events(streams: list[DeltaStream], rid: str, created: int, model: str, n: int, k,
                             stream_options: dict | None, as_ids: bool = False, echo: list[dict] | None = None,
                             show_prompt_logprobs: bool = True) -> AsyncIterator[str]:
    """Completion chunks (object text_completion) as tokens arrive; each choice's last chunk
    carries its finish_reason; then the usage chunk if asked for; then `data: [DONE]`. With
    `echo` (the calls, one per prompt), each choice's first chunk is its prompt, with its
    logprobs when k is set: the deltas of a prompt's choices then wait for its prompt logprobs,
    which come with choice 0's first delta."""
    def chunk(choices, **extra):
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                     "choices": choices, **extra})

    final: list[Delta] = []
    offsets: dict[int, int] = {}
    token_bytes: dict[int, bytes] = {}
    prompts: dict[int, tuple[list | None, list[int] | None]] = {}  # prompt -> (logprob entries, ids)
    waiting: dict[int, list[Delta]] = {}  # prompt -> deltas held until its prompt logprobs come
    echoed: set[int] = set()

    def events(i: int, d: Delta) -> list[str]:
        out = []
        idx = i * n + d.index
        if echo is not None and idx not in echoed:
            echoed.add(idx)
            text, (entries, ids) = echo[i]["prompt"], prompts[i]
            lp = None
            if k is not None:
                lp = _echo_logprobs(text, entries, ids, None if as_ids else token_bytes, k)
            offsets[idx] = len(text)
            out.append(chunk([{"index": idx, "text": text, "logprobs": lp, "finish_reason": None}]))
        if d.usage is not None:  # the last Delta of prompt i: every choice's finish
            for c in d.choices or []:
                out.append(chunk([{"index": i * n + c.index, "text": "", "logprobs": None,
                                   "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]))
            return out
        lp = None
        if k is not None and d.logprobs is not None:
            lp = _completion_logprobs(d.logprobs, d.token_ids, None if as_ids else token_bytes, k,
                                      offsets.get(idx, 0))
            offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lp["tokens"])
        extra = {}
        if d.prompt_logprobs is not None and show_prompt_logprobs:
            extra["prompt_logprobs"] = _prompt_logprobs(d.prompt_logprobs, d.prompt_token_ids, token_bytes)
        out.append(chunk([{"index": idx, "text": d.text, "logprobs": lp, "finish_reason": None, **extra}]))
        return out

    try:
        async for i, d in _merged(streams):
            if d.usage is not None:
                final.append(d)
            token_bytes.update(d.token_bytes or {})
            if echo is not None and i not in prompts:
                if k is not None and d.prompt_logprobs is None:
                    waiting.setdefault(i, []).append(d)
                    continue
                prompts[i] = (d.prompt_logprobs, d.prompt_token_ids)
                for held in waiting.pop(i, []):
                    for e in events(i, held):
                        yield e
            for e in events(i, d):
                yield e
        if stream_options and stream_options.get("include_usage"):
            yield chunk([], usage=_usage(final))
    except ShardlineError as exc:
        yield _sse(_from_shardline(exc, "prompt").body())
    yield "data: [DONE]\n\n"


async def _chat_events(stream: DeltaStream, rid: str, created: int, model: str, n: int, k,
                       stream_options: dict | None) -> AsyncIterator[str]:
    """Chat chunks (object chat.completion.chunk): a first chunk per choice with the assistant
    role, content deltas, a finish chunk per choice, the usage chunk if asked, `data: [DONE]`."""
    def chunk(choices, **extra):
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": choices, **extra})

    token_bytes: dict[int, bytes] = {}
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for _, d in _merged([stream]):
            if d.usage is not None:
                for c in d.choices or []:
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}])
                if stream_options and stream_options.get("include_usage"):
                    yield chunk([], usage=_usage([d]))
                continue
            token_bytes.update(d.token_bytes or {})
            lp = None
            if k is not None and d.logprobs is not None:
                lp = _chat_logprobs(d.logprobs, d.token_ids, token_bytes, k)
            yield chunk([{"index": d.index, "delta": {"content": d.text}, "logprobs": lp, "finish_reason": None}])
    except ShardlineError as exc:
        yield _sse(_from_shardline(exc, "messages").body())
    yield "data: [DONE]\n\n"


def serve(address: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          timeout_s: float = 300.0, log_level: str = "info", **client_kwargs) -> None:
    """Run the gateway with uvicorn in the foreground until SIGINT/SIGTERM (graceful: open
    streams get 5 s). `client_kwargs`: as for `create_app`."""
    import uvicorn

    uvicorn.run(create_app(address, api_key, timeout_s, **client_kwargs), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=5)
