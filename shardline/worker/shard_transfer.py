"""Shard transfer, worker side: receive this worker's tensors from the coordinator and build a
loader over them (docs/protocol.md, "Shard transfer"; shardline/coordinator/shard_server.py sends).

`fetch_shard` runs the exchange on the worker's DEALER socket before the stage is built:

    worker                              coordinator
    SHARD_REQUEST {model_digest}  --->
                                  <---  SHARD_MANIFEST {tensors, total_bytes, num_chunks, shard_digest}
    SHARD_FETCH {index: 0..W-1}   --->                      (W = SHARD_WINDOW outstanding)
                                  <---  SHARD_CHUNK {index, offset, data, sha256}
    SHARD_FETCH {index: W}        --->  ... until every chunk is in

Every chunk's sha256 is checked as it arrives (a bad one is fetched again, up to
`MAX_CHUNK_RETRIES` times), then the sha256 of the whole stream against `shard_digest`. The
stream lands in one buffer; each tensor is a NumPy view of its part (no copies). Nothing is
written to disk. By the manifest's `format`:

    gguf         the views hold the GGUF's quantized blocks; `ReceivedShardLoader` serves
                 `GGUFShardLoader`'s interface over them.
    safetensors  the views hold the checkpoint's values in the stored dtype (F32, F16, BF16 as raw
                 16-bit patterns); `ReceivedCheckpoint` serves `SafetensorsCheckpoint`'s reads over
                 them (keyed by logical tensor name), and `SafetensorsShardLoader` permutes Q/K
                 and quantizes (`none|int8|int4`) exactly as from the files. The buffer is
                 dropped when the stage is built.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from shardline import messages as M
from shardline import protocol as P
from shardline.protocol import MsgType
from shardline.shard import shard_tensor_slices
from shardline.worker.loader import GGUFShardLoader, SafetensorsShardLoader, ShardSpec

log = logging.getLogger("shardline.worker")

MAX_CHUNK_RETRIES = 3
TRANSFER_TIMEOUT_S = 120.0  # longest silence from the coordinator during a transfer


class ShardTransferError(RuntimeError):
    """The shard could not be received intact (the message says which chunk or digest)."""


class ReceivedTensor:
    """A received tensor slice, shaped like `gguf.ReaderTensor` (name, tensor_type, shape in ggml
    order, data as the reader would give it), so the GGUF code paths take it unchanged."""

    def __init__(self, entry: M.ManifestTensor, data: np.ndarray):
        from gguf import GGMLQuantizationType

        if entry.ggml_type is None or entry.ne is None:
            raise ShardTransferError(f"manifest: gguf tensor {entry.name} without ggml_type and ne")
        self.name = entry.name
        self.tensor_type = GGMLQuantizationType(entry.ggml_type)
        self.shape = np.array(entry.ne, dtype=np.uint64)
        self.data = data
        self.rows = entry.rows
        self.cols = entry.cols
        self.n_elements = int(np.prod(entry.ne))
        self.n_bytes = int(data.nbytes)


class ReceivedShardLoader(GGUFShardLoader):
    """`GGUFShardLoader`'s interface over received tensor slices. Ranges are asked for in the
    whole tensor's coordinates (as with a file) and mapped onto the slice held; asking for
    anything outside it raises KeyError naming the tensor."""

    def __init__(self, spec, shard: ShardSpec, tensors: dict[str, ReceivedTensor]):
        self.spec = spec
        self.shard = shard
        self.tensors = tensors

    @staticmethod
    def _local(held: tuple[int, int] | None, want: tuple[int, int] | None, name: str, what: str):
        """`want` (whole-tensor coordinates) -> coordinates inside the held slice, or None for all of it."""
        if want is None or want == held:
            if want is None and held is not None:
                raise KeyError(f"tensor {name!r}: all {what} asked for, only {what} {held} received")
            return None
        if held is None:
            return want
        if not held[0] <= want[0] < want[1] <= held[1]:
            raise KeyError(f"tensor {name!r}: {what} {want} asked for, only {held} received")
        return want[0] - held[0], want[1] - held[0]

    def linear_weight(self, name: str, rows=None, cols=None):
        t = self.raw(name)
        from shardline.kernels.formats import QuantizedWeight

        q = QuantizedWeight.from_gguf(t)
        if cols is not None:
            c = self._local(t.cols, tuple(cols), name, "columns")
            return q if c is None or c == (0, q.in_features) else q.col_slice(*c)
        r = self._local(t.rows, None if rows is None else tuple(rows), name, "rows")
        if t.cols is not None:
            raise KeyError(f"tensor {name!r}: all columns asked for, only {t.cols} received")
        return q if r is None or r == (0, q.out_features) else q.row_slice(*r)

    def _part(self, name: str):
        """Received tensors are the logical ones (the coordinator cut fused tensors into parts)."""
        return self.raw(name), 0, None

    def quantized(self, name: str):
        return self.linear_weight(name)

    def dense(self, name: str):
        t = self.raw(name)
        if t.rows is not None or t.cols is not None:
            raise KeyError(f"tensor {name!r}: the whole tensor asked for, a slice received")
        return super().dense(name)

    def rows(self, name: str, start: int, stop: int):
        t = self.raw(name)
        r = self._local(t.rows, (start, stop), name, "rows") or (0, int(t.data.shape[0]))
        return GGUFShardLoader.dense(self, name)[r[0]:r[1]].contiguous()

    def cols(self, name: str, start: int, stop: int):
        t = self.raw(name)
        c = self._local(t.cols, (start, stop), name, "columns") or (0, int(t.shape[0]))
        return GGUFShardLoader.dense(self, name)[:, c[0]:c[1]].contiguous()


class ReceivedCheckpoint:
    """`shardline.model_file.SafetensorsCheckpoint`'s reading interface (`__contains__`,
    `shapes`, `read`, `close`, `directory`) over received slices of a checkpoint's tensors.

    tensors: logical GGUF name -> (array in the wire dtype, st_dtype, rows, cols), rows/cols the
    slice held in whole-tensor coordinates (None: all). Whole shapes come from the spec
    (`expected_tensors`). Reading outside a held slice raises KeyError naming the tensor.
    """

    def __init__(self, spec, tensors: dict[str, tuple[np.ndarray, str, tuple | None, tuple | None]]):
        from shardline.model_file import expected_tensors

        self.directory = "<received from the coordinator>"
        self.tensors = tensors
        expected = expected_tensors(spec)
        self.shapes = {name: expected[name] for name in tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def locate(self, name: str, spec) -> tuple[str, int, None]:
        """Received tensors are keyed by their logical names (fused parts already cut)."""
        return name, 0, None

    def close(self) -> None:
        """Drop the received arrays (the stage holds its own encoded copies)."""
        self.tensors = {}

    @staticmethod
    def _local(held, want, size: int, name: str, what: str) -> slice:
        lo, hi = want if want is not None else (0, size)
        h0, h1 = held if held is not None else (0, size)
        if not h0 <= lo < hi <= h1:
            raise KeyError(f"tensor {name!r}: {what} [{lo}, {hi}) asked for, only [{h0}, {h1}) received")
        return slice(lo - h0, hi - h0)

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        """As `SafetensorsCheckpoint.read`: rows [r0, r1) and columns [c0, c1) in whole-tensor
        coordinates (all when None) -> float32 NumPy array (a copy)."""
        import torch

        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} was not received")
        data, st_dtype, held_rows, held_cols = self.tensors[name]
        shape = self.shapes[name]
        r = self._local(held_rows, rows, shape[0], name, "rows")
        part = data[r] if len(shape) == 1 else data[r, self._local(held_cols, cols, shape[1], name, "columns")]
        if st_dtype == "BF16":
            return torch.from_numpy(np.ascontiguousarray(part).view(np.int16)).view(torch.bfloat16).float().numpy()
        return part.astype(np.float32)


def _recv(sock, deadline_s: float, expect: MsgType) -> M.Message:
    """Next message of type `expect` (HEARTBEATs skipped). Raises ShardTransferError on ERROR, a
    malformed frame, or after TRANSFER_TIMEOUT_S of silence."""
    while True:
        if not sock.poll(int(deadline_s * 1000)):
            raise ShardTransferError(f"no {expect.name} from the coordinator for {deadline_s:.0f} s")
        try:
            msg_type, body = P.decode(sock.recv())
        except P.ProtocolError as exc:
            raise ShardTransferError(f"malformed message from the coordinator: {exc}") from None
        if msg_type is expect:
            return body
        if msg_type is MsgType.ERROR:
            raise ShardTransferError(f"coordinator refused the shard transfer: {body.message}")
        if msg_type is not MsgType.HEARTBEAT:
            log.warning("ignoring %s during the shard transfer", msg_type.name)


def check_manifest(manifest: M.ShardManifest, spec, shard: ShardSpec) -> None:
    """The manifest lists exactly this shard's tensor slices, contiguous in the stream.

    Raises:
        ShardTransferError: a tensor missing, extra, sliced otherwise or misplaced.
    """
    want = [(s.name, s.rows, s.cols)
            for s in shard_tensor_slices(spec, shard.layer_start, shard.layer_end, shard.is_first, shard.is_last,
                                         shard.tp_rank, shard.tp_size)]
    got = [(e.name, e.rows, e.cols) for e in manifest.tensors]
    if got != want:
        missing = sorted({w[0] for w in want} - {g[0] for g in got})
        raise ShardTransferError(f"the manifest is not this shard's: {len(got)} tensors, expected {len(want)}"
                                 + (f" (missing {', '.join(missing[:5])})" if missing else ""))
    offset = 0
    for e in manifest.tensors:
        try:
            itemsize = np.dtype(e.dtype).itemsize
        except TypeError:
            raise ShardTransferError(f"tensor {e.name}: unknown dtype {e.dtype!r}") from None
        if e.offset != offset or e.nbytes != int(np.prod(e.shape)) * itemsize:
            raise ShardTransferError(f"tensor {e.name}: offset/size do not match the stream layout")
        offset += e.nbytes
    if offset != manifest.total_bytes:
        raise ShardTransferError(f"tensors hold {offset} bytes, manifest says {manifest.total_bytes}")


def fetch_shard(sock, worker_id: str, model_digest: str, spec, shard: ShardSpec, reason: str,
                window: int = P.SHARD_WINDOW, quantization: str = "none", group_size: int = 32,
                dtype: str = "float32") -> tuple[ReceivedShardLoader | SafetensorsShardLoader, M.TransferStats]:
    """Receive this worker's shard over `sock` (the worker-plane DEALER) and return a loader over
    it and the transfer's stats. A GGUF shard gives a
    `ReceivedShardLoader`; a safetensors shard a `SafetensorsShardLoader` that encodes the
    received values as `quantization`, `group_size` and `dtype` say (as ASSIGN names them).

    Raises:
        ShardTransferError: refused, a chunk still corrupt after MAX_CHUNK_RETRIES, a digest
            mismatch, quantization asked for a GGUF shard, or the coordinator silent for
            TRANSFER_TIMEOUT_S.
    """
    t0 = time.monotonic()
    sock.send(P.encode(M.ShardRequest(worker_id=worker_id, model_digest=model_digest, reason=reason)))
    manifest = _recv(sock, TRANSFER_TIMEOUT_S, MsgType.SHARD_MANIFEST)
    check_manifest(manifest, spec, shard)
    fmt = manifest.format
    if fmt not in ("gguf", "safetensors"):
        raise ShardTransferError(f"manifest: unknown format {fmt!r}")
    if fmt == "gguf" and quantization != "none":
        raise ShardTransferError(f"quantization={quantization} applies to safetensors checkpoints; the coordinator "
                                 f"serves a GGUF file")
    total, chunk_bytes, n = manifest.total_bytes, manifest.chunk_bytes, manifest.num_chunks
    if n != max(1, -(-total // chunk_bytes)):
        raise ShardTransferError(f"manifest: {n} chunks of {chunk_bytes} bytes cannot hold {total} bytes")
    buf = np.empty(total, dtype=np.uint8)
    received = [False] * n
    retries = {}
    next_index, outstanding = 0, 0
    while not all(received) or outstanding:
        while outstanding < window and next_index < n:
            sock.send(P.encode(M.ShardFetch(index=next_index)))
            next_index += 1
            outstanding += 1
        if outstanding == 0:
            break
        body = _recv(sock, TRANSFER_TIMEOUT_S, MsgType.SHARD_CHUNK)
        outstanding -= 1
        i, data = body.index, body.data
        if not 0 <= i < n:
            raise ShardTransferError(f"malformed SHARD_CHUNK (index {i} of {n})")
        start = i * chunk_bytes
        size = min(chunk_bytes, total - start)
        if body.offset != start or len(data) != size or hashlib.sha256(data).hexdigest() != body.sha256:
            retries[i] = retries.get(i, 0) + 1
            log.warning("shard chunk %d/%d failed its checksum (try %d)", i, n, retries[i])
            if retries[i] > MAX_CHUNK_RETRIES:
                raise ShardTransferError(f"chunk {i} failed its sha256 check {retries[i]} times")
            sock.send(P.encode(M.ShardFetch(index=i)))
            outstanding += 1
            continue
        buf[start:start + size] = np.frombuffer(data, dtype=np.uint8)
        received[i] = True
    digest = hashlib.sha256(buf).hexdigest()
    if digest != manifest.shard_digest:
        raise ShardTransferError(f"shard sha256 {digest[:16]} does not match the manifest's "
                                 f"{manifest.shard_digest[:16]}")
    stats = M.TransferStats(bytes=total, chunks=n, retries=sum(retries.values()), seconds=time.monotonic() - t0,
                            format=fmt)
    views = [(e, buf[e.offset:e.offset + e.nbytes].view(np.dtype(e.dtype)).reshape(e.shape))
             for e in manifest.tensors]
    if fmt == "safetensors":
        if any(e.st_dtype not in ("F32", "F16", "BF16") for e, _ in views):
            raise ShardTransferError("manifest: a safetensors tensor without st_dtype F32, F16 or BF16")
        ckpt = ReceivedCheckpoint(spec, {e.name: (arr, e.st_dtype, e.rows, e.cols) for e, arr in views})
        return SafetensorsShardLoader(ckpt.directory, spec, shard, quantization, group_size, dtype,
                                      checkpoint=ckpt), stats
    return ReceivedShardLoader(spec, shard, {e.name: ReceivedTensor(e, arr) for e, arr in views}), stats
