"""`lmgen serve` with no --model serves the embedded demo model, chat template included."""

import pytest

from lmgen import LLM, SamplingParams
from serverutil import DEMO_MODEL, demo_model_path, serve  # noqa: F401 (fixture)

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Who made the world?"}]


@pytest.fixture(scope="module")
def model_path(demo_model_path):
    return demo_model_path


@pytest.fixture(scope="module")
def server(model_path):
    # The default model is the demo model; until its weights exist, the tiny checkpoint stands in.
    with serve(None if model_path == DEMO_MODEL else model_path) as process:
        yield process


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(str(model_path))


def test_the_default_model_name(server, model_path):
    [card] = server.client().models.list().data
    assert card.id == ("lmgen-demo" if model_path == DEMO_MODEL else str(model_path))


def test_greedy_chat_equals_llm_chat(server, llm):
    client = server.client()
    model = client.models.list().data[0].id
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
    expected = llm.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0))
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True))
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_streamed_chat_is_the_same_reply(server, llm):
    client = server.client()
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = llm.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0))
    assert text == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)
