"""Quantized weight formats: GGML block formats (Q8_0, Q4_0, Q4_1, read-only Q4_K/Q6_K) and
Shardline's own per-group INT8 / INT4, plus the `QuantizedWeight` container every kernel takes.

Sources: ggml's `ggml-common.h` / `ggml-quants.c` (block structs, `dequantize_row_*`) and the
GGUF spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md). A linear weight has numpy shape
(out_features, in_features) and is stored row-major; each row is a run of quant blocks of 32 values
along in_features (256 for the K-quants), so output rows are independent byte ranges.

GGML blocks (little-endian, `ggml_half` = IEEE fp16):

    Q8_0, 34 bytes / 32 values:   value[j] = qs[j] * d
    +------+---------------------------------+
    | d f16| qs int8 x 32  (q0 ... q31)      |
    +------+---------------------------------+
     0    2                                 34

    Q4_0, 18 bytes / 32 values:   value[j] = (nib[j] - 8) * d
    +------+------------------------+
    | d f16| qs u8 x 16             |   qs[j] = nib[j] | nib[j+16] << 4,  j = 0..15
    +------+------------------------+   (low nibbles: values 0..15, high nibbles: 16..31)
     0    2                        18

    Q4_1, 20 bytes / 32 values:   value[j] = nib[j] * d + m
    +------+------+------------------------+
    | d f16| m f16| qs u8 x 16 (as Q4_0)   |
    +------+------+------------------------+
     0    2      4                        20

Our own formats (per-group, group_size g in {32, 64, 96, 128}, a multiple of 32 dividing
in_features); the codes and the per-group params live in separate arrays:

    int8:  q     int8    [out, in]          value = q * s            (symmetric)
                                            value = q * s + m        (asymmetric)
    int4:  q     uint8   [out, in // 2]     value = (nib - 8) * s    (symmetric)
                                            value = nib * s + m      (asymmetric)
           each 32 values pack into 16 bytes in ggml's nibble order (as Q4_0's qs above):
           +------------------------------------------+
           | byte j: lo = nib[j], hi = nib[j+16]       |  j = 0..15, then the next 32 values
           +------------------------------------------+
    s, m:  float32 [out, in // g]           one scale (and one offset when asymmetric) per group
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

QK = 32  # values per GGML block (Q8_0/Q4_0/Q4_1)
QK_K = 256  # values per K-quant super-block (Q4_K/Q6_K)


class QType(str, enum.Enum):
    """Weight storage type. GGML names follow ggml's `ggml_type`; int8/int4 are our own."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q4_K = "q4_k"
    Q6_K = "q6_k"
    INT8 = "int8"
    INT4 = "int4"


# (values per block, bytes per block) for types stored as packed GGML rows, from ggml-common.h.
GGML_BLOCK = {
    QType.Q8_0: (32, 34),
    QType.Q4_0: (32, 18),
    QType.Q4_1: (32, 20),
    QType.Q4_K: (256, 144),
    QType.Q6_K: (256, 210),
}
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
OWN_TYPES = (QType.INT8, QType.INT4)

_GGUF_TO_QTYPE = {
    "F32": QType.F32, "F16": QType.F16, "BF16": QType.BF16, "Q8_0": QType.Q8_0,
    "Q4_0": QType.Q4_0, "Q4_1": QType.Q4_1, "Q4_K": QType.Q4_K, "Q6_K": QType.Q6_K,
}


def parse_qtype(qtype) -> QType:
    """`QType` from a QType or its string name; ValueError naming it if unsupported."""
    try:
        return QType(qtype.lower() if isinstance(qtype, str) else qtype)
    except ValueError:
        raise ValueError(f"unsupported qtype {qtype!r}; expected one of "
                         f"{[q.value for q in QType]}") from None


