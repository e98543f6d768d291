"""Shard transfer, coordinator side: stream a worker exactly its shard's tensors from the model
file, in checksummed chunks, over the worker plane (docs/protocol.md, "Shard transfer").

A worker whose host lacks the model file (or holds one with another digest) sends SHARD_REQUEST.
The coordinator lays out the worker's tensor slices (`shardline.shard.shard_tensor_slices`) as
one byte stream and answers SHARD_MANIFEST:

    stream:  | tensor 0 slice (C order) | tensor 1 slice | ... | tensor n-1 slice |
              ^offset 0                  ^offset_1        ...                      ^total_bytes
    chunks:  [0, C) [C, 2C) ... (C = SHARD_CHUNK_BYTES, the last one shorter)

The worker then pulls chunks with SHARD_FETCH (at most SHARD_WINDOW outstanding), checks each
SHARD_CHUNK's sha256 and finally the whole stream's sha256 (`shard_digest`). Two formats
(the manifest's `format`):

    gguf         tensor bytes are the GGUF's own (quantized blocks as stored); a column slice of a
                 quantized weight takes whole quant blocks of each row, so the worker's kernels
                 run on it unchanged (`GGUFTensorSource`).
    safetensors  tensor bytes are the checkpoint's own values in the stored dtype (F32, F16, or
                 BF16 sent as its raw 16-bit patterns), Q/K rows still in the rotate-half layout;
                 the worker permutes and quantizes (`none|int8|int4`) after receipt exactly as
                 when it reads the files itself (`SafetensorsTensorSource`). The coordinator
                 never imports kernels/, so nothing is quantized before sending.

The coordinator keeps no copy of the stream: each chunk is cut from the memory-mapped file when
asked for (the last tensor's contiguous bytes are kept for the next chunk).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os

import numpy as np

from shardline import messages as M
from shardline import protocol as P
from shardline.architectures import architecture
from shardline.model_file import SafetensorsCheckpoint, is_safetensors_checkpoint
from shardline.protocol import ErrorCode
from shardline.shard import TensorSlice, shard_tensor_slices

log = logging.getLogger("shardline.coordinator")


class ShardError(ValueError):
    """A shard that cannot be served (message names the tensor or the reason)."""


class GGUFTensorSource:
    """Cuts tensor slices out of a memory-mapped GGUF file as C-contiguous NumPy arrays. Slices
    name logical tensors; with `spec`, a family's fused tensors are cut into their parts
    (`Architecture.locate`); without, names are taken as stored."""

    format = "gguf"

    def __init__(self, path: str, spec=None):
        import gguf

        from shardline.model_file import open_gguf

        self.reader = open_gguf(path)
        self.spec = spec
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._block = gguf.constants.GGML_QUANT_SIZES  # type -> (elements per block, bytes per block)

    def describe(self, ts: TensorSlice) -> tuple[dict, np.ndarray]:
        """(the slice's `ManifestTensor` fields but its offset, a view of the slice's data; not yet
        contiguous).

        Raises:
            ShardError: unknown tensor, a slice out of range or not aligned to quant blocks.
        """
        stored, first, part = (ts.name, 0, None) if self.spec is None else \
            architecture(self.spec.architecture).locate(ts.name, self.spec)
        t = self.tensors.get(stored)
        if t is None:
            raise ShardError(f"tensor {stored!r} is not in the model file")
        data = t.data
        ne = [int(n) for n in t.shape]  # ggml order: ne[0] = input features (columns)
        block, type_bytes = self._block[t.tensor_type]
        n_rows = data.shape[0] if part is None else part
        rows = ts.rows if ts.rows is not None or part is None else (0, part)
        if rows is not None:
            r0, r1 = rows
            if not 0 <= r0 < r1 <= n_rows:
                raise ShardError(f"{ts.name}: rows {list(rows)} out of range for {n_rows} rows")
            data = data[first + r0:first + r1]
            ne[-1] = r1 - r0
        if ts.cols is not None:
            c0, c1 = ts.cols
            if len(ne) != 2 or not 0 <= c0 < c1 <= ne[0] or c0 % block or c1 % block:
                raise ShardError(f"{ts.name}: columns {ts.cols} are not whole {block}-element blocks of {ne}")
            if data.dtype.itemsize == 1 and block * data.dtype.itemsize != type_bytes:  # raw quant blocks
                data = data[:, c0 // block * type_bytes: c1 // block * type_bytes]
            else:
                data = data[:, c0:c1]
            ne[0] = c1 - c0
        fields = dict(name=ts.name, ggml_type=int(t.tensor_type), ne=ne, dtype=data.dtype.str,
                      shape=list(data.shape), rows=ts.rows, cols=ts.cols, nbytes=int(data.nbytes))
        return fields, data


class SafetensorsTensorSource:
    """Cuts tensor slices out of a Hugging Face checkpoint directory, in the stored dtype. Tensors
    are named by their GGUF names (as `shard_tensor_slices` lists them) and looked up by their
    Hugging Face names; each slice is read only when its bytes are needed."""

    format = "safetensors"
    # stored dtype -> NumPy type string on the wire (BF16: raw 16-bit patterns)
    WIRE_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}

    def __init__(self, directory: str, spec=None):
        """`spec`: the served model's, to find logical tensors (fused ones in their parts); None:
        Llama's names."""
        self.ckpt = SafetensorsCheckpoint(directory)
        self.spec = spec

    def describe(self, ts: TensorSlice):
        """(the slice's `ManifestTensor` fields but its offset: name, st_dtype (the stored dtype),
        dtype, shape, rows, cols, nbytes; a function returning the slice as a C-contiguous NumPy
        array).

        Raises:
            ShardError: a tensor missing from the checkpoint, a slice out of range, or a stored
                dtype other than F32, F16 and BF16.
        """
        import math

        import torch

        from shardline.model_file import hf_locate

        try:
            hf, first, part = hf_locate(ts.name, self.spec)
        except KeyError:
            raise ShardError(f"tensor {ts.name!r} has no Hugging Face counterpart") from None
        if hf not in self.ckpt:
            raise ShardError(f"tensor {hf} (for {ts.name}) is not in the checkpoint {self.ckpt.directory}")
        full, st_dtype = list(self.ckpt.shapes[hf]), self.ckpt.dtypes[hf]
        if part is not None:  # a part of a fused tensor: its rows, in the part's coordinates
            full[0] = part
        if st_dtype not in self.WIRE_DTYPES:
            raise ShardError(f"tensor {hf}: stored dtype {st_dtype}; shard transfer sends F32, F16 and BF16")
        shape = list(full)
        for dim, rng in ((0, ts.rows), (1, ts.cols)):
            if rng is not None:
                if dim >= len(full) or not 0 <= rng[0] < rng[1] <= full[dim]:
                    raise ShardError(f"{ts.name}: {'rows' if dim == 0 else 'columns'} {list(rng)} out of range "
                                     f"for shape {full}")
                shape[dim] = rng[1] - rng[0]
        dtype = self.WIRE_DTYPES[st_dtype]

        rows = ts.rows if ts.rows is not None or part is None else (0, part)
        stored_rows = None if rows is None else (first + rows[0], first + rows[1])

        def read() -> np.ndarray:
            t = self.ckpt.read_stored(hf, stored_rows, ts.cols)
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            return t.numpy().view(np.dtype(dtype))

        fields = dict(name=ts.name, st_dtype=st_dtype, dtype=dtype, shape=shape, rows=ts.rows, cols=ts.cols,
                      nbytes=math.prod(shape) * np.dtype(dtype).itemsize)
        return fields, read


