"""Offline batch inference: a JSONL file of requests -> a JSONL file of results, in input order.

Input lines are JSON objects with one of `prompt` (str), `messages` (chat) or `prompt_token_ids`,
an optional `id`, an optional `logprobs`, and any `SamplingParams` field (`max_tokens`,
`temperature`, `seed`, `stop`, ...). Output line i answers input line i:

    {"index": i, "id": ..., "text": ..., "token_ids": [...], "finish_reason": ..., "usage": {...}}
    {"index": i, "id": ..., "error": "InvalidRequestError: ..."}      # a refused request

Results are written in input order as soon as every earlier line is done, so the output is
always a prefix of the answer: a restarted run keeps the complete lines already there (a torn
last line is cut off) and submits only the rest.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import fields
from pathlib import Path

from shardline.client import Client, ShardlineError
from shardline.sampling import SamplingParams

_PARAM_KEYS = {f.name for f in fields(SamplingParams)}
_INPUT_KEYS = {"prompt", "messages", "prompt_token_ids"}


def completed_lines(output: Path) -> int:
    """Number of complete result lines at the head of `output`; cuts a torn last line off."""
    if not output.exists():
        return 0
    n, good_bytes = 0, 0
    with open(output, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n") or not isinstance(rec, dict) or rec.get("index") != n:
                break
            n += 1
            good_bytes += len(line)
    if good_bytes != output.stat().st_size:
        with open(output, "r+b") as f:
            f.truncate(good_bytes)
    return n


def parse_request(line: str, index: int) -> dict:
    """One input line -> keyword arguments for Client.generate.

    Raises:
        ValueError: not a JSON object, no prompt, or an unknown key (named).
    """
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"line {index + 1}: not JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"line {index + 1}: expected a JSON object")
    unknown = set(rec) - _PARAM_KEYS - _INPUT_KEYS - {"id", "logprobs"}
    if unknown:
        raise ValueError(f"line {index + 1}: unknown key(s) {', '.join(sorted(unknown))}")
    given = _INPUT_KEYS & set(rec)
    if len(given) != 1:
        raise ValueError(f"line {index + 1}: give exactly one of prompt, messages, prompt_token_ids")
    return rec


def run_batch(input_path: str | os.PathLike, output_path: str | os.PathLike, address: str | None = None,
              concurrency: int = 32, progress: bool = True, timeout_s: float = 600.0) -> dict:
    """Run every line of `input_path` through the cluster, appending results to `output_path`.

    Returns {"total", "skipped", "completed", "errors", "generated_tokens"}.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    output = Path(output_path)
    with open(input_path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    skip = completed_lines(output)
    if skip > len(lines):
        raise ValueError(f"{output} has {skip} results but {input_path} only {len(lines)} lines")
    stats = {"total": len(lines), "skipped": skip, "completed": 0, "errors": 0, "generated_tokens": 0}
    lock = threading.Lock()

    def work(client: Client, i: int) -> dict:
        out = {"index": i}
        try:
            rec = parse_request(lines[i], i)
            out["id"] = rec.get("id")
            kw = {k: v for k, v in rec.items() if k != "id"}
            r = client.generate(**kw)
            out.update(r.to_dict())
        except (ValueError, TypeError, OverflowError, ShardlineError) as exc:  # bad line or refused: recorded
            out["error"] = f"{type(exc).__name__}: {exc}"
        return out

    columns = [TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[tps]:.1f} tokens/s")]
    with Client(address, timeout_s=timeout_s) as client, open(output, "a") as out_f, \
            Progress(*columns, disable=not progress) as bar, ThreadPoolExecutor(concurrency) as pool:
        task = bar.add_task("batch", total=len(lines), completed=skip, tps=0.0)
        done: dict[int, dict] = {}
        next_write = skip
        pending = set()
        todo = iter(range(skip, len(lines)))
        start = bar.get_time()
        while True:
            while len(pending) < 2 * concurrency:
                i = next(todo, None)
                if i is None:
                    break
                fut = pool.submit(work, client, i)
                fut.index = i
                pending.add(fut)
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                res = fut.result()
                done[fut.index] = res
                with lock:
                    if "error" in res:
                        stats["errors"] += 1
                    else:
                        stats["completed"] += 1
                        stats["generated_tokens"] += len(res["token_ids"])
            while next_write in done:  # in input order
                out_f.write(json.dumps(done.pop(next_write), ensure_ascii=False) + "\n")
                next_write += 1
            out_f.flush()
            elapsed = max(bar.get_time() - start, 1e-9)
            bar.update(task, completed=next_write, tps=stats["generated_tokens"] / elapsed)
    return stats
