"""cluster.yaml schema: one frozen pydantic model per concern, composed into `ClusterConfig`.

Facts found at run time (KV blocks per worker, the plan) live in their own objects
(`shardline.coordinator.planner.Plan`), never written back here. Field descriptions double as docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from shardline.model_file import PACKAGED_MODELS

DEFAULT_CLIENT_ADDRESS = "tcp://127.0.0.1:7450"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorConfig(_Frozen):
    host: str = Field("127.0.0.1", description="Address the coordinator binds to (client and worker planes).")
    client_port: int = Field(7450, ge=1, le=65535, description="Client plane ZeroMQ ROUTER port.")
    worker_port: int = Field(7451, ge=1, le=65535, description="Worker plane ZeroMQ ROUTER port.")
    rendezvous_port: int = Field(
        7452, ge=1, le=65535, description="torch.distributed TCPStore port hosted by the coordinator."
    )
    advertise_host: str | None = Field(
        None, description="Address workers use to reach the rendezvous store (default: host)."
    )
    recovery_timeout_s: float = Field(
        60.0, gt=0, description="After a worker is lost, seconds to find a new plan (survivors, or a replacement "
                                "that joins) before in-flight requests end with UNAVAILABLE."
    )
    replan_on_fewer_workers: bool = Field(
        True, description="After a worker is lost, re-plan onto the survivors at once when the model fits them; "
                          "false: wait for a replacement to bring the cluster back to workers.count."
    )
    max_spare_workers: int = Field(
        8, ge=0, le=64, description="Workers beyond workers.count kept registered as replacements."
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, validation_alias=AliasChoices("shutdown_timeout_s", "drain_timeout_s"),
        description="On SIGTERM/SIGINT (graceful shutdown): seconds running requests get to finish (admission "
                    "stops at once). `drain_timeout_s` is accepted as an alias."
    )


class WorkersConfig(_Frozen):
    count: int = Field(2, ge=1, le=64, description="Number of workers the cluster waits for before planning.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device of the workers `shardline launch` starts.")
    threads: int = Field(1, ge=1, le=256, description="Compute threads per worker process (torch and Numba).")
    memory_gb: float | None = Field(
        None, gt=0, description="Memory each local worker offers for weights and KV cache (default: a share of RAM)."
    )
    kv_cache_gb: float | None = Field(
        0.5, gt=0, description="Most memory per worker for its KV cache pool (GiB); None: all memory left after weights."
    )
    kv_cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Element type of the KV cache: float16 (llama.cpp's default f16 cache; twice the "
                               "tokens per GiB of float32 and half the bytes each decode step reads; K and V rounded "
                               "to 11 significant bits) or float32. Attention computes in float32 either way.")
    launch_local: bool = Field(True, description="`shardline launch` starts `count` workers on this host.")
    gemm_weights: Literal["packed", "bf16"] = Field(
        "packed", description="Weights of the many-token path (prefill, large decode batches) on CPU workers: "
        "`packed` dequantizes tiles of the quantized weights at every call (memory ~= the file); `bf16` also "
        "keeps a bfloat16 copy of every linear weight (2 bytes per parameter more) and multiplies it directly, "
        "about twice the throughput at 32+ sequences.")
    price_per_hour: float | None = Field(
        None, ge=0, description="Hourly price of one worker (any currency), for utilization and cost per million "
                                "generated tokens; a worker's `--price-per-hour` overrides it. None: cost not reported."
    )


class ParallelConfig(_Frozen):
    pipeline_parallel: PositiveInt | Literal["auto"] | None = Field(
        None, description="Pipeline stages (layer-wise split). None: workers.count / tensor_parallel; auto: the "
                          "planner chooses (see tensor_parallel)."
    )
    tensor_parallel: PositiveInt | Literal["auto"] = Field(
        1, description="Tensor-parallel ranks per stage (must divide the head counts); auto: the planner tries every "
                       "layout of workers.count the model allows and keeps the fastest."
    )
    layer_split: Literal["balanced", "even", "memory"] = Field(
        "balanced", description="How layers are spread over stages: balanced (slowest stage as fast as possible, "
                                "every worker keeping room for the KV pool), evenly, or in proportion to memory."
    )


class SchedulerConfig(_Frozen):
    max_num_seqs: int = Field(64, ge=1, le=4096, description="Most sequences in one step.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget of one step (decode + prompt chunks).")
    max_model_len: int | None = Field(
        None, ge=16, description="Longest sequence (prompt + output) in tokens; default: the model's context length."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Force the KV pool size in blocks (default: from worker memory)."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    pipeline_micro_batches: int | None = Field(
        None, ge=1, description="Step plans in flight at once (default: the number of pipeline stages)."
    )
    async_scheduling: bool = Field(
        True, description="Schedule a sequence's next decode step before its current token returns (vLLM's async "
        "scheduling); the last stage hands sampled tokens to the first directly. Applies with tensor_parallel 1."
    )


class MetricsConfig(_Frozen):
    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP from the coordinator.")
    host: str = Field("127.0.0.1", description="Address the metrics endpoint binds to.")
    port: int = Field(9450, ge=1, le=65535, description="Port of the metrics endpoint (http://HOST:PORT/metrics).")
    window_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds over which recent throughput and worker busy fractions are measured."
    )


class GatewayConfig(_Frozen):
    enabled: bool = Field(False, description="`shardline launch` also starts the OpenAI-compatible HTTP gateway.")
    host: str = Field("127.0.0.1", description="Address the HTTP gateway binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP gateway (http://HOST:PORT/v1).")
    api_key: str | None = Field(
        None, min_length=1, description="Require `Authorization: Bearer <api_key>` on /v1/* (prefer api_key_env)."
    )
    api_key_env: str | None = Field(
        None, min_length=1, description="Name of the environment variable that holds the API key."
    )
    timeout_s: float = Field(300.0, gt=0, description="Seconds the gateway waits for each reply of the coordinator.")

    @model_validator(mode="after")
    def _check(self):
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("give gateway.api_key or gateway.api_key_env, not both")
        return self

    def resolve_api_key(self) -> str | None:
        """The API key (from `api_key`, or the variable `api_key_env` names); None: no key.

        Raises:
            ConfigError: `api_key_env` names a variable that is unset or empty.
        """
        if self.api_key_env is None:
            return self.api_key
        import os

        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"gateway.api_key_env={self.api_key_env}: the environment variable is not set")
        return key


class SecurityConfig(_Frozen):
    """CurveZMQ (RFC 26) keys of the client and worker planes; `shardline keygen` writes them."""

    server_key: str | None = Field(
        None, description="The coordinator's secret key file (`NAME.key_secret`); its public key (`NAME.key`) goes "
                          "to every client and worker. Set: both planes are CURVE-encrypted and authenticated."
    )
    client_keys: str | list[str] | None = Field(
        None, description="Public keys allowed on the client plane: a directory of `*.key` files or a list of files. "
                          "None: any client key (still encrypted). Re-read on SIGHUP to the coordinator."
    )
    worker_keys: str | list[str] | None = Field(
        None, description="Public keys allowed on the worker plane: a directory of `*.key` files or a list of files. "
                          "None: any worker key (still encrypted). Re-read on SIGHUP to the coordinator."
    )
    client_key: str | None = Field(
        None, description="Secret key file of the clients the cluster runs itself (`shardline launch`'s health checks "
                          "and --prompt, the HTTP gateway, LocalCluster); must be on client_keys."
    )
    worker_key: str | None = Field(
        None, description="Secret key file `shardline launch` gives the local workers it starts; must be on worker_keys."
    )
    insecure: bool = Field(
        False, description="Allow binding a non-loopback coordinator.host without server_key (unencrypted, "
                           "unauthenticated planes)."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.server_key is None:
            given = [f for f in ("client_keys", "worker_keys", "client_key", "worker_key") if getattr(self, f)]
            if given:
                raise ValueError(f"security.{given[0]} needs security.server_key (the coordinator's secret key file)")
        return self


class HeartbeatConfig(_Frozen):
    interval_s: float = Field(1.0, gt=0, description="Seconds between heartbeats on the worker plane.")
    misses: int = Field(5, ge=1, description="Missed heartbeats before a worker is declared dead.")
    data_plane_timeout_s: float = Field(
        30.0, gt=0, description="Timeout of every torch.distributed operation (rendezvous, send/recv, all-reduce): "
                                "a worker waiting on a dead peer gives up after this long."
    )


class ClusterConfig(_Frozen):
    """The whole cluster.yaml."""

    model: str = Field(
        "smollm2-135m",
        description="Packaged model name, path to a .gguf file, a Hugging Face checkpoint directory "
                    "(config.json + *.safetensors + tokenizer.json), or a Hugging Face repo id in the local "
                    "Hugging Face cache (HF_HUB_CACHE / HF_HOME; never downloaded): org/name for a checkpoint, "
                    "org/name:file.gguf for a GGUF file in a repo.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Activation dtype of the workers; with quantization none, also the dtype a "
                               "safetensors checkpoint's weights are kept in."
    )
    quantization: Literal["none", "int8", "int4"] = Field(
        "none", description="Safetensors checkpoints: quantize the weights on load to per-group int8 (symmetric) "
                            "or int4 (asymmetric; embedding and lm_head int8), or keep them float (none). GGUF "
                            "models are already quantized and take only none."
    )
    quantization_group_size: Literal[32, 64, 96, 128] = Field(
        32, description="Weights per int8/int4 scale along the input dimension; must divide the hidden size, the "
                        "per-rank FFN size and the per-rank attention width. Larger: less memory, more error."
    )
    coordinator: CoordinatorConfig = CoordinatorConfig()
    workers: WorkersConfig = WorkersConfig()
    parallel: ParallelConfig = ParallelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    metrics: MetricsConfig = MetricsConfig()
    gateway: GatewayConfig = GatewayConfig()
    security: SecurityConfig = SecurityConfig()

    @model_validator(mode="after")
    def _check(self):
        pp, tp, n = self.pipeline_parallel, self.tensor_parallel, self.workers.count
        if pp is not None and tp is not None and pp * tp != n:
            raise ValueError(f"pipeline_parallel={pp} x tensor_parallel={tp} = {pp * tp} does not match workers.count={n}")
        for name, v in (("pipeline_parallel", pp), ("tensor_parallel", tp)):
            if v is not None and n % v:
                raise ValueError(f"{name}={v} does not divide workers.count={n}")
        ports = [self.coordinator.client_port, self.coordinator.worker_port, self.coordinator.rendezvous_port]
        if len(set(ports)) != 3:
            raise ValueError(f"coordinator ports must differ, got {ports}")
        if self.metrics.enabled and self.metrics.port in ports:
            raise ValueError(f"metrics.port={self.metrics.port} collides with a coordinator port {ports}")
        if self.quantization != "none" and (self.model in PACKAGED_MODELS or self.model.endswith(".gguf")):
            raise ValueError(f"quantization={self.quantization} applies to Hugging Face safetensors checkpoints; "
                             f"model {self.model!r} is a GGUF file, already quantized (use quantization: none)")
        return self

    @property
    def pipeline_parallel(self) -> int | None:
        """Pipeline stages, or None when the planner chooses (parallel.*: auto)."""
        pp, tp = self.parallel.pipeline_parallel, self.parallel.tensor_parallel
        if isinstance(pp, int):
            return pp
        if pp == "auto" or tp == "auto":
            return None
        return max(1, self.workers.count // tp)

    @property
    def tensor_parallel(self) -> int | None:
        """Tensor-parallel ranks per stage, or None when the planner chooses."""
        pp, tp = self.parallel.pipeline_parallel, self.parallel.tensor_parallel
        if isinstance(tp, int):
            return tp
        return self.workers.count // pp if isinstance(pp, int) and self.workers.count % pp == 0 else None

    @property
    def client_address(self) -> str:
        return f"tcp://{self.coordinator.host}:{self.coordinator.client_port}"

    @property
    def worker_address(self) -> str:
        return f"tcp://{self.coordinator.host}:{self.coordinator.worker_port}"


class ConfigError(ValueError):
    """cluster.yaml that cannot be used; the message names the file and the field."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> ClusterConfig:
    """Load and validate cluster.yaml (or the defaults when `path` is None).

    `overrides` is a nested dict merged over the file (used by the CLI and tests).

    Raises:
        ConfigError: unreadable YAML, unknown fields, or values out of range (field named).
    """
    data: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if overrides:
        data = _merge(data, overrides)
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{where}: invalid cluster config:\n" + "\n".join(lines)) from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
