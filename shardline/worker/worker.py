"""Worker process: registers with the coordinator, loads its shard, executes step plans.

The worker decides nothing: it replays exactly the plan the coordinator sends (STEP), in the
order sent. Loop:

    1. poll the coordinator socket (up to one heartbeat interval)
    2. ASSIGN -> load shard, join torch.distributed, allocate the KV pool, reply READY
       STEP   -> update block tables, forward, send hidden states on / sample and reply
       HEARTBEAT -> note the coordinator is alive; SHUTDOWN -> leave the loop
    3. send a heartbeat when one is due; exit if the coordinator has been silent too long
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque

import torch
import zmq

from shardline import __version__
from shardline import protocol as P
from shardline.model_file import ModelSpec
from shardline.protocol import MsgType
from shardline.sampling import SamplingParams
from shardline.worker.process import default_memory_bytes, keep_freed_memory, local_ip_towards, rss_bytes
from shardline.worker.sampler import SequenceSampling

log = logging.getLogger("shardline.worker")

MAX_STEP_TIMES = 4096  # forward-pass durations kept between two heartbeats (the coordinator takes no more)


class LoadProgress:
    """A progress bar over the phases of loading a shard (rich), drawn on stderr only when it is a
    terminal, so the logs of launched or redirected workers stay clean."""

    def __init__(self, title: str, phases: list[str]):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.title, self.phases, self.done, self.escape = title, phases, 0, escape
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty())
        self.task = self.progress.add_task(escape(f"{title}: {phases[0]}"), total=len(phases))
        self.progress.start()

    def next(self) -> None:
        """The current phase is done; the next one starts."""
        self.done += 1
        what = self.phases[self.done] if self.done < len(self.phases) else "done"
        self.progress.update(self.task, completed=self.done, description=self.escape(f"{self.title}: {what}"))

    def close(self) -> None:
        self.progress.stop()


class Worker:
    def __init__(self, coordinator: str, device: str = "cpu", threads: int = 1, memory_bytes: int | None = None,
                 worker_id: str | None = None, host: str | None = None, price_per_hour: float | None = None,
                 *, speed: float = 1.0, model_path: str | None = None, use_local_model: bool = True):
        """`speed`: relative speed declared to the planner (> 0). `model_path`: this host's copy of
        the model (its digest goes into REGISTER; a mismatch is refused by the coordinator).
        `use_local_model` False: never read a model file here, always receive the shard from
        the coordinator."""
        if not speed > 0:
            raise ValueError(f"speed={speed}: must be > 0")
        self.speed = speed
        self.model_path = model_path
        self.use_local_model = use_local_model
        self._digests: dict[str, str] = {}  # local model path -> sha256, computed once
        self.transfer_stats: dict | None = None
        if price_per_hour is not None and not price_per_hour >= 0:
            raise ValueError(f"price_per_hour={price_per_hour}: must be >= 0")
        self.price_per_hour = price_per_hour
        self.coordinator = coordinator
        self.device = device
        self.threads = threads
        self.memory_bytes = memory_bytes or default_memory_bytes()
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.incarnation = uuid.uuid4().hex[:12]
        self.host = host or local_ip_towards(coordinator)
        self.heartbeat_interval_s = 1.0
        self.heartbeat_misses = 10
        self.curve_keys: tuple[str, str, str] | None = None  # (server public, own public, own secret), Z85
        self.generation = 0  # plan generation of the last ASSIGN (named in data-plane ERRORs)
        self._stop = False
        self.model = self.kv_cache = self.comm = None
        self.block_tables: dict[int, list[int]] = {}
        self.params: dict[int, SequenceSampling] = {}  # seq_id -> sampling state (from its first step)
        # first stage: seq_id -> (step_id, token) of its latest sampled token (async scheduling:
        # a continuation's input; from this worker's sampler with one stage, else the token ring)
        self.sampled: dict[int, tuple[int, int]] = {}
        self.step_time_s = 0.0
        self.num_steps = 0
        self.busy_s = 0.0  # seconds in forward passes since start (input received -> output sent)
        self.step_times: deque[float] = deque(maxlen=MAX_STEP_TIMES)  # since the last heartbeat

    # ---- lifecycle -----------------------------------------------------------------------
    def run(self) -> int:
        keep_freed_memory()
        torch.set_num_threads(self.threads)
        os.environ.setdefault("NUMBA_NUM_THREADS", str(self.threads))
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        ctx = zmq.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())
        self._configure_socket(self.sock)
        self.sock.connect(self.coordinator)
        self._register()
        self._hb_stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()
        last_sent = last_heard = time.monotonic()
        rc = 0
        try:
            while not self._stop:
                if self.sock.poll(int(self.heartbeat_interval_s * 1000)):
                    try:
                        msg_type, body = P.decode(self.sock.recv())
                        P.validate(msg_type, body)
                    except P.ProtocolError as exc:
                        log.error("bad frame from the coordinator: %s", exc)
                        continue
                    last_heard = time.monotonic()
                    if msg_type is MsgType.STEP:
                        if self.comm is not None:  # else: the group broke; wait for the next ASSIGN
                            try:
                                self.execute_step(body)
                            except Exception as exc:  # a dead peer (gloo/NCCL error or timeout), or a bug
                                log.exception("step %s failed", body.get("step_id"))
                                self._drop_data_plane(f"step {body.get('step_id')}: {exc}")
                    elif msg_type is MsgType.ASSIGN:
                        if self.comm is not None:  # a new plan: leave the old group first
                            self.comm.abort()
                            self.comm = None
                        self.generation = body.get("generation", 0)
                        try:
                            self.assign(body)
                        except Exception as exc:  # e.g. a peer died during rendezvous (timeout)
                            log.exception("ASSIGN failed")
                            self._drop_data_plane(f"ASSIGN generation {body.get('generation')}: {exc}")
                    elif msg_type is MsgType.SHUTDOWN and body.get("reason") == "lost":
                        self._rejoin()
                    elif msg_type is MsgType.SHUTDOWN:
                        log.info("worker %s: shutdown requested", self.worker_id)
                        break
                    elif msg_type is MsgType.ERROR:
                        log.error("coordinator refused this worker: %s", body.get("message"))
                        rc = 1
                        break
                    last_heard = time.monotonic()  # handling (a load) may take long
                now = time.monotonic()
                if self.model is not None and now - last_heard > self.heartbeat_interval_s * self.heartbeat_misses:
                    log.error("coordinator silent for %.1f s; exiting", now - last_heard)
                    if self.comm is not None:  # cut off: pending sends would only wait out their timeout
                        self.comm.abort()
                        self.comm = None
                    rc = 1
                    break
        finally:
            self.close()
        return rc

    def stop(self) -> None:
        self._stop = True

    def _register(self) -> None:
        self._send(MsgType.REGISTER, {
            "worker_id": self.worker_id, "incarnation": self.incarnation, "host": self.host,
            "device": self.device, "memory_bytes": self.memory_bytes, "version": __version__,
            "pid": os.getpid(), "threads": self.threads, "speed": self.speed,
            "protocol": f"{P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}",
            **({"model_digest": self._digest(self.model_path), "model_path": self.model_path}
               if self.model_path and self.use_local_model else {}),
            **({} if self.price_per_hour is None else {"price_per_hour": self.price_per_hour}),
        })
        log.info("worker %s registered with %s from %s", self.worker_id, self.coordinator, self.host)

    def _rejoin(self) -> None:
        """SHUTDOWN {reason: lost}: the coordinator declared this worker lost (it was frozen, cut
        off or too slow to heartbeat) and re-planned without it. Leave the data plane, drop the
        shard and the KV cache, and register again as a new incarnation: the coordinator may
        put it back into a plan (e.g. when the survivors alone cannot serve)."""
        log.warning("worker %s: declared lost by the coordinator; dropping the shard and registering again",
                    self.worker_id)
        if self.comm is not None:
            try:
                self.comm.abort()
            except Exception as exc:  # a half-broken group; it is dropped anyway
                log.warning("leaving the old group: %s", exc)
            self.comm = None
        self.model = self.kv_cache = None
        self.block_tables.clear()
        self.params.clear()
        self.sampled.clear()
        self.incarnation = uuid.uuid4().hex[:12]
        self._register()

    def _heartbeat_loop(self) -> None:
        """Thread: a HEARTBEAT every `heartbeat_interval_s` from a socket of its own (routing id
        `<worker id>#hb`; ZeroMQ sockets are not shared between threads), so a long load or a
        data-plane receive blocked on a dead peer does not make this worker look dead. Only a
        dead, frozen (SIGSTOP) or cut-off process stops heartbeating."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode() + b"#hb")
        sock.setsockopt(zmq.SNDHWM, 4)  # never queue more than a few stale heartbeats
        self._configure_socket(sock)
        sock.connect(self.coordinator)
        try:
            while not self._hb_stop.wait(self.heartbeat_interval_s):
                times, self.step_times = self.step_times, deque(maxlen=MAX_STEP_TIMES)
                comm = self.comm
                body = {"worker_id": self.worker_id, "incarnation": self.incarnation, "num_steps": self.num_steps,
                        "step_time_s": self.step_time_s, "rss_bytes": rss_bytes(), "busy_s": self.busy_s,
                        "step_times_s": list(times), **({"comm": comm.stats()} if comm is not None else {})}
                try:
                    sock.send(P.encode(MsgType.HEARTBEAT, body), zmq.NOBLOCK)
                except zmq.Again:  # the coordinator is unreachable; it will time this worker out
                    pass
        finally:
            sock.close(linger=0)

    def _configure_socket(self, sock) -> None:
        """CurveZMQ client keys on a worker-plane socket when `curve_keys` were given."""
        if self.curve_keys is not None:
            from shardline.security import configure_curve_client

            configure_curve_client(sock, *self.curve_keys)

    def _drop_data_plane(self, why: str) -> None:
        """The torch.distributed group is broken (a peer died or timed out) or replaced: leave it,
        forget the sequences' worker-side state, tell the coordinator (it re-plans), and wait for
        the next ASSIGN; STEPs until then are ignored. The ERROR names the plan generation that
        failed: a survivor blocked on a cut-off peer until `data_plane_timeout_s` reports it after
        the coordinator may already have re-planned, and that report must not break the new plan."""
        log.error("worker %s: data plane failed: %s", self.worker_id, why)
        if self.comm is not None:
            try:
                self.comm.abort()
            except Exception as exc:  # a half-broken group may fail to tear down; it is dropped anyway
                log.warning("leaving the old group: %s", exc)
            self.comm = None
        self.block_tables.clear()
        self.params.clear()
        self.sampled.clear()
        self._send(MsgType.ERROR, P.error_body(P.ErrorCode.UNAVAILABLE, f"data plane failed: {why}",
                                               generation=self.generation))

    def close(self) -> None:
        if getattr(self, "_hb_stop", None) is not None:
            self._hb_stop.set()
            self._hb_thread.join(timeout=5)
        if self.comm is not None:
            try:
                self.comm.close()
            except Exception:  # the peers may already be gone
                pass
            self.comm = None
        self.sock.close(linger=0)

    def _send(self, msg_type: MsgType, body: dict) -> None:
        self.sock.send(P.encode(msg_type, body))

    # ---- ASSIGN: load the shard ----------------------------------------------------------
    def assign(self, a: dict) -> None:
        from shardline.worker.comm import StageComm
        from shardline.worker.kv_cache import KVCache
        from shardline.worker.loader import ShardSpec, open_shard_loader
        from shardline.worker.model import StageModel

        gc.unfreeze()  # a previous plan's model (frozen below) can be collected once dropped
        t0 = time.monotonic()
        spec = ModelSpec.from_dict(a["spec"])
        self.spec = spec
        self.stage, self.pp_size = a["stage"], a["pp_size"]
        self.tp_rank, self.tp_size = a["tp_rank"], a["tp_size"]
        self.block_size = a["block_size"]
        self.heartbeat_interval_s = a.get("heartbeat_interval_s", self.heartbeat_interval_s)
        self.heartbeat_misses = max(self.heartbeat_misses, a.get("heartbeat_misses", 0) * 2)
        self.shard = ShardSpec(a["layer_start"], a["layer_end"], self.stage == 0, self.stage == self.pp_size - 1,
                               self.tp_rank, self.tp_size)
        bar = LoadProgress(f"stage {self.stage} layers [{self.shard.layer_start}, {self.shard.layer_end})",
                           ["joining the data plane", "weights", "KV cache", "warm-up (compiling kernels)"])
        backend = "nccl" if self.device == "cuda" else "gloo"
        self.block_tables.clear()
        self.params.clear()
        self.sampled.clear()
        self.comm = StageComm(a["rank"], a["world_size"], self.stage, self.pp_size, self.tp_rank, self.tp_size,
                              a["store_host"], a["store_port"], a["store_prefix"], backend, self.host,
                              timeout_s=a.get("data_plane_timeout_s", 60.0), token_stream=bool(a.get("token_ring")))
        bar.next()
        local = self._local_model(a)
        if local is not None:
            loader = open_shard_loader(local, spec, self.shard, a.get("quantization", "none"),
                                       a.get("quantization_group_size", 32), a.get("dtype", "float32"))
        else:
            loader = self._receive_shard(a, spec)
        self.model = StageModel(spec, loader, a["max_positions"], all_reduce=self.comm.all_reduce,
                                all_gather=self.comm.all_gather)
        loader.close()
        if a.get("gemm_weights") == "bf16" and self.device == "cpu":
            self.model.keep_bf16_copies()
        bar.next()
        n_layers = self.shard.layer_end - self.shard.layer_start
        kv_dtype = {"float16": torch.float16, "float32": torch.float32}[a.get("kv_cache_dtype", "float32")]
        self.kv_cache = KVCache(n_layers, a["num_kv_blocks"], self.block_size, spec.num_kv_heads // self.tp_size,
                                spec.head_dim, dtype=kv_dtype)
        from shardline.worker.sampler import Sampler

        self.sampler = Sampler(spec.eos_token_id)
        bar.next()
        self.model.warm_up(self.kv_cache, self.block_size)
        bar.next()
        bar.close()
        # torch, Numba and the model make a heap that every full collection walks (100-290 ms a
        # pass measured in a worker after loading; a stall of the whole pipeline when it comes
        # during serving); frozen, collections look only at what serving allocates
        gc.collect()
        gc.freeze()
        load_s = time.monotonic() - t0
        log.info("worker %s: stage %d layers [%d, %d) tp %d/%d loaded in %.1f s (%.0f MB weights, %.0f MB KV)",
                 self.worker_id, self.stage, self.shard.layer_start, self.shard.layer_end, self.tp_rank,
                 self.tp_size, load_s, self.model.weight_bytes() / 1e6, self.kv_cache.nbytes / 1e6)
        self._send(MsgType.READY, {"worker_id": self.worker_id, "weight_bytes": self.model.weight_bytes(),
                                   "generation": a.get("generation", 0),
                                   "shard_transfer": self.transfer_stats,
                                   "rss_bytes": rss_bytes(),
                                   "kv_bytes": self.kv_cache.nbytes, "load_s": load_s,
                                   # continuations need the sampled tokens at the first stage
                                   "lookahead_ok": self.tp_size == 1 and (self.pp_size == 1 or self.comm.has_token_stream)})

    # ---- where the weights come from -----------------------------------------------------
    def _digest(self, path: str) -> str:
        from shardline.shard import model_digest

        if path not in self._digests:
            t0 = time.monotonic()
            self._digests[path] = model_digest(path)
            log.info("model %s: sha256 %s (%.1f s)", path, self._digests[path][:16], time.monotonic() - t0)
        return self._digests[path]

    def _local_model(self, a: dict) -> str | None:
        """A model file on this host whose digest is the one ASSIGN names (this worker's
        --model-path, else the coordinator's path, else the packaged model of that name), or None:
        then the shard comes from the coordinator."""
        if not self.use_local_model:
            return None
        want = a.get("model_digest")
        candidates = [self.model_path] if self.model_path else [a.get("model_path")]
        if not self.model_path and a.get("model"):
            from shardline.model_file import ModelError, resolve_model_path

            try:
                candidates.append(str(resolve_model_path(a["model"])))
            except ModelError:
                pass
        for path in dict.fromkeys(c for c in candidates if c):
            if not os.path.exists(path):
                continue
            if want is None:  # a coordinator that names no digest: trust the path
                return path
            have = self._digest(path)
            if have == want:
                return path
            log.warning("local model %s has sha256 %s, the coordinator serves %s; receiving the shard instead",
                        path, have[:16], want[:16])
        return None

    def _receive_shard(self, a: dict, spec: ModelSpec):
        from shardline.worker.shard_transfer import fetch_shard

        reason = "local model files disabled" if not self.use_local_model else "no local model file with that digest"
        log.info("worker %s: receiving stage %d tp %d/%d from the coordinator (%s)", self.worker_id, self.stage,
                 self.tp_rank, self.tp_size, reason)
        loader, self.transfer_stats = fetch_shard(self.sock, self.worker_id, a["model_digest"], spec, self.shard,
                                                  reason, quantization=a.get("quantization", "none"),
                                                  group_size=a.get("quantization_group_size", 32),
                                                  dtype=a.get("dtype", "float32"))
        st = self.transfer_stats
        log.info("worker %s: received %.1f MB in %d chunks (%d retried) in %.2f s", self.worker_id, st["bytes"] / 1e6,
                 st["chunks"], st["retries"], st["seconds"])
        return loader

    # ---- STEP: one forward pass ----------------------------------------------------------
    def execute_step(self, plan: dict) -> None:
        """Run one step plan. Plan fields: step_id, free [seq ids], seqs [maps with seq_id, start,
        n, tokens (packed int32), blocks (packed int32 new block-table entries), reset, sample,
        params (first time only)]."""
        from shardline.worker.model import build_attention_metadata

        t0 = time.perf_counter()
        for seq_id in plan.get("free", ()):
            self.block_tables.pop(seq_id, None)
            self.params.pop(seq_id, None)
            self.sampled.pop(seq_id, None)
        ring_in = self.shard.is_first and self.comm.has_token_stream
        if ring_in:  # take the tokens the last stage has sent so far (its sends never wait on us)
            self._note_sampled(self.comm.recv_sampled_tokens(block=False))
        seqs = plan["seqs"]
        if not seqs:
            return
        entries, tokens = [], []
        for s in seqs:
            sid = s["seq_id"]
            new_blocks = P.unpack_ids(s["blocks"])
            if s["reset"]:
                self.block_tables[sid] = new_blocks
            else:
                self.block_tables[sid].extend(new_blocks)
            if s.get("params") is not None:
                self.params[sid] = SequenceSampling(SamplingParams.from_dict(s["params"]), s.get("logprobs") or 0,
                                                    s.get("prompt_logprobs") or 0, s.get("prompt_len"))
            if self.shard.is_last:
                self._note_tokens(self.params[sid], s)
            entries.append((s["start"], s["n"], self.block_tables[sid], s["sample"]))
            if self.shard.is_first:
                if "prev" in s:  # a continuation: the token step `prev` sampled for this sequence
                    tokens.append(self._sampled_token(sid, s["prev"], ring_in))
                else:
                    tokens.extend(P.unpack_ids(s["tokens"]))
        meta = build_attention_metadata(entries, self.block_size)
        num_sampled = int(meta.sample_rows.shape[0])
        scored = self._prompt_logprob_rows(seqs) if self.shard.is_last else []
        if scored:  # the lm_head also runs on the prompt rows whose logprobs were asked for
            meta.sample_rows = torch.cat([meta.sample_rows, torch.tensor([r for sc in scored for r in sc[3]],
                                                                         dtype=torch.int64)])
        if self.shard.is_first:
            x = torch.tensor(tokens, dtype=torch.int64)
        else:
            x = self.comm.recv_hidden((meta.num_tokens, self.spec.hidden_size), torch.float32)
        t_input = time.perf_counter()  # busy time starts when the input is here (not while waiting for it)
        out = self.model(x, meta, self.kv_cache)
        send_wait_s = 0.0
        if not self.shard.is_last:
            t_send = time.perf_counter()
            self.comm.send_hidden(out)
            send_wait_s = time.perf_counter() - t_send  # a blocking send (gloo) waits for the next stage
        elif self.tp_rank == 0:
            sampled = [s for s in seqs if s["sample"]]
            states = [self.params[s["seq_id"]] for s in sampled]
            nlp = [st.num_logprobs for st in states]
            positions = [s["start"] + s["n"] for s in sampled]
            res = self.sampler(out[:num_sampled], [st.params for st in states], positions, nlp, states)
            sampled_ids = [s["seq_id"] for s in sampled]
            if self.shard.is_first:  # one stage: continuations read the tokens here
                self._note_sampled([(plan["step_id"], sampled_ids, res.token_ids)])
            elif self.comm.has_token_stream:  # before the result: the first stage may be waiting for them
                self.comm.send_sampled_tokens(plan["step_id"], sampled_ids, res.token_ids)
            body = {"step_id": plan["step_id"], "seq_ids": P.pack_ids(sampled_ids),
                    "tokens": P.pack_ids(res.token_ids), "forward_s": time.perf_counter() - t0}
            if any(nlp):
                body["logprobs"] = [None if lp is None else [lp[0], [list(t) for t in lp[1]]] for lp in res.logprobs]
            if scored:
                body["prompt_logprobs"] = self._prompt_logprobs(scored, out[num_sampled:])
            self._send(MsgType.STEP_RESULT, body)
        t_end = time.perf_counter()
        self.step_time_s = t_end - t0
        self.busy_s += t_end - t_input - send_wait_s
        self.step_times.append(t_end - t_input - send_wait_s)
        self.num_steps += 1

    def _note_sampled(self, messages) -> None:
        """Keep (step_id, token) per live sequence from (step_id, seq_ids, token_ids) messages
        (a late one for a freed sequence is dropped)."""
        for step_id, seq_ids, token_ids in messages:
            for sid, tok in zip(seq_ids, token_ids):
                if sid in self.block_tables:
                    self.sampled[sid] = (step_id, tok)

    def _sampled_token(self, seq_id: int, step_id: int, ring_in: bool) -> int:
        """The token step `step_id` sampled for `seq_id`: waits on the token ring for it if it
        has not arrived. Raises RuntimeError when it cannot come (no ring, a plan out of step)."""
        got = self.sampled.get(seq_id)
        while got is None or got[0] < step_id:
            if not ring_in:
                raise RuntimeError(f"continuation of sequence {seq_id}: step {step_id}'s token is not here")
            self._note_sampled(self.comm.recv_sampled_tokens(block=True))
            got = self.sampled.get(seq_id)
        if got[0] != step_id:
            raise RuntimeError(f"continuation of sequence {seq_id}: expected step {step_id}'s token, "
                               f"have step {got[0]}'s")
        return got[1]

    def _note_tokens(self, st: SequenceSampling, s: dict) -> None:
        """Last stage: keep the token ids of a sequence whose penalties need its history.
        `history` (with a reset) holds the tokens before the first computed position (a cached
        prefix); every step's `tokens` are the ids at positions [start, start + n)."""
        if not st.params.needs_history:
            return
        assert "prev" not in s, "a continuation of a sequence whose penalties need its history"
        if s.get("params") is not None:
            st.token_ids = P.unpack_ids(s.get("history") or b"")
        start = s["start"]
        assert st.token_ids is not None and len(st.token_ids) >= start, (len(st.token_ids or ()), start)
        del st.token_ids[start:]
        st.token_ids.extend(P.unpack_ids(s["tokens"]))

    def _prompt_logprob_rows(self, seqs: list[dict]) -> list[tuple[int, int, list[int], list[int], int]]:
        """Rows of this step whose logits give prompt logprobs: per sequence asking for them,
        (seq_id, start, targets, rows, the chunk's first token). The row at position p predicts
        the prompt token at p + 1; the last row of a chunk that ends inside the prompt predicts
        the first token of the next chunk (target -1), so its log-probabilities wait
        (`pending_logprobs`) for the next step."""
        scored, row = [], 0
        for s in seqs:
            st, start, n = self.params[s["seq_id"]], s["start"], s["n"]
            if st.num_prompt_logprobs and st.prompt_len and start < st.prompt_len:
                end = min(start + n, st.prompt_len - 1)  # positions [start, end) predict a prompt token
                chunk = P.unpack_ids(s["tokens"])
                targets = [chunk[p + 1 - start] if p + 1 < start + n else -1 for p in range(start, end)]
                scored.append((s["seq_id"], start, targets, [row + p - start for p in range(start, end)], chunk[0]))
            row += n
        return scored

    def _prompt_logprobs(self, scored, logits: torch.Tensor) -> list:
        """[seq_id, first position, entries] per sequence: entries[i] is the logprob entry
        ([logprob, [[token, logprob] x k]]) of the prompt token at position first + i."""
        from shardline.worker.sampler import prompt_logprobs

        logp = torch.log_softmax(logits.float(), dim=-1)
        result, i = [], 0
        for seq_id, start, targets, rows, first_token in scored:
            st = self.params[seq_id]
            lp = logp[i:i + len(rows)]
            i += len(rows)
            entries, first = [], start + 1
            if st.pending_logprobs is not None and start > 0:  # the previous chunk's last row
                first = start
                entries += prompt_logprobs(st.pending_logprobs[None], [first_token], st.num_prompt_logprobs)
            st.pending_logprobs = None
            known = [t for t in targets if t >= 0]
            if known:
                entries += prompt_logprobs(lp[: len(known)], known, st.num_prompt_logprobs)
            if targets and targets[-1] < 0:
                st.pending_logprobs = lp[-1].clone()
            if entries:
                result.append([seq_id, first, entries])
        return result


def main(coordinator: str, device: str = "cpu", threads: int = 1, memory_bytes: int | None = None,
         worker_id: str | None = None, host: str | None = None, price_per_hour: float | None = None,
         speed: float = 1.0, model_path: str | None = None, use_local_model: bool = True,
         curve_keys: tuple | None = None) -> int:
    """`curve_keys`: (coordinator public, own public, own secret) Z85 CurveZMQ keys, or None."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    w = Worker(coordinator, device, threads, memory_bytes, worker_id, host, price_per_hour, speed=speed,
               model_path=model_path, use_local_model=use_local_model)
    w.curve_keys = curve_keys
    return w.run()
