"""Allowed-token bitmasks: the packed form in which a constrained sequence's mask travels.

The coordinator fills one row per constrained sequence (`coordinator/grammar.py`) and the last
stage applies it to that sequence's logits row before sampling (`worker/sampler.py`). A row is
ceil(vocab_size / 32) int32 words; bit j of word w (least significant first) allows token
32 * w + j. Bits past vocab_size are 0. This is the layout xgrammar and llguidance fill
(`allocate_token_bitmask`), so the engine writes straight into it.

    token:  31 ........ 1 0 | 63 ....... 33 32 | ... | 32w+31 ... 32w
    word:   [        0       ][        1        ] ... [       w       ]   int32, little-endian on the wire

On the wire a row is its words as little-endian int32 bytes (4 * num_words(vocab_size) bytes),
like the token-id arrays of the protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BITS_PER_WORD = 32


def num_words(vocab_size: int) -> int:
    """int32 words of one row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def allocate(num_rows: int, vocab_size: int) -> np.ndarray:
    """[num_rows, num_words(vocab_size)] int32, every token disallowed (all bits 0)."""
    return np.zeros((num_rows, num_words(vocab_size)), dtype=np.int32)


def from_allowed(token_ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """One row [num_words(vocab_size)] int32 allowing exactly `token_ids`.

    Raises:
        ValueError: a token id outside [0, vocab_size).
    """
    ids = np.fromiter(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    bits = np.zeros(num_words(vocab_size) * BITS_PER_WORD, dtype=np.uint8)
    bits[ids] = 1
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


def allowed_tokens(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a row [num_words(vocab_size)] int32 allows, increasing (int64)."""
    bits = np.unpackbits(np.ascontiguousarray(row, dtype="<i4").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


def to_bytes(rows: np.ndarray) -> bytes:
    """Rows [..., num_words] int32 as little-endian int32 bytes (the wire form)."""
    return np.ascontiguousarray(rows, dtype="<i4").tobytes()


def from_bytes(data: bytes, vocab_size: int) -> np.ndarray:
    """Rows [len(data) / (4 * num_words), num_words] int32 from their wire form.

    Raises:
        ValueError: the length is not a whole number of rows for `vocab_size`.
    """
    row_bytes = 4 * num_words(vocab_size)
    if len(data) % row_bytes:
        raise ValueError(f"token bitmask of {len(data)} bytes is not a whole number of "
                         f"{row_bytes}-byte rows (vocab_size {vocab_size})")
    return np.frombuffer(data, dtype="<i4").astype(np.int32).reshape(-1, num_words(vocab_size))
