"""`model:` as a Hugging Face repo id, resolved in a local Hugging Face cache built by hand
(models--org--name/{refs/main, snapshots/<commit>/...}, huggingface_hub's layout), never
downloaded."""

from __future__ import annotations

import socket

import pytest

from shardline.model_file import ModelError, hf_hub_cache_dir, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: resolution reads the cache only."""

    def refuse(*args, **kwargs):
        raise AssertionError("resolve_model_path tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def add_repo(cache, repo_id: str, files: dict[str, bytes]):
    """A cached snapshot of `repo_id` at COMMIT with `files`, and refs/main pointing at it."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_repo_absent_from_cache_names_repo_and_cache(hub_cache):
    with pytest.raises(ModelError) as err:
        resolve_model_path("Qwen/Qwen2.5-7B-Instruct")
    assert "'Qwen/Qwen2.5-7B-Instruct'" in str(err.value) and str(hub_cache) in str(err.value)
    with pytest.raises(ModelError, match="q4_k_m.gguf of the Hugging Face repo 'org/x-GGUF'.*" + str(hub_cache)):
        resolve_model_path("org/x-GGUF:q4_k_m.gguf")


def test_repo_resolves_to_its_snapshot(hub_cache):
    snapshot = add_repo(hub_cache, "Qwen/Qwen2.5-7B-Instruct", {
        "config.json": b"{}", "model.safetensors": b"", "tokenizer.json": b"{}"})
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == snapshot


def test_repo_file_resolves_to_the_file(hub_cache):
    snapshot = add_repo(hub_cache, "bartowski/Qwen2.5-7B-Instruct-GGUF", {
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf": b"GGUF", "sub/Qwen2.5-7B-Instruct-Q8_0.gguf": b"GGUF"})
    assert resolve_model_path("bartowski/Qwen2.5-7B-Instruct-GGUF:Qwen2.5-7B-Instruct-Q4_K_M.gguf") == (
        snapshot / "Qwen2.5-7B-Instruct-Q4_K_M.gguf")
    assert resolve_model_path("bartowski/Qwen2.5-7B-Instruct-GGUF:sub/Qwen2.5-7B-Instruct-Q8_0.gguf") == (
        snapshot / "sub" / "Qwen2.5-7B-Instruct-Q8_0.gguf")
    # the repo alone is not a checkpoint: the error lists the files to pick from
    with pytest.raises(ModelError, match="name one as bartowski/Qwen2.5-7B-Instruct-GGUF:FILE.*Q4_K_M.gguf"):
        resolve_model_path("bartowski/Qwen2.5-7B-Instruct-GGUF")


def test_snapshot_without_weights_is_refused(hub_cache):
    add_repo(hub_cache, "org/only-config", {"config.json": b"{}"})
    with pytest.raises(ModelError, match="has no \\*.safetensors"):
        resolve_model_path("org/only-config")


def test_cache_location_follows_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache_dir() == tmp_path / "hf" / "hub"
    snapshot = add_repo(tmp_path / "hf" / "hub", "org/name", {"config.json": b"{}", "a.safetensors": b""})
    assert resolve_model_path("org/name") == snapshot


def test_local_path_wins_over_repo_id(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    (tmp_path / "org" / "name" / "w.safetensors").write_bytes(b"")
    add_repo(hub_cache, "org/name", {"config.json": b"{}", "a.safetensors": b""})
    assert resolve_model_path("org/name").resolve() == (tmp_path / "org" / "name").resolve()
    # a missing relative .gguf path is still a missing file, not a repo id
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model_path("models/missing.gguf")
