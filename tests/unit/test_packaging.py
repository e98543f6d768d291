"""Shardline installs nothing but the `shardline` package, so it cannot shadow another
distribution's top-level module. Hugging Face's `kernels` is the case that bit: `transformers`
imports it (`transformers/integrations/hub_kernels.py`), and a top-level `kernels` of ours, in
site-packages or in the repository root that `python -m pytest` puts on sys.path, was found first.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[2]


def test_only_the_shardline_package_is_distributed():
    found = setuptools.find_packages(str(REPO), include=["shardline*"])
    assert found and all(p == "shardline" or p.startswith("shardline.") for p in found)
    for name in ("coordinator", "worker", "kernels"):
        assert f"shardline.{name}" in found
        assert not (REPO / name / "__init__.py").exists(), f"a top-level package {name}/ in the repository root"


def test_transformers_model_beside_shardline_in_one_process():
    import torch

    import shardline.coordinator.server  # noqa: F401
    import shardline.kernels  # noqa: F401
    import shardline.worker.model  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # Hugging Face's package, when installed, is the one found
        origin = Path(spec.origin).resolve()
        assert not origin.is_relative_to(REPO / "kernels") and not origin.is_relative_to(REPO / "shardline")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
