"""GPT-OSS's harmony replies: read into content, reasoning and calls, whole and streamed in pieces; calls forced by
a grammar; a conversation with calls and results rendered as transformers renders it; the chat server's answers."""

import json
import re
import time

import jsonschema
import pytest
import transformers
from fastapi.testclient import TestClient

from lmgen import LLM, Engine, EngineConfig, SamplingParams
from lmgen.loader.tokenizer import Tokenizer
from lmgen.server.app import build_app
from lmgen.server.protocol import ChatMessage
from lmgen.server.serving import ServerSettings, template_message
from lmgen.tool_calls import HarmonyReader, HarmonyToolParser, ToolCalling, reply_reader, tool_parser_for
from tests.server.serverutil import in_process

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]
ARGUMENTS = '{"city": "Lisbon", "unit": "celsius"}'
ANSWER = ("<|channel|>analysis<|message|>User asks the weather. Answer.<|end|>"
          "<|start|>assistant<|channel|>final<|message|>Sunny, 21 °C.")
CALL = ("<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary "
        f"to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}")

# text -> (content, reasoning, calls) when calls are read ("auto")
REPLIES = {
    ANSWER: ("Sunny, 21 °C.", "User asks the weather. Answer.", []),
    ANSWER + "<|return|>": ("Sunny, 21 °C.", "User asks the weather. Answer.", []),
    CALL: (None, "Need the tool.", [("get_weather", ARGUMENTS)]),
    # a preamble for the user, then a call with its recipient in the role part (as the template writes calls)
    ("<|channel|>commentary<|message|>Checking the clock.<|end|><|start|>assistant to=functions.get_time"
     "<|channel|>commentary json<|message|>{}<|call|>"): ("Checking the clock.", None, [("get_time", "{}")]),
    ("<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis<|message|>Second.<|end|>"
     "<|start|>assistant<|channel|>final<|message|>Done."): ("Done.", "First.\nSecond.", []),
    # a built-in tool's call (python, on the analysis channel) is reasoning, not a call of the caller's
    ("<|channel|>analysis to=python code<|message|>print(1)<|end|><|start|>assistant<|channel|>final"
     "<|message|>1"): ("1", "print(1)", []),
    "No markers at all.": ("No markers at all.", None, []),
    "<|channel|>final<|message|>Cut sh": ("Cut sh", None, []),  # stopped by max_tokens
    "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>fin": (None, "Hmm.", []),  # a header
}


@pytest.fixture(scope="module")
def tokenizer(gpt_oss_harmony_path):
    return Tokenizer.from_pretrained(gpt_oss_harmony_path)


@pytest.fixture(scope="module")
def harmony(tokenizer):
    return HarmonyToolParser(tokenizer)


def reader(tooling: ToolCalling | None) -> HarmonyReader:
    """Harmony replies read as the server reads them: for calls as `tooling` says (None: no tools)."""
    return HarmonyReader(None, None) if tooling is None else reply_reader(tooling.parser, tooling)


def read(text: str, tooling: ToolCalling | None) -> tuple:
    reply = reader(tooling).read(text)
    return reply.content, reply.reasoning, [(call.name, call.arguments) for call in reply.calls]


def streamed(text: str, tooling: ToolCalling | None, size: int) -> tuple:
    """`text` fed in pieces of `size` characters: content, reasoning and calls reassembled (None: nothing sent)."""
    stream, content, reasoning, calls = reader(tooling).stream(), "", "", []
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for number, piece in enumerate(pieces):
        reply_delta = stream.feed(piece, number == len(pieces) - 1)
        content, reasoning = content + reply_delta.content, reasoning + reply_delta.reasoning
        for delta in reply_delta.calls:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.id.startswith("call_") and delta.arguments == ""
                calls.append((delta.name, ""))
            else:
                calls[delta.index] = (calls[delta.index][0], calls[delta.index][1] + delta.arguments)
    assert stream.called == bool(calls)
    return content or None, reasoning or None, calls


def test_the_harmony_format_is_detected_from_gpt_oss_template(tokenizer):
    assert isinstance(tool_parser_for(tokenizer), HarmonyToolParser)


@pytest.mark.parametrize("text", list(REPLIES))
def test_replies_read_as_vllm_answers_them(harmony, text):
    assert read(text, ToolCalling(TOOLS, harmony)) == REPLIES[text]
    content, calls = harmony.parse(text)  # as LLM.chat's callers read a reply
    assert (content, [(c.name, c.arguments) for c in calls]) == (REPLIES[text][0], REPLIES[text][2])


