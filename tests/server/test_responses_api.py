"""/v1/responses through the official openai client, and OpenAI's optional fields a local server ignores."""

import json

import jsonschema
import openai
import pytest

from lmgen import LLM, SamplingParams
from serverutil import tiny_server  # noqa: F401 (fixture)

INSTRUCTIONS = "You are terse."
QUESTION = "Name a color."
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
IGNORED = {"store": False, "metadata": {"team": "eval"}, "service_tier": "auto", "user": "someone",
           "prompt_cache_key": "k", "prompt_cache_retention": "24h", "safety_identifier": "abc"}


@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path))


def expected_chat(llm, messages, max_tokens):
    return llm.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0)).outputs[0]


def test_a_response_equals_the_chat_reply(client, llm):
    response = client.responses.create(model="tiny", input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=10,
                                       temperature=0)
    expected = expected_chat(llm, MESSAGES, 10)
    assert response.object == "response" and response.id.startswith("resp_")
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and message.content[0].text == expected.text
    assert response.output_text == expected.text
    prompt_tokens = len(llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True))
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt_tokens, len(expected.token_ids))
    assert response.usage.total_tokens == prompt_tokens + len(expected.token_ids)
    if expected.finish_reason == "length":
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.incomplete_details is None
    assert response.instructions == INSTRUCTIONS and response.max_output_tokens == 10


def test_streamed_events_add_up_to_the_response(client):
    kwargs = dict(model="tiny", input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-4].text == whole.output_text
    final = events[-1].response
    assert final.id == events[0].response.id and final.output[0].content[0].text == text
    assert final.usage.output_tokens == whole.usage.output_tokens == 12
    # The SDK's stream helper checks the events' consistency as it assembles them (into a response that
    # completed: one that stopped, as the grammar makes it).
    kwargs["extra_body"] = {"structured_outputs": {"choice": ["red", "green"]}}
    with client.responses.stream(**kwargs) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text in ("red", "green")
    assert final.output[0].status == "completed"


def test_input_messages_with_parts_and_an_earlier_output(client, llm):
    first = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=4, temperature=0)
    follow_up = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
                 *[item.model_dump() for item in first.output],  # echoed back as the SDK returned it
                 {"type": "message", "role": "user", "content": "And another?"}]
    response = client.responses.create(model="tiny", input=follow_up, instructions=INSTRUCTIONS,
                                       max_output_tokens=6, temperature=0)
    conversation = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And another?"}]
    assert response.output_text == expected_chat(llm, conversation, 6).text


def test_logprobs_and_json_schema_output(client):
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=5, temperature=0,
                                       include=["message.output_text.logprobs"], top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    logprobs = response.output[0].content[0].logprobs
    assert len(logprobs) == 5 and all(len(entry.top_logprobs) == 2 for entry in logprobs)
    assert "".join(entry.token for entry in logprobs) == response.output_text
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 8}}, "required": ["color"],
              "additionalProperties": False}
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=40, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "color", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input.0.content.0"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    # a reasoning item goes with the assistant message right after it
    ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": "x"}]},
                {"role": "user", "content": "Hi"}]}, "input.0"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "reasoning", "summary": []}]}, "input.1"),
    ({"input": [{"type": "reasoning", "content": [{"type": "output_text", "text": "x"}]},
                {"role": "assistant", "content": "Hi"}]}, "input.0.content.0"),
    ({"max_output_token": 5}, "max_output_token"),  # a typo
    ({"background": True}, "background"),
    ({"n": 2}, "n"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
])
def test_unsupported_fields_are_a_400_naming_them(tiny_server, fields, param):
    response = tiny_server.post("/v1/responses", json={"model": "tiny", "input": QUESTION, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_openai_optional_fields_are_accepted_and_ignored(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, parallel_tool_calls=False,
                                          **IGNORED)
    completion = client.completions.create(model="tiny", prompt=QUESTION, max_tokens=3, extra_body=IGNORED)
    response = client.responses.create(model="tiny", input=QUESTION, max_output_tokens=3, parallel_tool_calls=True,
                                       **IGNORED)
    assert chat.choices[0].message.content is not None and completion.choices[0].text is not None
    assert response.output_text is not None and response.store is False
    with pytest.raises(openai.BadRequestError, match="'stor'"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, extra_body={"stor": False})
