"""Tool calls: each family's format read from fixed texts, streamed in pieces, forced by a grammar; LLM.chat."""

import json
import random

import jsonschema
import pytest

from lmgen import LLM, SamplingParams
from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.params import StructuredOutputs
from lmgen.sampling.structured import LLGuidanceBackend
from lmgen.tool_calls import (
    PARSERS, HermesToolParser, Llama3JsonToolParser, MistralToolParser, ToolArgumentError, ToolCalling,
    reply_reader, template_messages, tool_parser_for,
)
from tests.loader.tokenizer_fixtures import LLAMA3_TEMPLATE, MISTRAL_TEMPLATE, QWEN25_TEMPLATE

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]

# Two calls in each family's format, with text before them where the format allows it.
CALLS = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lisbon", "unit": "celsius"}}; '
                   '{"name": "get_time", "parameters": {}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}, '
               '{"name": "get_time", "arguments": {}}]',
}
CONTENT = {"hermes": "Let me look.\n", "llama3_json": None, "mistral": None}


@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return Tokenizer.from_pretrained(llama_path)


@pytest.fixture(params=sorted(set(PARSERS) - {"harmony"}))  # harmony's replies: tests/test_harmony.py
def parser(request, tokenizer):
    return PARSERS[request.param](tokenizer)


def test_each_format_reads_content_and_calls(parser):
    content, calls = parser.parse(CALLS[parser.name])
    assert content == CONTENT[parser.name]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Lisbon", "unit": "celsius"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


def test_call_ids_are_openai_style_except_mistral_whose_templates_want_nine_characters(parser):
    [call, _] = parser.parse(CALLS[parser.name])[1]
    assert call.id.startswith("call_") if parser.name != "mistral" else len(call.id) == 9 and call.id.isalnum()


def test_the_formats_without_their_special_markers(tokenizer):
    """Llama's <|python_tag|> and Mistral's [TOOL_CALLS] are special tokens, dropped from the text by default."""
    [call] = Llama3JsonToolParser(tokenizer).parse(' {"name": "f", "parameters": {"x": 1}}')[1]
    assert (call.name, call.arguments) == ("f", '{"x": 1}')
    [call] = MistralToolParser(tokenizer).parse('[{"name": "f", "arguments": {"x": [1, "]"]}}]')[1]
    assert (call.name, call.arguments) == ("f", '{"x": [1, "]"]}')


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"x": 1,}}\n</tool_call>',  # not JSON
    '<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',  # unbalanced
    '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>',  # arguments not an object
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n{"na\\qme": "f", "arguments": {}}\n</tool_call>',  # a key that is no JSON string
    '<tool_call>\n{"name": "\\q", "arguments": {}}\n</tool_call>',  # a name that is no JSON string
    '<tool_call>\n{"name": "f", "arguments": {"x": "unfinish',  # cut short
    "no call here, only <tool_call",
])
def test_malformed_or_unfinished_calls_are_content(tokenizer, text):
    assert HermesToolParser(tokenizer).parse(text) == (text, [])


def test_plain_replies_are_content(parser):
    assert parser.parse("The weather is fine.") == ("The weather is fine.", [])


def parsed(calling: ToolCalling, text: str):
    """The content and calls of a finished reply, read as the server reads it."""
    reply = reply_reader(calling.parser, calling).read(text)
    assert reply.reasoning is None
    return reply.content, reply.calls


def streamed(calling: ToolCalling, text: str, size: int):
    """Feed `text` in pieces of `size` characters; the content and each call (id, name, arguments) reassembled."""
    stream, content, calls = reply_reader(calling.parser, calling).stream(), "", {}
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for number, piece in enumerate(pieces):
        reply_delta = stream.feed(piece, number == len(pieces) - 1)
        assert reply_delta.reasoning == ""
        content += reply_delta.content
        for delta in reply_delta.calls:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.arguments == "" and delta.name
                calls[delta.index] = [delta.id, delta.name, ""]
            else:
                assert delta.name is None
                calls[delta.index][2] += delta.arguments
    return content, list(calls.values()), stream.called


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_streamed_deltas_add_up_to_the_parsed_calls(parser, size):
    text = CALLS[parser.name]
    content, calls, called = streamed(ToolCalling(TOOLS, parser), text, size)
    expected_content, expected = parser.parse(text)
    assert content == (expected_content or "")
    assert [(name, arguments) for _, name, arguments in calls] == [(c.name, c.arguments) for c in expected]
    assert called


