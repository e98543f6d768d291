"""Quantized weight formats: the GGML block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and Shardline's own per-group INT8 / INT4, plus the
`QuantizedWeight` container every kernel takes.

Sources: ggml's `ggml-common.h` (block structs), `ggml-quants.c` (`dequantize_row_*`,
`get_scale_min_k4`) and the GGUF spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md). A
linear weight has numpy shape (out_features, in_features) and is stored row-major; each row is a
run of quant blocks of 32 values along in_features (256 for the K-quants' super-blocks), so
output rows are independent byte ranges.

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

    Q5_0, 22 bytes / 32 values:   value[j] = (q[j] - 16) * d,  q[j] = nib[j] | bit j of qh << 4
    +------+-----------+------------------------+
    | d f16| qh u32 LE | qs u8 x 16 (as Q4_0)   |   qh bit j: the fifth bit of value j
    +------+-----------+------------------------+
     0    2           6                        22

    Q5_1, 24 bytes / 32 values:   value[j] = q[j] * d + m   (q[j] as Q5_0)
    +------+------+-----------+------------------------+
    | d f16| m f16| qh u32 LE | qs u8 x 16             |
    +------+------+-----------+------------------------+
     0    2      4           8                        24

K-quants: a super-block of 256 values in sub-blocks of 32 (Q4_K, Q5_K) or 16 (the others), each
sub-block with its own small integer scale (and min) multiplied by the super-block's fp16 d
(and dmin):

    Q4_K, 144 bytes / 256 values: sub-block s = 0..7 (32 values): value = d*sc[s]*q - dmin*m[s]
    +------+------+---------------------+----------------------------------------------+
    | d f16|dmin  | scales u8 x 12      | qs u8 x 128                                  |
    +------+------+---------------------+----------------------------------------------+
     0    2      4                     16                                            144
      qs: 4 runs of 32 bytes; run r holds sub-block 2r in the low nibbles and 2r+1 in the high
      scales: 8 six-bit scales sc[s] and mins m[s] (`get_scale_min_k4`):
        byte  0..3: sc[0..3] (bits 0-5) | sc[4..7] bits 4-5 (bits 6-7)
        byte  4..7: m[0..3]  (bits 0-5) | m[4..7]  bits 4-5 (bits 6-7)
        byte 8..11: sc[4..7] bits 0-3 (bits 0-3) | m[4..7] bits 0-3 (bits 4-7)

    Q5_K, 176 bytes / 256 values: as Q4_K plus a fifth bit, q = nib | bit s of qh[l] << 4
    +------+------+-------------+----------------+-------------------------------------+
    | d f16|dmin  | scales x 12 | qh u8 x 32     | qs u8 x 128 (as Q4_K)               |
    +------+------+-------------+----------------+-------------------------------------+
     0    2      4             16               48                                   176
      value l of sub-block s (l = 0..31): fifth bit = bit s of qh[l]

    Q6_K, 210 bytes / 256 values: 16 sub-blocks of 16: value = d * sc[s] * (q - 32), q 6 bits
    +-----------------------------+----------------------+--------------+------+
    | ql u8 x 128 (low 4 bits)    | qh u8 x 64 (high 2)  | sc int8 x 16 | d f16|
    +-----------------------------+----------------------+--------------+------+
     0                          128                    192            208    210
      per half h (128 values): ql[64h + l] low nibble -> value l, high nibble -> value l + 64;
      ql[64h + 32 + l] low -> l + 32, high -> l + 96 (l = 0..31); qh[32h + l] bits 0-1, 2-3,
      4-5, 6-7 are the high bits of values l, l + 32, l + 64, l + 96; sub-block = value // 16

    Q3_K, 110 bytes / 256 values: 16 sub-blocks of 16: value = d * (sc[s] - 32) * (q - 4 h')
    +------------------+-------------------------+-----------------+------+
    | hmask u8 x 32    | qs u8 x 64 (2 bits each)| scales u8 x 12  | d f16|
    +------------------+-------------------------+-----------------+------+
     0                32                        96               108    110
      per half h (128 values), j = 0..3: value 32j + l (l = 0..31) has q = bits 2j..2j+1 of
      qs[32h + l] and h' = 0 if bit 4h + j of hmask[l] is set, else 1
      scales: 16 six-bit scales sc[s] = low 4 bits: scales[s % 8] >> 4 (s // 8), high 2 bits:
      scales[8 + s % 4] >> 2 (s // 4)

    Q2_K, 84 bytes / 256 values: 16 sub-blocks of 16: value = d * (sc & 15) * q - dmin * (sc >> 4)
    +------------------+-------------------------+------+------+
    | scales u8 x 16   | qs u8 x 64 (2 bits each)| d f16| dmin |
    +------------------+-------------------------+------+------+
     0                16                        80     82     84
      q of value 128h + 32j + l: bits 2j..2j+1 of qs[32h + l] (as Q3_K's low bits)

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

from .quants import quantize_rows

QK = 32  # values per GGML block (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1)
QK_K = 256  # values per K-quant super-block (Q2_K..Q6_K)


class QType(str, enum.Enum):
    """Weight storage type. GGML names follow ggml's `ggml_type`; int8/int4 are our own."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"
    INT8 = "int8"
    INT4 = "int4"


