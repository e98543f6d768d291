"""Where a worker's shard weights come from: a model file on this host whose sha256 is the one
the coordinator serves, or else the coordinator itself (shard transfer, shard_transfer.py).

The digest of a local file is computed once per path (`shardline.shard.model_digest`: hashing a
model of several GB takes seconds) and sent in REGISTER, so the coordinator refuses a worker
that holds another model under the same name before it is planned.
"""

from __future__ import annotations

import logging
import os
import time

from shardline import messages as M
from shardline.model_file import ModelSpec
from shardline.worker.loader import ShardSpec, open_shard_loader

log = logging.getLogger("shardline.worker")


class WeightSource:
    """Opens the loader of a worker's shard for an ASSIGN.

    `model_path`: this host's copy of the model (`--model-path`), or None: the coordinator's
    path, else the packaged model of the name the coordinator serves, if either is here.
    `use_local_model` False: never read a model file here, always receive the shard.
    """

    def __init__(self, model_path: str | None = None, use_local_model: bool = True):
        self.model_path = model_path
        self.use_local_model = use_local_model
        self._digests: dict[str, str] = {}  # local model path -> sha256 hex, computed once

    def digest(self, path: str) -> str:
        """sha256 hex of the model at `path` (a GGUF file or a checkpoint directory), cached."""
        from shardline.shard import model_digest

        if path not in self._digests:
            t0 = time.monotonic()
            self._digests[path] = model_digest(path)
            log.info("model %s: sha256 %s (%.1f s)", path, self._digests[path][:16], time.monotonic() - t0)
        return self._digests[path]

    def local_model_file(self) -> tuple[str | None, str | None]:
        """REGISTER's `model_digest` and `model_path` naming this host's model: (sha256 hex, path)
        when a `model_path` was given and may be read, else (None, None)."""
        if not (self.model_path and self.use_local_model):
            return None, None
        return self.digest(self.model_path), self.model_path

    def local_model(self, a: M.Assign) -> str | None:
        """A model file on this host whose digest is the one ASSIGN `a` names (`model_path`
        given here, else ASSIGN's `model_path`, else the packaged model named `model`), or None:
        then the shard comes from the coordinator. An ASSIGN without `model_digest` trusts the
        first path that exists."""
        if not self.use_local_model:
            return None
        want = a.model_digest
        candidates = [self.model_path] if self.model_path else [a.model_path]
        if not self.model_path and a.model:
            from shardline.model_file import ModelError, resolve_model_path

            try:
                candidates.append(str(resolve_model_path(a.model)))
            except ModelError:
                pass
        for path in dict.fromkeys(c for c in candidates if c):
            if not os.path.exists(path):
                continue
            if want is None:
                return path
            have = self.digest(path)
            if have == want:
                return path
            log.warning("local model %s has sha256 %s, the coordinator serves %s; receiving the shard instead",
                        path, have[:16], want[:16])
        return None

    def open(self, a: M.Assign, spec: ModelSpec, shard: ShardSpec, sock,
             worker_id: str) -> tuple[object, M.TransferStats | None]:
        """The loader of `shard` for ASSIGN `a` and the transfer stats (when the shard was received
        over `sock`, the worker-plane DEALER; None when it was read from a local file). The loader
        encodes a safetensors checkpoint as ASSIGN's `quantization`, `quantization_group_size` and
        `dtype` say; close it once the stage is built.

        Raises:
            shardline.worker.shard_transfer.ShardTransferError: the transfer failed.
            ValueError: quantization asked for a local GGUF file, or no local file and no
                `model_digest` to ask the coordinator for.
        """
        quantization, group_size, dtype = a.quantization, a.quantization_group_size, a.dtype
        local = self.local_model(a)
        if local is not None:
            return open_shard_loader(local, spec, shard, quantization, group_size, dtype), None
        from shardline.worker.shard_transfer import fetch_shard

        reason = "local model files disabled" if not self.use_local_model else "no local model file with that digest"
        if a.model_digest is None:
            raise ValueError("no local model file, and ASSIGN names no model_digest to ask the coordinator for")
        log.info("worker %s: receiving stage %d tp %d/%d from the coordinator (%s)", worker_id, a.stage,
                 shard.tp_rank, shard.tp_size, reason)
        loader, stats = fetch_shard(sock, worker_id, a.model_digest, spec, shard, reason,
                                    quantization=quantization, group_size=group_size, dtype=dtype)
        log.info("worker %s: received %.1f MB in %d chunks (%d retried) in %.2f s", worker_id, stats.bytes / 1e6,
                 stats.chunks, stats.retries, stats.seconds)
        return loader, stats
