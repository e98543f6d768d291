"""Chat templates: a model's jinja2 template turning a conversation into its prompt text.

Models ship the template as they were trained with it (GGUF `tokenizer.chat_template`,
tokenizer_config.json `chat_template`, or chat_template.jinja). It is rendered the way
transformers' `apply_chat_template` renders it (transformers `utils/chat_template_utils.py`), since
that is what the templates are written and tested against:

- a sandboxed, immutable jinja2 environment with `trim_blocks` and `lstrip_blocks`, the
  `loopcontrols` extension and a `{% generation %}` block tag (rendered as its body);
- globals `raise_exception(message)`, `strftime_now(format)`, `dict(...)` and a `namespace` that
  refuses underscore-prefixed names; a `tojson` filter that does not escape HTML and takes
  `indent`, `separators`, `sort_keys`;
- variables `messages` (message keys whose value is None dropped, reasoning copied between
  `reasoning_content`, `thinking` and `reasoning`), `tools` and `documents` (None when not given),
  `add_generation_prompt`, the special tokens that exist (`bos_token`, `eos_token`, `unk_token`,
  `pad_token`), and any further keyword arguments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning travels under; templates read one or another.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
    rendering a prompt it is just its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's `namespace()`, refusing underscore-prefixed attributes (no reaching into CPython
    internals from a template)."""

    def __init__(*args, **kwargs):  # jinja2's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types (str, int, float, bool, None, dict, list, tuple), so
    the sandbox sees no object with methods of its own; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _message(message: Any) -> dict:
    """One message as templates expect it: keys whose value is None dropped (templates test
    `'tool_calls' in message`), reasoning under every name templates read."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a chat message must be a dict with 'role' and 'content', not {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """A compiled chat template. `ChatTemplate(source).render(messages, ...)` gives the prompt text.

    Raises:
        ValueError: (constructor) the template does not parse.
    """

    def __init__(self, source: str):
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]).

        `tools`: JSON schemas of the functions the model may call (OpenAI's `tools` entries);
        `documents`: [{"title": ..., "text": ...}] for retrieval templates; `special_tokens`:
        {"bos_token": "<s>", ...}, the None ones left undefined; further keyword arguments become
        template variables (e.g. `enable_thinking=False`) and override special tokens.

        Raises:
            ValueError: a message, tool or document that is not a dict, or the template raised
                (`raise_exception`) or failed.
        """
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be JSON schemas (dicts)")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise ValueError("documents must be dicts with 'title' and 'text'")
        variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        variables.update(kwargs)
        try:
            return self._template.render(
                messages=[_plain(_message(m)) for m in messages],
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
