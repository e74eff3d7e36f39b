"""The OpenAI API of a real `lmgen serve` process, through the official openai client."""

import httpx
import pytest

from lmgen import LLM, SamplingParams
from serverutil import tiny_server  # noqa: F401 (fixture)

PROMPT = "Portugal is"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return tiny_server.client()


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path))


def content_chunks(stream):
    """(choice index, text) of every chunk that carries a token, plus the usage chunk's usage."""
    pieces, usage, finish = [], None, {}
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text = choice.delta.content if hasattr(choice, "delta") else choice.text
            if getattr(getattr(choice, "delta", None), "role", None):
                continue
            pieces.append((choice.index, text or ""))
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return pieces, usage, finish


def test_health_and_models(tiny_server, client):
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}
    [card] = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "lmgen"
    assert card.model_extra["max_model_len"] == 256


def test_greedy_completion_equals_llm_generate(client, llm):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    [expected] = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))
    assert response.choices[0].text == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")


def test_greedy_chat_equals_llm_chat(client, llm):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    expected = llm.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0))
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == expected.outputs[0].text
    assert response.object == "chat.completion"


def test_usage_matches_the_tokenizer(client, llm):
    tokenizer = llm.tokenizer
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES, add_generation_prompt=True))
    assert chat.usage.completion_tokens == 5


def test_streaming_completion_equals_the_whole(client):
    settings = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    whole = client.completions.create(**settings)
    stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **settings)
    pieces, usage, finish = content_chunks(stream)
    assert "".join(text for _, text in pieces) == whole.choices[0].text
    assert len(pieces) == whole.usage.completion_tokens  # one chunk per token
    assert usage.model_dump() == whole.usage.model_dump()
    assert finish == {0: whole.choices[0].finish_reason}


def test_streaming_chat_equals_the_whole(client):
    settings = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**settings)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **settings)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)


def test_n_two_completions(client):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2, seed=3, temperature=1.0,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 12
    assert response.choices[0].text != response.choices[1].text  # two seeds: seed and seed + 1


def test_n_two_streaming_chat(client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, seed=5,
                                            stream=True, extra_body={"ignore_eos": True})
    pieces, _, finish = content_chunks(stream)
    assert sorted(index for index, _ in pieces) == [0] * 4 + [1] * 4
    assert finish == {0: "length", 1: "length"}


def test_completion_logprobs(client):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    without = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in without.choices[0].logprobs.content)


def test_stop_strings_cut_the_output(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), "the greedy output is too short to pick a stop string from"
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[:full.index(stop) + len(stop)]


def test_seed_reproducibility(client):
    def sample(seed):
        return client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                              seed=seed, extra_body={"ignore_eos": True}).choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first


def test_several_prompts_token_ids_and_echo(client, llm):
    ids = llm.tokenizer.encode(PROMPT)
    response = client.completions.create(model="tiny", prompt=[PROMPT, "Lisbon"], max_tokens=4, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == response.choices[0].text
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + response.choices[0].text
    assert response.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode("Lisbon"))


def test_beam_search_equals_llm_generate(client, llm):
    beams = SamplingParams(n=2, num_beams=2, temperature=0, max_tokens=8, length_penalty=0.5, early_stopping=True)
    expected = [c.text for c in llm.generate(PROMPT, beams)[0].outputs]
    completion = client.completions.create(model="tiny", prompt=PROMPT, n=2, max_tokens=8, extra_body={
        "use_beam_search": True, "length_penalty": 0.5, "early_stopping": True})
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == expected
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, max_tokens=8,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content
    stop = expected[0][2:4]
    stopped = client.completions.create(model="tiny", prompt=PROMPT, n=2, max_tokens=8, stop=[stop],
                                        extra_body={"use_beam_search": True})
    assert any(c.finish_reason == "stop" for c in stopped.choices)
    assert all(stop not in c.text for c in stopped.choices)
    scored = client.completions.create(model="tiny", prompt=PROMPT, n=2, max_tokens=8, logprobs=2,
                                       extra_body={"use_beam_search": True})
    assert all(len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) > 0 for c in scored.choices)


def test_extras_and_penalties_are_accepted(client):
    response = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={"5": 2.0}, user="tester", seed=1,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": False,
                    "stop_token_ids": [2], "skip_special_tokens": True})
    assert response.usage.completion_tokens == 6


def test_tokenize_and_detokenize(tiny_server, llm):
    tokens = tiny_server.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == llm.tokenizer.encode(PROMPT) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 256
    chat = tiny_server.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    text = tiny_server.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == llm.tokenizer.decode(tokens["tokens"])


def test_metrics_count_requests_and_tokens(tiny_server):
    metrics = tiny_server.metrics()
    assert metrics[("lmgen_requests_total", (("status", "length"),))] > 0
    assert metrics[("lmgen_generation_tokens_total", ())] > 0
    assert metrics[("lmgen_prompt_tokens_total", ())] > 0
    assert metrics[("lmgen_time_to_first_token_seconds_count", ())] > 0
    assert metrics[("lmgen_inter_token_latency_seconds_count", ())] > 0
    for gauge in ("lmgen_requests_waiting", "lmgen_requests_running", "lmgen_kv_cache_usage_ratio"):
        assert (gauge, ()) in metrics
