"""Independent reference for tests: transformers' own GGUF loaders on the same model file.

transformers dequantizes the GGUF to float32 and builds its tokenizer from the same metadata, but
shares no code with Shardline, so agreement with it is evidence. Loading the model takes ~20 s;
everything is cached per process.

Known difference: transformers has no pre-tokenizer for `tokenizer.ggml.pre == "smollm"` and uses
plain GPT-2 splitting, so it does not isolate non-ASCII numerals (" ²" is one word there and two in
llama.cpp and in SmolLM2's tokenizer.json). `load_reference_tokenizer(split_digits=True)` restores
the tokenizer.json pre-tokenizer (Digits(individual_digits=True) + ByteLevel).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from shardline.model_file import resolve_model_path

DEFAULT_MODEL = "smollm2-135m"

# Logprobs of a cluster against transformers' float32 forward, absolute (nats). The arithmetic is
# float32 (2e-3 held with a float32 KV cache); the default float16 KV cache rounds K and V to 11
# significant bits, which moved single logprobs by up to 6.4e-3 (a rank-4 alternative at -5.3
# nats after several generated tokens, test_safetensors; 3.9e-3 in test_end_to_end). The bound
# leaves twice that for other CPUs' GEMM kernels. A misaligned position or a wrong token would be
# off by far more.
LOGPROB_ATOL = 1.5e-2


def _split(model: str) -> tuple[str, str]:
    path = Path(resolve_model_path(model))
    return str(path.parent), path.name


@functools.lru_cache(maxsize=None)
def load_reference_tokenizer(model: str = DEFAULT_MODEL, split_digits: bool = False):
    """transformers' tokenizer built from the GGUF (`AutoTokenizer.from_pretrained(dir,
    gguf_file=name)`). With `split_digits`, its pre-tokenizer is replaced by the one in SmolLM2's
    tokenizer.json (each numeral its own word), which is what llama.cpp's "smollm" does."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    directory, name = _split(model)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    if split_digits:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return tok


@functools.lru_cache(maxsize=None)
def load_reference_model(model: str = DEFAULT_MODEL):
    """transformers' model from the GGUF, dequantized to float32, in eval mode on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = _split(model)
    m = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    m.eval()
    return m


def reference_logits(token_ids: list[int], model: str = DEFAULT_MODEL) -> np.ndarray:
    """Logits of one sequence, every position: `[T, vocab]` float32 (no BOS is added)."""
    import torch

    if not token_ids:
        raise ValueError("reference_logits needs at least one token id")
    m = load_reference_model(model)
    with torch.inference_mode():
        out = m(torch.tensor([list(token_ids)], dtype=torch.long))
    logits = out.logits[0].to(torch.float32).cpu().numpy()  # [T, vocab]
    return np.ascontiguousarray(logits)
