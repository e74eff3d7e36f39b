"""Reasoning parsers: a thinking model's <think> section read out of its replies, whole and streamed, in front of
any call format; picked from the chat template; the chat and Responses endpoints' reasoning on a tiny Qwen3."""

import json
import re

import openai
import pytest
from openai.types.responses import ResponseReasoningItem, ResponseStreamEvent
from pydantic import TypeAdapter
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.reasoning import PARSERS, ThinkingReader, reasoning_parser_for, reasoning_reader
from lmgen.reply import ContentReader
from lmgen.tool_calls import HermesToolParser, ToolCalling, reply_reader
from tests.loader.tokenizer_fixtures import LLAMA3_TEMPLATE
from tests.server.serverutil import in_process

ARGUMENTS = '{"city": "Lisbon", "unit": "celsius"}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
THOUGHT = "<think>\nThe user greets me.\nA greeting back.\n</think>\n\nHello!"
CALL = f'<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": {ARGUMENTS}}}\n</tool_call>'

# text -> (reasoning, content) read by qwen3, and by deepseek_r1
REPLIES = {
    THOUGHT: (("The user greets me.\nA greeting back.", "Hello!"),) * 2,
    # the template opened <think>: deepseek_r1 reads the reasoning, qwen3 (which needs both tags) all content
    "The user greets me.\n</think>\n\nHello!": ((None, "The user greets me.\n</think>\n\nHello!"),
                                                ("The user greets me.", "Hello!")),
    "Hello!": ((None, "Hello!"), ("Hello!", None)),
    "<think>\nStill thinking when max_tok": (("Still thinking when max_tok", None),) * 2,  # cut short
    "<think>\n\n</think>\n\nHello!": ((None, "Hello!"),) * 2,  # what Qwen3 writes without thinking
    "  <think>a</think>b": (("a", "b"),) * 2,
    "Hi <think>x</think>": ((None, "Hi <think>x</think>"), ("Hi <think>x", None)),
    "<think>a < b and </thin is no end</think> ok": (("a < b and </thin is no end", "ok"),) * 2,
    "<thin": ((None, "<thin"), ("<thin", None)),
    "": ((None, None),) * 2,
}


def read(reader, text: str) -> tuple:
    reply = reader.read(text)
    return reply.reasoning, reply.content or None, [(call.name, call.arguments) for call in reply.calls]


def streamed(reader, text: str, size: int) -> tuple:
    """`text` fed in pieces of `size` characters: reasoning, content and calls reassembled (None: nothing sent)."""
    stream, reasoning, content, calls = reader.stream(), "", "", []
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    for number, piece in enumerate(pieces):
        delta = stream.feed(piece, number == len(pieces) - 1)
        reasoning, content = reasoning + delta.reasoning, content + delta.content
        for call in delta.calls:
            if call.id is not None:
                calls.append((call.name, ""))
            calls[call.index] = (calls[call.index][0], calls[call.index][1] + call.arguments)
    assert stream.called == bool(calls)
    return reasoning or None, content or None, calls


@pytest.mark.parametrize("name", sorted(PARSERS))
@pytest.mark.parametrize("text", list(REPLIES))
def test_replies_read_as_vllm_reads_them_whole_and_streamed(name, text):
    reader = ThinkingReader(PARSERS[name], ContentReader())
    expected = (*REPLIES[text][name == "deepseek_r1"], [])
    assert read(reader, text) == expected
    for size in (1, 2, 3, 1000):  # 1 and 2: the markers arrive in pieces
        assert streamed(reader, text, size) == expected, size


@pytest.fixture(scope="module")
def tokenizer(qwen3_path):
    return Tokenizer.from_pretrained(qwen3_path)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_thinking_then_a_call(tokenizer, name):
    calling = ToolCalling(TOOLS, HermesToolParser(tokenizer))
    reader = ThinkingReader(PARSERS[name], reply_reader(calling.parser, calling))
    expected = ("Need the weather.", None, [("get_weather", ARGUMENTS)])
    assert read(reader, CALL) == expected
    for size in (1, 4, 1000):
        assert streamed(reader, CALL, size) == expected


def test_a_reply_a_grammar_shapes_thinks_only_where_the_grammar_opens_think(tokenizer):
    """deepseek_r1 reads a reply without </think> as reasoning cut short, but a forced call or JSON never thinks."""
    calling = ToolCalling(TOOLS, HermesToolParser(tokenizer), "required")
    forced = CALL[CALL.index("<tool_call>"):]
    reader = reasoning_reader(PARSERS["deepseek_r1"], reply_reader(calling.parser, calling), constrained=True)
    assert read(reader, forced) == streamed(reader, forced, 3) == (None, None, [("get_weather", ARGUMENTS)])
    assert read(reader, CALL) == ("Need the weather.", None, [("get_weather", ARGUMENTS)])
    answer = ContentReader()
    assert read(reasoning_reader(PARSERS["deepseek_r1"], answer, constrained=True), "{}") == (None, "{}", [])
    assert read(reasoning_reader(PARSERS["deepseek_r1"], answer), "{}") == ("{}", None, [])
    assert reasoning_reader(PARSERS["deepseek_r1"], answer, thinking=False) is answer
    assert reasoning_reader(None, answer) is answer


def test_markers_that_are_special_tokens_are_decoded(tokenizer):
    """Qwen3's <think> and </think> are plain added tokens; where a tokenizer makes them special, skipping special
    tokens would drop them from the text."""
    assert not ThinkingReader(reasoning_parser_for(tokenizer), ContentReader()).needs_special_tokens
    backend = BackendTokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    special = Tokenizer(backend, extra_special_tokens=["<think>", "</think>"], chat_templates=tokenizer.chat_templates)
    assert ThinkingReader(reasoning_parser_for(special), ContentReader()).needs_special_tokens