@pytest.mark.parametrize("size", [1, 2, 5])
def test_streamed_arguments_with_brackets_and_escapes_in_strings(tokenizer, size):
    """A call's arguments are followed to their end as they arrive; quotes, brackets and backslashes
    inside strings must not end them early."""
    arguments = json.dumps({"text": 'say "}" and {brace} [x] \\ }]', "items": [1, {"k": "}"}], "last": "\\"})
    text = f'<tool_call>\n{{"name": "write", "arguments": {arguments}}}\n</tool_call>\n' + CALLS["hermes"][13:]
    calling = ToolCalling(TOOLS, HermesToolParser(tokenizer))
    _, calls, _ = streamed(calling, text, size)
    assert [(name, args) for _, name, args in calls] == [(c.name, c.arguments) for c in parsed(calling, text)[1]]
    assert calls[0][2] == arguments and len(calls) == 3


@pytest.mark.parametrize("text", ["Sunny, 21 degrees.", '<tool_call>\n{"name": oops}\n</tool_call>',
                                  "[1, 2, 3]", " <|python_tag|"])
def test_streamed_replies_without_valid_calls_are_all_content(parser, text):
    assert streamed(ToolCalling(TOOLS, parser), text, 2) == (text, [], False)


def test_mutated_replies_never_raise_and_stream_as_they_parse(parser):
    """Bounded fuzzing: each format's calls with characters deleted, inserted or cut off, read whole
    and streamed in random pieces: never an exception, and the same calls either way."""
    rng = random.Random(0)
    alphabet = '{}[]":,;\\ \n<>/|' + "tool_call name arguments parameters [TOOL_CALLS] 0123456789"
    calling = ToolCalling(TOOLS, parser)
    for _ in range(400):
        chars = list(CALLS[parser.name])
        for _ in range(rng.randint(1, 3)):
            if not chars:
                break
            at = rng.randrange(len(chars))
            if rng.random() < 0.1:
                del chars[max(at, 1):]
            elif rng.random() < 0.5:
                del chars[at]
            else:
                chars.insert(at, rng.choice(alphabet))
        text = "".join(chars)
        content, calls = parsed(calling, text)
        streamed_content, streamed_calls, _ = streamed(calling, text, rng.randint(1, 6))
        if calls:
            assert [(name, arguments) for _, name, arguments in streamed_calls] == [
                (c.name, c.arguments) for c in calls], text
        else:
            assert content == text


def test_parallel_tool_calls_false_keeps_the_first_call(tokenizer):
    calling = ToolCalling(TOOLS, HermesToolParser(tokenizer), parallel_tool_calls=False)
    assert [c.name for c in parsed(calling, CALLS["hermes"])[1]] == ["get_weather"]
    assert [name for _, name, _ in streamed(calling, CALLS["hermes"], 4)[1]] == ["get_weather"]


def test_tool_choice_none_reads_no_calls(tokenizer):
    text = CALLS["hermes"]
    assert parsed(ToolCalling(TOOLS, HermesToolParser(tokenizer), "none"), text) == (text, [])


def test_the_format_is_detected_from_the_chat_template():
    cases = {QWEN25_TEMPLATE: "hermes", LLAMA3_TEMPLATE: "llama3_json", MISTRAL_TEMPLATE: None,
             MISTRAL_TEMPLATE + "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]": "mistral"}
    for template, name in cases.items():
        parser = tool_parser_for(Tokenizer(_backend(), chat_templates={"default": template}))
        assert (parser.name if parser else None) == name
    with pytest.raises(InvalidArgumentError, match="hermes"):
        tool_parser_for(Tokenizer(_backend()), "qwen")


def _backend():
    from tokenizers import Tokenizer as BackendTokenizer, models

    return BackendTokenizer(models.WordLevel({"a": 0}, unk_token="a"))


@pytest.mark.parametrize(("tools", "choice", "field"), [
    (TOOLS, {"type": "function", "function": {"name": "get_wether"}}, "tool_choice.function.name"),
    (TOOLS, "sometimes", "tool_choice"),
    ([], "required", "tool_choice"),
    ([{"type": "function", "function": {"parameters": {}}}], "auto", "tools.0.function.name"),
    ([{"type": "code_interpreter"}], "auto", "tools.0"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "auto", "tools.0.function.parameters"),
])
def test_bad_tools_and_choices_name_the_field(tokenizer, tools, choice, field):
    with pytest.raises(ToolArgumentError) as caught:
        ToolCalling(tools, HermesToolParser(tokenizer), choice)
    assert caught.value.field == field


def test_a_call_cannot_be_forced_without_a_format():
    with pytest.raises(ToolArgumentError, match="cannot be forced"):
        ToolCalling(TOOLS, None, "required")
    assert ToolCalling(TOOLS, None, "auto").structured() is None


