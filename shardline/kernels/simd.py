"""Sixteen-lane float32 vectors for Numba CPU kernels.

Numba has no vector type: its loop vectorizer widens simple loops, but it cannot keep an array
of accumulators in registers across an outer loop, and it reduces each dot product on its own
(one horizontal sum per dot). `float32x16` is an LLVM `<16 x float>` value (one AVX-512
register, two AVX2 registers elsewhere; LLVM legalizes the width for the host), and the
intrinsics below are the few operations the attention kernels need. Values of this type live in
SSA registers, so accumulators declared as local variables stay in registers through loops.

Loads and stores take an array (any number of dimensions, C-contiguous) and a flat element
index; they do not check bounds. A load from an int16 array reads IEEE 754 binary16 bit patterns
(the float16 KV cache, see shardline/kernels/attention.py) and widens them exactly (`fpext`, F16C's
vcvtph2ps).

`fold8` .. `fold1` sum sixteen partial-sum vectors into one vector of sixteen dot products with
15 shuffle-add steps (a transpose-and-add tree, as hand-written AVX GEMV kernels do), instead of
sixteen separate horizontal sums.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

LANES = 16
PREFETCH_LOCALITY = 2


class Float32x16(types.Type):
    """Numba type of a <16 x float> value."""

    def __init__(self):
        super().__init__(name="float32x16")


float32x16 = Float32x16()
_VEC = ir.VectorType(ir.FloatType(), LANES)


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


def _element_pointer(context, builder, arr_ty, arr, index, elem_ir):
    data = context.make_array(arr_ty)(context, builder, arr).data
    ptr = builder.gep(data, [index])
    return builder.bitcast(ptr, ir.PointerType(ir.VectorType(elem_ir, LANES)))


@intrinsic
def vload(typingctx, arr, index):
    """arr[index : index + 16] (flat, C order) as float32x16; arr float32, or int16 holding
    binary16 bit patterns (widened to float32)."""
    if not isinstance(arr, types.Array) or arr.layout != "C" or not isinstance(index, types.Integer):
        return None
    if arr.dtype == types.float32:
        elem, align = ir.FloatType(), 4
    elif arr.dtype == types.int16:
        elem, align = ir.HalfType(), 2
    else:
        return None

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = _element_pointer(context, builder, sig.args[0], args[0], idx, elem)
        v = builder.load(ptr, align=align)
        return v if elem == ir.FloatType() else builder.fpext(v, _VEC)

    return float32x16(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    """arr[index : index + 16] = value (arr float32, flat C order)."""
    if (not isinstance(arr, types.Array) or arr.layout != "C" or arr.dtype != types.float32
            or not isinstance(index, types.Integer) or value != float32x16):
        return None

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = _element_pointer(context, builder, sig.args[0], args[0], idx, ir.FloatType())
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint that arr[index] (flat, C order; any dtype) will be read soon: LLVM's `llvm.prefetch`
    (read, locality 2: x86 prefetcht1, into L2). Does not fault and returns nothing."""
    if not isinstance(arr, types.Array) or arr.layout != "C" or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [idx]), ir.PointerType(ir.IntType(8)))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, PREFETCH_LOCALITY), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


@intrinsic
def vsplat(typingctx, x):
    """float32 x in all 16 lanes."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))

    return float32x16(x), codegen


@intrinsic
def vzero(typingctx):
    """All lanes 0.0."""
    return float32x16(), lambda context, builder, sig, args: ir.Constant(_VEC, [0.0] * LANES)


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c per lane (one rounding: llvm.fma)."""
    if not (a == b == c == float32x16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fma.v16f32")
        return builder.call(fn, list(args))

    return float32x16(a, b, c), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b per lane."""
    if not (a == b == float32x16):
        return None
    return float32x16(a, b), lambda context, builder, sig, args: builder.fmul(args[0], args[1])


def _fold(width):
    """The shuffle-add step that halves the segments: x and y each hold 16 // width segments of
    `width` lanes (segment s: partial sums of dot product s); the result holds 2 * 16 // width
    segments of width // 2 lanes: x's segments in order, then y's, each the sum of its first
    and second half."""
    half = width // 2
    lo, hi = [], []
    for base in (0, LANES):  # x's lanes are 0..15, y's 16..31 in shufflevector's numbering
        for s in range(LANES // width):
            lo += [base + s * width + j for j in range(half)]
            hi += [base + s * width + half + j for j in range(half)]
    lo_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), lo)
    hi_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), hi)

    def typer(typingctx, x, y):
        if not (x == y == float32x16):
            return None

        def codegen(context, builder, sig, args):
            a = builder.shuffle_vector(args[0], args[1], lo_mask)
            b = builder.shuffle_vector(args[0], args[1], hi_mask)
            return builder.fadd(a, b)

        return float32x16(x, y), codegen

    typer.__name__ = f"fold{half}"
    return intrinsic(typer)


fold8 = _fold(16)
fold8.__doc__ = "Two vectors of one 16-lane segment each -> two segments of 8 lanes (x's, y's)."
fold4 = _fold(8)
fold4.__doc__ = "Two vectors of two 8-lane segments -> four segments of 4 lanes (x's, then y's)."
fold2 = _fold(4)
fold2.__doc__ = "Two vectors of four 4-lane segments -> eight segments of 2 lanes (x's, then y's)."
fold1 = _fold(2)
fold1.__doc__ = "Two vectors of eight 2-lane segments -> sixteen lanes, each one full sum (x's, then y's)."
