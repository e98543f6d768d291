"""Sixteen-lane int32 vectors and the 8-bit dot product for Numba CPU kernels.

`int32x16` is an LLVM `<16 x i32>` value (one AVX-512 register), the integer sibling of
shardline/kernels/simd.py's float32x16. The operation that matters is `dpbusd(acc, a, b)`: per
lane i, acc[i] + sum_{j<4} a.u8[4i + j] * b.s8[4i + j] (a's bytes unsigned, b's signed), i.e.
sixty-four 8-bit products summed four at a time into sixteen 32-bit lanes. On a CPU with
AVX512-VNNI it is one `vpdpbusd` instruction (Intel SDM, "VPDPBUSD"; llama.cpp's quantized dot
products on x86 are built on it or on its AVX2 precursor pair `vpmaddubsw` + `vpmaddwd`);
elsewhere the same arithmetic is written in plain LLVM IR (widen, multiply, add the four
products of each lane) and LLVM picks the instructions the host has. Sums never overflow in
the kernels' use: at most 32 products of |a| <= 63 and |b| <= 127 per dot before a float scale.

Loads take a C-contiguous array and a flat element index; they do not check bounds.
"""
from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from .simd import _VEC, LANES, float32x16

HAS_VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))

_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_IVEC = ir.VectorType(_I32, LANES)
_BVEC = ir.VectorType(_I8, 4 * LANES)


class Int32x16(types.Type):
    """Numba type of a <16 x i32> value."""

    def __init__(self):
        super().__init__(name="int32x16")


int32x16 = Int32x16()


@register_model(Int32x16)
class _Int32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _IVEC)


def _splat(builder, v):
    """An i32 value in all 16 lanes."""
    v = builder.insert_element(ir.Constant(_IVEC, ir.Undefined), v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_IVEC, ir.Undefined), ir.Constant(_IVEC, [0] * LANES))


def _pointer(context, builder, sig, args, elem):
    """A pointer to `elem` at arr[index] for an intrinsic's (arr, index) arguments."""
    idx = context.cast(builder, args[1], sig.args[1], types.intp)
    ptr = builder.gep(context.make_array(sig.args[0])(context, builder, args[0]).data, [idx])
    return builder.bitcast(ptr, ir.PointerType(elem))


def _is_byte_array(arr):
    return (isinstance(arr, types.Array) and arr.layout == "C"
            and arr.dtype in (types.uint8, types.int8))


@intrinsic
def iload(typingctx, arr, index):
    """The 64 bytes arr[index : index + 64] (uint8 or int8 array) as int32x16."""
    if not _is_byte_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig, args, _IVEC), align=1)

    return int32x16(arr, index), codegen


@intrinsic
def ibroadcast(typingctx, arr, index):
    """The 4 bytes arr[index : index + 4] (uint8 or int8 array) as one int32 in all 16 lanes."""
    if not _is_byte_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, builder.load(_pointer(context, builder, sig, args, _I32), align=1))

    return int32x16(arr, index), codegen


@intrinsic
def bload(typingctx, arr, index):
    """The 16 bytes arr[index : index + 16] widened to int32x16 (uint8 array: zero-extended;
    int8: sign-extended)."""
    if not _is_byte_array(arr) or not isinstance(index, types.Integer):
        return None
    signed = arr.dtype == types.int8

    def codegen(context, builder, sig, args):
        v = builder.load(_pointer(context, builder, sig, args, ir.VectorType(_I8, LANES)), align=1)
        return builder.sext(v, _IVEC) if signed else builder.zext(v, _IVEC)

    return int32x16(arr, index), codegen


def _lanewise(name, op, scalar_rhs=False):
    """An intrinsic (a, b) -> builder.<op>(a, b) on int32x16 lanes; with scalar_rhs, b is an
    integer applied to every lane (the shift count)."""
    def typer(typingctx, a, b):
        if a != int32x16 or not (isinstance(b, types.Integer) if scalar_rhs else b == int32x16):
            return None

        def codegen(context, builder, sig, args):
            rhs = _splat(builder, context.cast(builder, args[1], sig.args[1], types.int32)) if scalar_rhs else args[1]
            return getattr(builder, op)(args[0], rhs)

        return int32x16(a, b), codegen

    typer.__name__ = name
    return intrinsic(typer)


iand = _lanewise("iand", "and_")
iand.__doc__ = "Lane-wise a & b."
iadd = _lanewise("iadd", "add")
iadd.__doc__ = "Lane-wise a + b (wrapping)."
isub = _lanewise("isub", "sub")
isub.__doc__ = "Lane-wise a - b (wrapping)."
ior = _lanewise("ior", "or_")
ior.__doc__ = "Lane-wise a | b."
isrl = _lanewise("isrl", "lshr", scalar_rhs=True)
isrl.__doc__ = "Lane-wise logical shift right of the int32 lanes by the integer n (0..31)."
isll = _lanewise("isll", "shl", scalar_rhs=True)
isll.__doc__ = "Lane-wise shift left of the int32 lanes by the integer n (0..31)."


@intrinsic
def isplat(typingctx, x):
    """An integer in all 16 int32 lanes."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32))

    return int32x16(x), codegen


@intrinsic
def to_f32(typingctx, a):
    """int32x16 -> float32x16 (exact below 2^24)."""
    if a != int32x16:
        return None
    return float32x16(a), lambda context, builder, sig, args: builder.sitofp(args[0], _VEC)


@intrinsic
def izero(typingctx):
    """All lanes 0."""
    return int32x16(), lambda context, builder, sig, args: ir.Constant(_IVEC, [0] * LANES)


def _dpbusd_generic(builder, acc, a, b):
    """acc + the four u8 x s8 products of each lane, in plain IR (no VNNI)."""
    wide = ir.VectorType(_I32, 4 * LANES)
    pa = builder.zext(builder.bitcast(a, _BVEC), wide)
    pb = builder.sext(builder.bitcast(b, _BVEC), wide)
    prod = builder.mul(pa, pb)
    total = acc
    for j in range(4):
        part = builder.shuffle_vector(prod, ir.Constant(wide, ir.Undefined),
                                      ir.Constant(_IVEC, [4 * i + j for i in range(LANES)]))
        total = builder.add(total, part)
    return total


@intrinsic
def dpbusd(typingctx, acc, a, b):
    """acc + per lane the sum of the four products a.u8[4i + j] * b.s8[4i + j] (see module doc)."""
    if not (acc == a == b == int32x16):
        return None

    def codegen(context, builder, sig, args):
        if HAS_VNNI:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_IVEC, [_IVEC] * 3),
                                                "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, list(args))
        return _dpbusd_generic(builder, *args)

    return int32x16(acc, a, b), codegen
