"""Message bodies: one typed struct per message type (docs/protocol.md lists their fields, and
tests/unit/test_protocol_spec.py holds the two to each other).

Each body is a `msgspec.Struct` encoded as a msgpack map keyed by field name; `shardline.protocol`
frames it (header + body) and decodes a frame straight into the struct of its type, so the
struct *is* the schema: a required field that is missing, or a value of the wrong type, is
refused by the decoder with the field's path (`Expected `int`, got `str` - at `$.step_id``).
Rules the structs follow:

- `kw_only=True` on every struct (msgspec applies it per class): fields are given by name;
  fields without a default are required, optional ones carry the default the receiver assumes
  when the field is absent.
- `omit_defaults=True`: a field equal to its default is not sent (a STEP entry of a running
  sequence carries no `params`, `history`, ...). Replies whose consumers read every key
  (HEALTH_REPLY, STATS_REPLY and their parts, DONE's `usage`/`timings`) send all fields.
- Unknown fields are skipped unread (`forbid_unknown_fields=False`): a newer minor version may
  add optional fields.
- `int` never accepts a bool (msgspec's strict mode); `float` accepts an int.
- Token-id arrays are `bytes` of packed little-endian int32 (`protocol.pack_ids`).
- `Any`-typed values (sampling `params`, the model `spec`, the `plan`) are checked by
  `check_plain` when decoded: plain msgpack values only (nil, bool, int, float, str, bin, arrays,
  maps with string keys, no ext types), nested at most `MAX_DEPTH` levels from the body's root.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec

from shardline.config import ClusterConfig, WorkersConfig

MAX_DEPTH = 16  # deepest nesting of maps/arrays in a body (the deepest typed one, STEP_RESULT, has 6)

# Config values ASSIGN carries, typed as cluster.yaml types them (one source of truth).
Quantization = ClusterConfig.model_fields["quantization"].annotation
QuantizationGroupSize = ClusterConfig.model_fields["quantization_group_size"].annotation
DType = ClusterConfig.model_fields["dtype"].annotation
GemmWeights = WorkersConfig.model_fields["gemm_weights"].annotation
KVCacheDType = WorkersConfig.model_fields["kv_cache_dtype"].annotation

Logprob = tuple[float, list[tuple[int, float]]]
"""One token's logprob entry: (logprob of the token, [(token id, logprob) x k], the k most likely
tokens); natural log of the raw distribution."""

PromptLogprobs = tuple[int, int, list[Logprob]]
"""A prompt chunk's logprobs in STEP_RESULT: (seq_id, first position, entries of the prompt tokens
at positions first .. first + len(entries) - 1)."""

_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})  # exact types: what the decoder makes


def check_plain(value: Any, level: int, field: str) -> None:
    """Check the `Any`-typed value of `field`, which sits at nesting level `level` of its body (the
    body map is level 1, a map or array in one of its fields level 2): plain msgpack values only,
    maps with string keys, nested at most `MAX_DEPTH` levels in all. Iterative, so a hostile value
    cannot exhaust the stack of whoever walks it later.

    Raises:
        ValueError: naming the field and the depth, a non-string key or a non-plain value (an ext
            type, a timestamp); the decoder adds the path of the struct holding the field.
    """
    stack = [(value, level)]
    while stack:
        v, depth = stack.pop()
        kind = type(v)
        if kind is dict or kind is list or kind is tuple:  # tuples: a value built here (decoded arrays are lists)
            if depth > MAX_DEPTH:
                raise ValueError(f"`{field}` nests deeper than {MAX_DEPTH} levels")
            if kind is dict:
                key_types = set(map(type, v))
                if key_types - {str}:
                    bad = next(iter(key_types - {str}))
                    raise ValueError(f"`{field}`: map keys must be strings, got {bad.__name__}")
                v = v.values()
            stack += [(item, depth + 1) for item in v if type(item) not in _SCALARS]
        elif kind not in _SCALARS:
            name = "timestamp" if isinstance(v, datetime.datetime) else kind.__name__
            raise ValueError(f"`{field}`: {name} values are not part of the protocol")


class Message(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """A message body (the base of every message type's struct)."""


class Part(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """A nested part of a message body."""


# ---- client plane -------------------------------------------------------------------------------


class ChatMessage(Part, kw_only=True):
    """One chat turn of GENERATE `messages`; the model's chat template renders them."""

    role: str
    content: str


class Generate(Message, kw_only=True):
    """GENERATE (client -> coordinator): a completion request. The prompt is `prompt_token_ids`
    (packed int32) if given, else `messages` rendered by the chat template, else `prompt`.
    `params` is the sampling parameter map, checked strictly by `SamplingParams.from_dict`.
    `logprobs` / `prompt_logprobs`: top-k per generated / prompt token (0 or None: none)."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_token_ids: bytes | None = None
    params: dict[str, Any] | None = None
    stream: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.params is not None:
            check_plain(self.params, 2, "params")


class Accepted(Message, kw_only=True):
    """ACCEPTED (coordinator -> client): the request is queued; its prompt has `prompt_tokens` tokens."""

    request_id: str
    prompt_tokens: int


class Delta(Message, kw_only=True):
    """DELTA (coordinator -> client): choice `index`'s new text and tokens (`token_ids`: packed
    int32) since its previous DELTA. `logprobs`: one entry per token of `token_ids`, when asked.
    Choice 0's first DELTA carries `prompt_logprobs` (None for position 0 and unscored positions)
    and `prompt_token_ids`, when asked. `token_bytes`: {decimal token id: raw bytes} of every token
    the logprobs name."""

    request_id: str
    index: int
    text: str
    token_ids: bytes
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_token_ids: bytes | None = None
    token_bytes: dict[str, bytes] | None = None


class Usage(Part, kw_only=True, omit_defaults=False):
    """DONE `usage`: tokens of the prompt, generated by all choices, served from the prefix cache;
    times the request's sequences were preempted."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    num_preemptions: int


class Timings(Part, kw_only=True, omit_defaults=False):
    """DONE `timings` of choice 0, seconds (None where the event has not happened): queue_s
    (arrival to first scheduled), ttft_s (arrival to first token), e2e_s (arrival to DONE),
    decode_tokens_per_s (output tokens after the first / the time they took; None below 2 tokens)."""

    queue_s: float | None
    ttft_s: float | None
    e2e_s: float
    decode_tokens_per_s: float | None = None


class Choice(Part, kw_only=True):
    """One choice of a request with n > 1 (DONE `choices`)."""

    index: int
    text: str
    token_ids: bytes
    finish_reason: str
    stop_reason: str | int | None
    logprobs: list[Logprob] | None = None


class Done(Message, kw_only=True):
    """DONE (coordinator -> client): the request has ended. Top-level fields describe choice 0
    (`text` its whole output, `token_ids` packed int32); `choices` (n > 1) lists every choice.
    `finish_reason`: stop, length or abort; `stop_reason`: the stop string or token id, or None."""

    request_id: str
    text: str
    token_ids: bytes
    finish_reason: str
    stop_reason: str | int | None
    usage: Usage
    timings: Timings
    logprobs: list[Logprob] | None = None
    choices: list[Choice] | None = None
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_token_ids: bytes | None = None
    token_bytes: dict[str, bytes] | None = None


class Cancel(Message, kw_only=True):
    """CANCEL (client -> coordinator): end the client's request `request_id` (DONE, abort)."""

    request_id: str


class Health(Message, kw_only=True):
    """HEALTH (client -> coordinator); `request_id` is echoed in the reply."""

    request_id: str = ""


class HealthReply(Message, kw_only=True, omit_defaults=False):
    """HEALTH_REPLY: `status` (ok, waiting_for_workers, loading, draining, plan_failed: ...,
    recovering: ..., degraded: ...), live and expected workers, the served model's id."""

    status: str
    workers_up: int
    workers_expected: int
    model: str
    request_id: str = ""


class Stats(Message, kw_only=True):
    """STATS (client -> coordinator); `request_id` is echoed in the reply."""

    request_id: str = ""


class CommStats(Part, kw_only=True, omit_defaults=False):
    """A worker's cumulative data-plane times since its stage was built (HEARTBEAT `comm`):
    seconds inside all-reduce, all-gather (the logits' under TP), sends (issuing them and waiting
    for old ones) and receives (the transfer plus waiting for the previous stage), and the number
    of calls of each (`shardline.worker.comm.StageComm.stats`)."""

    all_reduce_s: float
    num_all_reduce: int
    all_gather_s: float
    num_all_gather: int
    send_s: float
    num_send: int
    recv_s: float
    num_recv: int


class WorkerStats(Part, kw_only=True, omit_defaults=False):
    """One registered worker in STATS_REPLY `workers`: liveness, its place in the plan (None
    outside it), memory (bytes), the latest step time and busy time (seconds), `busy_fraction`
    (forward-pass seconds / wall seconds over the throughput window; None until two heartbeats),
    its hourly price (None: none given), its declared speed and last `comm` (None before one)."""

    worker_id: str
    host: str
    pid: int
    alive: bool
    ready: bool
    drained: bool
    heartbeat_age_s: float
    step_time_s: float
    weight_bytes: int
    rss_bytes: int
    kv_bytes: int
    speed: float
    comm: CommStats | None
    stage: int | None
    layer_start: int | None
    layer_end: int | None
    tp_rank: int | None
    num_steps: int
    busy_s: float
    busy_fraction: float | None
    price_per_hour: float | None


class ProcessStats(Part, kw_only=True, omit_defaults=False):
    """The coordinator process: its pid, resident bytes and open file descriptors."""

    pid: int
    rss_bytes: int
    num_fds: int


class WorkerDrainState(Part, kw_only=True, omit_defaults=False):
    """The worker drain in progress: the worker, its phase (quiesce or replan), seconds since it began."""

    worker_id: str
    phase: str
    elapsed_s: float


class StatsReply(Message, kw_only=True, omit_defaults=False):
    """STATS_REPLY: counters since start, the cluster `state` (as HEALTH's status), queue and KV
    state (None before the first plan), the drain in progress, every worker, throughput (tokens/s
    over `throughput_window_s` seconds; None at first), cost (None when no worker has a price;
    per hour, in total, per million generated tokens since start and at the recent throughput)
    and the plan (`Plan.to_dict`; None without one)."""

    request_id: str = ""
    requests_total: int
    requests_finished: int
    generation_tokens_total: int
    prompt_tokens_total: int
    steps_total: int
    step_time_s_total: float
    state: str
    coordinator: ProcessStats
    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    num_steps_in_flight: int | None = None
    num_kv_blocks: int | None = None
    num_free_blocks: int | None = None
    kv_cache_usage: float | None = None
    num_preemptions_total: int | None = None
    prefix_cache_hit_blocks: int | None = None
    async_scheduling: bool | None = None
    num_continuations_total: int | None = None
    worker_drain: WorkerDrainState | None
    workers: list[WorkerStats]
    throughput_window_s: float
    generation_tokens_per_s: float | None
    price_per_hour: float | None
    cost_total: float | None
    cost_per_million_tokens: float | None
    recent_cost_per_million_tokens: float | None
    plan: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.plan is not None:
            check_plain(self.plan, 2, "plan")


class Models(Message, kw_only=True):
    """MODELS (client -> coordinator); `request_id` is echoed in the reply."""

    request_id: str = ""


class ModelCard(Part, kw_only=True, omit_defaults=False):
    """A served model: its id (as clients name it), name, context length (tokens: the longest
    prompt + output) and architecture."""

    id: str
    name: str
    context_length: int
    architecture: str


class ModelsReply(Message, kw_only=True):
    """MODELS_REPLY: the served models."""

    models: list[ModelCard]
    request_id: str = ""


class DrainWorker(Message, kw_only=True):
    """DRAIN_WORKER (client -> coordinator): re-plan without worker `worker_id`, then shut it down."""

    worker_id: str
    request_id: str = ""


class DrainWorkerReply(Message, kw_only=True):
    """DRAIN_WORKER_REPLY: the drain is done; `plan_id` and `plan` are the new plan's,
    `requests_resumed` the sequences recomputed under it, `drain_s` seconds from DRAIN_WORKER to
    the new plan serving."""

    worker_id: str
    plan_id: int
    plan: dict[str, Any]
    requests_resumed: int
    drain_s: float
    request_id: str = ""

    def __post_init__(self) -> None:
        check_plain(self.plan, 2, "plan")


# ---- worker plane -------------------------------------------------------------------------------


class Register(Message, kw_only=True):
    """REGISTER (worker -> coordinator): a worker joins. `incarnation` is random per process;
    `memory_bytes` is offered for weights and KV cache; `version` is the worker's shardline
    version (major.minor must match the coordinator's); `price_per_hour` (None: the cluster's
    `workers.price_per_hour`) and `speed` (relative, for the planner) are declared by the worker;
    `model_digest` / `model_path` name the model file it was started with (None: none)."""

    worker_id: str
    incarnation: str = ""
    host: str
    device: str
    memory_bytes: int
    version: str
    pid: int = 0
    threads: int = 1
    price_per_hour: float | None = None
    speed: float = 1.0
    model_digest: str | None = None
    model_path: str | None = None
    protocol: str = ""


class Assign(Message, kw_only=True):
    """ASSIGN (coordinator -> worker): the worker's place in plan `plan_id` and everything it needs
    to load it: its ranks and layers [layer_start, layer_end), the model (`spec`:
    `ModelSpec.to_dict`; `model_path`, `model`, `model_digest` to find a local copy, None when
    unknown), the KV pool (`num_kv_blocks` blocks of `block_size` tokens of `kv_cache_dtype`), the
    rendezvous (`store_host`:`store_port`, key prefix `store_prefix` = plan<plan_id>/), timeouts
    (seconds), how weights are kept (`quantization`, `quantization_group_size`, `dtype`,
    `gemm_weights`) and `token_stream` (async scheduling with several stages: open the
    last-to-first stream of sampled tokens). Every config value is sent: the worker repeats no
    default."""

    plan_id: int
    rank: int
    world_size: int
    stage: int
    pp_size: int
    tp_rank: int
    tp_size: int
    layer_start: int
    layer_end: int
    spec: dict[str, Any]
    num_kv_blocks: int
    block_size: int
    max_positions: int
    store_host: str
    store_port: int
    store_prefix: str
    data_plane_timeout_s: float
    heartbeat_interval_s: float
    heartbeat_misses: int
    quantization: Quantization
    quantization_group_size: QuantizationGroupSize
    dtype: DType
    gemm_weights: GemmWeights
    kv_cache_dtype: KVCacheDType
    token_stream: bool
    model_path: str | None = None
    model: str | None = None
    model_digest: str | None = None
    version: str = ""

    def __post_init__(self) -> None:
        check_plain(self.spec, 2, "spec")


class TransferStats(Part, kw_only=True, omit_defaults=False):
    """How a worker received its shard (READY `shard_transfer`): bytes, chunks, chunks fetched
    again after a bad checksum, seconds, and the stream's format (gguf or safetensors)."""

    bytes: int
    chunks: int
    retries: int
    seconds: float
    format: str


class Ready(Message, kw_only=True):
    """READY (worker -> coordinator): the worker loaded its shard for plan `plan_id` (None: the
    current plan). Bytes of weights, resident memory and KV pool, load seconds; `async_scheduling`:
    it can run continuations (one TP rank, and one stage or the token stream open);
    `shard_transfer`: None when the weights were read from a local file."""

    worker_id: str
    plan_id: int | None = None
    weight_bytes: int = 0
    rss_bytes: int = 0
    kv_bytes: int = 0
    load_s: float = 0.0
    async_scheduling: bool = False
    shard_transfer: TransferStats | None = None


class StepSeq(Part, kw_only=True):
    """One sequence of a STEP. It computes `n` tokens at positions [start, start + n): their ids
    `tokens` (packed int32; empty for a continuation), the block-table entries the workers have
    not seen `blocks` (packed int32; with `reset`, the whole table), and samples one token when
    `sample`. `input_step` (async scheduling): the step whose sampled token is this entry's input
    (`n` is 1, `tokens` empty). With `reset` only: `params` (sampling parameters), `logprobs` and
    `prompt_logprobs` (top-k; 0: none), `prompt_len` (prompt tokens: output tokens so far =
    position - prompt_len), `history` (packed int32 token ids at positions [0, start), when a
    penalty needs them and a cached prefix skipped them)."""

    seq_id: int
    start: int
    n: int
    tokens: bytes
    blocks: bytes
    reset: bool
    sample: bool
    input_step: int | None = None
    params: dict[str, Any] | None = None
    logprobs: int = 0
    prompt_len: int | None = None
    prompt_logprobs: int = 0
    history: bytes = b""

    def __post_init__(self) -> None:
        if self.params is not None:
            check_plain(self.params, 4, "params")  # body > seqs > entry > params


class Step(Message, kw_only=True):
    """STEP (coordinator -> every worker): step `step_id`'s sequences, and `free`: the sequence ids
    whose worker-side state (block table, sampling state) to drop first."""

    step_id: int
    seqs: list[StepSeq]
    free: list[int] = []


class StepResult(Message, kw_only=True):
    """STEP_RESULT (the sampler -> coordinator): the tokens step `step_id` sampled, `seq_ids[i]`
    sampled `tokens[i]` (both packed int32); `forward_s` seconds from the STEP to the result.
    `logprobs` (if any sequence asked): per sampled sequence an entry or None; `prompt_logprobs`
    (if any sequence asked and a prompt chunk ran): per such sequence, its scored positions."""

    step_id: int
    seq_ids: bytes
    tokens: bytes
    forward_s: float = 0.0
    logprobs: list[Logprob | None] | None = None
    prompt_logprobs: list[PromptLogprobs] | None = None


class Heartbeat(Message, kw_only=True):
    """HEARTBEAT, both ways. Worker -> coordinator: `worker_id` and `incarnation` (None: not
    named), steps run and the latest step's seconds, resident bytes, `busy_s` (cumulative
    forward-pass seconds), `step_times_s` (the busy seconds of the steps since the previous
    heartbeat, at most 4096), `comm` (None without a stage). Coordinator -> worker: `time`
    (Unix seconds)."""

    worker_id: str | None = None
    incarnation: str | None = None
    num_steps: int | None = None
    step_time_s: float = 0.0
    rss_bytes: int = 0
    busy_s: float = 0.0
    step_times_s: list[float] = []
    comm: CommStats | None = None
    time: float | None = None


class Shutdown(Message, kw_only=True):
    """SHUTDOWN (coordinator -> worker): leave and exit 0 (`reason` "" or "drained"), or with
    reason "lost", drop the shard and register again as a new incarnation."""

    reason: str = ""


class ShardRequest(Message, kw_only=True):
    """SHARD_REQUEST (worker -> coordinator): send me my shard of model `model_digest`; `reason`
    (why no local file serves) is for the log."""

    worker_id: str
    model_digest: str
    reason: str = ""


class ManifestTensor(Part, kw_only=True):
    """One tensor slice of a SHARD_MANIFEST: its logical GGUF `name`, NumPy `dtype` string and
    array `shape` of its data, the output `rows` [r0, r1) and input `cols` [c0, c1) it holds
    (None: all), its place [offset, offset + nbytes) in the stream. gguf: `ggml_type` and `ne`
    (the slice's ggml type and shape, ne[0] = input features); safetensors: `st_dtype` (the
    stored dtype F32, F16 or BF16; BF16 travels as <u2 bit patterns)."""

    name: str
    dtype: str
    shape: list[int]
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    offset: int
    nbytes: int
    ggml_type: int | None = None
    ne: list[int] | None = None
    st_dtype: str | None = None


class ShardManifest(Message, kw_only=True):
    """SHARD_MANIFEST (coordinator -> worker): the shard's tensor slices in stream order, the
    stream's `format` (gguf or safetensors), its size in bytes and in chunks of `chunk_bytes`,
    and `shard_digest`, the sha256 hex of the whole stream."""

    model_digest: str
    format: str = "gguf"
    tensors: list[ManifestTensor]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    shard_digest: str


class ShardFetch(Message, kw_only=True):
    """SHARD_FETCH (worker -> coordinator): send chunk `index`."""

    index: int


class ShardChunk(Message, kw_only=True):
    """SHARD_CHUNK (coordinator -> worker): bytes [offset, offset + len(data)) of the shard stream
    (chunk `index`) and their sha256 hex."""

    index: int
    offset: int
    data: bytes
    sha256: str


# ---- both planes --------------------------------------------------------------------------------


class Error(Message, kw_only=True):
    """ERROR, either way: `code` (an `ErrorCode`), its `code_name`, a message for people. To a
    client: the `request_id` it answers ("" when unknown). From a worker whose data plane failed:
    `plan_id`, the plan whose group failed (None: the current one)."""

    code: int
    code_name: str
    message: str
    request_id: str = ""
    plan_id: int | None = None


class RequestRef(Message, kw_only=True):
    """Any client request read for its `request_id` alone: the ERROR answering a body that failed
    to decode still names the request it refuses."""

    request_id: str = ""
