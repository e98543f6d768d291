"""shardline.worker.process.keep_freed_memory on a real prefill step: with glibc's defaults, the MB-sized
activations of a step were fresh memory maps whose pages faulted in on first touch (~58,000
page faults in a 512-token step of 15 layers); the worker keeps freed blocks in the heap."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

STEP = r"""
import resource, sys
import torch, numba
from shardline.worker.process import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
numba.set_num_threads(1)
from shardline.model_file import read_model_spec, resolve_model_path
from shardline.worker.kv_cache import KVCache
from shardline.worker.loader import GGUFShardLoader, ShardSpec
from shardline.worker.model import StageModel, build_attention_metadata
path = str(resolve_model_path("smollm2-135m"))
spec = read_model_spec(path)
model = StageModel(spec, GGUFShardLoader(path, spec, ShardSpec(24, 30, False, True, 0, 1)), 256)
model.keep_bf16_copies()
kv = KVCache(6, 4 * 9, 16, spec.num_kv_heads, spec.head_dim)
meta = build_attention_metadata([(0, 128, list(range(i * 9, (i + 1) * 9)), True) for i in range(4)], 16)
x = torch.randn(512, spec.hidden_size)
for _ in range(2):
    model(x, meta, kv)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    model(x, meta, kv)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def _faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs Linux with glibc (the setting under test is glibc's mallopt)")
def test_prefill_step_reuses_freed_memory():
    """Four 128-token prompts through six layers and the lm_head, after two warm-up steps (two
    layers were too few: glibc's adaptive threshold sometimes caught up)."""
    kept = _faults_per_step("keep")
    default = _faults_per_step("default")
    print(f"\nminor page faults per step: {kept} with keep_freed_memory, {default} with glibc's defaults")
    assert kept < 1000, (kept, default)
