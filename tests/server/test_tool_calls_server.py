"""Tool calling over HTTP with the openai client, on a random Qwen2 whose chat template shows Hermes calls.

Random weights never call a tool of their own accord, so "auto" is scripted: structured_outputs makes
the reply a fixed text, and the server must read the calls in it as it would a model's.
"""

import json
import re
import time

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from lmgen import Engine, EngineConfig
from lmgen.server.app import build_app
from lmgen.server.serving import ServerSettings
from serverutil import serve

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]  # no parameters: it takes no arguments
SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "maxProperties": 0}}
MESSAGES = [{"role": "user", "content": "What is the weather in Lisbon?"}]
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}\n</tool_call>'


@pytest.fixture(scope="module")
def server(qwen_tools_path):
    with serve(qwen_tools_path, "--served-model-name", "tiny") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def scripted(server):
    """scripted(text): the request fields that make the reply `text`, whatever the weights say."""
    markers = {marker: server.post("/tokenize", json={"prompt": marker, "add_special_tokens": False}).json()["tokens"]
               for marker in ("<tool_call>", "</tool_call>")}
    assert all(len(ids) == 1 for ids in markers.values())

    def fields(text: str) -> dict:
        # llguidance matches an added token (these two) only by its id
        parts = [f"<[{markers[part][0]}]>" if part in markers else json.dumps(part)
                 for part in re.split("(</?tool_call>)", text) if part]
        return {"structured_outputs": {"grammar": "start: " + " ".join(parts)}}

    return fields


def reassembled(stream) -> tuple[str, list[dict], str]:
    """The content, the calls and the finish reason of a streamed reply."""
    content, calls, finish = "", [], None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.type == "function"
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_required_gives_calls_whose_arguments_follow_the_schema(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              n=3, seed=0, max_tokens=400)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_tool_choice_gives_one_call_to_that_function(client):
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, seed=1, max_tokens=400,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = response.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert response.choices[0].finish_reason == "stop"  # as OpenAI ends a call it was told to make
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        response = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, seed=seed,
                                                  tool_choice="required", parallel_tool_calls=False, max_tokens=400)
        assert len(response.choices[0].message.tool_calls) == 1


def test_streamed_call_deltas_add_up_to_the_whole_call(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=7, max_tokens=400)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = reassembled(client.chat.completions.create(stream=True, **kwargs))
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (call.function.name, call.function.arguments) for call in whole.message.tool_calls]
    assert content == "" and finish == whole.finish_reason == "tool_calls"


def test_auto_reads_the_calls_in_a_reply_and_streams_the_text_before_them(client, scripted):
    text = "Let me check.\n" + WEATHER_CALL
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=400, extra_body=scripted(text))
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.content == "Let me check.\n"
    [call] = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Lisbon", "unit": "celsius"})
    content, calls, finish = reassembled(client.chat.completions.create(stream=True, **kwargs))
    assert content == "Let me check.\n" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


@pytest.mark.parametrize("text", ["It is sunny.",
                                  '<tool_call>\n{"name": "get_weather", "arguments": {oops}}\n</tool_call>'])
def test_auto_replies_without_valid_calls_are_content(client, scripted, text):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=400,
                  extra_body=scripted(text))
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (text, None, "stop")
    assert reassembled(client.chat.completions.create(stream=True, **kwargs)) == (text, [], "stop")


def test_tool_choice_none_reads_no_calls(client, scripted):
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                            max_tokens=400, extra_body=scripted(WEATHER_CALL)).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (WEATHER_CALL, None, "stop")


def test_a_conversation_with_a_tool_result_renders_and_runs(server, client):
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=3, max_tokens=400).choices[0].message
    [call] = first.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    # the reply's message object goes back as it is, as OpenAI's examples do
    reply = client.chat.completions.create(model="tiny", messages=[*MESSAGES, first, result], tools=TOOLS,
                                           max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    history = [*MESSAGES, first.model_dump(exclude_none=True), result]
    tokens = server.post("/tokenize", json={"messages": history}).json()["tokens"]
    text = server.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    # the call's arguments rendered as the object they are (not as quoted JSON text), then the result
    assert f'{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text


@pytest.mark.parametrize(("fields", "param"), [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_wether"}}),
     "tool_choice.function.name"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": "{}"}}]), "tools.0.function.parameters"),
    (dict(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
          tool_choice="required"), "tools"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
     "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_tool_fields_are_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, **fields})
    assert caught.value.body["param"] == param, caught.value.body


@pytest.mark.parametrize("parser", ["llama3_json", None])
def test_the_tool_call_parser_setting_names_the_format(llama_path, parser):
    """The tiny Llama's chat template shows no call format: tools need the server's --tool-call-parser."""
    settings = ServerSettings(served_model_names=("tiny",), tool_call_parser=parser)
    with TestClient(build_app(settings, lambda: Engine(EngineConfig(model=str(llama_path))))) as http:
        deadline = time.monotonic() + 120
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        response = http.post("/v1/chat/completions", json={
            "messages": MESSAGES, "tools": TOOLS, "seed": 0, "max_tokens": 200,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    if parser is None:
        assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
        return
    [choice] = response.json()["choices"]
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
