"""Planner: model file x workers -> pipeline stages (layer ranges) x tensor-parallel shards.

Inputs: the model's hyperparameters and per-layer tensor sizes (from the GGUF tensor table, or a
safetensors checkpoint's headers at the size its quantization gives), and each worker's offered
memory. Output: a `Plan`, one `StageAssignment` per worker, and the KV
pool size (blocks) that every worker can hold: the minimum across workers, since a block id
names the same slot range on every stage.

Layer split: "even" gives each stage num_layers / pp layers (the first stages one more when it
does not divide); "memory" splits in proportion to the smallest offer in each stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shardline.model_file import ModelSpec


class PlanError(ValueError):
    """No plan fits: the message says why (`tensor_parallel=2 does not divide num_kv_heads=3`)."""


@dataclass(frozen=True)
class WorkerOffer:
    worker_id: str
    host: str
    memory_bytes: int
    device: str = "cpu"


@dataclass(frozen=True)
class StageAssignment:
    worker_id: str
    host: str
    rank: int
    stage: int
    tp_rank: int
    layer_start: int
    layer_end: int
    weight_bytes: int
    kv_bytes_per_block: int
    memory_bytes: int


@dataclass(frozen=True)
class Plan:
    pp_size: int
    tp_size: int
    num_kv_blocks: int
    block_size: int
    assignments: tuple[StageAssignment, ...]

    @property
    def world_size(self) -> int:
        return len(self.assignments)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the weights as the workers keep them: per decoder layer, embedding, head."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # lm_head (== embed_bytes when tied) + final norm

    @classmethod
    def from_gguf(cls, path: str, spec: ModelSpec, bytes_per_element: float | None = None) -> "ModelSizes":
        """Sizes from the GGUF tensor table: packed bytes as stored (`bytes_per_element` None) or
        numel * bytes_per_element (weights dequantized on load)."""
        import gguf

        reader = gguf.GGUFReader(path)
        layer = [0] * spec.num_layers
        embed = head = 0

        def size(t) -> int:
            return int(t.n_bytes) if bytes_per_element is None else int(t.n_elements * bytes_per_element)

        for t in reader.tensors:
            if t.name.startswith("blk."):
                layer[int(t.name.split(".")[1])] += size(t)
            elif t.name == "token_embd.weight":
                embed = size(t)
            else:  # output.weight, output_norm.weight
                head += size(t)
        if spec.tie_word_embeddings:
            head += embed
        return cls(tuple(layer), embed, head)

    @classmethod
    def from_safetensors(cls, directory: str, spec: ModelSpec, quantization: str = "none", group_size: int = 32,
                         dtype: str = "float32") -> "ModelSizes":
        """Sizes of a Hugging Face checkpoint as the workers keep it after quantizing on load:
        2-D weights at `bytes_per_element(quantization, ...)` (the embedding and lm_head at
        `embedding_quantization`'s rate), norms and biases float32. Shapes from the safetensors
        headers only."""
        from shardline.model_file import (SafetensorsCheckpoint, bytes_per_element, embedding_quantization,
                                          hf_expected_tensors)

        ckpt = SafetensorsCheckpoint(directory)
        layer_rate = bytes_per_element(quantization, group_size, dtype)
        embed_rate = bytes_per_element(embedding_quantization(quantization), group_size, dtype)
        layer = [0] * spec.num_layers
        embed = head = 0
        for name, shape in hf_expected_tensors(spec).items():
            n = ckpt.numel(name)
            if name.startswith("model.layers."):
                layer[int(name.split(".")[2])] += int(n * layer_rate) if len(shape) == 2 else 4 * n
            elif name == "model.embed_tokens.weight":
                embed = int(n * embed_rate)
            elif name == "lm_head.weight":
                head += int(n * embed_rate)
            else:  # model.norm.weight
                head += 4 * n
        if spec.tie_word_embeddings:
            head += embed
        return cls(tuple(layer), embed, head)

    @classmethod
    def from_model(cls, path: str, spec: ModelSpec, quantization: str = "none", group_size: int = 32,
                   dtype: str = "float32") -> "ModelSizes":
        """`from_gguf` for a GGUF file (packed bytes as stored), `from_safetensors` for a
        checkpoint directory."""
        from shardline.model_file import is_safetensors_checkpoint

        if is_safetensors_checkpoint(path):
            return cls.from_safetensors(path, spec, quantization, group_size, dtype)
        return cls.from_gguf(path, spec)


def kv_bytes_per_block(spec: ModelSpec, num_layers: int, block_size: int, tp_size: int, dtype_bytes: int = 4) -> int:
    return 2 * num_layers * block_size * (spec.num_kv_heads // tp_size) * spec.head_dim * dtype_bytes


def check_parallel(spec: ModelSpec, pp_size: int, tp_size: int) -> None:
    """Raises PlanError when the model cannot be split this way."""
    counts = {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
              "intermediate_size": spec.intermediate_size}
    bad = [f"{k}={v}" for k, v in counts.items() if v % tp_size]
    if bad:  # name every count it does not divide
        raise PlanError(f"tensor_parallel={tp_size} does not divide {', '.join(bad)}")
    if pp_size > spec.num_layers:
        raise PlanError(f"pipeline_parallel={pp_size} exceeds num_layers={spec.num_layers}")


def check_quantization(spec: ModelSpec, tp_size: int, group_size: int) -> None:
    """Raises PlanError when int8/int4 groups of `group_size` do not tile every weight row of a
    tensor-parallel shard: the input widths hidden_size, intermediate_size / tp (down_proj shard)
    and num_heads / tp * head_dim (o_proj shard) must be multiples of it."""
    widths = {"hidden_size": spec.hidden_size,
              "intermediate_size / tensor_parallel": spec.intermediate_size // tp_size,
              "num_heads / tensor_parallel * head_dim": spec.num_heads // tp_size * spec.head_dim}
    bad = [f"{k}={v}" for k, v in widths.items() if v % group_size]
    if bad:
        raise PlanError(f"quantization_group_size={group_size} does not divide {', '.join(bad)}; "
                        f"use 32 or another size that does")


def split_layers(num_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous layer ranges in proportion to `weights` (each stage gets at least one layer)."""
    pp = len(weights)
    if len(set(weights)) == 1:  # even: the first num_layers % pp stages get one more layer
        q, r = divmod(num_layers, pp)
        bounds = [i * q + min(i, r) for i in range(pp + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(pp)]
    total = sum(weights)
    bounds = [0]
    for i in range(1, pp):
        b = round(num_layers * sum(weights[:i]) / total)
        b = max(bounds[-1] + 1, min(b, num_layers - (pp - i)))
        bounds.append(b)
    bounds.append(num_layers)
    return [(bounds[i], bounds[i + 1]) for i in range(pp)]


def make_plan(spec: ModelSpec, sizes: ModelSizes, workers: list[WorkerOffer], pp_size: int, tp_size: int,
              block_size: int, layer_split: str = "even", kv_cache_bytes: int | None = None,
              num_kv_blocks: int | None = None, min_kv_blocks: int = 16,
              quant_group_size: int | None = None) -> Plan:
    """Assign workers to stages and layers, and size the KV pool.

    Workers are taken in the given order: stage-major, TP rank minor. `quant_group_size`: the
    int8/int4 group size when weights are quantized on load (checked by `check_quantization`).

    Raises:
        PlanError: the split is impossible, the quantization groups do not tile the shards, or
            the weights plus `min_kv_blocks` do not fit.
    """
    check_parallel(spec, pp_size, tp_size)
    if quant_group_size is not None:
        check_quantization(spec, tp_size, quant_group_size)
    if len(workers) != pp_size * tp_size:
        raise PlanError(f"pipeline_parallel={pp_size} x tensor_parallel={tp_size} needs {pp_size * tp_size} "
                        f"workers, {len(workers)} registered")
    groups = [workers[s * tp_size:(s + 1) * tp_size] for s in range(pp_size)]
    if layer_split == "memory":
        ranges = split_layers(spec.num_layers, [min(w.memory_bytes for w in g) for g in groups])
    else:
        ranges = split_layers(spec.num_layers, [1.0] * pp_size)

    assignments, blocks_fit = [], []
    for stage, (g, (l0, l1)) in enumerate(zip(groups, ranges)):
        w_bytes = sum(sizes.layer_bytes[l0:l1]) // tp_size
        if stage == 0:
            w_bytes += sizes.embed_bytes
        if stage == pp_size - 1:  # lm_head + final norm; a tied lm_head on stage 0 is the embedding
            w_bytes += sizes.head_bytes - (sizes.embed_bytes if stage == 0 and spec.tie_word_embeddings else 0)
        per_block = kv_bytes_per_block(spec, l1 - l0, block_size, tp_size)
        for tp_rank, w in enumerate(g):
            room = w.memory_bytes - w_bytes
            if room < per_block * min_kv_blocks:
                need = w_bytes + per_block * min_kv_blocks
                raise PlanError(f"worker {w.worker_id} (stage {stage}, layers {l0}-{l1 - 1}) needs "
                                f"{need / 2**30:.2f} GiB for weights and a minimal KV cache, offers "
                                f"{w.memory_bytes / 2**30:.2f} GiB")
            kv_room = room if kv_cache_bytes is None else min(room, kv_cache_bytes)
            blocks_fit.append(kv_room // per_block)
            assignments.append(StageAssignment(w.worker_id, w.host, stage * tp_size + tp_rank, stage, tp_rank,
                                               l0, l1, w_bytes, per_block, w.memory_bytes))
    blocks = min(blocks_fit)
    if num_kv_blocks is not None:
        if num_kv_blocks > blocks:
            raise PlanError(f"num_kv_blocks={num_kv_blocks} does not fit: the workers hold at most {blocks}")
        blocks = num_kv_blocks
    return Plan(pp_size, tp_size, int(blocks), block_size, tuple(assignments))


def format_plan(plan: Plan) -> str:
    """The plan as a text table (for `shardline plan` and the coordinator log)."""
    rows = [("worker", "host", "rank", "stage", "layers", "tp", "weights MiB", "KV blocks", "KV MiB")]
    for a in plan.assignments:
        rows.append((a.worker_id, a.host, str(a.rank), str(a.stage), f"{a.layer_start}-{a.layer_end - 1}",
                     f"{a.tp_rank}/{plan.tp_size}", f"{a.weight_bytes / 2**20:.1f}", str(plan.num_kv_blocks),
                     f"{plan.num_kv_blocks * a.kv_bytes_per_block / 2**20:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
