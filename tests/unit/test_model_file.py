"""Model resolution and GGUF metadata: clear errors naming what was looked for."""

from __future__ import annotations

import gguf
import pytest

from shardline.model_file import ModelError, read_model_spec, resolve_model_path


def _write(path, arch: str, eos: int | None = 2) -> str:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_feed_forward_length(128)
    w.add_vocab_size(300)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_packaged_model_resolves_and_reads_smollm2_hyperparameters():
    spec = read_model_spec(resolve_model_path("smollm2-135m"))
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (30, 576, 9, 3)
    assert (spec.head_dim, spec.intermediate_size, spec.vocab_size) == (64, 1536, 49152)
    assert spec.rope_theta == 100000.0 and spec.tie_word_embeddings and spec.eos_token_id == 2


def test_unknown_name_and_missing_file_are_named(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'llama-9000'.*smollm2-135m"):
        resolve_model_path("llama-9000")
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelError, match=f"model file not found: {missing}"):
        resolve_model_path(str(missing))


def test_unsupported_architecture_is_named(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        read_model_spec(path)


def test_llama_metadata_without_eos_and_garbage_files_are_refused(tmp_path):
    spec = read_model_spec(_write(tmp_path / "tiny.gguf", "llama"))
    assert spec.num_layers == 2 and spec.num_kv_heads == 4 and spec.head_dim == 16
    with pytest.raises(ModelError, match="eos_token_id"):
        read_model_spec(_write(tmp_path / "noeos.gguf", "llama", eos=None))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        read_model_spec(junk)
