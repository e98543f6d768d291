"""The model a coordinator serves: its file, metadata, digest, tokenizer and sizes, read once at start."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shardline.config import ClusterConfig
from shardline.coordinator.planner import ModelSizes, check_parallel
from shardline.coordinator.tokenizer import Tokenizer
from shardline.model_file import ModelSpec, read_model_spec, resolve_model_path

log = logging.getLogger("shardline.coordinator")


@dataclass(frozen=True)
class ServedModel:
    """What the coordinator knows of its model. Facts found at start-up, never written back into
    the config: `max_model_len` is `scheduler.max_model_len` capped by the model's context."""

    model_id: str  # the cluster.yaml reference (`model`), as clients name it
    path: str  # the resolved GGUF file or checkpoint directory
    spec: ModelSpec
    digest: str  # sha256 hex (shardline.shard.model_digest): the join handshake and shard transfers name it
    tokenizer: Tokenizer
    sizes: ModelSizes  # bytes per layer and per KV token, the planner's input
    max_model_len: int  # tokens

    @classmethod
    def open(cls, config: ClusterConfig) -> ServedModel:
        """Resolve and read `config.model`; check a fixed pipeline x tensor split against it
        before the digest reads every byte of the file.

        Raises:
            ModelError: unknown model, unreadable file, unsupported tensor types.
            PlanError: `parallel.pipeline_parallel` x `tensor_parallel` cannot split this model.
        """
        from shardline.shard import model_digest

        path = str(resolve_model_path(config.model))
        spec = read_model_spec(path)
        tokenizer = Tokenizer.from_model_path(path)
        sizes = ModelSizes.from_model(path, spec, config.quantization, config.quantization_group_size, config.dtype)
        max_model_len = min(config.scheduler.max_model_len or spec.context_length, spec.context_length)
        if config.pipeline_parallel is not None and config.tensor_parallel is not None:
            check_parallel(spec, config.pipeline_parallel, config.tensor_parallel)  # fail before anything loads
        t0 = time.monotonic()
        digest = model_digest(path)
        log.info("model %s: sha256 %s (%.1f s)", path, digest[:16], time.monotonic() - t0)
        return cls(config.model, path, spec, digest, tokenizer, sizes, max_model_len)
