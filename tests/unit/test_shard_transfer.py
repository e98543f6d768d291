"""Shard transfer (shardline/coordinator/shard_server.py -> shardline/worker/shard_transfer.py) over a real ZeroMQ
socket pair, against the model file itself: the received tensors are byte-identical to the
file's slices, a stage built from them computes exactly what a stage built from the file does,
corrupted chunks are fetched again, and a wrong digest or manifest is refused."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import torch
import zmq

from shardline.coordinator.shard_server import GGUFTensorSource, ShardError, ShardLayout, ShardServer
from shardline import messages as M
from shardline import protocol as P
from shardline.model_file import read_model_spec, resolve_model_path
from shardline.protocol import MsgType
from shardline.shard import TensorSlice, model_digest, shard_tensor_slices
from shardline.worker.loader import GGUFShardLoader, ShardSpec
from shardline.worker.shard_transfer import ShardTransferError, check_manifest, fetch_shard

PATH = str(resolve_model_path("smollm2-135m"))
SPEC = read_model_spec(PATH)
DIGEST = model_digest(PATH)


@pytest.fixture(scope="module")
def source():
    return GGUFTensorSource(PATH)


def serve(server: ShardServer, shard, n_messages: int, corrupt: set[int] = frozenset(), refuse: bool = False):
    """A fake coordinator on an inproc ROUTER; returns (dealer socket, thread). Chunks whose index
    is in `corrupt` are sent once with a flipped byte."""
    ctx = zmq.Context.instance()
    addr = f"inproc://shard-{id(server)}-{len(corrupt)}-{refuse}"
    router = ctx.socket(zmq.ROUTER)
    router.bind(addr)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"w0")
    dealer.connect(addr)
    spoiled = set()

    def run():
        try:
            for _ in range(n_messages):
                if not router.poll(20000):
                    return
                ident, frame = router.recv_multipart()
                mtype, body = P.decode(frame)
                try:
                    if mtype is MsgType.SHARD_REQUEST:
                        out = server.on_request("w0", body, shard)
                    else:
                        out = server.on_fetch("w0", body)
                        if out.index in corrupt and out.index not in spoiled:
                            spoiled.add(out.index)
                            data = bytearray(out.data)
                            data[len(data) // 2] ^= 0xFF
                            out.data = bytes(data)
                except ShardError as exc:
                    out = P.error(P.ErrorCode.INVALID_REQUEST, str(exc))
                router.send_multipart([ident, P.encode(out)])
                if isinstance(out, M.Error):
                    return
        finally:
            router.close(linger=0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return dealer, t


def file_slice(reader_tensor, ts: TensorSlice, block_bytes) -> np.ndarray:
    """Independent reference: the slice cut from the file's array by hand."""
    data = np.asarray(reader_tensor.data)
    if ts.rows:
        data = data[ts.rows[0]:ts.rows[1]]
    if ts.cols:
        n, b = block_bytes
        data = data[:, ts.cols[0] // n * b: ts.cols[1] // n * b]
    return np.ascontiguousarray(data)


@pytest.mark.parametrize("shard", [(0, 3, True, False, 1, 3), (28, 30, False, True, 2, 3), (0, 30, True, True, 0, 1)],
                         ids=["first-tp1of3", "last-tp2of3", "whole"])
def test_received_tensors_equal_the_file_slices(source, shard):
    import gguf

    spec_shard = ShardSpec(shard[0], shard[1], shard[2], shard[3], shard[4], shard[5])
    server = ShardServer(PATH, SPEC, DIGEST)
    slices = shard_tensor_slices(SPEC, *shard)
    layout = ShardLayout(source, slices)
    dealer, t = serve(server, shard, 1 + layout.num_chunks)
    try:
        loader, stats = fetch_shard(dealer, "w0", DIGEST, SPEC, spec_shard, "test")
    finally:
        dealer.close(linger=0)
        t.join(5)
    assert stats.bytes == layout.total_bytes and stats.retries == 0
    assert set(loader.tensors) == {s.name for s in slices}
    for ts in slices:
        t_file = source.tensors[ts.name]
        want = file_slice(t_file, ts, gguf.constants.GGML_QUANT_SIZES[t_file.tensor_type])
        got = loader.tensors[ts.name].data
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), ts
    # exactly the shard: a TP rank's attention holds 3 of 9 heads' rows
    if shard[5] == 3:
        q = loader.tensors[f"blk.{shard[0]}.attn_q.weight"]
        assert q.data.shape[0] == 3 * SPEC.head_dim and q.rows == (shard[4] * 192, (shard[4] + 1) * 192)
        assert stats.bytes < sum(int(t.n_bytes) for t in source.tensors.values()) / 2
        # vocabulary-parallel: only the rank's third of the embedding / tied lm_head rows travels
        embd = loader.tensors["token_embd.weight"]
        v = SPEC.vocab_size // 3
        assert embd.rows == (shard[4] * v, (shard[4] + 1) * v) and embd.data.shape[0] == v
        assert embd.n_bytes == source.tensors["token_embd.weight"].n_bytes // 3


