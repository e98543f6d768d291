"""Planner: model file x workers -> pipeline stages (layer ranges) x tensor-parallel shards.

Inputs: the model's hyperparameters and per-layer tensor sizes (from the GGUF tensor table, or a
safetensors checkpoint's headers at the size its quantization gives), and each worker's offered
memory. Output: a `Plan`, one `StageAssignment` per worker, and the KV
pool size (blocks) that every worker can hold: the minimum across workers, since a block id
names the same slot range on every stage.

Layer split: "even" gives each stage num_layers / pp layers (the first stages one more when it
does not divide); "memory" splits in proportion to the smallest offer in each stage; "balanced"
searches every contiguous split (dynamic programming) for the one whose slowest stage is fastest
under `CostModel` (weights read per decode step, per-layer cost, all-reduces, declared speed)
while every worker keeps room for the KV pool, and among equals the one with the most KV blocks.
When the config leaves tensor_parallel / pipeline_parallel open, every layout the model allows
is planned and the fastest kept. Impossible requests fail here, before anything loads, with the
reason ("tensor_parallel=2 does not divide num_kv_heads=3", "model needs 9.10 GiB, workers offer
8.00 GiB").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shardline.model_file import ModelSpec


class PlanError(ValueError):
    """No plan fits: the message says why (`tensor_parallel=2 does not divide num_kv_heads=3`)."""


@dataclass(frozen=True)
class WorkerOffer:
    """What a worker brings: `memory_bytes` for weights and KV cache, its device, and a declared
    relative `speed` (1.0 = the reference; 2.0 runs a step in half the time)."""

    worker_id: str
    host: str
    memory_bytes: int
    device: str = "cpu"
    speed: float = 1.0


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
    speed: float = 1.0
    est_step_s: float = 0.0  # the CostModel's decode-step estimate for this worker's stage, seconds
    kv_blocks_fit: int = 0  # KV blocks this worker could hold beside its weights (the pool is the minimum)


@dataclass(frozen=True)
class Plan:
    pp_size: int
    tp_size: int
    num_kv_blocks: int
    block_size: int
    assignments: tuple[StageAssignment, ...]
    est_step_s: float = 0.0  # the slowest stage's estimate, seconds

    @property
    def world_size(self) -> int:
        return len(self.assignments)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the weights as the workers keep them: per decoder layer, embedding, head, all
    whole (the TP split is `stage_weight_bytes`'s business)."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # lm_head (== embed_bytes when tied) + final norm
    norm_bytes: int | None = None  # the final norm's part of head_bytes; None: 4 * hidden_size (float32)

    def lm_head_bytes(self, spec: ModelSpec) -> int:
        """head_bytes without the final norm: the [vocab, hidden] matrix (the embedding when tied)."""
        norm = 4 * spec.hidden_size if self.norm_bytes is None else self.norm_bytes
        return max(0, self.head_bytes - norm)

    @classmethod
    def from_gguf(cls, path: str, spec: ModelSpec, bytes_per_element: float | None = None) -> "ModelSizes":
        """Sizes from the GGUF tensor table: packed bytes as stored (`bytes_per_element` None) or
        numel * bytes_per_element (weights dequantized on load)."""
        from shardline.model_file import open_gguf

        reader = open_gguf(path)
        layer = [0] * spec.num_layers
        embed = head = norm = 0

        def size(t) -> int:
            return int(t.n_bytes) if bytes_per_element is None else int(t.n_elements * bytes_per_element)

        for t in reader.tensors:
            if t.name.startswith("blk."):
                layer[int(t.name.split(".")[1])] += size(t)
            elif t.name == "token_embd.weight":
                embed = size(t)
            elif t.name in ("output.weight", "output_norm.weight"):
                head += size(t)
                norm += size(t) if t.name == "output_norm.weight" else 0
            # others (llama3's rope_freqs, LongRoPE's rope_factors_*) are read into the spec, not held
        if spec.tie_word_embeddings:
            head += embed
        return cls(tuple(layer), embed, head, norm)

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
        embed = head = norm = 0
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
                norm += 4 * n
        if spec.tie_word_embeddings:
            head += embed
        return cls(tuple(layer), embed, head, norm)

    @classmethod
    def from_model(cls, path: str, spec: ModelSpec, quantization: str = "none", group_size: int = 32,
                   dtype: str = "float32") -> "ModelSizes":
        """`from_gguf` for a GGUF file (packed bytes as stored), `from_safetensors` for a
        checkpoint directory."""
        from shardline.model_file import is_safetensors_checkpoint

        if is_safetensors_checkpoint(path):
            return cls.from_safetensors(path, spec, quantization, group_size, dtype)
        return cls.from_gguf(path, spec)


KV_DTYPE_BYTES = {"float16": 2, "float32": 4}  # workers.kv_cache_dtype -> bytes per element


def kv_bytes_per_block(spec: ModelSpec, num_layers: int, block_size: int, tp_size: int, dtype_bytes: int = 2) -> int:
    """Bytes of one KV block (K and V of `block_size` tokens) on one rank holding `num_layers`
    layers and 1/tp_size of the KV heads; dtype_bytes 2 for a float16 cache, 4 for float32."""
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
    if (tp_size - 1) * -(-spec.vocab_size // tp_size) >= spec.vocab_size:
        raise PlanError(f"tensor_parallel={tp_size} leaves a TP rank no rows of the vocab_size={spec.vocab_size} "
                        f"embedding (ceil(vocab / tp) rows per rank)")


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


def vocab_share(nbytes: int, vocab_size: int, tp_size: int) -> int:
    """Bytes of one TP rank's vocabulary slice of a [vocab, hidden] tensor of `nbytes`: the
    largest slice, ceil(vocab / tp) rows (shardline.shard.vocab_range), rounded up."""
    per = -(-vocab_size // tp_size)
    return -(-nbytes * per // vocab_size)


def embed_share(spec: ModelSpec, sizes: ModelSizes, tp_size: int) -> int:
    """Bytes of the token embedding one TP rank of the first stage holds (vocabulary-parallel)."""
    return vocab_share(sizes.embed_bytes, spec.vocab_size, tp_size)


def head_share(spec: ModelSpec, sizes: ModelSizes, tp_size: int) -> int:
    """Bytes of the head one TP rank of the last stage holds: its vocabulary slice of the lm_head
    plus the whole final norm."""
    lm_head = sizes.lm_head_bytes(spec)
    return sizes.head_bytes - lm_head + vocab_share(lm_head, spec.vocab_size, tp_size)


def stage_weight_bytes(spec: ModelSpec, sizes: ModelSizes, stage: int, pp_size: int, layer_start: int,
                       layer_end: int, tp_size: int) -> int:
    """Bytes of the weights one TP rank of `stage` holds: 1/tp of each of its layers, plus its
    vocabulary slice (ceil(vocab / tp) rows) of the embedding on the first stage and of the
    lm_head on the last, with the whole final norm (with one stage and tied embeddings the head
    is the embedding, counted once)."""
    w = sum(sizes.layer_bytes[layer_start:layer_end]) // tp_size
    embed = embed_share(spec, sizes, tp_size)
    if stage == 0:
        w += embed
    if stage == pp_size - 1:  # lm_head + final norm; a tied lm_head on stage 0 is the embedding
        w += head_share(spec, sizes, tp_size) - (embed if stage == 0 and spec.tie_word_embeddings else 0)
    return w


@dataclass(frozen=True)
class CostModel:
    """Estimated seconds of one decode step of a pipeline stage (the planner's objective).

    A decode step is memory-bound: each weight a rank holds is read once per step, and every layer
    adds a fixed cost (Python, kernel calls, attention). A TP rank reads 1/tp of each layer and its
    vocabulary slice of the lm_head (`head_bytes` is that rank's share), and waits for two
    all-reduces per layer, plus one more on the first stage (the vocabulary-parallel embedding)
    and one on the last (the logits' all-gather), `extra_collectives`, each costed as one
    all-reduce:

        stage_s = ((layer_bytes / tp + head_bytes) / bytes_per_s + num_layers * layer_overhead_s) / speed
                  + (num_layers * 2 + extra_collectives) * all_reduce_s * (tp - 1)

    `speed` is the slowest rank's declared relative speed (the TP ranks run in lock step). The
    embedding's row gather costs nothing here. Only ratios matter to the planner: it minimizes
    the slowest stage, which bounds pipelined throughput.
    """

    bytes_per_s: float
    layer_overhead_s: float
    all_reduce_s: float  # one all-reduce of a decode step's activations, per rank beyond the first

    @classmethod
    def for_device(cls, device: str) -> "CostModel":
        return COST_MODELS.get(device, COST_MODELS["cpu"])

    def stage_s(self, layer_bytes: int, num_layers: int, head_bytes: int, tp_size: int, speed: float,
                extra_collectives: int = 0) -> float:
        compute = (layer_bytes / tp_size + head_bytes) / self.bytes_per_s + num_layers * self.layer_overhead_s
        return compute / speed + (num_layers * 2 + extra_collectives) * self.all_reduce_s * (tp_size - 1)


# CPU: measured on the 2-core development machine, one thread per worker, SmolLM2 Q4_1: the Q8_0
# lm_head (30 MB) takes 2.2 ms per decode token (13.7 GB/s), a 2.2 MB layer 0.48 ms (so ~0.32 ms of
# fixed cost); shardline/worker/comm.py's point-to-point all-reduce of [1, 576] inside a serving TP=3 stage
# ~1.2 ms (70 ms per step over 60 all-reduces, bench/parallel.py; 0.7-0.9 ms alone).
# CUDA: estimates (HBM ~2 TB/s effective, ~0.1 ms of launches per layer, NCCL all-reduce ~20 us).
COST_MODELS = {
    "cpu": CostModel(bytes_per_s=13.7e9, layer_overhead_s=3.2e-4, all_reduce_s=6e-4),
    "cuda": CostModel(bytes_per_s=2e12, layer_overhead_s=1e-4, all_reduce_s=2e-5),
}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_total_memory(spec: ModelSpec, sizes: ModelSizes, workers: list[WorkerOffer], pp_size: int, tp_size: int,
                       block_size: int, min_kv_blocks: int, kv_dtype_bytes: int = 2) -> None:
    """Raises PlanError when all the workers together offer less than the model needs: every
    layer once, each TP rank's vocabulary slice of the embedding and the head (once in all, up to
    the padding of the last slice) with a copy of the final norm per rank, and `min_kv_blocks`
    KV blocks for every layer ("model needs 9.10 GiB, workers offer 8.00 GiB (...)")."""
    embed = embed_share(spec, sizes, tp_size)
    per_rank = embed + head_share(spec, sizes, tp_size) - (embed if pp_size == 1 and spec.tie_word_embeddings else 0)
    weights = sum(sizes.layer_bytes) + tp_size * per_rank
    kv = min_kv_blocks * kv_bytes_per_block(spec, spec.num_layers, block_size, 1, kv_dtype_bytes)
    offered = sum(w.memory_bytes for w in workers)
    if weights + kv > offered:
        copies = f" with the embedding and head split over {tp_size} TP ranks" if tp_size > 1 else ""
        raise PlanError(f"model needs {_gib(weights + kv)}, workers offer {_gib(offered)} (weights "
                        f"{_gib(weights)}{copies}, KV cache of {min_kv_blocks} blocks {_gib(kv)})")


class _Stages:
    """Per (stage, layer range): weight bytes, estimated step time and the KV blocks that fit on
    each rank of the stage's TP group; memoized, for the split search."""

    def __init__(self, spec, sizes, groups, tp_size, block_size, kv_cache_bytes, need_blocks, cost, kv_dtype_bytes=2):
        self.kv_dtype_bytes = kv_dtype_bytes
        self.spec, self.sizes, self.groups, self.tp = spec, sizes, groups, tp_size
        self.block_size, self.kv_cache_bytes, self.need_blocks, self.cost = block_size, kv_cache_bytes, need_blocks, cost
        self.pp = len(groups)
        self._memo: dict = {}

    def weight_bytes(self, s: int, l0: int, l1: int) -> int:
        return stage_weight_bytes(self.spec, self.sizes, s, self.pp, l0, l1, self.tp)

    def per_block(self, l0: int, l1: int) -> int:
        return kv_bytes_per_block(self.spec, l1 - l0, self.block_size, self.tp, self.kv_dtype_bytes)

    def time_s(self, s: int, l0: int, l1: int) -> float:
        last = s == self.pp - 1
        head = head_share(self.spec, self.sizes, self.tp) if last else 0
        speed = min(w.speed for w in self.groups[s])
        return self.cost.stage_s(sum(self.sizes.layer_bytes[l0:l1]), l1 - l0, head, self.tp, speed,
                                 extra_collectives=int(s == 0) + int(last))

    def blocks_fit(self, s: int, l0: int, l1: int) -> list[int]:
        """KV blocks each rank can hold beside its weights (capped by kv_cache_bytes); negative
        when even the weights do not fit."""
        w, per = self.weight_bytes(s, l0, l1), self.per_block(l0, l1)
        room = [g.memory_bytes - w for g in self.groups[s]]
        return [r // per if self.kv_cache_bytes is None or r < 0 else min(r, self.kv_cache_bytes) // per
                for r in room]

    def overflow(self, s: int, l0: int, l1: int) -> int:
        """Bytes by which the worst rank of the stage misses weights + need_blocks KV blocks."""
        need = self.weight_bytes(s, l0, l1) + self.need_blocks * self.per_block(l0, l1)
        return max(need - g.memory_bytes for g in self.groups[s])

    def fits(self, s: int, l0: int, l1: int) -> bool:
        key = (s, l0, l1)
        if key not in self._memo:
            self._memo[key] = self.overflow(s, l0, l1) <= 0
        return self._memo[key]


def _min_max_split(num_layers: int, pp: int, cost) -> tuple[float, list[tuple[int, int]]]:
    """Contiguous split of `num_layers` layers into `pp` non-empty ranges minimizing
    max_s cost(s, l0, l1) (None = not allowed). Dynamic programming over (stage, boundary):
    best[s][l] = min over l0 of max(best[s-1][l0], cost(s-1, l0, l)); O(pp * num_layers^2)."""
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(pp + 1)]
    arg = [[-1] * (num_layers + 1) for _ in range(pp + 1)]
    best[0][0] = -inf  # the neutral element of max (costs may be negative: -blocks, overflow)
    for s in range(pp):
        for l1 in range(s + 1, num_layers - (pp - s - 1) + 1):
            for l0 in range(s, l1):
                if best[s][l0] == inf:
                    continue
                c = cost(s, l0, l1)
                if c is None:
                    continue
                v = max(best[s][l0], c)
                if v < best[s + 1][l1]:
                    best[s + 1][l1], arg[s + 1][l1] = v, l0
    if best[pp][num_layers] == inf:
        return inf, []
    bounds, l = [num_layers], num_layers
    for s in range(pp, 0, -1):
        l = arg[s][l]
        bounds.append(l)
    bounds.reverse()
    return best[pp][num_layers], [(bounds[i], bounds[i + 1]) for i in range(pp)]


def balanced_split(st: _Stages, num_layers: int) -> list[tuple[int, int]]:
    """Layer ranges that fit every rank (weights + the minimal KV pool) and make the slowest
    stage as fast as possible (`CostModel`); among those, the ranges with the largest KV pool.

    Two passes of `_min_max_split`: first the least bottleneck time T over feasible splits, then
    (as a min-max of -blocks) the most KV blocks among splits whose every stage takes <= T.

    Raises:
        PlanError: no split fits; names the worker that misses most in the split that misses
            least, with the bytes it needs and offers.
    """
    pp = st.pp
    t_best, ranges = _min_max_split(num_layers, pp, lambda s, a, b: st.time_s(s, a, b) if st.fits(s, a, b) else None)
    if not ranges:
        _, worst = _min_max_split(num_layers, pp, st.overflow)
        _raise_does_not_fit(st, worst)
    limit = t_best * (1 + 1e-9)
    _, ranges = _min_max_split(num_layers, pp, lambda s, a, b: -min(st.blocks_fit(s, a, b))
                               if st.fits(s, a, b) and st.time_s(s, a, b) <= limit else None)
    return ranges


def _raise_does_not_fit(st: _Stages, ranges: list[tuple[int, int]]) -> None:
    for s, (l0, l1) in enumerate(ranges):
        need = st.weight_bytes(s, l0, l1) + st.need_blocks * st.per_block(l0, l1)
        for w in st.groups[s]:
            if need > w.memory_bytes:
                raise PlanError(f"worker {w.worker_id} (stage {s}, layers {l0}-{l1 - 1}) needs {need / 2**30:.2f} GiB "
                                f"for weights and a minimal KV cache, offers {w.memory_bytes / 2**30:.2f} GiB")


def parallel_layouts(spec: ModelSpec, num_workers: int, pp_size: int | None = None,
                     tp_size: int | None = None) -> list[tuple[int, int]]:
    """(pp_size, tp_size) pairs with pp * tp == num_workers that the model allows
    (`check_parallel`), keeping whichever of the two is fixed.

    Raises:
        PlanError: a fixed size does not divide the number of workers, or no layout is allowed
            (the reasons of each are named).
    """
    for name, v in (("tensor_parallel", tp_size), ("pipeline_parallel", pp_size)):
        if v is not None and num_workers % v:
            raise PlanError(f"{name}={v} does not divide the {num_workers} workers")
    tps = [tp_size] if tp_size is not None else [t for t in range(1, num_workers + 1) if num_workers % t == 0]
    if pp_size is not None:
        tps = [num_workers // pp_size]
    ok, why = [], []
    for tp in tps:
        try:
            check_parallel(spec, num_workers // tp, tp)
            ok.append((num_workers // tp, tp))
        except PlanError as exc:
            why.append(str(exc))
    if not ok:
        raise PlanError(f"no layout of {num_workers} workers is allowed: {'; '.join(why)}")
    return ok


def make_plan(spec: ModelSpec, sizes: ModelSizes, workers: list[WorkerOffer], pp_size: int | None,
              tp_size: int | None, block_size: int, layer_split: str = "even", kv_cache_bytes: int | None = None,
              num_kv_blocks: int | None = None, min_kv_blocks: int = 16,
              quant_group_size: int | None = None, cost: CostModel | None = None, kv_dtype_bytes: int = 2) -> Plan:
    """Assign workers to stages and layers, and size the KV pool.

    Workers are taken in the given order: stage-major, TP rank minor. `pp_size` / `tp_size` None:
    the planner tries every layout of the workers the model allows (`parallel_layouts`) and keeps
    the one whose slowest stage is fastest (`CostModel`; ties: fewer TP ranks). `layer_split`:
    "even", "memory" (in proportion to each stage's smallest offer) or "balanced"
    (`balanced_split`). `min_kv_blocks`: KV blocks every worker must hold beside its weights (or
    `num_kv_blocks` when forced). `quant_group_size`: the int8/int4 group size when weights are
    quantized on load (checked by `check_quantization`). `cost`: default
    `CostModel.for_device` of the first worker. `kv_dtype_bytes`: bytes per cached K/V element
    (2: float16, 4: float32).

    Raises:
        PlanError: the split is impossible ("tensor_parallel=2 does not divide num_kv_heads=3"),
            the quantization groups do not tile the shards, the workers together offer too little
            ("model needs 9.10 GiB, workers offer 8.00 GiB"), no layer split fits each worker,
            or `num_kv_blocks` does not fit.
    """
    if layer_split not in ("even", "memory", "balanced"):
        raise PlanError(f"layer_split={layer_split!r}: expected even, memory or balanced")
    cost = cost or CostModel.for_device(workers[0].device if workers else "cpu")
    if pp_size is None or tp_size is None:
        layouts = parallel_layouts(spec, len(workers), pp_size, tp_size)
        plans, why = [], []
        for pp, tp in layouts:
            try:
                plans.append(make_plan(spec, sizes, workers, pp, tp, block_size, layer_split, kv_cache_bytes,
                                       num_kv_blocks, min_kv_blocks, quant_group_size, cost, kv_dtype_bytes))
            except PlanError as exc:
                why.append(f"pipeline_parallel={pp} x tensor_parallel={tp}: {exc}")
        if not plans:
            raise PlanError(why[0] if len(why) == 1 else "no layout fits: " + "; ".join(why))
        return min(plans, key=lambda p: (round(p.est_step_s, 12), p.tp_size))
    check_parallel(spec, pp_size, tp_size)
    if quant_group_size is not None:
        check_quantization(spec, tp_size, quant_group_size)
    if len(workers) != pp_size * tp_size:
        raise PlanError(f"pipeline_parallel={pp_size} x tensor_parallel={tp_size} needs {pp_size * tp_size} "
                        f"workers, {len(workers)} registered")
    check_total_memory(spec, sizes, workers, pp_size, tp_size, block_size, min_kv_blocks, kv_dtype_bytes)
    groups = [workers[s * tp_size:(s + 1) * tp_size] for s in range(pp_size)]
    st = _Stages(spec, sizes, groups, tp_size, block_size, kv_cache_bytes, min_kv_blocks, cost, kv_dtype_bytes)
    if layer_split == "balanced":
        ranges = balanced_split(st, spec.num_layers)
    elif layer_split == "memory":
        ranges = split_layers(spec.num_layers, [min(w.memory_bytes for w in g) for g in groups])
    else:
        ranges = split_layers(spec.num_layers, [1.0] * pp_size)
    _raise_does_not_fit(st, ranges)

    assignments, blocks_fit = [], []
    for stage, (g, (l0, l1)) in enumerate(zip(groups, ranges)):
        w_bytes, per_block, time_s = st.weight_bytes(stage, l0, l1), st.per_block(l0, l1), st.time_s(stage, l0, l1)
        fit = st.blocks_fit(stage, l0, l1)
        blocks_fit.extend(fit)
        for tp_rank, (w, n) in enumerate(zip(g, fit)):
            assignments.append(StageAssignment(w.worker_id, w.host, stage * tp_size + tp_rank, stage, tp_rank,
                                               l0, l1, w_bytes, per_block, w.memory_bytes, w.speed, time_s, n))
    blocks = min(blocks_fit)
    if num_kv_blocks is not None:
        if num_kv_blocks > blocks:
            raise PlanError(f"num_kv_blocks={num_kv_blocks} does not fit: the workers hold at most {blocks}")
        blocks = num_kv_blocks
    return Plan(pp_size, tp_size, int(blocks), block_size, tuple(assignments),
                max(a.est_step_s for a in assignments))


def format_plan(plan: Plan) -> str:
    """The plan as a text table (for `shardline plan` and the coordinator log): worker, host,
    rank, stage, layers, TP rank, weight bytes (MiB), KV blocks and their MiB, declared speed,
    and the planner's estimate of the stage's decode step (ms)."""
    rows = [("worker", "host", "rank", "stage", "layers", "TP rank", "weight bytes", "KV blocks", "KV bytes",
             "speed", "est. step")]
    for a in plan.assignments:
        rows.append((a.worker_id, a.host, str(a.rank), str(a.stage), f"{a.layer_start}-{a.layer_end - 1}",
                     f"{a.tp_rank}/{plan.tp_size}", f"{a.weight_bytes / 2**20:.1f} MiB", str(plan.num_kv_blocks),
                     f"{plan.num_kv_blocks * a.kv_bytes_per_block / 2**20:.1f} MiB", f"{a.speed:g}",
                     f"{a.est_step_s * 1e3:.1f} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def plan_for_config(config, spec: ModelSpec, sizes: ModelSizes, workers: list[WorkerOffer]) -> Plan:
    """`make_plan` with the parallel, scheduler and KV settings of a `shardline.config.ClusterConfig`
    (the coordinator and `shardline plan` call this, so both print the same plan).

    Raises:
        PlanError: as `make_plan`.
    """
    kv_cap = int(config.workers.kv_cache_gb * 2**30) if config.workers.kv_cache_gb else None
    quant = config.quantization_group_size if config.quantization != "none" else None
    return make_plan(spec, sizes, workers, config.pipeline_parallel, config.tensor_parallel,
                     config.scheduler.block_size, config.parallel.layer_split, kv_cap, config.scheduler.num_kv_blocks,
                     quant_group_size=quant, kv_dtype_bytes=KV_DTYPE_BYTES[config.workers.kv_cache_dtype])
