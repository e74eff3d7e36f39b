"""Structured output over HTTP with the openai client: response_format and vLLM's structured_outputs."""

import json
import re

import jsonschema
import pytest

from serverutil import serve

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0}},
          "required": ["city", "population"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


@pytest.fixture(scope="module")
def client(llama_path):
    with serve(llama_path, "--served-model-name", "tiny") as process:
        yield process.client()


def test_response_format_json_schema_validates(client):
    response = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=3, seed=1, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_validates(client):
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, seed=2, max_tokens=200, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_structured_outputs_on_both_endpoints(client):
    completion = client.completions.create(model="tiny", prompt="Code:", seed=3, max_tokens=20,
                                           extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}})
    assert re.fullmatch("[A-Z]{2}-[0-9]{4}", completion.choices[0].text)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, seed=4, max_tokens=20,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chat.choices[0].message.content in ("yes", "no")
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}
    completion = client.completions.create(model="tiny", prompt="Flags:", seed=5, max_tokens=40,
                                           extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(completion.choices[0].text), schema)


def test_invalid_schema_is_a_400_naming_the_field(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    assert caught.value.body["param"] == "response_format"
    assert "json_schema" in caught.value.body["message"]