def test_history_arguments_become_objects_for_the_template():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    [system, assistant] = template_messages([{"role": "system", "content": "s"},
                                             {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert system == {"role": "system", "content": "s"}
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    with pytest.raises(ToolArgumentError) as caught:
        broken = {**call, "function": {"name": "f", "arguments": "{"}}
        template_messages([{"role": "assistant", "tool_calls": [broken]}])
    assert caught.value.field == "tool_calls.0.function.arguments"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_the_forced_grammar_takes_calls_in_the_format_and_refuses_others(parser, tokenizer, choice):
    backend = LLGuidanceBackend(tokenizer, len(tokenizer), frozenset([tokenizer.eos_token_id]))
    grammar = backend.compile(ToolCalling(TOOLS, parser, choice).structured())
    call = '{"name": "get_weather", "%s": {"city": "Lisbon", "unit": "celsius"}}' % parser.argument_keys[0]
    other = '{"name": "get_time", "%s": {}}' % parser.argument_keys[0]
    one, two = {
        "hermes": (f"<tool_call>\n{call}\n</tool_call>",
                   f"<tool_call>\n{call}\n</tool_call>\n<tool_call>\n{other}\n</tool_call>"),
        "llama3_json": (call, f"{call}; {other}"),
        "mistral": (f"[TOOL_CALLS][{call}]", f"[TOOL_CALLS][{call}, {other}]"),
    }[parser.name]
    assert _accepts(backend, grammar, tokenizer, one)
    assert _accepts(backend, grammar, tokenizer, two) == (choice == "required")  # a named function: one call
    assert not _accepts(backend, grammar, tokenizer, one.replace("get_weather", "get_wether"))
    assert not _accepts(backend, grammar, tokenizer, one.replace('"celsius"', '"kelvin"'))
    assert not _accepts(backend, grammar, tokenizer, one.replace('": ', '":'))  # json.dumps' layout only


def test_forced_calls_take_schemas_with_definitions(parser, tokenizer):
    """Pydantic writes models as {"$defs": {...}, "$ref": "#/$defs/..."}: the root the references name moves."""
    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "visit", "parameters": {
        "type": "object", "$defs": {"City": city}, "properties": {"city": {"$ref": "#/$defs/City"}},
        "required": ["city"], "additionalProperties": False}}}, TOOLS[1]]
    backend = LLGuidanceBackend(tokenizer, len(tokenizer), frozenset([tokenizer.eos_token_id]))
    grammar = backend.compile(ToolCalling(tools, parser, "required", parallel_tool_calls=False).structured())
    call = '{"name": "visit", "%s": {"city": {"name": "Porto"}}}' % parser.argument_keys[0]
    text = {"hermes": f"<tool_call>\n{call}\n</tool_call>", "llama3_json": call,
            "mistral": f"[TOOL_CALLS][{call}]"}[parser.name]
    assert _accepts(backend, grammar, tokenizer, text)
    assert not _accepts(backend, grammar, tokenizer, text.replace('"name": "Porto"', '"nome": "Porto"'))
    clash = {**tools[0], "function": {**tools[0]["function"], "name": "move"}}
    clash["function"]["parameters"] = {**clash["function"]["parameters"], "$defs": {"City": WEATHER}}
    with pytest.raises(ToolArgumentError, match="City"):
        ToolCalling([tools[0], clash], parser, "required").structured()


def _accepts(backend, grammar, tokenizer, text: str) -> bool:
    matcher = backend.new_matcher(grammar)
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


def test_llm_chat_forces_valid_calls_on_random_weights(qwen_tools_path):
    llm = LLM(str(qwen_tools_path))
    messages = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    outputs = llm.chat(messages, SamplingParams(n=3, seed=0, max_tokens=150), tools=TOOLS, tool_choice="required")
    for output in outputs.outputs:
        content, calls = llm.tool_parser.parse(output.text)
        assert content is None and calls and output.finish_reason == "stop"
        for call in calls:
            schema = WEATHER if call.name == "get_weather" else {"type": "object", "maxProperties": 0}
            jsonschema.validate(json.loads(call.arguments), schema)
    named = {"type": "function", "function": {"name": "get_time"}}
    [call] = llm.tool_parser.parse(llm.chat(messages, SamplingParams(seed=1), tools=TOOLS, tool_choice=named).text)[1]
    assert (call.name, call.arguments) == ("get_time", "{}")
    with pytest.raises(InvalidArgumentError, match="structured"):
        llm.chat(messages, SamplingParams(structured=StructuredOutputs(json_object=True)), tools=TOOLS,
                 tool_choice="required")
