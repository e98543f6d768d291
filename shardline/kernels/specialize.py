"""Format tags: one Numba type per format code, so a kernel is compiled once per format.

A kernel that must contain one format's code alone takes a tag instead of the plain int code,
and its `numba.extending.overload` helpers choose the format's implementation while typing
(`code_of`). The tag is an empty one-dimensional array whose dtype stands for the format: array
arguments are the ones Numba's dispatcher types in C without a Python call (about a microsecond
per call), and the twelve numeric dtypes of its fast path give twelve distinct types. An
`IntEnum` member per format would read better but costs ~40 us to type on every call, and an int
forced literal with `numba.literally` tens of milliseconds.
"""
from __future__ import annotations

import numpy as np
from numba import from_dtype, types
from numba.core.errors import TypingError

from .formats import FMT

LEGACY = 0  # the code cpu.py's `dequant_row` uses for q8_0/q4_0/q4_1/int8/int4 together

_DTYPES = (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
           np.uint64, np.float32, np.float64, np.complex64, np.complex128)
assert max(FMT.values()) < len(_DTYPES)
_TAGS = {code: np.empty(0, _DTYPES[code]) for code in sorted({LEGACY, *FMT.values()})}
_CODES = {from_dtype(np.dtype(dt)): code for code, dt in enumerate(_DTYPES)}


def tag(code: int) -> np.ndarray:
    """The tag of a format code (formats.FMT, or LEGACY): an empty array, read-only by use."""
    return _TAGS[code]


def code_of(tag_type) -> int:
    """The format code of a tag's Numba type (for overload typing); TypingError otherwise."""
    if isinstance(tag_type, types.Array) and tag_type.ndim == 1 and tag_type.dtype in _CODES:
        return _CODES[tag_type.dtype]
    raise TypingError(f"expected a format tag (shardline.kernels.specialize.tag), got {tag_type}")