def test_stage_from_received_tensors_computes_what_the_file_stage_does(source):
    """Stage 1 of a TP=3 x PP=2 layout (layers 27-29 + head here), rank 1: the stage built from
    received tensors gives bit-identical logits to the one built from the file."""
    from shardline.worker.kv_cache import KVCache
    from shardline.worker.model import StageModel, build_attention_metadata

    torch.manual_seed(0)
    shard = (27, 30, False, True, 1, 3)
    spec_shard = ShardSpec(*shard)
    server = ShardServer(PATH, SPEC, DIGEST)
    layout = ShardLayout(source, shard_tensor_slices(SPEC, *shard))
    dealer, t = serve(server, shard, 1 + layout.num_chunks + 2, corrupt={0, layout.num_chunks - 1})
    try:
        received, stats = fetch_shard(dealer, "w0", DIGEST, SPEC, spec_shard, "test")
    finally:
        dealer.close(linger=0)
        t.join(5)
    assert stats.retries == 2  # both corrupted chunks were fetched again
    x = torch.randn(5, SPEC.hidden_size)
    meta = build_attention_metadata([(0, 5, [0], True)], 16)
    outs = []
    for loader in (received, GGUFShardLoader(PATH, SPEC, spec_shard)):
        model = StageModel(SPEC, loader, 64)
        kv = KVCache(3, 4, 16, SPEC.num_kv_heads // 3, SPEC.head_dim)
        outs.append(model(x.clone(), meta, kv))
    # no all-gather outside a cluster: rank 1's partial logits, its vocabulary slice [16384, 32768)
    assert outs[0].shape == (1, SPEC.vocab_size // 3) and torch.equal(outs[0], outs[1])


def test_chunks_are_bounded_and_checksummed(source):
    shard = (0, 30, True, True, 0, 1)
    layout = ShardLayout(source, shard_tensor_slices(SPEC, *shard), chunk_bytes=1 << 20)
    assert layout.num_chunks == -(-layout.total_bytes // (1 << 20))
    stream = hashlib.sha256()
    for i in range(layout.num_chunks):
        c = layout.chunk(i)
        assert c.offset == i << 20 and len(c.data) <= 1 << 20
        assert c.sha256 == hashlib.sha256(c.data).hexdigest()
        stream.update(c.data)
    assert stream.hexdigest() == layout.digest
    # the whole model's stream is the file's tensor data, each tensor once
    assert layout.total_bytes == sum(int(t.n_bytes) for t in source.tensors.values())
    with pytest.raises(ShardError, match="out of range"):
        layout.chunk(layout.num_chunks)


def test_wrong_digest_and_misaligned_slices_are_refused(source):
    server = ShardServer(PATH, SPEC, DIGEST)
    dealer, t = serve(server, (0, 1, True, False, 0, 1), 1)
    try:
        with pytest.raises(ShardTransferError, match=f"asks for model sha256 {'0' * 16}.*serves .*sha256 {DIGEST[:16]}"):
            fetch_shard(dealer, "w0", "0" * 64, SPEC, ShardSpec(0, 1, True, False), "test")
    finally:
        dealer.close(linger=0)
        t.join(5)
    with pytest.raises(ShardError, match="not whole 32-element blocks"):
        source.describe(TensorSlice("blk.0.ffn_down.weight", cols=(0, 100)))
    with pytest.raises(ShardError, match="not in the model file"):
        source.describe(TensorSlice("blk.99.ffn_down.weight"))
    with pytest.raises(ShardError, match="no assignment"):
        server.on_request("w9", M.ShardRequest(worker_id="w9", model_digest=DIGEST), None)


def test_a_manifest_for_another_shard_is_refused(source):
    layout = ShardLayout(source, shard_tensor_slices(SPEC, 0, 2, True, False, 0, 3))
    manifest = layout.manifest(DIGEST)
    check_manifest(manifest, SPEC, ShardSpec(0, 2, True, False, 0, 3))
    with pytest.raises(ShardTransferError, match="not this shard's"):
        check_manifest(manifest, SPEC, ShardSpec(0, 2, True, False, 1, 3))  # another TP rank's heads
    with pytest.raises(ShardTransferError, match="missing blk.2"):
        check_manifest(manifest, SPEC, ShardSpec(0, 3, True, False, 0, 3))


# ---- safetensors checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A 2-layer SmolLM2 checkpoint made from the GGUF (float32, tests/safetensors_checkpoint.py)
    and the same tensors stored as bfloat16."""
    from safetensors.torch import load_file, save_file

    from tests.safetensors_checkpoint import gguf_to_hf_checkpoint

    f32 = gguf_to_hf_checkpoint(PATH, tmp_path_factory.mktemp("hf_f32"), num_layers=2, tokenizer=None)
    bf16 = tmp_path_factory.mktemp("hf_bf16")
    (bf16 / "config.json").write_text((f32 / "config.json").read_text())
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f32 / "model.safetensors")).items()},
              str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    return {"f32": str(f32), "bf16": str(bf16)}


def fetch_from(directory: str, shard: tuple, quantization: str, corrupt=frozenset()):
    """Serve `shard` of the checkpoint over ZeroMQ; (loader, stats, layout)."""
    from shardline.coordinator.shard_server import SafetensorsTensorSource

    spec = read_model_spec(directory)
    digest = model_digest(directory)
    server = ShardServer(directory, spec, digest)
    layout = ShardLayout(SafetensorsTensorSource(directory), shard_tensor_slices(spec, *shard))
    dealer, t = serve(server, shard, 1 + layout.num_chunks + len(corrupt), corrupt=corrupt)
    try:
        loader, stats = fetch_shard(dealer, "w0", digest, spec, ShardSpec(*shard), "test",
                                    quantization=quantization, group_size=32)
    finally:
        dealer.close(linger=0)
        t.join(5)
    return loader, stats, layout


@pytest.mark.parametrize("stored", ["f32", "bf16"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_safetensors_shard_transfer_builds_the_stage_the_files_do(hf_dirs, stored, quantization):
    """A TP=3 rank 1 of a one-stage 2-layer checkpoint, received from the coordinator (values in
    the stored dtype, quantized on the worker after receipt), gives bit-identical logits to the
    stage its SafetensorsShardLoader builds from the directory, for float32 and bfloat16 files
    and quantization none/int8/int4; only the rank's slices travel (a third of each layer and of
    the embedding's rows)."""
    from shardline.coordinator.shard_server import SafetensorsTensorSource
    from shardline.worker.kv_cache import KVCache
    from shardline.worker.loader import SafetensorsShardLoader
    from shardline.worker.model import StageModel, build_attention_metadata

    directory = hf_dirs[stored]
    spec = read_model_spec(directory)
    shard = (0, 2, True, True, 1, 3)
    received, stats, layout = fetch_from(directory, shard, quantization,
                                         corrupt={1} if quantization == "int8" else frozenset())
    assert stats.format == "safetensors" and stats.bytes == layout.total_bytes
    itemsize = 4 if stored == "f32" else 2
    third = spec.vocab_size // 3
    embd = next(e for e in layout.entries if e.name == "token_embd.weight")
    assert embd.rows == (third, 2 * third) and embd.nbytes == third * spec.hidden_size * itemsize
    assert embd.st_dtype == {"f32": "F32", "bf16": "BF16"}[stored]
    whole = sum(SafetensorsTensorSource(directory).describe(TensorSlice(s.name))[0]["nbytes"]
                for s in shard_tensor_slices(spec, 0, 2, True, True, 0, 1))
    assert stats.bytes < 0.4 * whole
    ids = torch.tensor([1, 17000, 40000, 2, 33000], dtype=torch.int64)  # every rank's vocabulary slice
    meta = build_attention_metadata([(0, 5, [0], True)], 16)
    outs = []
    for loader in (received, SafetensorsShardLoader(directory, spec, ShardSpec(*shard), quantization, 32)):
        model = StageModel(spec, loader, 64)
        loader.close()
        kv = KVCache(2, 4, 16, spec.num_kv_heads // 3, spec.head_dim)
        assert model.embed_tokens.weight.out_features == third
        outs.append(model(ids.clone(), meta, kv))
    assert outs[0].shape == (1, third) and torch.equal(outs[0], outs[1])


def test_safetensors_transfer_refuses_what_it_cannot_serve(hf_dirs):
    from shardline.coordinator.shard_server import SafetensorsTensorSource

    source = SafetensorsTensorSource(hf_dirs["f32"])
    with pytest.raises(ShardError, match="out of range"):
        source.describe(TensorSlice("token_embd.weight", rows=(0, 10**6)))
    with pytest.raises(ShardError, match=r"model\.layers\.5\.mlp\.down_proj\.weight .* is not in the checkpoint"):
        source.describe(TensorSlice("blk.5.ffn_down.weight"))
    # a GGUF shard cannot be quantized on receipt
    server = ShardServer(PATH, SPEC, DIGEST)
    shard = (29, 30, False, True, 0, 1)
    layout = ShardLayout(GGUFTensorSource(PATH), shard_tensor_slices(SPEC, *shard))
    dealer, t = serve(server, shard, 1 + layout.num_chunks)
    try:
        with pytest.raises(ShardTransferError, match="quantization=int8 applies to safetensors checkpoints"):
            fetch_shard(dealer, "w0", DIGEST, SPEC, ShardSpec(*shard), "test", quantization="int8")
    finally:
        dealer.close(linger=0)
        t.join(5)
