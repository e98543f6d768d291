"""Tool calling: OpenAI's `tools` and `tool_choice`, the model's tool-call text parsed into
`tool_calls` (whole, or delta by delta as OpenAI streams them), and the constraint that forces a
call for `tool_choice` `required` or a named function.

Models write tool calls in the format their chat template teaches (vLLM's parser names):

    hermes       <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>   (Hermes, Qwen2.5, Qwen3;
                 several blocks for several calls; text before them is content)
    llama3_json  {"name": "f", "parameters": {...}}, optionally after <|python_tag|>; several
                 separated by "; " (Llama 3.1-3.3: the whole output is the call)
    mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]             (Mistral 7B v0.3, Nemo)
                 [TOOL_CALLS]f[ARGS]{...}[TOOL_CALLS]g[ARGS]{...}                  (tokenizer v11+: Small 3.2, Devstral)

`detect_tool_parser(chat_template)` picks the format from the markers the template writes.
Arguments are returned as the model wrote them (a JSON text); streamed, they arrive as fragments
whose concatenation is that same text, after a first delta with the call's id, type and name:

    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\": "}}]}
    {"tool_calls": [{"index": 0, "function": {"arguments": "\\"Paris\\"}"}}]}

References: https://platform.openai.com/docs/guides/function-calling; vLLM
`vllm/entrypoints/openai/tool_parsers/` (hermes, llama3_json, mistral).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from shardline.structured_outputs import RequestFieldError, StructuredOutputsParams

MAX_TOOLS = 128
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's function.name
_WS = " \t\r\n"


# ---- the request: tools and tool_choice --------------------------------------------------------
@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's `tool_choice`: mode "none" (no call), "auto" (the model decides), "required" (at
    least one call) or "function" (exactly one call of `name`)."""

    mode: str
    name: str | None = None