@pytest.mark.parametrize("size", [1, 2, 5, 1000])  # 1 and 2: every marker arrives in pieces
@pytest.mark.parametrize("text", list(REPLIES))
def test_streamed_pieces_add_up_to_the_whole_reply(harmony, text, size):
    tooling = ToolCalling(TOOLS, harmony)
    assert streamed(text, tooling, size) == read(text, tooling)


def test_without_reading_calls_a_call_is_read_by_its_channel(harmony):
    for tooling in (None, ToolCalling(TOOLS, harmony, "none")):
        assert read(CALL, tooling) == (ARGUMENTS, "Need the tool.", [])
        assert streamed(CALL, tooling, 3) == (ARGUMENTS, "Need the tool.", [])


def test_a_call_that_is_no_json_object_is_content(harmony):
    text = CALL[:-10]  # cut short
    assert read(text, ToolCalling(TOOLS, harmony)) == (ARGUMENTS[:-10], "Need the tool.", [])


def test_parallel_tool_calls_false_keeps_the_first_call(harmony):
    text = CALL + "<|call|><|start|>assistant<|channel|>commentary to=functions.get_time<|message|>{}"
    tooling = ToolCalling(TOOLS, harmony, parallel_tool_calls=False)
    assert read(text, tooling) == streamed(text, tooling, 4) == (None, "Need the tool.", [("get_weather", ARGUMENTS)])
    assert len(read(text, ToolCalling(TOOLS, harmony))[2]) == 2


# ---- rendering a conversation with a call and its result, as the chat server receives it ------------------
OPENAI_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Lisbon?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]
TRANSFORMERS_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Lisbon?"},
    {"role": "assistant", "thinking": "Need the tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.loads(ARGUMENTS)}}]},
    {"role": "tool", "content": '{"temp": 21}'},
]
FOLLOW_UP = ({"role": "assistant", "content": "Sunny, 21 °C."}, {"role": "user", "content": "And tomorrow?"})