class ShardLayout:
    """One worker's shard as a byte stream: the manifest, chunk `i` on demand, and the digest.
    A source's `describe` gives each slice's data as an array (a memmap view) or as a function
    that reads it (called when the tensor's bytes are needed: the digest, then its chunks)."""

    def __init__(self, source, slices: list[TensorSlice], chunk_bytes: int = P.SHARD_CHUNK_BYTES):
        self.source = source
        self.chunk_bytes = chunk_bytes
        self.entries: list[M.ManifestTensor] = []
        self._views, self._offsets = [], []
        offset = 0
        for ts in slices:
            fields, view = source.describe(ts)
            entry = M.ManifestTensor(**fields, offset=offset)
            self.entries.append(entry)
            self._views.append(view)
            self._offsets.append(offset)
            offset += entry.nbytes
        self.total_bytes = offset
        self.num_chunks = max(1, -(-offset // chunk_bytes))
        self._cached: tuple[int, bytes] | None = None
        h = hashlib.sha256()
        for i in range(len(self.entries)):
            h.update(self._tensor_bytes(i))
        self.digest = h.hexdigest()

    def _tensor_bytes(self, i: int) -> memoryview:
        if self._cached is None or self._cached[0] != i:
            view = self._views[i]
            data = view() if callable(view) else view
            self._cached = (i, memoryview(np.ascontiguousarray(data)).cast("B"))
        return self._cached[1]

    def manifest(self, model_digest: str) -> M.ShardManifest:
        return M.ShardManifest(model_digest=model_digest, format=getattr(self.source, "format", "gguf"),
                               tensors=self.entries, total_bytes=self.total_bytes, chunk_bytes=self.chunk_bytes,
                               num_chunks=self.num_chunks, shard_digest=self.digest)

    def chunk(self, index: int) -> M.ShardChunk:
        """SHARD_CHUNK body for chunk `index`.

        Raises:
            ShardError: index out of range.
        """
        if not 0 <= index < self.num_chunks:
            raise ShardError(f"chunk index {index} out of range [0, {self.num_chunks})")
        start = index * self.chunk_bytes
        end = min(self.total_bytes, start + self.chunk_bytes)
        parts, pos = [], start
        i = max(0, bisect.bisect_right(self._offsets, start) - 1)
        while pos < end:
            e = self.entries[i]
            lo, hi = pos - e.offset, min(end, e.offset + e.nbytes) - e.offset
            if hi > lo:
                parts.append(self._tensor_bytes(i)[lo:hi])
                pos += hi - lo
            i += 1
        data = b"".join(parts)
        return M.ShardChunk(index=index, offset=start, data=data, sha256=hashlib.sha256(data).hexdigest())


class ShardServer:
    """Serves SHARD_REQUEST / SHARD_FETCH for the workers of the current plan.

    A worker's `shard` is its (layer_start, layer_end, is_first, is_last, tp_rank, tp_size), or
    None when it has no assignment (`PlanLifecycle.shard_of`).
    """

    def __init__(self, model_path: str, spec, model_digest: str):
        self.model_path = model_path
        self.spec = spec
        self.model_digest = model_digest
        self._source: GGUFTensorSource | SafetensorsTensorSource | None = None
        self.layouts: dict[str, ShardLayout] = {}
        self.bytes_sent: dict[str, int] = {}

    def answer(self, worker_id: str, body: M.ShardRequest | M.ShardFetch, shard) -> M.Message:
        """The reply to a worker's SHARD_REQUEST (SHARD_MANIFEST) or SHARD_FETCH (SHARD_CHUNK); to
        one that cannot be served, ERROR INVALID_REQUEST naming why."""
        try:
            if isinstance(body, M.ShardRequest):
                manifest = self.on_request(worker_id, body, shard)
                log.info("worker %s: sending its shard (%s): %d tensors, %.1f MB in %d chunks", worker_id,
                         body.reason, len(manifest.tensors), manifest.total_bytes / 1e6, manifest.num_chunks)
                return manifest
            return self.on_fetch(worker_id, body)
        except ShardError as exc:
            log.error("shard transfer to worker %s refused: %s", worker_id, exc)
            return P.error(ErrorCode.INVALID_REQUEST, str(exc))

    def on_request(self, worker_id: str, body: M.ShardRequest, shard) -> M.ShardManifest:
        """SHARD_REQUEST -> SHARD_MANIFEST body.

        Raises:
            ShardError: no assignment, a digest other than the served model's, or a tensor the
                source cannot serve (see the sources' `describe`).
        """
        want = body.model_digest
        if want != self.model_digest:
            raise ShardError(f"worker {worker_id} asks for model sha256 {want[:16]}, coordinator serves "
                             f"{os.path.basename(self.model_path)} sha256 {self.model_digest[:16]}")
        if shard is None:
            raise ShardError(f"worker {worker_id} has no assignment in the current plan")
        if self._source is None:
            source = SafetensorsTensorSource if is_safetensors_checkpoint(self.model_path) else GGUFTensorSource
            self._source = source(self.model_path, self.spec)
        layout = ShardLayout(self._source, shard_tensor_slices(self.spec, *shard))
        self.layouts[worker_id] = layout
        self.bytes_sent[worker_id] = 0
        return layout.manifest(self.model_digest)

    def on_fetch(self, worker_id: str, body: M.ShardFetch) -> M.ShardChunk:
        """SHARD_FETCH -> SHARD_CHUNK body.

        Raises:
            ShardError: no manifest was sent to this worker, or a bad index.
        """
        layout = self.layouts.get(worker_id)
        if layout is None:
            raise ShardError(f"worker {worker_id} fetched a chunk before SHARD_REQUEST")
        out = layout.chunk(body.index)
        self.bytes_sent[worker_id] += len(out.data)
        return out

    def done(self, worker_id: str) -> None:
        """The worker is loaded: forget its layout."""
        self.layouts.pop(worker_id, None)
