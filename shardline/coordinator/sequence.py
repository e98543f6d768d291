"""A sequence: one request's tokens and where it stands in the KV cache."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shardline.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens of one request and its KV-cache bookkeeping.

    Invariant: `num_computed_tokens <= num_tokens`; the KV of tokens [0, num_computed_tokens) is
    in the blocks of `block_table` (block_table[i] holds positions [i*block_size, (i+1)*block_size)).
    A sequence samples a token whenever a step brings num_computed_tokens up to num_tokens.
    """

    seq_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    request_id: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of this sequence's full blocks
    num_blocks_sent: int = 0  # block-table entries already sent to the workers (diffs after)
    use_prefix_cache: bool = True  # False when every prompt position must be computed (prompt logprobs)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens at positions [start, stop) of prompt + output."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
