"""Structured outputs: the constraint a request puts on its generated text, and its request forms.

A request constrains its output with exactly one of (vLLM's `StructuredOutputsParams` fields):

    json            a JSON schema the output must validate against
    json_object     any JSON object
    regex           a regular expression the whole output must match
    choice          one of a list of strings
    grammar         a context-free grammar: EBNF / GBNF (rules written `name ::= ...`) or Lark
    structural_tag  an xgrammar structural tag (tool calls in a model's own format)

The HTTP forms that map onto it (`from_request`): OpenAI's `response_format` (`json_object`, or
`json_schema` with `name`, `schema` and `strict`), vLLM's `structured_outputs` object and its
older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` fields. The coordinator
compiles the constraint (`coordinator/grammar.py`); this module checks only its form, so a
client or the gateway can refuse a malformed one before sending it.

References: https://platform.openai.com/docs/guides/structured-outputs, vLLM
`vllm/sampling_params.py` (StructuredOutputsParams) and `docs/features/structured_outputs.md`.
"""

from __future__ import annotations

import json as _json
import re
from dataclasses import dataclass, fields
from typing import Any

MAX_SPEC_CHARS = 65536  # longest schema (as JSON text), regex, grammar or structural tag
MAX_CHOICES = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's json_schema.name


class RequestFieldError(ValueError):
    """A request field with a malformed value. `param` names the field as the request spelled it
    (OpenAI's error `param`, e.g. "response_format" or "tools")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputsParams:
    """The constraint on a request's output: exactly one of `json`, `json_object`, `regex`,
    `choice`, `grammar`, `structural_tag` (see the module docstring).

    json: the JSON schema as a dict (a JSON text is parsed). Properties are generated in the
    schema's order and properties the schema does not list are never generated (vLLM's default
    with xgrammar). strict: keywords the engine cannot enforce (e.g. `uniqueItems`, `not`) make
    the request fail instead of being ignored, so the output always validates (OpenAI's
    `json_schema.strict`). disable_any_whitespace: JSON without whitespace between tokens
    (vLLM's option of that name), which takes fewer tokens.

    Raises:
        ValueError: on construction, naming the field, for none or several constraints, a
            value of the wrong type, an empty or oversized one.
    """

    json: dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: dict | None = None
    strict: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self):
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", _json.loads(self.json))
            except ValueError as exc:
                raise ValueError(f"json: not valid JSON ({exc})") from None
        if isinstance(self.structural_tag, str):
            try:
                object.__setattr__(self, "structural_tag", _json.loads(self.structural_tag))
            except ValueError as exc:
                raise ValueError(f"structural_tag: not valid JSON ({exc})") from None
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs: give exactly one of {', '.join(KINDS)}"
                             + (f" (got {', '.join(set_kinds)})" if set_kinds else ""))
        for name in ("json_object", "strict", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a boolean")
        kind = set_kinds[0]
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            if not isinstance(value, dict):
                raise ValueError(f"{kind}: must be a JSON object, got {type(value).__name__}")
            if len(_json.dumps(value)) > MAX_SPEC_CHARS:
                raise ValueError(f"{kind}: longer than {MAX_SPEC_CHARS} characters as JSON")
        elif kind in ("regex", "grammar"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{kind}: must be a non-empty string")
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"{kind}: longer than {MAX_SPEC_CHARS} characters")
        elif kind == "choice":
            if (not isinstance(value, tuple) or not 0 < len(value) <= MAX_CHOICES
                    or not all(isinstance(c, str) and c for c in value)):
                raise ValueError(f"choice: must be 1 to {MAX_CHOICES} non-empty strings")
            if sum(map(len, value)) > MAX_SPEC_CHARS:
                raise ValueError(f"choice: more than {MAX_SPEC_CHARS} characters in all")
        elif kind == "json_object" and value is not True:
            raise ValueError("json_object: must be true")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """The constraint as one string (a compile-cache key): kind, options and the
        specification; two params with the same key compile to the same grammar."""
        spec = getattr(self, self.kind)
        text = spec if isinstance(spec, str) else _json.dumps(spec, ensure_ascii=False,
                                                               separators=(",", ":"))
        return f"{self.kind}:{int(self.strict)}{int(self.disable_any_whitespace)}:{text}"

    def to_dict(self) -> dict:
        """The wire form: the set constraint and the options that differ from their defaults. A
        schema or structural tag travels as its JSON text: a schema may nest deeper than the
        protocol lets a plain value nest."""
        value = getattr(self, self.kind)
        if self.kind in ("json", "structural_tag"):
            value = _json.dumps(value, ensure_ascii=False)
        d: dict[str, Any] = {self.kind: list(value) if self.kind == "choice" else value}
        if self.strict:
            d["strict"] = True
        if self.disable_any_whitespace:
            d["disable_any_whitespace"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredOutputsParams":
        """Build from the wire form (or vLLM's `structured_outputs` object); unknown keys are
        refused by name.

        Raises:
            ValueError: not a map, an unknown key, or a value the constructor refuses.
        """
        if not isinstance(d, dict):
            raise ValueError(f"structured_outputs must be a map, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"structured_outputs: unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**d)


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def from_request(*, response_format: Any = None, structured_outputs: Any = None, guided_json: Any = None,
                 guided_regex: Any = None, guided_choice: Any = None, guided_grammar: Any = None
                 ) -> StructuredOutputsParams | None:
    """The constraint of an OpenAI-style request body, or None when it asks for plain text.

    response_format: OpenAI's `{"type": "text"}`, `{"type": "json_object"}` or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
    structured_outputs: vLLM's object (the fields of StructuredOutputsParams). guided_*: vLLM's
    older fields (guided_json a schema or its JSON text, guided_choice a list of strings).
    At most one of these may constrain the output.

    Raises:
        RequestFieldError: naming the field, for a malformed value or two constraints at once.
    """
    given: list[tuple[str, StructuredOutputsParams]] = []
    if response_format is not None:
        params = _response_format(response_format)
        if params is not None:
            given.append(("response_format", params))
    if structured_outputs is not None:
        try:
            given.append(("structured_outputs", StructuredOutputsParams.from_dict(structured_outputs)))
        except ValueError as exc:
            raise RequestFieldError(f"structured_outputs: {exc}", "structured_outputs") from None
    for name, value in (("guided_json", guided_json), ("guided_regex", guided_regex),
                        ("guided_choice", guided_choice), ("guided_grammar", guided_grammar)):
        if value is None:
            continue
        try:
            given.append((name, StructuredOutputsParams(**{_GUIDED[name]: value})))
        except (ValueError, TypeError) as exc:
            raise RequestFieldError(f"{name}: {_reason(exc)}", name) from None
    if len(given) > 1:
        names = [n for n, _ in given]
        raise RequestFieldError(f"give only one output constraint, got {', '.join(names)}", names[1])
    return given[0][1] if given else None


def _response_format(rf: Any) -> StructuredOutputsParams | None:
    param = "response_format"
    if not isinstance(rf, dict):
        raise RequestFieldError("response_format: must be an object with a `type`", param)
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise RequestFieldError(f"response_format.type={kind!r}: must be text, json_object or json_schema", param)
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestFieldError("response_format.json_schema: must be an object with `name` and `schema`", param)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise RequestFieldError("response_format.json_schema.name: must be 1 to 64 letters, digits, '_' or '-'",
                                param)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestFieldError("response_format.json_schema.strict: must be a boolean", param)
    try:  # OpenAI: a missing schema is the empty schema, which any JSON value satisfies
        return StructuredOutputsParams(json=spec.get("schema", {}), strict=bool(strict))
    except ValueError as exc:
        raise RequestFieldError(f"response_format.json_schema.schema: {_reason(exc)}", param) from None


def _reason(exc: Exception) -> str:
    """A constructor's message without the field prefix it adds ("json: ...")."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    return rest if sep and head in KINDS else text
