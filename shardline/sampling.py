"""Sampling parameters of a request: validated once, travel as a plain dict.

Semantics follow vLLM's `SamplingParams` (and OpenAI's API for the penalties), so a request
written for either means the same here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from shardline.structured_outputs import StructuredOutputsParams

MAX_N = 16  # most choices per request
MAX_LOGPROBS = 20  # most top-k logprobs per token (logprobs, prompt_logprobs)
MAX_TOKENS = 2**31 - 1  # bound of every token count and token id (they travel as int32)
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM: _SAMPLING_EPS)
MAX_LOGIT_BIAS = 1024  # most entries of logit_bias
MAX_BIAS = 100.0  # |bias| bound (OpenAI: -100 to 100)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token and when to stop.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1.0 disables nucleus
    sampling. A request with a `seed` draws from its own generator keyed by (seed, position), so
    its tokens do not depend on what else is in the batch.

    n: independent output sequences (choices) for one prompt; choice i > 0 uses the seed
    `choice_seed(seed, i)`. min_tokens: end-of-sequence and `stop_token_ids` cannot be sampled
    before this many tokens (their logits are set to -inf, as vLLM does). Penalties (vLLM /
    OpenAI semantics, applied to the logits before temperature, on the last stage, with the
    sequence's own token history): `repetition_penalty` r divides positive logits and multiplies
    negative ones by r for every token seen in the prompt or the output (1 = off);
    `frequency_penalty` subtracts f x (count of the token in the output); `presence_penalty`
    subtracts p once for every token present in the output (0 = off).

    logit_bias: {token id: bias in [-100, 100]} added to those logits (OpenAI's `logit_bias`;
    -100 in effect bans a token); a JSON-style map with string keys is accepted. Like vLLM,
    reported logprobs do not include it. structured_outputs: the constraint on the output
    (`StructuredOutputsParams`, or its dict form); the coordinator turns it into an
    allowed-token mask per step.

    Raises:
        ValueError: on construction, naming the field, when a value is outside its range.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    n: int = 1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None or isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        else:
            raise ValueError(f"stop={self.stop!r}: must be a string or a list of strings")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be a list of integers")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(self, "structured_outputs", StructuredOutputsParams.from_dict(self.structured_outputs))
        elif not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError(f"structured_outputs={self.structured_outputs!r}: must be a StructuredOutputsParams "
                             f"or its dict form")
        self._check()

    def _check(self):
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS:
            bad("max_tokens", f"must be an integer in [1, {MAX_TOKENS}]")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", "must be an integer in [0, max_tokens]")
        if not _is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be a number in [0, 100]")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= MAX_TOKENS:
            bad("top_k", f"must be an integer in [-1, {MAX_TOKENS}] (0 or -1 disables it)")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be a number in (0, 1]")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an integer in [0, 2**63)")
        if len(self.stop) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop):
            bad("stop", "must be at most 16 non-empty strings of at most 256 characters")
        if len(self.stop_token_ids) > 64 or not all(_is_int(t) and 0 <= t <= MAX_TOKENS for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be at most 64 integers in [0, {MAX_TOKENS}]")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a boolean")
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output", "must be a boolean")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}]")
        if not _is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", "must be a number in (0, 10] (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                bad(name, "must be a number in [-2, 2]")

    @property
    def greedy(self) -> bool:
        """Temperature below GREEDY_TEMPERATURE (1e-5, vLLM's sampling epsilon) means greedy:
        dividing the logits by a smaller one overflows float32."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_history(self) -> bool:
        """True when sampling needs the sequence's past token ids (a penalty is on)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice `index` of an n-choice request: n=1 and, with a seed, the
        seed `choice_seed(seed, index)` (choice 0 keeps the request's seed)."""
        seed = None if self.seed is None else choice_seed(self.seed, index)
        return replace(self, n=1, seed=seed)

    def to_dict(self) -> dict:
        """The wire form (a msgpack map with string keys). `logit_bias` and `structured_outputs`
        appear only when set, so a plain request reads the same to a peer that predates them."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _OPTIONAL_ON_WIRE}
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            d["logit_bias"] = {str(t): b for t, b in self.logit_bias.items()}
        if self.structured_outputs is not None:
            d["structured_outputs"] = self.structured_outputs.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        """Build from a wire dict; unknown keys are refused by name.

        Raises:
            ValueError: an unknown key or a value out of range (the field is named).
        """
        if not isinstance(d, dict):
            raise ValueError(f"sampling params must be a map, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


_OPTIONAL_ON_WIRE = ("logit_bias", "structured_outputs")


def _logit_bias(value) -> dict[int, float] | None:
    """`logit_bias` as {int token id: float bias}, None when empty. Keys may be ints or decimal
    strings (OpenAI's JSON form).

    Raises:
        ValueError: naming logit_bias, for anything else or a value out of range.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias={value!r}: must be a map of token id to bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if not _is_int(token) or not 0 <= token <= MAX_TOKENS:
            raise ValueError(f"logit_bias: key {key!r} must be a token id in [0, {MAX_TOKENS}]")
        if not _is_num(bias) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ValueError(f"logit_bias: bias {bias!r} of token {token} must be a number in "
                             f"[{-MAX_BIAS:g}, {MAX_BIAS:g}]")
        out[token] = float(bias)
    return out or None


def choice_seed(seed: int, index: int) -> int:
    """Seed of choice `index` of a seeded n-choice request: `seed` for choice 0, otherwise
    `(seed + index * 0x9E3779B97F4A7C15) mod 2**63` (a golden-ratio stride, so neighbouring
    request seeds do not share choices)."""
    return seed if index == 0 else (seed + index * 0x9E3779B97F4A7C15) % 2**63


def check_num_logprobs(name: str, value) -> int:
    """Validate a top-k logprobs count (`logprobs`, `prompt_logprobs`): an integer in
    [0, MAX_LOGPROBS], 0 meaning none. None counts as 0.

    Raises:
        ValueError: naming the field, for anything else.
    """
    if value is None:
        return 0
    if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise ValueError(f"{name}={value!r}: must be an integer in [0, {MAX_LOGPROBS}]")
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
