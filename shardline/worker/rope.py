"""Rotary position embedding (Su et al. 2021, RoFormer) and the variants that stretch it past
the pretraining context: linear (position interpolation, Chen et al. 2023), llama3 (Meta's
per-wavelength scaling), YaRN (Peng et al. 2023), dynamic NTK, and LongRoPE (Ding et al. 2024;
Phi-3's short/long factors).

The formulas are those of transformers' modeling_rope_utils.py (`_compute_*_parameters`, and
`dynamic_rope_update` for the variants that depend on the sequence length) and of llama.cpp's
`ggml_rope_cache_init` / `rope_yarn` (GGUF's `rope_freqs` divisors); written here in float64.

Layout. The model rotates adjacent pairs (x[2i], x[2i+1]) of each head by angle pos * f_i,
as the complex product (x[2i] + i x[2i+1]) * a e^(i pos f_i), for the rotary_dim / 2 pairs that
RoPE covers; the pairs past rotary_dim (partial rotary, Phi-3 variants) get the identity
(cos 1, sin 0). `a` is the variant's attention factor (YaRN's mscale, LongRoPE's scale; 1
otherwise); as transformers multiplies cos and sin by it, so are the tables here.

    table [max_positions, head_dim / 2]:  | f_0 .. f_{r/2-1} (rotated) | identity .. (r/2 .. D/2-1) |

Sequence-dependent variants. LongRoPE uses its long factors once a sequence is longer than the
pretraining context, and dynamic NTK grows its base with the sequence length. As transformers
does in a forward pass, the frequencies of a step's new tokens follow the length of their
sequence at the end of the step (`seq_lens`): a decode token at position p sees length p + 1,
so its row of the table is fixed (the fused kernels' cos/sin tables are that row per position);
the tokens of a prompt chunk all take the chunk's end. Keys already in the KV cache keep the
rotation they were written with, as in transformers' cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shardline.model_file import RopeScaling

SEQ_DEPENDENT = ("longrope", "dynamic")


def inv_frequencies(theta: float, rotary_dim: int, scaling: RopeScaling = RopeScaling(),
                    seq_len: int | None = None) -> np.ndarray:
    """float64 [rotary_dim / 2] angular frequencies f_i (radians per position) of `scaling`'s
    variant; `seq_len` is the sequence length the sequence-dependent variants (longrope,
    dynamic) are computed for (None: at most the pretraining context)."""
    r = rotary_dim
    exponent = np.arange(0, r, 2, dtype=np.float64) / r
    base = theta ** exponent  # theta^(2i/r)
    kind = scaling.rope_type
    if kind == "default":
        return 1.0 / base
    if kind == "linear":
        return 1.0 / (scaling.factor * base)
    if kind == "llama3":
        if scaling.freq_factors:  # GGUF: llama.cpp divides each frequency by rope_freqs[i]
            return 1.0 / (base * np.asarray(scaling.freq_factors, dtype=np.float64))
        inv = 1.0 / base
        old, factor = scaling.original_max_position_embeddings, scaling.factor
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)
    if kind == "yarn":
        return _yarn(theta, r, base, scaling)
    if kind == "longrope":
        long = seq_len is not None and seq_len > scaling.original_max_position_embeddings
        ext = np.asarray(scaling.long_factor if long else scaling.short_factor, dtype=np.float64)
        return 1.0 / (ext * base)
    if kind == "dynamic":
        return 1.0 / dynamic_base(theta, r, scaling, seq_len) ** exponent
    raise ValueError(f"unknown rope_type {kind!r}")


def dynamic_base(theta, rotary_dim: int, scaling: RopeScaling, seq_len):
    """Dynamic NTK's base for sequences of `seq_len` tokens (a number or an array):
    theta * (factor * L / L0 - (factor - 1))^(r / (r - 2)) with L = max(seq_len, L0), L0 the
    pretraining context (transformers' _compute_dynamic_ntk_parameters)."""
    l0, factor, r = scaling.original_max_position_embeddings, scaling.factor, rotary_dim
    length = np.maximum(np.asarray(l0 if seq_len is None else seq_len, dtype=np.float64), l0)
    return theta * (factor * length / l0 - (factor - 1)) ** (r / (r - 2))


def _yarn(theta: float, r: int, base: np.ndarray, s: RopeScaling) -> np.ndarray:
    """YaRN: interpolate (divide by factor) the low frequencies, keep the high ones, ramp
    linearly between the dimensions that turn beta_fast and beta_slow times over the original
    context (transformers' _compute_yarn_parameters; llama.cpp's rope_yarn with ext_factor 1)."""
    def correction_dim(rotations: float) -> float:
        return r * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    return (1.0 / (s.factor * base)) * (1 - extrapolation) + (1.0 / base) * extrapolation


class RotaryEmbedding:
    """RoPE on adjacent pairs for one set of frequencies (see the module doc for the layout).

    head_dim: dimensions per head; theta: base; max_positions: positions the tables cover;
    scaling: the variant (default: plain RoPE); rotary_dim: rotated dimensions (None: all).

    cos, sin:  float32 NumPy [max_positions, head_dim / 2], the factors a token at position p of
               a sequence p + 1 tokens long is rotated by (decode), for the fused CPU kernels
    freqs_cis: complex64 torch [max_positions, head_dim / 2], the same as complex numbers
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: RopeScaling = RopeScaling(),
                 rotary_dim: int | None = None):
        self.head_dim = head_dim
        self.theta = theta
        self.rotary_dim = rotary_dim or head_dim
        self.scaling = scaling
        self.seq_dependent = scaling.rope_type in SEQ_DEPENDENT
        positions = np.arange(max_positions, dtype=np.float64)
        if self.seq_dependent:
            angles = self._angles(positions, positions + 1)
        else:
            angles = np.outer(positions, inv_frequencies(theta, self.rotary_dim, scaling))
        self.freqs_cis = self._polar(angles)  # [max_pos, head_dim/2]
        self.cos = self.freqs_cis.real.contiguous().numpy()
        self.sin = self.freqs_cis.imag.contiguous().numpy()

    def _angles(self, positions: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """float64 [n, rotary_dim/2] angles of tokens at `positions` in sequences `seq_lens` long."""
        r = self.rotary_dim
        if self.scaling.rope_type == "dynamic":
            exponent = np.arange(0, r, 2, dtype=np.float64) / r
            inv = dynamic_base(self.theta, r, self.scaling, seq_lens)[:, None] ** -exponent[None, :]
            return positions[:, None] * inv
        out = np.empty((len(positions), r // 2))
        original = self.scaling.original_max_position_embeddings
        long = seq_lens > original
        for flag, length in ((False, original), (True, original + 1)):  # LongRoPE: short or long factors
            rows = long == flag
            if rows.any():
                out[rows] = np.outer(positions[rows], inv_frequencies(self.theta, r, self.scaling, length))
        return out

    def _polar(self, angles: np.ndarray) -> torch.Tensor:
        """[n, rotary_dim/2] angles -> complex64 [n, head_dim/2]: a e^(i angle), identity past rotary_dim."""
        n = angles.shape[0]
        full = np.zeros((n, self.head_dim // 2))
        full[:, : angles.shape[1]] = angles
        magnitude = np.ones(self.head_dim // 2)
        magnitude[: angles.shape[1]] = self.scaling.attention_factor
        a = torch.from_numpy(full)
        return torch.polar(torch.from_numpy(np.broadcast_to(magnitude, full.shape).copy()), a).to(torch.complex64)

    def for_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 1, head_dim // 2] complex64 rotations of tokens at `positions`, each the
        last of its sequence (decode), computed once per step."""
        return self.freqs_cis[positions].unsqueeze(1)

    def for_step(self, positions: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        """As `for_positions` for a step whose tokens belong to sequences `seq_lens` long after the
        step ([num_tokens] int64; None when every token is the last of its sequence). Only the
        sequence-dependent variants look at it (module doc)."""
        if not self.seq_dependent or seq_lens is None:
            return self.for_positions(positions)
        rot = self.freqs_cis[positions]
        other = seq_lens != positions + 1  # prompt tokens before the last of their chunk
        if bool(other.any()):
            rows = other.nonzero().squeeze(1)
            rot[rows] = self._polar(self._angles(positions[rows].numpy().astype(np.float64),
                                                 seq_lens[rows].numpy()))
        return rot.unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, num_heads, head_dim] float32 (may be a strided view) -> same shape, contiguous
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * rot).flatten(-2)