def parse_tools(tools: Any) -> list[dict]:
    """OpenAI's `tools`, checked: [{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}]. Returns them as given (chat templates read this shape).

    Raises:
        RequestFieldError: param "tools", naming the entry and what is wrong.
    """
    def bad(i, why):
        raise RequestFieldError(f"tools[{i}]: {why}", "tools")

    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise RequestFieldError(f"tools: must be a list of 1 to {MAX_TOOLS} tools", "tools")
    names = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            bad(i, 'must be {"type": "function", "function": {...}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            bad(i, "function.name must be 1 to 64 letters, digits, '_' or '-'")
        if name in names:
            bad(i, f"function {name!r} is defined twice")
        names.add(name)
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            bad(i, "function.parameters must be a JSON schema object")
        if "description" in fn and not isinstance(fn["description"], str):
            bad(i, "function.description must be a string")
        if "strict" in fn and not isinstance(fn["strict"], (bool, type(None))):
            bad(i, "function.strict must be a boolean")
    return tools


def parse_tool_choice(tool_choice: Any, tools: list[dict] | None) -> ToolChoice:
    """OpenAI's `tool_choice` ("none", "auto", "required" or {"type": "function", "function":
    {"name": ...}}) against the checked `tools`. Absent: "auto" with tools, "none" without.

    Raises:
        RequestFieldError: param "tool_choice": an unknown form, a function not in `tools`, or
            "required" / a function without tools.
    """
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise RequestFieldError("tool_choice: 'required' needs tools", "tool_choice")
        return ToolChoice(tool_choice if tools else "none")
    if (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str)):
        name = tool_choice["function"]["name"]
        if not any(t["function"]["name"] == name for t in tools or []):
            raise RequestFieldError(f"tool_choice: function {name!r} is not in tools", "tool_choice")
        return ToolChoice("function", name)
    raise RequestFieldError('tool_choice: must be "none", "auto", "required" or '
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")


# ---- parsed output ------------------------------------------------------------------------------
@dataclass
class ToolCall:
    """One call: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    """A finished output: its text outside tool calls (None when only whitespace) and its calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class _Call:
    """A call as far as the text goes: name None until its string is complete; arguments the
    raw text of the arguments value so far (trailing whitespace held back); done once closed."""

    name: str | None = None
    arguments: str = ""
    done: bool = False


@dataclass
class _Scan:
    """What a (possibly unfinished) output holds: content text that cannot be part of a call, the
    calls, and `malformed` when text meant as a call is not one (it is then content)."""

    content: str = ""
    calls: list[_Call] = field(default_factory=list)
    malformed: bool = False


# ---- an incremental scanner of one JSON object ----------------------------------------------------
def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    """Index after the JSON string starting at s[i] == '"'; None if it does not end in s."""
    i += 1
    while i < len(s):
        if s[i] == "\\":
            i += 2
        elif s[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """Index after the JSON value starting at s[i]; None if it may go on past the end of s.

    Raises:
        ValueError: brackets that do not match.
    """
    if s[i] == '"':
        return _string_end(s, i)
    if s[i] in "{[":
        stack = []
        while i < len(s):
            c = s[i]
            if c == '"':
                end = _string_end(s, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                stack.append("}" if c == "{" else "]")
            elif c in "}]":
                if not stack or stack.pop() != c:
                    raise ValueError("unbalanced brackets")
                if not stack:
                    return i + 1
            i += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(s) else None  # a number at the end of s may have more digits


def _scan_object(s: str, i: int, args_keys: tuple[str, ...]) -> tuple[_Call, int | None]:
    """The call in the JSON object starting at s[i] == '{' ({"name": ..., <args key>: ...}), and
    the index after its closing brace (None while unfinished).

    Raises:
        ValueError: text that is not such an object (so far), or a name that is not a string.
    """
    call = _Call()
    j = i + 1
    while True:
        j = _skip_ws(s, j)
        if j >= len(s):
            return call, None
        if s[j] == "}":
            if call.name is None:
                raise ValueError("a tool call without a name")
            call.done = True
            return call, j + 1
        if s[j] != '"':
            raise ValueError(f"expected a key at {j}")
        key_end = _string_end(s, j)
        if key_end is None:
            return call, None
        key = json.loads(s[j:key_end])
        j = _skip_ws(s, key_end)
        if j >= len(s):
            return call, None
        if s[j] != ":":
            raise ValueError(f"expected ':' at {j}")
        j = _skip_ws(s, j + 1)
        if j >= len(s):
            return call, None
        end = _value_end(s, j)
        if key == "name":
            if end is not None:
                name = json.loads(s[j:end])
                if not isinstance(name, str):
                    raise ValueError("the tool name is not a string")
                call.name = name
        elif key in args_keys:
            call.arguments = (s[j:] if end is None else s[j:end]).rstrip(_WS)
        if end is None:
            return call, None
        j = _skip_ws(s, end)
        if j < len(s) and s[j] == ",":
            j += 1


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker` (held back from
    streamed content: the marker may be arriving)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---- the formats --------------------------------------------------------------------------------
class ToolParser:
    """A tool-call format: parse a finished output, stream one, and build the constraint that
    forces calls. `markers`: the special-token texts the format writes (a server keeps them in
    the text it parses, and lets grammars spell them)."""

    name = ""
    markers: tuple[str, ...] = ()

    def parse(self, text: str) -> ParsedOutput:
        """The content and calls of a finished output. Text that starts a call but is not a
        valid one is returned as content, as vLLM's parsers do."""
        scan = self._scan(text, final=True)
        if scan.malformed or any(c.name is None or not c.done for c in scan.calls):
            return ParsedOutput(text if text.strip() else None)
        calls = [ToolCall(self.new_id(), c.name, c.arguments or "{}") for c in scan.calls]
        return ParsedOutput(scan.content if scan.content.strip() else None, calls)

    def stream(self) -> "ToolCallStream":
        """A streaming parser for one output (one choice)."""
        return ToolCallStream(self)

    def constraint(self, tools: list[dict], choice: ToolChoice) -> StructuredOutputsParams | None:
        """The structural tag forcing this format's calls: at least one call of any tool for
        "required", exactly one call of the named function for "function"; None otherwise.
        Each call's arguments follow its function's `parameters` schema."""
        if choice.mode not in ("required", "function"):
            return None
        chosen = [t["function"] for t in tools if choice.mode == "required" or t["function"]["name"] == choice.name]
        assert chosen, choice
        return StructuredOutputsParams(structural_tag={"type": "structural_tag", "format": self._calls_format(
            [(fn["name"], fn.get("parameters") or {"type": "object"}) for fn in chosen], choice.mode == "function")})

    def new_id(self) -> str:
        """A tool call id (OpenAI's form: "call_" and 24 random letters and digits)."""
        return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))

    def _scan(self, text: str, final: bool) -> _Scan:
        raise NotImplementedError

    def _calls_format(self, functions: list[tuple[str, dict]], one: bool) -> dict:
        raise NotImplementedError


def _tag(begin: str, schema: dict, end: str) -> dict:
    return {"type": "tag", "begin": begin, "content": {"type": "json_schema", "json_schema": schema}, "end": end}


def _tags(tags: list[dict], separator: str, one: bool) -> dict:
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
            "stop_after_first": one}


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3);
    text outside the blocks is content."""

    name = "hermes"
    markers = ("<tool_call>", "</tool_call>")
    BEGIN, END = markers

    def _scan(self, text: str, final: bool) -> _Scan:
        scan, i = _Scan(), 0

        def add(segment: str) -> None:  # whitespace between and after blocks is not content
            if not scan.calls or segment.strip():
                scan.content += segment

        while True:
            start = text.find(self.BEGIN, i)
            if start < 0:
                rest = text[i:]
                add(rest if final else rest[: len(rest) - _held_prefix(rest, self.BEGIN)])
                return scan
            add(text[i:start])
            j = _skip_ws(text, start + len(self.BEGIN))
            if j >= len(text):
                return scan
            try:
                if text[j] != "{":
                    raise ValueError("a <tool_call> block without a JSON object")
                call, end = _scan_object(text, j, ("arguments", "parameters"))
            except ValueError:
                scan.malformed = True
                return scan
            scan.calls.append(call)
            if end is None:
                return scan
            k = _skip_ws(text, end)
            if not text.startswith(self.END, k):
                if k < len(text) and not self.END.startswith(text[k:]):
                    scan.malformed = True
                call.done = False
                return scan
            i = k + len(self.END)

    def _calls_format(self, functions, one):
        return _tags([_tag(f'{self.BEGIN}\n{{"name": {json.dumps(n)}, "arguments": ', s, f"}}\n{self.END}")
                      for n, s in functions], "\n", one)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: the whole output is `{"name": ..., "parameters": ...}` (several
    separated by ';'), optionally after `<|python_tag|>`; any other output is content."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)
    TAG = markers[0]

    def _scan(self, text: str, final: bool) -> _Scan:
        scan = _Scan()
        i = _skip_ws(text, 0)
        if text.startswith(self.TAG, i):
            i = _skip_ws(text, i + len(self.TAG))
        elif not final and self.TAG.startswith(text[i:]):
            return scan  # undecided: whitespace, or the tag arriving
        if i >= len(text) and not final:
            return scan  # undecided: the tag, and what follows it not yet here
        if i >= len(text) or text[i] != "{":
            scan.content = text
            return scan
        while True:
            try:
                call, end = _scan_object(text, i, ("parameters", "arguments"))
            except ValueError:
                return _Scan(content=text, malformed=True)
            scan.calls.append(call)
            if end is None:
                return scan
            j = _skip_ws(text, end)
            if j < len(text) and text[j] == ";":
                j = _skip_ws(text, j + 1)
            if j >= len(text):
                return scan
            if text[j] != "{":
                return _Scan(content=text, malformed=True)
            i = j

    def _calls_format(self, functions, one):
        return _tags([_tag(f'{{"name": {json.dumps(n)}, "parameters": ', s, "}") for n, s in functions], "; ",
                     True)  # Llama 3 makes one call per turn


class MistralToolParser(ToolParser):
    """Mistral's `[TOOL_CALLS]` followed by a JSON list of {"name", "arguments"} objects, or
    (tokenizer v11+, `args_marker`) by `name[ARGS]{...}` once per call. Text before the first
    `[TOOL_CALLS]` is content. Call ids are 9 letters and digits, as Mistral's templates require."""

    name = "mistral"
    BEGIN, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self, args_marker: bool = False):
        self.args_marker = args_marker
        self.markers = (self.BEGIN, self.ARGS) if args_marker else (self.BEGIN,)

    def new_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def _scan(self, text: str, final: bool) -> _Scan:
        start = text.find(self.BEGIN)
        if start < 0:
            return _Scan(text if final else text[: len(text) - _held_prefix(text, self.BEGIN)])
        scan = _Scan(text[:start])
        i = _skip_ws(text, start + len(self.BEGIN))
        if i >= len(text):
            return scan
        try:
            if text[i] == "[":
                self._scan_list(text, i, scan)
            else:
                self._scan_named(text, start, scan, final)
        except ValueError:
            scan.malformed = True
        return scan

    def _scan_list(self, text: str, i: int, scan: _Scan) -> None:
        i = _skip_ws(text, i + 1)
        while i < len(text):
            if text[i] != "{":
                raise ValueError("expected a call object")
            call, end = _scan_object(text, i, ("arguments", "parameters"))
            scan.calls.append(call)
            if end is None:
                return
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
            elif i < len(text) and text[i] == "]":
                return
            elif i < len(text):
                raise ValueError("expected ',' or ']'")
        if scan.calls:
            scan.calls[-1].done = False  # the list is not closed yet

    def _scan_named(self, text: str, i: int, scan: _Scan, final: bool) -> None:
        while text.startswith(self.BEGIN, i):
            i += len(self.BEGIN)
            a = text.find(self.ARGS, i)
            if a < 0:
                if final or not re.fullmatch(r"[A-Za-z0-9_.-]*", text[i:].split("[", 1)[0]):
                    raise ValueError("a call without [ARGS]")
                return
            call = _Call(name=text[i:a].strip())
            scan.calls.append(call)
            j = _skip_ws(text, a + len(self.ARGS))
            if j >= len(text):
                return
            end = _value_end(text, j)
            call.arguments = (text[j:] if end is None else text[j:end]).rstrip(_WS)
            if end is None:
                return
            call.done = True
            i = _skip_ws(text, end)
        if i < len(text) and not (not final and self.BEGIN.startswith(text[i:])):
            raise ValueError("text after a call")

    def _calls_format(self, functions, one):
        if self.args_marker:
            return _tags([_tag(f"{self.BEGIN}{n}{self.ARGS}", s, "") for n, s in functions], "", one)
        return {"type": "sequence", "elements": [  # "[TOOL_CALLS] [" as Mistral 7B v0.3's template writes it
            {"type": "or", "elements": [{"type": "const_string", "value": f"{self.BEGIN} ["},
                                        {"type": "const_string", "value": f"{self.BEGIN}["}]},
            _tags([_tag(f'{{"name": {json.dumps(n)}, "arguments": ', s, "}") for n, s in functions], ", ", one),
            {"type": "const_string", "value": "]"}]}


TOOL_PARSERS = ("hermes", "llama3_json", "mistral")


def detect_tool_parser(chat_template: str | None) -> ToolParser | None:
    """The tool-call format a chat template teaches, from the markers it writes: `[TOOL_CALLS]`
    (with `[ARGS]`: the v11 form) -> mistral; `<tool_call>` -> hermes; a Llama 3 header with
    `<|python_tag|>` or a `"parameters"` call shape -> llama3_json. None when it shows none."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return MistralToolParser(args_marker="[ARGS]" in t)
    if "<tool_call>" in t:
        return HermesToolParser()
    if "<|start_header_id|>" in t and ("<|python_tag|>" in t or '"parameters"' in t):
        return Llama3JsonToolParser()
    return None


def tool_parser(name: str) -> ToolParser:
    """The parser of a format by its name (TOOL_PARSERS; "mistral" is the JSON-list form).

    Raises:
        ValueError: an unknown name.
    """
    parsers = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "mistral": MistralToolParser}
    if name not in parsers:
        raise ValueError(f"unknown tool parser {name!r}: one of {', '.join(TOOL_PARSERS)}")
    return parsers[name]()


# ---- streaming -----------------------------------------------------------------------------------
class ToolCallStream:
    """Turns the text deltas of one output into OpenAI chat deltas: `push(text)` returns
    {"content": ...} and/or {"tool_calls": [...]} for what the text so far settles (an empty dict
    while nothing new is settled), `finish()` the rest. Content that may be the start of a
    marker is held back; a call's name is sent whole, with its id, before any of its arguments.

    Each push scans the whole text so far (outputs are short; vLLM's parsers do the same).
    """

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self._content = 0  # characters of content sent
        self._sent: list[list] = []  # per call: [id, characters of arguments sent]
        self._fallback = False  # the text is content after all (a malformed call)

    @property
    def tool_calls_sent(self) -> int:
        return len(self._sent)

    def push(self, delta: str) -> dict:
        self.text += delta
        return self._diff(final=False)

    def finish(self) -> dict:
        """The deltas the end of the output settles (held-back text)."""
        return self._diff(final=True)

    def _diff(self, final: bool) -> dict:
        if self._fallback:
            return self._content_delta(self.text)
        scan = self.parser._scan(self.text, final)
        if scan.malformed:
            if not self._sent:  # nothing of a call went out: it is all content
                self._fallback = True
                return self._content_delta(self.text)
            return {}  # a call already went out: drop what cannot be parsed
        out = self._content_delta(scan.content)
        calls = []
        for index, call in enumerate(scan.calls):
            if call.name is None:
                break
            if index == len(self._sent):
                self._sent.append([self.parser.new_id(), 0])
                calls.append({"index": index, "id": self._sent[index][0], "type": "function",
                              "function": {"name": call.name, "arguments": ""}})
            sent = self._sent[index][1]
            if len(call.arguments) > sent:
                calls.append({"index": index, "function": {"arguments": call.arguments[sent:]}})
                self._sent[index][1] = len(call.arguments)
        if calls:
            out["tool_calls"] = calls
        return out

    def _content_delta(self, content: str) -> dict:
        if len(content) <= self._content:
            return {}
        new, self._content = content[self._content:], len(content)
        return {"content": new}
