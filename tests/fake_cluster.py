"""A coordinator without sockets, and fake workers and clients that talk to it in frames.

`FakeCluster` builds a real `Coordinator` (registry, plan lifecycle, dispatcher, input and output
processors) whose outbox is a `RecordingOutbox`, on the packaged SmolLM2 model (opened once per
process). Workers and clients are routing ids; their messages go through the coordinator's frame
routing (`on_worker_frame`, `on_client_frame`) exactly as the sockets would deliver them, and
`run_loop_turn` does what one turn of the serving loop does after reading the inbox.
"""

from __future__ import annotations

import functools
import time

from shardline import __version__
from shardline import messages as M
from shardline import protocol as P
from shardline.config import load_config
from shardline.coordinator.outbox import RecordingOutbox
from shardline.coordinator.served_model import ServedModel
from shardline.coordinator.server import Coordinator
from shardline.protocol import MsgType

GIB = 2**30


@functools.lru_cache(maxsize=1)
def served_model() -> ServedModel:
    return ServedModel.open(load_config())


class FakeCluster:
    """`FakeCluster(workers={"count": 2}, ...)`: cluster.yaml overrides (metrics off)."""

    def __init__(self, **overrides):
        overrides.setdefault("metrics", {"enabled": False})
        self.config = load_config(None, overrides)
        self.outbox = RecordingOutbox()
        self.coord = Coordinator(self.config, outbox=self.outbox, model=served_model())
        self.lifecycle = self.coord.lifecycle
        self.registry = self.coord.registry

    # ---- workers -------------------------------------------------------------------------
    def register(self, worker_id: str, memory_gb: float = 4.0, **fields) -> None:
        """REGISTER of `worker_id` (the `M.Register` fields in `fields` replace the defaults)."""
        fields = {"incarnation": f"{worker_id}-1", "host": "127.0.0.1", "device": "cpu",
                  "memory_bytes": int(memory_gb * GIB), "version": __version__, "pid": 1000, "threads": 1,
                  "model_digest": self.coord.model.digest, **fields}
        self.worker_says(worker_id, M.Register(worker_id=worker_id, **fields))

    def ready(self, worker_id: str, plan_id: int | None = None) -> None:
        self.worker_says(worker_id, M.Ready(
            worker_id=worker_id, plan_id=self.lifecycle.plan_id if plan_id is None else plan_id,
            weight_bytes=10**8, kv_bytes=2**29, load_s=0.5))

    def serve(self, *worker_ids: str) -> None:
        """Register the workers and answer every ASSIGN with READY."""
        for wid in worker_ids:
            self.register(wid)
        for a in self.lifecycle.plan.assignments:
            self.ready(a.worker_id)

    def worker_says(self, worker_id: str, body: M.Message | bytes, identity: bytes | None = None) -> None:
        """`body` (a message, or a frame as bytes) from the worker's main socket, or from `identity`."""
        frame = body if isinstance(body, bytes) else P.encode(body)
        self.coord.on_worker_frame(worker_id.encode() if identity is None else identity, frame)

    def sampler(self) -> str:
        plan = self.lifecycle.plan
        return plan.assignments[-plan.tp_size].worker_id

    def step_result(self, step: M.Step, tokens: dict[int, int], worker_id: str | None = None, **fields) -> None:
        """The sampler's STEP_RESULT of a STEP: `tokens` maps seq id -> sampled token id; `fields`:
        further `M.StepResult` fields."""
        ids = [e.seq_id for e in step.seqs if e.sample]
        self.worker_says(worker_id or self.sampler(), M.StepResult(
            step_id=step.step_id, seq_ids=P.pack_ids(ids), tokens=P.pack_ids([tokens[i] for i in ids]),
            forward_s=0.01, **fields))

    # ---- clients -------------------------------------------------------------------------
    def client_says(self, client: bytes, body: M.Message | bytes) -> None:
        """`body` (a message, or a frame as bytes) from client routing id `client`."""
        self.coord.on_client_frame(client, body if isinstance(body, bytes) else P.encode(body))

    def generate(self, client: bytes, request_id: str, prompt: str = "Hello", stream: bool = False, **params) -> None:
        """GENERATE with sampling `params` (max_tokens 4 unless given)."""
        params.setdefault("max_tokens", 4)
        self.client_says(client, M.Generate(request_id=request_id, prompt=prompt, params=params, stream=stream))

    # ---- the loop ------------------------------------------------------------------------
    def run_loop_turn(self, now: float | None = None) -> list[M.Step]:
        """Steps 2-5 of the serving loop: dispatch, emit, and with `now` (monotonic seconds) the
        heartbeat tick, then a worker drain's progress. Returns the STEP bodies dispatched (as
        the plan's first member received them)."""
        first = self.lifecycle.plan.assignments[0].worker_id if self.lifecycle.plan else None
        before = len(self.outbox.to(first, MsgType.STEP)) if first else 0
        self.coord.dispatch_steps()
        self.coord.emit_outputs()
        if now is not None:
            self.lifecycle.tick(now)
        self.lifecycle.advance_worker_drain(time.monotonic() if now is None else now)
        return self.outbox.to(first, MsgType.STEP)[before:] if first else []