def row_bytes(qtype: QType, in_features: int) -> int:
    """Bytes of one packed GGML row of `in_features` values (in_features % block values == 0)."""
    n, b = GGML_BLOCK[qtype]
    if in_features % n:
        raise ValueError(f"{qtype.value}: in_features={in_features} is not a multiple of {n}")
    return in_features // n * b


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A linear layer's weight, kept packed as in the file.

    qtype:   storage type (`QType`).
    shape:   (out_features, in_features); y = x @ W.T.
    data:    GGML quant types: uint8 [out, row_bytes], the file's bytes (often a np.memmap view).
             f32: float32 [out, in]; f16: float16 [out, in]; bf16: uint16 [out, in] (raw bits).
             int8: int8 [out, in] codes; int4: uint8 [out, in // 2] packed nibbles (see module doc).
    scales:  int8/int4 only: float32 [out, in // group_size]; None otherwise.
    mins:    int8/int4 asymmetric only: float32 [out, in // group_size]; None when symmetric.
    group_size: values per scale (32 for GGML Q*_0/Q*_1, 256 for K-quants, 1 for floats).
    """

    qtype: QType
    shape: tuple[int, int]
    data: np.ndarray
    scales: np.ndarray | None = None
    mins: np.ndarray | None = None
    group_size: int = QK

    def __post_init__(self):
        object.__setattr__(self, "qtype", parse_qtype(self.qtype))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        out, inf = self.shape
        q = self.qtype
        if q in GGML_BLOCK:
            exp, dt = (out, row_bytes(q, inf)), np.uint8
        elif q in FLOAT_TYPES:
            exp, dt = (out, inf), {QType.F32: np.float32, QType.F16: np.float16,
                                   QType.BF16: np.uint16}[q]
        else:
            g = self.group_size
            if g % QK or inf % g or not 32 <= g <= 128:
                raise ValueError(f"{q.value}: group_size={g} must be 32..128, a multiple of 32 "
                                 f"dividing in_features={inf}")
            exp = (out, inf) if q is QType.INT8 else (out, inf // 2)
            dt = np.int8 if q is QType.INT8 else np.uint8
            if self.scales is None or self.scales.shape != (out, inf // g):
                raise ValueError(f"{q.value}: scales must be float32 [{out}, {inf // g}]")
            if self.mins is not None and self.mins.shape != (out, inf // g):
                raise ValueError(f"{q.value}: mins must be float32 [{out}, {inf // g}]")
        if self.data.shape != exp or self.data.dtype != dt:
            raise ValueError(f"{q.value} weight of shape {self.shape}: data must be "
                             f"{np.dtype(dt).name} {list(exp)}, got {self.data.dtype.name} "
                             f"{list(self.data.shape)}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def symmetric(self) -> bool:
        """int8/int4: True when there is no per-group offset."""
        return self.mins is None

    @property
    def nbytes(self) -> int:
        """Bytes held: packed data plus scales and mins."""
        return sum(a.nbytes for a in (self.data, self.scales, self.mins) if a is not None)

    @classmethod
    def from_gguf(cls, tensor) -> "QuantizedWeight":
        """Wrap a 2-D `gguf.ReaderTensor` without copying (its `.data` memmap stays the storage).

        tensor.shape is in ggml order (ne0 = in_features first); tensor.data is uint8
        [out, row_bytes] for quant types, or the float array for F32/F16/BF16.
        """
        name = tensor.tensor_type.name
        if name not in _GGUF_TO_QTYPE:
            raise ValueError(f"tensor {tensor.name!r}: unsupported GGUF type {name}")
        qtype = _GGUF_TO_QTYPE[name]
        ne = [int(n) for n in tensor.shape]
        if len(ne) != 2:
            raise ValueError(f"tensor {tensor.name!r}: expected a 2-D weight, got ggml shape {ne}")
        out, inf = ne[1], ne[0]
        data = np.asarray(tensor.data) if not isinstance(tensor.data, np.memmap) else tensor.data
        if qtype in GGML_BLOCK:
            data = data.reshape(out, row_bytes(qtype, inf))
        elif qtype is QType.BF16:
            data = data.view(np.uint16).reshape(out, inf)
        else:
            data = data.reshape(out, inf)
        gs = GGML_BLOCK[qtype][0] if qtype in GGML_BLOCK else 1
        return cls(qtype, (out, inf), data, group_size=gs)

    def row_slice(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows [start, stop) (column-parallel TP shard); views, no copy."""
        out, inf = self.shape
        if not 0 <= start < stop <= out:
            raise ValueError(f"row_slice({start}, {stop}) out of range for shape {self.shape}")
        sl = slice(start, stop)
        return QuantizedWeight(self.qtype, (stop - start, inf), self.data[sl],
                               None if self.scales is None else self.scales[sl],
                               None if self.mins is None else self.mins[sl], self.group_size)

    def col_slice(self, start: int, stop: int) -> "QuantizedWeight":
        """Input columns [start, stop) (row-parallel TP shard). start and stop must be multiples
        of the block/group size. Copies just the selected bytes into C-contiguous arrays, since
        the kernels stream each row linearly."""
        out, inf = self.shape
        g = self.group_size
        if not 0 <= start < stop <= inf or start % g or stop % g:
            raise ValueError(f"{self.qtype.value}: col_slice({start}, {stop}) must be within "
                             f"{inf} and aligned to the block size {g}")
        q = self.qtype
        if q in GGML_BLOCK:
            n, b = GGML_BLOCK[q]
            data = self.data[:, start // n * b: stop // n * b]
        elif q is QType.INT4:
            data = self.data[:, start // 2: stop // 2]
        else:
            data = self.data[:, start:stop]
        gs = slice(start // g, stop // g)
        cp = np.ascontiguousarray
        return QuantizedWeight(q, (out, stop - start), cp(data),
                               None if self.scales is None else cp(self.scales[:, gs]),
                               None if self.mins is None else cp(self.mins[:, gs]), g)


# ---------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------

def pack_nibbles(nib: np.ndarray) -> np.ndarray:
    """uint8 nibbles [rows, n] (n % 32 == 0, values 0..15) -> uint8 [rows, n // 2], ggml order:
    in each run of 32 values, byte j holds value j (low nibble) and value j+16 (high nibble)."""
    r, n = nib.shape
    b = nib.reshape(r, n // 32, 2, 16).astype(np.uint8)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(r, n // 2)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_nibbles`: uint8 [rows, n // 2] -> uint8 [rows, n]."""
    r, nb = packed.shape
    p = packed.reshape(r, nb // 16, 1, 16)
    return np.concatenate([p & 0x0F, p >> 4], axis=2).reshape(r, nb * 2)


def quantize(w: np.ndarray, qtype: str | QType, group_size: int = 32,
             symmetric: bool = True) -> QuantizedWeight:
    """Quantize a float weight [out, in] to `qtype`.

    int8/int4 (ours): round to nearest per group of `group_size` values along in_features.
      int8 sym:  s = amax/127,         q = round(w/s) in [-127, 127]     |err| <= s/2 = amax/254
      int8 asym: s = (max-min)/255,    q = round((w-min)/s) - 128,
                 m = min + 128 s                                         |err| <= (max-min)/510
      int4 sym:  s = amax/7,           nib = round(w/s) + 8, w/s in [-7, 7]  |err| <= amax/14
      int4 asym: s = (max-min)/15,     nib = round((w-min)/s), m = min   |err| <= (max-min)/30
      (bounds hold up to float32 rounding of s*q + m, a few ulp of amax).
    q8_0/q4_0/q4_1/f16/bf16/f32: ggml's reference quantizers via `gguf.quants.quantize`.
    """
    qtype = parse_qtype(qtype)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize: expected a 2-D weight [out, in], got shape {w.shape}")
    out, inf = w.shape
    if qtype in (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.F16, QType.BF16):
        import gguf
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype.name])
        if qtype is QType.F16:
            data = data.astype(np.float16)
        elif qtype is QType.BF16:
            data = np.ascontiguousarray(data).view(np.uint16).reshape(out, inf)
        return QuantizedWeight(qtype, (out, inf), data, group_size=32 if qtype in GGML_BLOCK else 1)
    if qtype is QType.F32:
        return QuantizedWeight(qtype, (out, inf), w, group_size=1)
    if qtype not in OWN_TYPES:
        raise ValueError(f"quantize: no quantizer for qtype {qtype.value}")
    g = group_size
    if g % QK or not 32 <= g <= 128 or inf % g:
        raise ValueError(f"{qtype.value}: group_size={g} must be 32..128, a multiple of 32 "
                         f"dividing in_features={inf}")
    wg = w.reshape(out, inf // g, g)
    levels = 127 if qtype is QType.INT8 else 7
    if symmetric:
        s = np.abs(wg).max(axis=2) / levels
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(wg * inv[..., None]), -levels, levels)
        mins = None
        q = q.astype(np.int8) if qtype is QType.INT8 else (q + 8).astype(np.uint8)
    else:
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        levels = 255 if qtype is QType.INT8 else 15
        s = (hi - lo) / levels
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint((wg - lo[..., None]) * inv[..., None]), 0, levels)
        if qtype is QType.INT8:
            q = (q - 128).astype(np.int8)
            mins = (lo + 128 * s).astype(np.float32)
        else:
            q = q.astype(np.uint8)
            mins = lo.astype(np.float32)
    q = q.reshape(out, inf)
    data = q if qtype is QType.INT8 else pack_nibbles(q)
    return QuantizedWeight(qtype, (out, inf), np.ascontiguousarray(data),
                           s.astype(np.float32), mins, g)
