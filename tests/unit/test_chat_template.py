"""Chat templates render as transformers' `apply_chat_template(..., tokenize=False)` renders them.

The templates here are written in the shape of Llama 3.1's and Qwen2.5's (the constructs they
use: a system message pulled out with `messages[0]`, `strftime_now`, tools as `tojson` with
indent, tool calls and tool results, `namespace` loops, `raise_exception`, whitespace control),
and each is compared with transformers on a tokenizer holding the same template.
"""

from __future__ import annotations

import pytest

from shardline.coordinator.chat_template import ChatTemplate
from shardline.coordinator.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, respond with a JSON function call.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nReturn a JSON object within <tool_call></tool_call> tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# A template using the rest of transformers' conventions: namespace, dict, documents, the
# {% generation %} tag, loop controls and reasoning fields.
CONVENTIONS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}{%- if m.role == 'skip' -%}{%- continue -%}{%- endif -%}{%- set ns.n = ns.n + 1 -%}
[{{ ns.n }}:{{ m.role }}]{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
{%- endfor -%}
{%- if documents is not none %}{% for d in documents %}<doc title="{{ d.title }}">{{ d.text }}</doc>{% endfor %}{% endif %}
{{- dict(a=1) | tojson }}{{ tools is none }}{{ custom | default('-') }}
{%- if add_generation_prompt %}>{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City, e.g. Paris"}},
                   "required": ["city"]}}}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What's the weather like in Paris?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "sunny, 24°C", "name": "get_weather"}],
    [{"role": "user", "content": "日本語 😀 <b>&</b>"}, {"role": "assistant", "content": "ok", "reasoning": "r"},
     {"role": "skip", "content": "x"}, {"role": "user", "content": "again"}],
]


def reference(template: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    return transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.BPE()), bos_token="<s>",
                                                eos_token="</s>", chat_template=template)


@pytest.mark.parametrize("template", [LLAMA3_STYLE, QWEN25_STYLE, CONVENTIONS], ids=["llama3", "qwen2.5", "conventions"])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers(template, with_tools, add_generation_prompt):
    ref, ours = reference(template), ChatTemplate(template)
    tools = TOOLS if with_tools else None
    documents = [{"title": "Paris", "text": "Sunny."}] if with_tools else None
    for i, messages in enumerate(CONVERSATIONS):
        if template is not CONVENTIONS and any(m["role"] == "skip" for m in messages):
            continue  # the "skip" role is CONVENTIONS' own
        expected = ref.apply_chat_template(messages, tools=tools, documents=documents, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, date_string="26 Jul 2024")
        got = ours.render(messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                          special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": None},
                          date_string="26 Jul 2024")
        assert got == expected, i


def test_llama3_style_rendering():
    out = ChatTemplate(LLAMA3_STYLE).render([{"role": "user", "content": "Hi"}],
                                            special_tokens={"bos_token": "<|begin_of_text|>"}, date_string="1 Jan 2025")
    assert out == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: 1 Jan 2025\n\n<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_raise_exception_and_strftime():
    two_calls = [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2}]
    with pytest.raises(ValueError, match="only supports single tool-calls"):
        ChatTemplate(LLAMA3_STYLE).render([{"role": "system", "content": "s"}] + two_calls)
    import datetime

    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) == str(datetime.date.today().year)


def test_template_that_does_not_parse():
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% if %}")


def test_namespace_refuses_private_names():
    with pytest.raises(ValueError, match="_x"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])


def test_tokenizer_passes_special_tokens_and_tools(tmp_path):
    from tests.unit.test_tokenizer import write_tiny_gguf

    t = Tokenizer.from_gguf(write_tiny_gguf(tmp_path / "t.gguf", chat_template=QWEN25_STYLE))
    ref = reference(QWEN25_STYLE)
    messages = CONVERSATIONS[2]
    assert t.apply_chat_template(messages, tools=TOOLS) == ref.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate("{{ bos_token }}|{{ unk_token is defined }}").render(
        [], special_tokens={"bos_token": "<|bos|>", "unk_token": None}) == "<|bos|>|False"