@pytest.mark.parametrize("follow_up", [(), FOLLOW_UP], ids=["call-pending", "call-answered"])
def test_a_conversation_with_calls_renders_as_transformers_renders_it(gpt_oss_harmony_path, tokenizer, follow_up):
    hf = transformers.AutoTokenizer.from_pretrained(gpt_oss_harmony_path)
    messages = [template_message(i, ChatMessage(**m)) for i, m in enumerate([*OPENAI_CONVERSATION, *follow_up])]
    expected = [*TRANSFORMERS_CONVERSATION, *follow_up]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True)
    assert text == hf.apply_chat_template(expected, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode_chat(messages, tools=TOOLS, add_generation_prompt=True) == hf.apply_chat_template(
        expected, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ("Need the tool." in text) == (not follow_up)  # the call's reasoning stays until an answer follows it


# ---- forced calls, and the chat server -----------------------------------------------------------------
def test_forced_calls_follow_the_schema(gpt_oss_harmony_path, tokenizer):
    """The grammar lets the model reason first (random weights would ramble on: a bias on <|end|> ends it)."""
    llm = LLM(str(gpt_oss_harmony_path))
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(2):
        output = llm.chat([{"role": "user", "content": "Weather?"}], SamplingParams(
            seed=seed, max_tokens=100, skip_special_tokens=False, logit_bias={tokenizer.token_to_id("<|end|>"): 30}),
            tools=TOOLS, tool_choice=named)
        [call] = llm.tool_parser.parse(output.text)[1]
        assert call.name == "get_weather" and output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(call.arguments), WEATHER)


@pytest.fixture(scope="module")
def http(gpt_oss_harmony_path):
    with in_process(gpt_oss_harmony_path) as client:
        yield client


def scripted(tokenizer, text: str) -> dict:
    """The request fields that make the reply `text` whatever the weights say (llguidance matches a special
    token only by its id)."""
    parts = [f"<[{tokenizer.token_to_id(part)}]>" if part.startswith("<|") else json.dumps(part)
             for part in re.split(r"(<\|[a-z]+\|>)", text) if part]
    return {"structured_outputs": {"grammar": "start: " + " ".join(parts)}}


def chat(http, stream: bool, **fields) -> tuple[dict, str]:
    """(the reply's message, its finish reason); streamed, the chunks' deltas reassembled."""
    body = {"messages": [{"role": "user", "content": "Weather in Lisbon?"}], "max_tokens": 200, "seed": 0, **fields}
    response = http.post("/v1/chat/completions", json={**body, "stream": stream})
    assert response.status_code == 200, response.text
    if not stream:
        [choice] = response.json()["choices"]
        return choice["message"], choice["finish_reason"]
    message, finish = {"content": None, "reasoning_content": None, "tool_calls": None}, None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        [choice] = json.loads(line[6:])["choices"]
        for key in ("content", "reasoning_content"):
            if choice["delta"].get(key):
                message[key] = (message[key] or "") + choice["delta"][key]
        for delta in choice["delta"].get("tool_calls") or []:
            if delta.get("id"):
                message["tool_calls"] = [*(message["tool_calls"] or []), {"id": delta["id"], "type": "function",
                                         "function": {"name": delta["function"]["name"], "arguments": ""}}]
            message["tool_calls"][delta["index"]]["function"]["arguments"] += delta["function"]["arguments"] or ""
        finish = choice["finish_reason"] or finish
    return message, finish


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_answers_content_and_reasoning(http, tokenizer, stream):
    message, finish = chat(http, stream, **scripted(tokenizer, ANSWER))
    assert (message["content"], message["reasoning_content"], message["tool_calls"]) == REPLIES[ANSWER][:2] + (None,)
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_answers_calls(http, tokenizer, stream):
    message, finish = chat(http, stream, tools=TOOLS, **scripted(tokenizer, CALL))
    assert (message["content"], message["reasoning_content"]) == (None, "Need the tool.")
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["function"] == {"name": "get_weather", "arguments": ARGUMENTS}
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_gives_the_analysis_as_its_reasoning_item(http, tokenizer, stream):
    body = {"input": "Weather in Lisbon?", "max_output_tokens": 200, "stream": stream, **scripted(tokenizer, ANSWER)}
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    if stream:  # the last event's response
        response = json.loads(response.text.strip().rsplit("data: ", 1)[1])["response"]
    else:
        response = response.json()
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == REPLIES[ANSWER][1]
    assert message["content"][0]["text"] == REPLIES[ANSWER][0]
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == len(
        tokenizer.encode(REPLIES[ANSWER][1], add_special_tokens=False))


def test_the_reasoning_effort_reaches_the_template(http, tokenizer):
    """OpenAI's reasoning_effort (chat) and reasoning.effort (Responses) become the template's reasoning_effort,
    which GPT-OSS's writes into its system message."""
    messages = [{"role": "user", "content": "Weather in Lisbon?"}]
    prompt_tokens = {effort: len(tokenizer.encode_chat(messages, add_generation_prompt=True, reasoning_effort=effort))
                     for effort in ("medium", "minimal")}  # medium: the template's default
    assert prompt_tokens["minimal"] != prompt_tokens["medium"]
    for effort in ("medium", "minimal"):
        chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1,
                                                       **({} if effort == "medium" else {"reasoning_effort": effort})})
        response = http.post("/v1/responses", json={"input": messages[0]["content"], "max_output_tokens": 1,
                                                    "reasoning": {"effort": effort, "summary": "auto"}})
        assert chat.json()["usage"]["prompt_tokens"] == response.json()["usage"]["input_tokens"] == prompt_tokens[effort]
        assert response.json()["reasoning"] == {"effort": effort, "summary": "auto"}


def test_a_reasoning_parser_for_harmony_replies_fails_the_load_with_a_clear_error(gpt_oss_harmony_path):
    failures = []
    settings = ServerSettings(served_model_names=("tiny",), reasoning_parser="qwen3")

    def load():
        return Engine(EngineConfig(model=str(gpt_oss_harmony_path)))

    with TestClient(build_app(settings, load, on_load_failure=failures.append)) as client:
        deadline = time.monotonic() + 120
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 503
    assert "drop reasoning_parser 'qwen3'" in str(failures[0])


def test_the_server_forces_a_call_and_takes_the_conversation_back(http, tokenizer):
    message, finish = chat(http, False, tools=TOOLS, tool_choice="required",
                           logit_bias={str(tokenizer.token_to_id("<|end|>")): 30})  # reasoning, if any, ends
    [call] = message["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time") and finish == "tool_calls"
    conversation = [{"role": "user", "content": "Weather in Lisbon?"}, {"role": "assistant", **message},
                    {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    message, finish = chat(http, False, tools=TOOLS, messages=conversation, max_tokens=5)
    assert finish in ("length", "stop", "tool_calls")
