"""Codec benchmark of the hot path: a STEP of 64 sequences (the coordinator builds and encodes it
every step, every worker decodes it) and its STEP_RESULT, in microseconds per message (the best
of several timeit repeats). Two STEPs: 64 sequences decoding one token each (some with a new KV
block), and the same with 8 of them new (a 32-token prompt chunk, the whole block table and the
sampling parameters).

    python bench/protocol.py [--seqs 64] [--number 2000]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardline import messages as M  # noqa: E402
from shardline import protocol as P  # noqa: E402
from shardline.sampling import SamplingParams  # noqa: E402

PARAMS = SamplingParams(max_tokens=128, temperature=0.7, top_p=0.9, seed=1).to_dict()


def build_step(step_id: int, num_seqs: int, num_new: int) -> M.Step:
    """The STEP the dispatcher builds for `num_seqs` sequences, the first `num_new` of them new."""
    seqs = []
    for i in range(num_seqs):
        if i < num_new:
            seqs.append(M.StepSeq(seq_id=i, start=0, n=32, tokens=P.pack_ids(range(32)),
                                  blocks=P.pack_ids([2 * i, 2 * i + 1]), reset=True, sample=True, params=PARAMS,
                                  logprobs=0, prompt_len=32))
        else:
            seqs.append(M.StepSeq(seq_id=i, start=100 + i, n=1, tokens=P.pack_ids([1000 + i]),
                                  blocks=P.pack_ids([500 + i] if i % 16 == 0 else []), reset=False, sample=True))
    return M.Step(step_id=step_id, seqs=seqs, free=[1000, 1001])


def build_result(step_id: int, num_seqs: int) -> M.StepResult:
    return M.StepResult(step_id=step_id, seq_ids=P.pack_ids(range(num_seqs)), tokens=P.pack_ids(range(num_seqs)),
                        forward_s=0.0123)


def best_us(fn, number: int) -> float:
    """Microseconds per call: the best of 5 repeats of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--number", type=int, default=2000, help="calls per timeit repeat")
    args = ap.parse_args()
    n = args.seqs
    print(f"protocol {P.PROTOCOL_MAJOR}.{P.PROTOCOL_MINOR}, {n} sequences, us per message (best of 5)")
    print(f"{'message':28s} {'bytes':>6s} {'build+encode':>13s} {'decode':>8s} {'total':>8s}")
    for new in (0, 8):
        frame = P.encode(build_step(7, n, new))
        enc = best_us(lambda: P.encode(build_step(7, n, new)), args.number)
        dec = best_us(lambda: P.decode(frame), args.number)
        print(f"{f'STEP ({new} new)':28s} {len(frame):6d} {enc:13.1f} {dec:8.1f} {enc + dec:8.1f}")
    frame = P.encode(build_result(7, n))
    enc = best_us(lambda: P.encode(build_result(7, n)), args.number)
    dec = best_us(lambda: P.decode(frame), args.number)
    print(f"{'STEP_RESULT':28s} {len(frame):6d} {enc:13.1f} {dec:8.1f} {enc + dec:8.1f}")


if __name__ == "__main__":
    main()
