"""Llama-family decoder stage: the layers [layer_start, layer_end) of one pipeline stage.

RMSNorm, rotary position embedding (adjacent-pair rotation, matching GGUF's Q/K row layout),
grouped-query attention over a paged KV cache, SwiGLU MLP, and on the last stage the final norm
and the (tied or untied) lm_head. References: Touvron et al. 2023 (LLaMA), Su et al. 2021
(RoFormer), Ainslie et al. 2023 (GQA), Kwon et al. 2023 (PagedAttention).

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

from shardline.kernels import fused
from shardline.kernels.attention import PagedDecodePlan, cache_array, causal_attention
from shardline.model_file import ModelSpec
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, ShardSpec
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
    import numpy as np
    from shardline.kernels.formats import QuantizedWeight

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    assert all(p.qtype == first.qtype and p.in_features == first.in_features for p in parts)
    cat = lambda arrs: None if arrs[0] is None else np.ascontiguousarray(np.concatenate(arrs, 0))  # noqa: E731
    return QuantizedWeight(first.qtype, (sum(p.out_features for p in parts), first.in_features),
                           cat([p.data for p in parts]), cat([p.scales for p in parts]), cat([p.mins for p in parts]),
                           first.group_size)


def make_linear(
    loader: GGUFShardLoader, names: list[str], rows: list[tuple[int, int]] | None = None,
    cols: tuple[int, int] | None = None, bias: bool = False, quantized: bool = True,
) -> torch.nn.Module:
    """One linear layer from the loader's weights (GGUF names): `names` are fused along the output
    dimension (QKV, gate+up), each cut to its `rows` range (column-parallel shard); or one weight
    cut to input columns `cols` (row-parallel shard). With `quantized` the weight stays packed as
    the loader gives it (GGUF: as in the file; safetensors: as quantized on load) and runs through
    shardline.kernels.dispatch; otherwise it is dequantized to float32.
    """
    if not quantized:
        if cols is not None:
            return DenseLinear(loader.cols(names[0], *cols))
        parts = [loader.rows(n, *r) if rows else loader.dense(n) for n, r in zip(names, rows or [None] * len(names))]
        w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    else:
        from shardline.kernels.dispatch import QuantizedLinear

        if cols is not None:
            w = loader.linear_weight(names[0], cols=cols)
        else:
            w = _concat_rows([loader.linear_weight(n, rows=r) for n, r in zip(names, rows or [None] * len(names))])
    b = None
    if bias:
        bs = [loader.rows(n.replace(".weight", ".bias"), *r) if rows else loader.dense(n.replace(".weight", ".bias"))
              for n, r in zip(names, rows or [None] * len(names))]
        b = torch.cat(bs, 0) if len(bs) > 1 else bs[0]
    if not quantized:
        return DenseLinear(w.contiguous(), b)
    return QuantizedLinear(w, b)


def linear_nbytes(layer: torch.nn.Module) -> int:
    """Bytes a linear layer's weight holds: the packed file bytes, plus the row-interleaved copy
    the CPU kernels build on first use (shardline/kernels/cpu.py), when there is one."""
    if hasattr(layer, "qweight"):
        from shardline.kernels import cpu

        packed = cpu._pack_cache.get(layer.qweight)
        copy = getattr(layer, "weight_bf16", None)
        return (layer.qweight.nbytes + (sum(a.nbytes for a in packed[1:]) if packed else 0)
                + (layer.out_features * layer.in_features * 2 if copy is not None else 0))
    return layer.nbytes


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


class RotaryEmbedding:
    """RoPE on adjacent pairs: (x[2i], x[2i+1]) rotated by pos * theta^(-2i/head_dim), done as a
    complex multiplication of (x[2i] + i x[2i+1]) by exp(i pos theta_i)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [max_pos, head_dim/2]
        # the same factors as float32 [max_pos, head_dim/2] arrays for the fused decode kernel
        self.cos = self.freqs_cis.real.contiguous().numpy()
        self.sin = self.freqs_cis.imag.contiguous().numpy()

    def for_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 1, head_dim // 2] complex64 rotations, computed once per step."""
        return self.freqs_cis[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, num_heads, head_dim] float32 (may be a strided view) -> same shape, contiguous
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * rot).flatten(-2)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, loader: GGUFShardLoader, layer: int, all_reduce):
        super().__init__()
        tp = loader.shard.tp_size
        p = f"blk.{layer}."
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = spec.num_kv_heads // tp
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        self.all_reduce = all_reduce
        self.input_norm = RMSNorm(loader.dense(p + "attn_norm.weight"), spec.rms_norm_eps)
        self.post_attention_norm = RMSNorm(loader.dense(p + "ffn_norm.weight"), spec.rms_norm_eps)
        q_rows = loader.head_rows(p + "attn_q.weight", spec.num_heads)
        kv_rows = loader.head_rows(p + "attn_k.weight", spec.num_kv_heads)
        # column-parallel fused QKV; row-parallel output projection
        self.qkv_proj = make_linear(
            loader, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
            rows=[q_rows, kv_rows, kv_rows], bias=spec.attention_bias,
        )
        self.o_proj = make_linear(loader, [p + "attn_output.weight"], cols=q_rows)
        f = loader.ffn_range()
        self.gate_up_proj = make_linear(loader, [p + "ffn_gate.weight", p + "ffn_up.weight"], rows=[f, f])
        if hasattr(self.gate_up_proj, "row_parts"):
            self.gate_up_proj.row_parts = 2  # its bf16 copy as gate and up blocks, for `swiglu`
        self.down_proj = make_linear(loader, [p + "ffn_down.weight"], cols=f)
        self.ffn_local = f[1] - f[0]
        self.tp_size = tp
        self.eps = spec.rms_norm_eps
        self._fused: dict[int, tuple | None] = {}  # n_tokens -> packed kernel args, or None

    def fused_args(self, n_tokens: int) -> tuple | None:
        """The packed weights for shardline.kernels.fused when every linear of this layer would run the
        packed CPU kernels for `n_tokens` tokens; None otherwise (other formats, bias, the
        torch GEMM path). Cached per n_tokens."""
        if n_tokens not in self._fused:
            from shardline.kernels.dispatch import QuantizedLinear

            mods = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
            args = [m.packed_kernel_args(n_tokens) if isinstance(m, QuantizedLinear) else None for m in mods]
            self._fused[n_tokens] = None if any(a is None for a in args) else (
                self.input_norm.weight.numpy(), self.post_attention_norm.weight.numpy(), *args)
        return self._fused[n_tokens]

    def fused_decode(self, x: torch.Tensor, step, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The layer through shardline.kernels.fused (one compiled call; two with TP, around the
        all-reduces) for a pure decode step on the CPU. x: float32 [T, hidden] contiguous, updated
        in place and returned; None when the fused kernel does not apply (caller runs forward)."""
        args = self.fused_args(x.shape[0])
        if args is None:
            return None
        attn_norm, ffn_norm, (qf, qq, qd, qm), (of, oq, od, om), (gf, gq, gd, gm), (df, dq, dd, dm) = args
        xn = x.numpy()
        eps = np.float32(self.eps)
        k_cache, v_cache = cache_array(kv[0]), cache_array(kv[1])
        positions, slots, tables, lens, block_size, cos, sin, nchunk = step
        scale = np.float32(1.0 / math.sqrt(self.head_dim))
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
            out[r0:r1] = causal_attention(q[r0:r1], kk, vv)
        if meta.decode_rows is not None:
            if meta.decode_rows_all:  # a pure decode step: rows 0..T-1 in order
                out = meta.decode_plan.run(q, k_cache, v_cache)
            else:
                out[meta.decode_rows] = meta.decode_plan.run(q[meta.decode_rows], k_cache, v_cache)
        return out

    def takes_bf16_path(self, x: torch.Tensor) -> bool:
        """Whether `forward_bf16` runs this layer for x: CPU float32 [T, hidden] contiguous,
        no tensor parallelism, no biases, and every linear would multiply its bf16 copy for T
        tokens (cluster.yaml `workers.gemm_weights: bf16`, T >= 8)."""
        from shardline.kernels.dispatch import QuantizedLinear

        if self.tp_size != 1 or x.is_cuda or x.dtype != torch.float32 or not x.is_contiguous():
            return False
        n = x.shape[0]
        mods = (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)
        return all(isinstance(m, QuantizedLinear) and m.bias is None and m.takes_bf16_copy(n) for m in mods) and \
            len(self.gate_up_proj.weight_bf16) == 2

    def forward_bf16(self, x, meta: AttentionMetadata, kv, rot: torch.Tensor | None, step: tuple | None = None):
        """`forward` with the activations between the GEMMs kept in bfloat16 (the bf16 copies'
        GEMMs take and return bfloat16): the RMSNorms write bfloat16 (shardline.kernels.fused._rms_norm),
        the decode RoPE/cache/attention kernel reads the QKV GEMM's bfloat16 output and writes
        the output projection's bfloat16 input, and the residual adds widen the projections'
        outputs (shardline.kernels.fused.add_rms_norm, add_to). The same numbers as `forward` bit for bit
        (it rounds and widens at the same points, through torch's conversions), with 8 fewer
        torch calls a layer.
        x: float32 [T, hidden] contiguous, updated in place and returned. Needs
        `takes_bf16_path(x)`."""
        n, hidden = x.shape
        xn = x.numpy()
        eps = np.float32(self.eps)
        h = torch.empty((n, hidden), dtype=torch.bfloat16)
        fused._rms_norm(xn, self.input_norm.weight.numpy(), eps, _bits(h))
        qkv = self.qkv_proj.bf16_linear(h)  # bfloat16 [T, q_size + 2 * kv_size]
        if step is not None:
            positions, slots, tables, lens, block_size, cos, sin, _ = step
            attn = torch.empty((n, self.q_size), dtype=torch.bfloat16)
            fused.rope_cache_attention(
                _bits(qkv), cos, sin, positions, slots, cache_array(kv[0]), cache_array(kv[1]), tables, lens,
                block_size, self.num_heads, np.float32(1.0 / math.sqrt(self.head_dim)),
                n >= 2 * numba.get_num_threads(), _bits(attn))
        else:
            attn = self._attention_torch(qkv.float(), meta, kv, rot).bfloat16()
        fused.add_rms_norm(xn, _bits(self.o_proj.bf16_linear(attn)), self.post_attention_norm.weight.numpy(), eps,
                           _bits(h))
        fused.add_to(xn, _bits(self.down_proj.bf16_linear(self.gate_up_proj.swiglu(h))))
        return x

    def _attention_torch(self, qkv: torch.Tensor, meta: AttentionMetadata, kv, rot: torch.Tensor) -> torch.Tensor:
        """RoPE (torch, complex multiply), cache write and attention of a step from the fused
        QKV projection: qkv float32 [T, q_size + 2 * kv_size] -> float32 [T, q_size]."""
        qk = RotaryEmbedding.apply(qkv[:, : self.q_size + self.kv_size].unflatten(-1, (-1, self.head_dim)), rot)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].unflatten(-1, (self.num_kv_heads, self.head_dim))
        return self.attention(q, k, v, meta, kv).flatten(1)

    def forward(self, x, meta: AttentionMetadata, kv, rot: torch.Tensor | None, step: tuple | None = None):
        # x: [T, hidden]; rot: [T, 1, head_dim/2] complex64 rotary factors of the step (None with `step`);
        # step: StageModel._fused_step's arguments on a pure CPU decode step (RoPE, cache write and
        # attention then run as one compiled call between the torch GEMMs)
        h = self.input_norm(x)
        qkv = self.qkv_proj(h)  # [T, q_size + 2 * kv_size]
        if step is not None and qkv.dtype == torch.float32:
            positions, slots, tables, lens, block_size, cos, sin, _ = step
            attn = torch.empty((x.shape[0], self.q_size), dtype=torch.float32)
            fused.rope_cache_attention(
                qkv.contiguous().numpy(), cos, sin, positions, slots, cache_array(kv[0]), cache_array(kv[1]),
                tables, lens, block_size, self.num_heads, np.float32(1.0 / math.sqrt(self.head_dim)),
                x.shape[0] >= 2 * numba.get_num_threads(), attn.numpy())
        else:
            attn = self._attention_torch(qkv, meta, kv, rot)
        x = x + self.all_reduce(self.o_proj(attn))
        h = self.post_attention_norm(x)
        act = self.gate_up_proj.swiglu(h) if hasattr(self.gate_up_proj, "swiglu") else None
        if act is None:
            gate, up = self.gate_up_proj(h).split([self.ffn_local, self.ffn_local], dim=-1)
            act = F.silu(gate) * up
        return x + self.all_reduce(self.down_proj(act))


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
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta, max_positions)
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

    def _fused_step(self, x: torch.Tensor, meta: AttentionMetadata) -> tuple | None:
        """The per-step arguments of the fused decode layers (shardline/kernels/fused.py), or None when the
        step is not a pure decode step of float32 activations on the CPU (or fusing is off)."""
        if not (self.fused_decode and meta.decode_rows_all and x.dtype == torch.float32 and not x.is_cuda):
            return None
        plan = meta.decode_plan
        tables, lens = plan._np
        threads = numba.get_num_threads()
        return (meta.positions.numpy(), meta.slot_mapping.numpy(), tables, lens, plan.block_size,
                self.rope.cos, self.rope.sin, 4 * threads if threads > 1 else 1)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        if self.shard.is_first:
            x = self.embed_tokens(x)  # x: [T] int64 -> [T, hidden]
        else:
            x = x.contiguous()  # the fused layers update the residual stream in place
        step = self._fused_step(x, meta)
        rot = None if step is not None else self.rope.for_positions(meta.positions)
        # (the embedding's rows are a new tensor, so the first stage may update them in place too)
        bf16_path = self.bf16_path and len(self.layers) > 0 and self.layers[0].takes_bf16_path(x)
        for i, layer in enumerate(self.layers):
            kv = kv_cache.layer(i)
            y = None if step is None else layer.fused_decode(x, step, kv)
            if y is None and bf16_path:  # bf16 GEMMs, bfloat16 activations between them
                y = layer.forward_bf16(x, meta, kv, rot, step)
            elif y is None:  # torch GEMMs (with the RoPE/cache/attention kernel on a decode step)
                y = layer(x, meta, kv, rot, step)
            x = y
        if not self.shard.is_last:
            return x
        return self.lm_head(self.norm(x[meta.sample_rows]))
