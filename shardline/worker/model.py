"""Dense decoder stage: the layers [layer_start, layer_end) of one pipeline stage, for every
family in shardline/architectures.py through one forward pass.

The Llama layer: RMSNorm, rotary position embedding (adjacent-pair rotation, shardline/worker/
rope.py), grouped-query attention over a paged KV cache, SwiGLU MLP, and on the last stage the
final norm and the (tied or untied) lm_head. References: Touvron et al. 2023 (LLaMA), Su et al.
2021 (RoFormer), Ainslie et al. 2023 (GQA), Kwon et al. 2023 (PagedAttention).

The other families switch options of the same layer (shardline/architectures.py), each where
transformers' modeling file puts it:

    qkv bias (Qwen2)            biases of the fused QKV projection
    q/k norm (Qwen3, Gemma 3)   RMSNorm over each head of q and k, after the projection, before RoPE
    (1 + w) norms (Gemma)       folded into the weights at load (GGUF stores them so)
    post-norms (Gemma 2/3)      x + norm(attn(x)), then x + norm(mlp(x)): four norms a layer
    embedding scale (Gemma)     embeddings times sqrt(hidden_size)
    GeGLU (Gemma)               down(gelu_tanh(gate) * up) instead of SwiGLU
    soft-capping (Gemma 2)      cap * tanh(s / cap) of the attention scores and of the logits
    query scale (Gemma)         query_pre_attn_scalar^-1/2 instead of head_dim^-1/2
    sliding window              a layer attends to the last `sliding_window` positions only
    two RoPE bases (Gemma 3)    the sliding layers use their own (plain) RoPE
    fused qkv, gate+up (Phi-3)  read part by part by the loaders: the layer sees separate tensors
    partial rotary, LongRoPE... the RoPE tables (rope.py)

Fast paths and the general path. The compiled CPU kernels (shardline/kernels/fused.py: the whole
decode layer, or RoPE + cache + paged attention between torch GEMMs; the causal prefill kernel
and the paged decode kernel of shardline/kernels/attention.py) compute plain softmax attention
over a sequence's whole context. A layer uses them when that is its attention for the step: no
soft-capping, and no sliding window shorter than the step's longest context (a window covering
the whole context changes nothing). The whole-layer decode kernel and the bfloat16 activation
path also need the Llama layer shape (no post-norms, SwiGLU; the bf16 path takes q/k norms).
Otherwise the layer runs torch GEMMs and `masked_attention` / `paged_attention` below.

Sliding windows and the KV cache: a sliding layer keeps every position's K and V in the pool
like the others and reads only its window through the full block table, so the worker needs
nothing from the coordinator beyond today's plan. A block id names the same slots in every
layer, so a block leaves the pool only when no layer reads it: for a model whose layers all
slide (Mistral with a window, Phi-3) the blocks wholly before a sequence's window could be
freed by the block manager; with global layers beside (Gemma 2/3) only per-layer-group block
tables (vLLM's hybrid KV cache manager) would free the sliding layers' share.

Activations inside a step are packed: all scheduled sequences' new tokens are concatenated into
one `[num_tokens, hidden]` tensor; `AttentionMetadata` says which rows belong to which sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from shardline.architectures import architecture
from shardline.kernels import fused
from shardline.kernels.attention import PagedDecodePlan, cache_array, causal_attention
from shardline.model_file import ModelSpec, RopeScaling
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, ShardSpec, rope_row_order
from shardline.worker.rope import RotaryEmbedding
from shardline.worker.vocab_parallel import VocabParallelEmbedding, VocabParallelLMHead


# ---- linear layers --------------------------------------------------------------------------
class DenseLinear(torch.nn.Module):
    """y = x @ W.T (+ b) with W float32 [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _concat_rows(parts):
    """Fuse packed weights along the output dimension (same qtype and in_features)."""
    from shardline.kernels.formats import QuantizedWeight

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    assert all(p.qtype == first.qtype and p.in_features == first.in_features for p in parts)
    cat = lambda arrs: None if arrs[0] is None else np.ascontiguousarray(np.concatenate(arrs, 0))  # noqa: E731
    return QuantizedWeight(first.qtype, (sum(p.out_features for p in parts), first.in_features),
                           cat([p.data for p in parts]), cat([p.scales for p in parts]), cat([p.mins for p in parts]),
                           first.group_size)


def _take_rows(w, order: np.ndarray | None):
    """Rows `order` of a packed weight (QuantizedWeight: each row is its own run of blocks) or of
    a float tensor (a weight or a bias); `w` itself when order is None."""
    if order is None:
        return w
    if isinstance(w, torch.Tensor):
        return w[torch.from_numpy(order)].contiguous()
    from shardline.kernels.formats import QuantizedWeight

    pick = lambda a: None if a is None else np.ascontiguousarray(a[order])  # noqa: E731
    return QuantizedWeight(w.qtype, w.shape, pick(w.data), pick(w.scales), pick(w.mins), w.group_size)


def make_linear(
    loader: GGUFShardLoader, names: list[str], rows: list[tuple[int, int]] | None = None,
    cols: tuple[int, int] | None = None, bias: bool = False, quantized: bool = True,
    row_orders: list[np.ndarray | None] | None = None,
) -> torch.nn.Module:
    """One linear layer from the loader's weights (GGUF names): `names` are fused along the output
    dimension (QKV, gate+up), each cut to its `rows` range (column-parallel shard) and its rows
    (and bias) put in `row_orders` order (Q/K into the adjacent-pair RoPE order; None: as
    read); or one weight cut to input columns `cols` (row-parallel shard). With `quantized` the
    weight stays packed as the loader gives it (GGUF: as in the file; safetensors: as quantized
    on load) and runs through shardline.kernels.dispatch; otherwise it is dequantized to float32.
    """
    orders = row_orders or [None] * len(names)
    if not quantized:
        if cols is not None:
            return DenseLinear(loader.cols(names[0], *cols))
        parts = [_take_rows(loader.rows(n, *r) if rows else loader.dense(n), o)
                 for n, r, o in zip(names, rows or [None] * len(names), orders)]
        w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    else:
        from shardline.kernels.dispatch import QuantizedLinear

        if cols is not None:
            w = loader.linear_weight(names[0], cols=cols)
        else:
            w = _concat_rows([_take_rows(loader.linear_weight(n, rows=r), o)
                              for n, r, o in zip(names, rows or [None] * len(names), orders)])
    b = None
    if bias:
        bs = [_take_rows(loader.rows(n.replace(".weight", ".bias"), *r) if rows
                         else loader.dense(n.replace(".weight", ".bias")), o)
              for n, r, o in zip(names, rows or [None] * len(names), orders)]
        b = torch.cat(bs, 0) if len(bs) > 1 else bs[0]
    if not quantized:
        return DenseLinear(w.contiguous(), b)
    return QuantizedLinear(w, b)


def linear_nbytes(layer: torch.nn.Module) -> int:
    """Bytes a linear layer's weight holds: the packed file bytes, plus the row-interleaved copy
    the CPU kernels build on first use (shardline/kernels/cpu.py), when there is one; and its
    float32 bias (Qwen2's q/k/v), as the planner counts it."""
    bias = 0 if layer.bias is None else layer.bias.numel() * 4
    if hasattr(layer, "qweight"):
        from shardline.kernels import cpu

        packed = cpu._pack_cache.get(layer.qweight)
        copy = getattr(layer, "weight_bf16", None)
        return (layer.qweight.nbytes + (sum(a.nbytes for a in packed[1:]) if packed else 0)
                + (layer.out_features * layer.in_features * 2 if copy is not None else 0)) + bias
    return layer.nbytes + bias


# ---- step metadata ----------------------------------------------------------------------
@dataclass
class AttentionMetadata:
    """Where each token of a step goes in the KV cache and what it attends to.

    positions:     [num_tokens] int64, position of each token in its sequence
    slot_mapping:  [num_tokens] int64, flat KV slot (block * block_size + offset) of each token
    prefills:      per sequence with more than one new token: (row_start, row_end, context_slots)
                   with context_slots [context_len] int64 (the slots of positions 0..context_len)
    decode_rows:   [num_decode] int64 rows of single-token sequences, or None
    decode_block_tables: [num_decode, max_blocks] int32 block tables of those sequences (padded 0)
    decode_context_lens: [num_decode] int32 tokens each decode attends to (its position + 1)
    sample_rows:   [num_sampled] int64 rows whose hidden state feeds the lm_head
    block_size:    tokens per KV block
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    prefills: list[tuple[int, int, torch.Tensor]]
    decode_rows: torch.Tensor | None
    decode_block_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    sample_rows: torch.Tensor
    block_size: int

    def __post_init__(self):
        self.decode_plan = None if self.decode_rows is None else PagedDecodePlan(
            self.decode_block_tables, self.decode_context_lens, self.block_size)
        self.decode_rows_all = self.decode_rows is not None and len(self.decode_rows) == self.num_tokens
        # the longest context a decode row / any token of the step attends to (sliding windows
        # shorter than it bite)
        self.max_decode_context_len = 0 if self.decode_rows is None else int(self.decode_context_lens.max())
        self.max_context_len = max([int(ctx.shape[0]) for _, _, ctx in self.prefills] + [self.max_decode_context_len])

    def seq_lens(self) -> torch.Tensor:
        """[num_tokens] int64: the length of each token's sequence at the end of the step (a decode
        token's position + 1; every token of a prompt chunk: the chunk's end)."""
        out = self.positions + 1
        for r0, r1, ctx in self.prefills:
            out[r0:r1] = ctx.shape[0]
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def build_attention_metadata(
    entries: list[tuple[int, int, list[int], bool]], block_size: int
) -> AttentionMetadata:
    """entries: per scheduled sequence (start position, num_new_tokens, block_table, sample)."""
    positions, slots, prefills, sample_rows = [], [], [], []
    dec_rows, dec_tables, dec_lens = [], [], []
    dec_pos, dec_slots = [], []  # a run of decode rows, made into one tensor (not one per row)
    row = 0
    for start, n, table, sample in entries:
        end = start + n
        if n == 1:
            dec_pos.append(start)
            dec_slots.append(table[start // block_size] * block_size + start % block_size)
            dec_rows.append(row)
            dec_tables.append(table)
            dec_lens.append(end)
        else:
            if dec_pos:
                positions.append(torch.tensor(dec_pos, dtype=torch.int64))
                slots.append(torch.tensor(dec_slots, dtype=torch.int64))
                dec_pos, dec_slots = [], []
            table_t = torch.tensor(table, dtype=torch.int64)
            ctx_pos = torch.arange(end, dtype=torch.int64)
            ctx_slots = table_t[ctx_pos // block_size] * block_size + ctx_pos % block_size
            positions.append(ctx_pos[start:end])
            slots.append(ctx_slots[start:end])
            prefills.append((row, row + n, ctx_slots))
        if sample:
            sample_rows.append(row + n - 1)
        row += n
    if dec_pos:
        positions.append(torch.tensor(dec_pos, dtype=torch.int64))
        slots.append(torch.tensor(dec_slots, dtype=torch.int64))
    decode_rows = decode_tables = decode_lens = None
    if dec_rows:
        width = max(len(t) for t in dec_tables)
        decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int32)
        decode_lens = torch.tensor(dec_lens, dtype=torch.int32)
        decode_rows = torch.tensor(dec_rows, dtype=torch.int64)
    return AttentionMetadata(
        positions=torch.cat(positions),
        slot_mapping=torch.cat(slots),
        prefills=prefills,
        decode_rows=decode_rows,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64),
        block_size=block_size,
    )


# ---- layers -------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous bfloat16 tensor's storage as a NumPy uint16 array of bit patterns (no copy):
    how the Numba kernels read and write bfloat16 (shardline.kernels.attention.load_float32, store_as)."""
    return t.view(torch.uint16).numpy()


class RMSNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and not x.is_cuda and x.is_contiguous():
            # one compiled loop (shardline/kernels/fused.py) instead of torch's ~6 ops, each a pass over x
            out = torch.empty_like(x)
            fused._rms_norm(x.numpy(), self.weight.numpy(), np.float32(self.eps), out.numpy())
            return out
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _grouped_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                               scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(cap(q k^T * scale) masked to `visible`) v, grouped-query, in q's dtype.

    q: [B, n, Hq, D]; k, v: [B, L, Hkv, D]; visible: bool [B, n, L]; returns [B, n, Hq, D].
    cap(s) = softcap * tanh(s / softcap) when softcap is set (Gemma 2's attention logit
    soft-capping, applied after the scale and before the mask, as transformers' eager attention).
    Every query row must see at least one key."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, n, hkv, hq // hkv, d)
    scores = torch.einsum("bnhgd,blhd->bhgnl", qg, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.einsum("bhgnl,blhd->bnhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(b, n, hq, d)


MASKED_QUERY_ROWS = 256  # query rows per pass of `masked_attention` (bounds its [Hq, rows, L] scores)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's chunk with the options the compiled kernel lacks.

    q: float32 [n, Hq, D], the chunk's queries at positions L - n .. L - 1; k, v: [L, Hkv, D],
    the whole context. Query at position i sees key j when j <= i and, with a `window` W,
    i - j < W (transformers' sliding_window_overlay; llama.cpp's is_masked_swa). Returns float32
    [n, Hq, D]. Queries go MASKED_QUERY_ROWS at a time, each block reading only the keys it can
    see."""
    n, length = q.shape[0], k.shape[0]
    out = torch.empty_like(q)
    for r0 in range(0, n, MASKED_QUERY_ROWS):
        r1 = min(n, r0 + MASKED_QUERY_ROWS)
        first, end = length - n + r0, length - n + r1  # query positions [first, end)
        start = max(0, first - window + 1) if window else 0
        q_pos = torch.arange(first, end, device=q.device)
        k_pos = torch.arange(start, end, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        if window:
            visible &= q_pos[:, None] - k_pos[None, :] < window
        out[r0:r1] = _grouped_softmax_attention(q[None, r0:r1], k[None, start:end].to(q.dtype),
                                                v[None, start:end].to(q.dtype), visible[None], scale, softcap)[0]
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, block_size: int, scale: float, softcap: float | None = None,
                    window: int | None = None) -> torch.Tensor:
    """Decode attention of single-token sequences with the options the compiled kernel lacks.

    q: float32 [B, Hq, D]; caches [num_slots, Hkv, D] (float16 or float32); block_tables int
    [B, max_blocks]; context_lens int [B] (position + 1). Each query sees its sequence's last
    min(context_len, window) positions, gathered through the block table. Returns float32
    [B, Hq, D]."""
    lens = context_lens.to(device=q.device, dtype=torch.int64)
    n_keys = lens.clamp(max=window) if window else lens
    idx = torch.arange(int(n_keys.max()), device=q.device)
    visible = idx[None, :] < n_keys[:, None]  # [B, L]
    pos = torch.where(visible, (lens - n_keys)[:, None] + idx[None, :], 0)
    slots = block_tables.to(device=q.device, dtype=torch.int64).gather(1, pos // block_size) * block_size \
        + pos % block_size
    return _grouped_softmax_attention(q[:, None], k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype),
                                      visible[:, None], scale, softcap)[:, 0]


class DecoderLayer(torch.nn.Module):
    """One decoder layer of any family in shardline/architectures.py (see the module doc for the
    options and which paths they take). Modules, with the GGUF tensors they hold: input_norm
    (attn_norm), qkv_proj (attn_q, attn_k, attn_v), q_norm / k_norm (attn_q_norm / attn_k_norm,
    or None), o_proj (attn_output), attn_out_norm (Gemma's post_attention_norm, or None),
    post_attention_norm (ffn_norm: the MLP's input norm, Llama's post_attention_layernorm),
    gate_up_proj (ffn_gate, ffn_up), down_proj (ffn_down), ffn_out_norm (post_ffw_norm, or None)."""

    def __init__(self, spec: ModelSpec, loader: GGUFShardLoader, layer: int, all_reduce):
        super().__init__()
        fam = architecture(spec.architecture)
        tp = loader.shard.tp_size
        p = f"blk.{layer}."
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = spec.num_kv_heads // tp
        self.head_dim = d = spec.head_dim
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        self.all_reduce = all_reduce
        eps = spec.rms_norm_eps

        def norm(name):
            return RMSNorm(loader.dense(f"{p}{name}.weight"), eps)

        self.input_norm = norm("attn_norm")
        self.post_attention_norm = norm("ffn_norm")
        self.attn_out_norm = norm("post_attention_norm") if fam.post_norms else None
        self.ffn_out_norm = norm("post_ffw_norm") if fam.post_norms else None
        # rows of Q/K (and their norms) in the rotate-half order go into the adjacent-pair order
        order = None if loader.rope_rows_adjacent else (lambda n: rope_row_order(n, d, spec.rotary_dim))  # noqa: E731
        self.q_norm = self.k_norm = None
        if fam.qk_norm:
            qn, kn = loader.dense(p + "attn_q_norm.weight"), loader.dense(p + "attn_k_norm.weight")
            if order is not None:
                qn, kn = _take_rows(qn, order(d)), _take_rows(kn, order(d))
            self.q_norm, self.k_norm = RMSNorm(qn, eps), RMSNorm(kn, eps)
        q_rows = loader.head_rows(p + "attn_q.weight", spec.num_heads)
        kv_rows = loader.head_rows(p + "attn_k.weight", spec.num_kv_heads)
        # column-parallel fused QKV; row-parallel output projection
        self.qkv_proj = make_linear(
            loader, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
            rows=[q_rows, kv_rows, kv_rows], bias=spec.attention_bias,
            row_orders=None if order is None else [order(self.q_size), order(self.kv_size), None],
        )
        self.o_proj = make_linear(loader, [p + "attn_output.weight"], cols=q_rows)
        f = loader.ffn_range()
        self.gate_up_proj = make_linear(loader, [p + "ffn_gate.weight", p + "ffn_up.weight"], rows=[f, f])
        if hasattr(self.gate_up_proj, "row_parts"):
            self.gate_up_proj.row_parts = 2  # its bf16 copy as gate and up blocks, for `swiglu`
        self.down_proj = make_linear(loader, [p + "ffn_down.weight"], cols=f)
        self.ffn_local = f[1] - f[0]
        self.tp_size = tp
        self.eps = eps
        self.activation = fam.activation
        self.llama_style = fam.llama_style  # the whole-layer decode kernel's shape
        self.bf16_style = not fam.post_norms and fam.activation == "silu"  # forward_bf16's shape
        self.scale = spec.attention_scale if spec.attention_scale is not None else 1.0 / math.sqrt(d)
        self.softcap = spec.attn_logit_softcapping
        self.window = spec.sliding_window if spec.is_sliding(layer) else None
        # which of StageModel.ropes rotates this layer: 1 for sliding layers with their own base
        self.rope_index = 1 if self.window is not None and spec.sliding_rope_theta is not None else 0
        self._fused: dict[int, tuple | None] = {}  # n_tokens -> packed kernel args, or None

    def kernel_attention(self, meta: AttentionMetadata) -> bool:
        """Whether the compiled attention kernels compute this layer's attention for the step:
        no soft-capping, and no window shorter than the step's longest context."""
        return self.softcap is None and (self.window is None or meta.max_context_len <= self.window)

    def _kernel_exact(self, context_len: int) -> bool:
        return self.softcap is None and (self.window is None or context_len <= self.window)

    def fused_args(self, n_tokens: int) -> tuple | None:
        """The packed weights for shardline.kernels.fused when every linear of this layer would run the
        packed CPU kernels for `n_tokens` tokens; None otherwise (other formats, bias, the
        torch GEMM path, a layer not of Llama's shape). Cached per n_tokens."""
        if n_tokens not in self._fused:
            from shardline.kernels.dispatch import QuantizedLinear

            mods = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
            args = [m.packed_kernel_args(n_tokens) if isinstance(m, QuantizedLinear) else None for m in mods]
            self._fused[n_tokens] = None if not self.llama_style or any(a is None for a in args) else (
                self.input_norm.weight.numpy(), self.post_attention_norm.weight.numpy(), *args)
        return self._fused[n_tokens]

    def fused_decode(self, x: torch.Tensor, step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The layer through shardline.kernels.fused (one compiled call; two with TP, around the
        all-reduces) for a pure decode step on the CPU whose attention the kernels compute
        (`kernel_attention`). x: float32 [T, hidden] contiguous, updated in place and returned;
        None when the fused kernel does not apply (caller runs forward)."""
        args = self.fused_args(x.shape[0])
        if args is None:
            return None
        attn_norm, ffn_norm, (qf, qq, qd, qm), (of, oq, od, om), (gf, gq, gd, gm), (df, dq, dd, dm) = args
        xn = x.numpy()
        eps = np.float32(self.eps)
        k_cache, v_cache = cache_array(kv[0]), cache_array(kv[1])
        positions, slots, tables, lens, block_size, cos, sin, nchunk = step
        scale = np.float32(self.scale)
        if self.tp_size == 1:
            fused.decode_layer(xn, attn_norm, ffn_norm, eps, qf, qq, qd, qm, of, oq, od, om, gf, gq, gd, gm,
                               df, dq, dd, dm, cos, sin, positions, slots, k_cache, v_cache, tables, lens,
                               block_size, self.num_heads, scale, nchunk)
            return x
        o = fused.decode_attention(xn, attn_norm, eps, qf, qq, qd, qm, of, oq, od, om, cos, sin, positions, slots,
                                   k_cache, v_cache, tables, lens, block_size, self.num_heads, scale, nchunk)
        x += self.all_reduce(torch.from_numpy(o))
        d = fused.decode_mlp(xn, ffn_norm, eps, gf, gq, gd, gm, df, dq, dd, dm, nchunk)
        x += self.all_reduce(torch.from_numpy(d))
        return x

    def attention(self, q, k, v, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]):
        # q: [T, Hq, D]; k, v: [T, Hkv, D]; caches: [num_blocks * block_size, Hkv, D] (flat view)
        k_cache, v_cache = kv
        if k_cache.dtype != k.dtype:  # a float16 cache: attend to K/V as stored, rounded, like a decode does
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = torch.empty_like(q)
        for r0, r1, ctx in meta.prefills:
            if r1 - r0 == ctx.shape[0]:  # the whole context is this step's: no gather
                kk, vv = k[r0:r1], v[r0:r1]
            else:  # row i (position L-n+i) sees context positions <= L-n+i, some from the cache
                kk, vv = k_cache[ctx].to(q.dtype), v_cache[ctx].to(q.dtype)
            if self._kernel_exact(ctx.shape[0]):
                out[r0:r1] = causal_attention(q[r0:r1], kk, vv, self.scale)
            else:
                out[r0:r1] = masked_attention(q[r0:r1], kk, vv, self.scale, self.softcap, self.window)
        if meta.decode_rows is not None:
            rows = None if meta.decode_rows_all else meta.decode_rows  # a pure decode step: rows 0..T-1 in order
            qd = q if rows is None else q[rows]
            if self._kernel_exact(meta.max_decode_context_len):
                o = meta.decode_plan.run(qd, k_cache, v_cache, self.scale)
            else:
                o = paged_attention(qd, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                    meta.block_size, self.scale, self.softcap, self.window)
            if rows is None:
                out = o
            else:
                out[rows] = o
        return out

    def takes_bf16_path(self, x: torch.Tensor) -> bool:
        """Whether `forward_bf16` runs this layer for x: a layer of Llama's shape (q/k norms
        allowed), CPU float32 x [T, hidden] contiguous, no tensor parallelism, no biases, and
        every linear would multiply its bf16 copy for T tokens (cluster.yaml
        `workers.gemm_weights: bf16`, T >= 8)."""
        from shardline.kernels.dispatch import QuantizedLinear

        if (not self.bf16_style or self.tp_size != 1 or x.is_cuda or x.dtype != torch.float32
                or not x.is_contiguous()):
            return False
        n = x.shape[0]
        mods = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        return all(isinstance(m, QuantizedLinear) and m.bias is None and m.takes_bf16_copy(n) for m in mods) and \
            len(self.gate_up_proj.weight_bf16) == 2

    def _rope_cache_attention(self, qkv: torch.Tensor, step, kv, out: torch.Tensor) -> None:
        """RoPE, cache write and paged attention of a pure decode step in one compiled call
        (shardline.kernels.fused.rope_cache_attention): qkv float32 or bfloat16 [T, q_size + 2 *
        kv_size] -> out (float32 or bfloat16 [T, q_size])."""
        positions, slots, tables, lens, block_size, cos, sin, _ = step
        arr = lambda t: t.numpy() if t.dtype == torch.float32 else _bits(t)  # noqa: E731
        fused.rope_cache_attention(
            arr(qkv.contiguous()), cos, sin, positions, slots, cache_array(kv[0]), cache_array(kv[1]), tables, lens,
            block_size, self.num_heads, np.float32(self.scale), qkv.shape[0] >= 2 * numba.get_num_threads(), arr(out))

    def forward_bf16(self, x, meta: AttentionMetadata, kv, rot: torch.Tensor | None, step: tuple | None = None):
        """`forward` with the activations between the GEMMs kept in bfloat16 (the bf16 copies'
        GEMMs take and return bfloat16): the RMSNorms write bfloat16 (shardline.kernels.fused._rms_norm),
        the decode RoPE/cache/attention kernel reads the QKV GEMM's bfloat16 output (float32
        after q/k norms) and writes the output projection's bfloat16 input, and the residual adds
        widen the projections' outputs (shardline.kernels.fused.add_rms_norm, add_to). The same
        numbers as `forward` bit for bit (it rounds and widens at the same points, through
        torch's conversions), with 8 fewer torch calls a layer. x: float32 [T, hidden]
        contiguous, updated in place and returned. Needs `takes_bf16_path(x)`."""
        n, hidden = x.shape
        xn = x.numpy()
        eps = np.float32(self.eps)
        h = torch.empty((n, hidden), dtype=torch.bfloat16)
        fused._rms_norm(xn, self.input_norm.weight.numpy(), eps, _bits(h))
        qkv = self.qkv_proj.bf16_linear(h)  # bfloat16 [T, q_size + 2 * kv_size]
        if self.q_norm is not None:
            qkv = self._qk_norm(qkv.float())
        if step is not None:
            attn = torch.empty((n, self.q_size), dtype=torch.bfloat16)
            self._rope_cache_attention(qkv, step, kv, attn)
        else:
            attn = self._attention_torch(qkv.float(), meta, kv, rot).bfloat16()
        fused.add_rms_norm(xn, _bits(self.o_proj.bf16_linear(attn)), self.post_attention_norm.weight.numpy(), eps,
                           _bits(h))
        fused.add_to(xn, _bits(self.down_proj.bf16_linear(self.gate_up_proj.swiglu(h))))
        return x

    def _qk_norm(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv float32 [T, q_size + 2 * kv_size] with RMSNorm applied over each head of q and of k
        (Qwen3, Gemma 3: before RoPE)."""
        t = qkv.shape[0]
        q = self.q_norm(qkv[:, : self.q_size].reshape(t * self.num_heads, self.head_dim))
        k = self.k_norm(qkv[:, self.q_size: self.q_size + self.kv_size].reshape(t * self.num_kv_heads, self.head_dim))
        return torch.cat([q.view(t, self.q_size), k.view(t, self.kv_size), qkv[:, self.q_size + self.kv_size:]], 1)

    def _attention_torch(self, qkv: torch.Tensor, meta: AttentionMetadata, kv, rot: torch.Tensor) -> torch.Tensor:
        """RoPE (torch, complex multiply), cache write and attention of a step from the fused
        QKV projection: qkv float32 [T, q_size + 2 * kv_size] -> float32 [T, q_size]."""
        qk = RotaryEmbedding.apply(qkv[:, : self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim)), rot)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].unflatten(-1, (self.num_kv_heads, self.head_dim))
        return self.attention(q, k, v, meta, kv).flatten(1)

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The gated MLP's activation: silu(gate) * up (SwiGLU) or gelu_tanh(gate) * up (GeGLU),
        [T, ffn_local] (bfloat16 when the bf16 copies' fused SwiGLU ran)."""
        if self.activation == "silu" and hasattr(self.gate_up_proj, "swiglu"):
            act = self.gate_up_proj.swiglu(h)
            if act is not None:
                return act
        gate, up = self.gate_up_proj(h).split([self.ffn_local, self.ffn_local], dim=-1)
        if self.activation == "silu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh") * up

    def forward(self, x, meta: AttentionMetadata, kv, rot: torch.Tensor | None, step: tuple | None = None):
        # x: [T, hidden]; rot: [T, 1, head_dim/2] complex64 rotary factors of the step (None with `step`);
        # step: StageModel._fused_steps' arguments on a pure CPU decode step whose attention the
        # kernels compute (RoPE, cache write and attention then run as one compiled call between
        # the torch GEMMs)
        h = self.input_norm(x)
        qkv = self.qkv_proj(h)  # [T, q_size + 2 * kv_size]
        if self.q_norm is not None:
            qkv = self._qk_norm(qkv)
        if step is not None and qkv.dtype == torch.float32:
            attn = torch.empty((x.shape[0], self.q_size), dtype=torch.float32)
            self._rope_cache_attention(qkv, step, kv, attn)
        else:
            attn = self._attention_torch(qkv, meta, kv, rot)
        o = self.all_reduce(self.o_proj(attn))
        x = x + (o if self.attn_out_norm is None else self.attn_out_norm(o))
        d = self.all_reduce(self.down_proj(self._mlp(self.post_attention_norm(x))))
        return x + (d if self.ffn_out_norm is None else self.ffn_out_norm(d))


class StageModel(torch.nn.Module):
    """The part of the model one worker runs.

    forward(tokens or hidden, meta) -> hidden [num_tokens, hidden] float32 on non-last stages,
    logits [num_sampled, vocab] float32 (rows `meta.sample_rows`) on the last stage.
    """

    def __init__(self, spec: ModelSpec, loader: GGUFShardLoader, max_positions: int, all_reduce=None,
                 all_gather=None):
        """all_reduce: sums [T, n] float32 over the stage's TP group; all_gather: [S, n] ->
        [S, tp_size * n] over it (shardline.worker.comm.StageComm). Both None outside a cluster: the
        layers then return partial sums, and under TP the last stage returns this rank's
        partial logits [S, v1 - v0] (shardline/worker/vocab_parallel.py)."""
        super().__init__()
        self.spec = spec
        self.shard = loader.shard
        s = loader.shard
        # the token embedding and the lm_head are vocabulary-parallel under TP (shardline/worker/vocab_parallel.py)
        vocab = loader.vocab_rows() if s.tp_size > 1 else None
        v0 = vocab[0] if vocab else 0
        self.embed_tokens = None
        if s.is_first:
            self.embed_tokens = VocabParallelEmbedding(loader.linear_weight("token_embd.weight", rows=vocab), v0,
                                                       (all_reduce or (lambda t: t)) if vocab else None)
        all_reduce = all_reduce or (lambda t: t)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(spec, loader, i, all_reduce) for i in range(s.layer_start, s.layer_end)
        )
        # ropes[0] rotates the full-attention layers (and sliding ones without a base of their
        # own); ropes[1] Gemma 3's sliding layers (plain RoPE, their own base): DecoderLayer.rope_index
        self.ropes = [RotaryEmbedding(spec.head_dim, spec.rope_theta, max_positions, spec.rope_scaling,
                                      spec.rotary_dim)]
        if any(layer.rope_index == 1 for layer in self.layers):
            self.ropes.append(RotaryEmbedding(spec.head_dim, spec.sliding_rope_theta, max_positions, RopeScaling(),
                                              spec.rotary_dim))
        self.rope = self.ropes[0]
        fam = architecture(spec.architecture)
        # Gemma multiplies the embeddings by sqrt(hidden_size), in the activations' dtype
        self.embed_scale = np.float32(math.sqrt(spec.hidden_size)) if fam.embedding_scale else None
        self.final_softcap = spec.final_logit_softcapping
        # pure decode steps on the CPU run each layer as one compiled call (shardline/kernels/fused.py)
        self.fused_decode = True
        # layers whose GEMMs take the bf16 copies keep activations in bfloat16 between them
        # (DecoderLayer.forward_bf16); False: DecoderLayer.forward (the same numbers)
        self.bf16_path = True
        self.norm = self.lm_head = None
        if s.is_last:
            self.norm = RMSNorm(loader.dense("output_norm.weight"), spec.rms_norm_eps)
            name = "token_embd.weight" if spec.tie_word_embeddings else "output.weight"
            self.lm_head = VocabParallelLMHead(loader.linear_weight(name, rows=vocab), spec.vocab_size, v0, s.tp_size,
                                               all_gather)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight_bytes(self) -> int:
        """Bytes of the weights this stage holds (packed where kept packed; a tied embedding
        and lm_head share the file's bytes and are counted once)."""
        total = sum(linear_nbytes(m) for m in self.modules() if hasattr(m, "qweight") or isinstance(m, DenseLinear))
        total += sum(m.weight.numel() * 4 for m in self.modules() if isinstance(m, RMSNorm))
        if self.embed_tokens is not None and not (self.lm_head is not None and self.spec.tie_word_embeddings):
            total += self.embed_tokens.nbytes
        return total

    def keep_bf16_copies(self) -> int:
        """Give every quantized linear layer a resident bfloat16 copy for the many-token path
        (shardline.kernels.dispatch.QuantizedLinear.keep_bf16_copy); returns the bytes added."""
        return sum(m.keep_bf16_copy() for m in self.modules() if hasattr(m, "keep_bf16_copy"))

    @torch.inference_mode()
    def warm_up(self, kv_cache: KVCache, block_size: int) -> None:
        """Run a few dummy steps so every kernel path (GEMV, small GEMM, tiled GEMM) is compiled
        before the first request: Numba compiles on first call, which takes seconds on a fresh
        machine. Writes garbage into KV block 0..; the coordinator's block ids overwrite it."""
        num_blocks = kv_cache.num_blocks
        steps = [[(0, min(n, num_blocks * block_size), True)] for n in (1, 4, 96)]
        if num_blocks * block_size >= 48:
            # a mixed step (a prompt chunk beside a decode row) takes the paged decode kernel
            # outside the fused layers, and a decode step of 32 sequences the RoPE/cache/attention
            # kernel between torch GEMMs (bf16 copies from 8 rows, packed weights from their
            # crossover); without these steps each compiled during the first such step of a
            # fresh install, a stall of the whole pipeline
            steps.append([(0, 4, True), (8, 1, True)])
            steps.append([(p, 1, True) for p in range(16, 48)])
        for entries in steps:
            n = max(start + k for start, k, _ in entries)
            table = list(range(-(-n // block_size)))
            meta = build_attention_metadata([(start, k, table, sample) for start, k, sample in entries], block_size)
            rows = sum(k for _, k, _ in entries)
            if self.shard.is_first:
                x = torch.zeros(rows, dtype=torch.int64)
            else:
                x = torch.zeros(rows, self.spec.hidden_size)
            self(x, meta, kv_cache)

    def calibrate(self) -> None:
        """Measure each linear's kernel/GEMM crossover now rather than during the first request."""
        from shardline.kernels.dispatch import calibrate

        seen = set()
        for m in self.modules():
            if hasattr(m, "qweight"):
                key = (m.qweight.qtype, m.qweight.shape)
                if key not in seen:
                    seen.add(key)
                    calibrate(m.qweight)

    def _fused_steps(self, x: torch.Tensor, meta: AttentionMetadata) -> list[tuple] | None:
        """The per-step arguments of the fused decode kernels (shardline/kernels/fused.py), one
        tuple per RoPE table (`ropes`), or None when the step is not a pure decode step of
        float32 activations on the CPU (or fusing is off)."""
        if not (self.fused_decode and meta.decode_rows_all and x.dtype == torch.float32 and not x.is_cuda):
            return None
        plan = meta.decode_plan
        tables, lens = plan._np
        threads = numba.get_num_threads()
        return [(meta.positions.numpy(), meta.slot_mapping.numpy(), tables, lens, plan.block_size,
                 rope.cos, rope.sin, 4 * threads if threads > 1 else 1) for rope in self.ropes]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        if self.shard.is_first:
            x = self.embed_tokens(x)  # x: [T] int64 -> [T, hidden]
            if self.embed_scale is not None:
                x *= self.embed_scale
        else:
            x = x.contiguous()  # the fused layers update the residual stream in place
        steps = self._fused_steps(x, meta)
        # a layer whose attention the kernels cannot compute this step takes the torch path
        exact = [layer.kernel_attention(meta) for layer in self.layers]
        rots = None
        if steps is None or not all(exact):
            seq_lens = meta.seq_lens() if any(r.seq_dependent for r in self.ropes) else None
            rots = [r.for_step(meta.positions, seq_lens) for r in self.ropes]
        # (the embedding's rows are a new tensor, so the first stage may update them in place too)
        bf16_path = self.bf16_path and len(self.layers) > 0 and self.layers[0].takes_bf16_path(x)
        for i, layer in enumerate(self.layers):
            kv = kv_cache.layer(i)
            step = steps[layer.rope_index] if steps is not None and exact[i] else None
            rot = None if rots is None else rots[layer.rope_index]
            y = None if step is None else layer.fused_decode(x, step, kv)
            if y is None and bf16_path:  # bf16 GEMMs, bfloat16 activations between them
                y = layer.forward_bf16(x, meta, kv, rot, step)
            elif y is None:  # torch GEMMs (with the RoPE/cache/attention kernel on a decode step)
                y = layer(x, meta, kv, rot, step)
            x = y
        if not self.shard.is_last:
            return x
        logits = self.lm_head(self.norm(x[meta.sample_rows]))
        if self.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap), after the vocabulary gather
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