def test_the_parser_is_picked_from_the_chat_template(tokenizer):
    opened = ("{% for m in messages %}<｜User｜>{{ m.content.split('</think>')[-1] }}{% endfor %}"
              "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")  # as DeepSeek-R1's
    wants_system = "{{ raise_exception('a system message first') if messages[0].role != 'system' }}</think>"
    cases = {tokenizer.chat_template: "qwen3", opened: "deepseek_r1", LLAMA3_TEMPLATE: None, wants_system: "qwen3"}
    for template, name in cases.items():
        parser = reasoning_parser_for(Tokenizer(tokenizer.backend, chat_templates={"default": template}))
        assert (parser.name if parser else None) == name
    assert reasoning_parser_for(tokenizer, "none") is None
    assert reasoning_parser_for(tokenizer, "deepseek_r1") == PARSERS["deepseek_r1"]
    with pytest.raises(InvalidArgumentError, match="deepseek_r1, qwen3, none"):
        reasoning_parser_for(tokenizer, "r1")


# ---- the server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(qwen3_path):
    with in_process(qwen3_path) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def scripted(tokenizer, text: str) -> dict:
    """The request fields that make the reply `text` whatever the weights say (llguidance matches an added
    token only by its id)."""
    parts = [f"<[{tokenizer.token_to_id(part)}]>" if re.fullmatch("</?(think|tool_call)>", part) else json.dumps(part)
             for part in re.split("(</?(?:think|tool_call)>)", text) if part]
    return {"structured_outputs": {"grammar": "start: " + " ".join(parts)}}


def chat(client, tokenizer, text: str, stream: bool, **fields) -> tuple:
    """The reply to a request scripted to be `text`: (reasoning, content, calls, finish reason)."""
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=100,
                  extra_body={**scripted(tokenizer, text), **fields.pop("extra_body", {})}, **fields)
    if not stream:
        [choice] = client.chat.completions.create(**kwargs).choices
        calls = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or []]
        return choice.message.reasoning_content, choice.message.content, calls, choice.finish_reason
    reasoning, content, calls, finish = "", "", [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        [choice] = chunk.choices
        reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.id:
                calls.append((call.function.name, ""))
            calls[call.index] = (calls[call.index][0], calls[call.index][1] + (call.function.arguments or ""))
        finish = choice.finish_reason or finish
    return reasoning or None, content or None, calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_chat_replies_give_their_reasoning_apart(client, tokenizer, stream):
    assert chat(client, tokenizer, THOUGHT, stream) == (*REPLIES[THOUGHT][0], [], "stop")
    assert chat(client, tokenizer, CALL, stream, tools=TOOLS) == (
        "Need the weather.", None, [("get_weather", ARGUMENTS)], "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_without_thinking_a_reply_is_all_content(client, tokenizer, stream):
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert chat(client, tokenizer, THOUGHT, stream, extra_body=off) == (None, THOUGHT, [], "stop")


def test_a_response_leads_with_its_reasoning(client, tokenizer):
    response = client.responses.create(model="tiny", input="Hi", max_output_tokens=100,
                                       extra_body=scripted(tokenizer, THOUGHT))
    reasoning, message = response.output
    assert isinstance(reasoning, ResponseReasoningItem) and reasoning.id.startswith("rs_")
    assert [part.text for part in reasoning.content] == [REPLIES[THOUGHT][0][0]] and reasoning.summary == []
    assert message.type == "message" and response.output_text == "Hello!" and response.status == "completed"
    details = response.usage.output_tokens_details
    assert details.reasoning_tokens == len(tokenizer.encode(REPLIES[THOUGHT][0][0], add_special_tokens=False))
    # echoed back, the reasoning goes with the assistant message it led to
    follow_up = [{"role": "user", "content": "Hi"}, *[item.model_dump() for item in response.output],
                 {"role": "user", "content": "And?"}]
    assert client.responses.create(model="tiny", input=follow_up, max_output_tokens=2).status == "incomplete"


def test_a_streamed_response_has_the_reasoning_item_first(client, tokenizer):
    kwargs = dict(model="tiny", input="Hi", max_output_tokens=100, extra_body=scripted(tokenizer, THOUGHT))
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    TypeAdapter(list[ResponseStreamEvent]).validate_python([event.model_dump() for event in events])
    kinds = [event.type for event in events]
    reasoning_deltas = kinds.count("response.reasoning_text.delta")
    text_deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     *["response.reasoning_text.delta"] * reasoning_deltas,
                     "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", "response.content_part.added",
                     *["response.output_text.delta"] * text_deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    reasoning = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert reasoning == whole.output[0].content[0].text and events[-1].response.output_text == whole.output_text
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    assert events[-1].response.usage == whole.usage
    with client.responses.stream(**kwargs) as stream:  # the SDK's helper checks the events as it assembles them
        assert stream.get_final_response().output_text == "Hello!"


def test_a_streamed_responses_logprobs_add_up_to_the_whole_ones(client, tokenizer):
    """Every output token's logprob goes out with the message's text (those of the reasoning with its first
    delta), as the whole response gives them."""
    kwargs = dict(model="tiny", input="Hi", max_output_tokens=100, include=["message.output_text.logprobs"],
                  top_logprobs=1, extra_body=scripted(tokenizer, THOUGHT))
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    streamed_tokens = [entry.token for event in events if event.type == "response.output_text.delta"
                       for entry in event.logprobs]
    whole_tokens = [entry.token for entry in whole.output[1].content[0].logprobs]
    assert streamed_tokens == whole_tokens and len(whole_tokens) == whole.usage.output_tokens