# (values per block, bytes per block) for types stored as packed GGML rows, from ggml-common.h.
GGML_BLOCK = {
    QType.Q8_0: (32, 34),
    QType.Q4_0: (32, 18),
    QType.Q4_1: (32, 20),
    QType.Q5_0: (32, 22),
    QType.Q5_1: (32, 24),
    QType.Q2_K: (256, 84),
    QType.Q3_K: (256, 110),
    QType.Q4_K: (256, 144),
    QType.Q5_K: (256, 176),
    QType.Q6_K: (256, 210),
}
K_QUANTS = (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
OWN_TYPES = (QType.INT8, QType.INT4)

_GGUF_TO_QTYPE = {q.name: q for q in (QType.F32, QType.F16, QType.BF16, *GGML_BLOCK)}

# Format codes the Numba kernels (CPU and CUDA) switch on, one per packed type.
FMT = {QType.Q8_0: 0, QType.Q4_0: 1, QType.Q4_1: 2, QType.INT8: 3, QType.INT4: 4,
       QType.Q5_0: 5, QType.Q5_1: 6, QType.Q2_K: 7, QType.Q3_K: 8, QType.Q4_K: 9,
       QType.Q5_K: 10, QType.Q6_K: 11}

# fp16 bit pattern -> float32 value: float32 [65536] (Numba has no CPU float16 arithmetic; the
# kernels decode the blocks' fp16 scales through this table)
F16_LUT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


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
    group_size: values per block (32 for GGML Q*_0/Q*_1, 256 for the K-quants' super-blocks,
             1 for floats); int8/int4: values per scale.
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
            object.__setattr__(self, "group_size", GGML_BLOCK[q][0])
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
        q = self.qtype
        if q in K_QUANTS and (start % QK_K or stop % QK_K):
            raise ValueError(f"{q.value}: col_slice({start}, {stop}) is not aligned to the "
                             f"{QK_K}-value super-blocks: a K-quant row is stored in super-blocks "
                             f"of {QK_K} values that share one scale header (d, dmin, sub-block "
                             f"scales), so a column slice must start and stop on a multiple of {QK_K}")
        if not 0 <= start < stop <= inf or start % g or stop % g:
            raise ValueError(f"{self.qtype.value}: col_slice({start}, {stop}) must be within "
                             f"{inf} and aligned to the block size {g}")
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
    GGML block types (q8_0 .. q6_k): `shardline.kernels.quants.quantize_rows` (ggml's
      reference rounding for the 32-value types, our own scale choice for the K-quants);
      in_features must be a multiple of the block size (32, or 256 for the K-quants).
    f16/bf16: `gguf.quants.quantize` (round to nearest even); f32: the array itself.
    Raises ValueError for a shape the type cannot hold.
    """
    qtype = parse_qtype(qtype)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize: expected a 2-D weight [out, in], got shape {w.shape}")
    out, inf = w.shape
    if qtype in GGML_BLOCK:
        return QuantizedWeight(qtype, (out, inf), quantize_rows(w, qtype.name))
    if qtype in (QType.F16, QType.BF16):
        import gguf
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype.name])
        if qtype is QType.F16:
            data = data.astype(np.float16)
        else:
            data = np.ascontiguousarray(data).view(np.uint16).reshape(out, inf)
        return QuantizedWeight(qtype, (out, inf), data, group_size=1)
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
