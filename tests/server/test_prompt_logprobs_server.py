"""The prompt's logprobs through a real `lmgen serve`: echo with logprobs as OpenAI's legacy completions (and
vLLM) return them, vLLM's prompt_logprobs field, and lm-evaluation-harness's local-completions model end to end."""

from pathlib import Path

import pytest

from lmgen.loader.tokenizer import Tokenizer
from serverutil import serve

PROMPT = "A list of colors: red, blue, green, yellow, purple, orange, black, white and gray"
LMEVAL_TASK = Path(__file__).parent.parent / "data" / "lmeval_task"


@pytest.fixture(scope="module")
def server(llama_path):
    with serve(llama_path, "--served-model-name", "tiny", "--max-num-batched-tokens", "16") as process:
        yield process  # prompts of more than 16 tokens prefill in chunks


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return Tokenizer.from_pretrained(llama_path)


def check_echoed(logprobs, ids: list[int], expected, tokenizer: Tokenizer, k: int) -> None:
    """OpenAI's legacy shape over the prompt's tokens (leading the completion's): nothing for the first; then each
    token's logprob (within 1e-4 of transformers') and the top k with the token itself; offsets counting the
    tokens' text."""
    assert logprobs.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position, token in enumerate(ids[1:]):
        chosen, top = logprobs.token_logprobs[position + 1], logprobs.top_logprobs[position + 1]
        assert chosen == pytest.approx(float(expected[position, token]), abs=1e-4)
        assert top[logprobs.tokens[position + 1]] == chosen and len(top) <= k + 1
        assert max(top.values()) == pytest.approx(float(expected[position].max()), abs=1e-4)
    lengths = [len(token) for token in logprobs.tokens]
    assert logprobs.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]


def test_echo_scores_the_prompt_as_transformers_does(client, tokenizer, llama_log_softmax):
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 2 * 16
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)  # its blocks go to the prefix cache
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    [choice] = response.choices
    assert choice.text == PROMPT and choice.finish_reason == "length" and response.usage.completion_tokens == 0
    check_echoed(choice.logprobs, ids, llama_log_softmax(ids), tokenizer, 2)
    assert choice.model_extra["prompt_logprobs"] is None  # vLLM's field only when asked for


def test_echo_with_a_completion_and_n(client, tokenizer, llama_log_softmax):
    ids = tokenizer.encode(PROMPT)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True}).choices[0]
    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=1, n=2,
                                       echo=True, extra_body={"ignore_eos": True})
    for choice in echoed.choices:
        assert choice.text == tokenizer.decode(ids) + plain.text
        logprobs = choice.logprobs
        assert logprobs.tokens == [tokenizer.decode([t]) for t in ids] + plain.logprobs.tokens
        assert logprobs.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
        assert logprobs.top_logprobs[len(ids):] == plain.logprobs.top_logprobs
    assert echoed.choices[0].logprobs == echoed.choices[1].logprobs
    check_echoed(echoed.choices[0].logprobs, ids, llama_log_softmax(ids), tokenizer, 1)


def test_streamed_echo_equals_the_whole_response(client):
    fields = dict(model="tiny", prompt=["Lisbon is", PROMPT], max_tokens=5, temperature=0, logprobs=3, echo=True,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**fields)
    text, tokens, values, tops, offsets = {}, {}, {}, {}, {}
    for chunk in client.completions.create(stream=True, **fields):
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + choice.text
            for name, field in ((tokens, "tokens"), (values, "token_logprobs"), (tops, "top_logprobs"),
                                (offsets, "text_offset")):
                name[choice.index] = name.get(choice.index, []) + getattr(choice.logprobs, field)
    for choice in whole.choices:
        assert text[choice.index] == choice.text
        assert (tokens[choice.index], values[choice.index], tops[choice.index], offsets[choice.index]) == (
            choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs,
            choice.logprobs.text_offset)
    assert text[0].startswith("Lisbon is") and text[1].startswith(PROMPT)


def check_vllm_field(entries: list, ids: list[int], expected, k: int) -> None:
    """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank, decoded_token}} for it and the top k."""
    assert entries[0] is None and len(entries) == len(ids)
    for position, (token, entry) in enumerate(zip(ids[1:], entries[1:])):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(float(expected[position, token]), abs=1e-4)
        assert mine["rank"] == int((expected[position] > expected[position, token]).sum()) + 1
        top = expected[position].topk(k)
        assert {int(t) for t, value in entry.items() if value["rank"] <= k} == set(top.indices.tolist())
        assert all(isinstance(value["decoded_token"], str) for value in entry.values())


def test_prompt_logprobs_on_both_endpoints(client, tokenizer, llama_log_softmax):
    ids = tokenizer.encode(PROMPT)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                           extra_body={"prompt_logprobs": 2})
    assert completion.choices[0].logprobs is None
    check_vllm_field(completion.choices[0].model_extra["prompt_logprobs"], ids, llama_log_softmax(ids), 2)
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                          extra_body={"prompt_logprobs": 1})
    chat_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    check_vllm_field(chat.model_extra["prompt_logprobs"], chat_ids, llama_log_softmax(chat_ids), 1)


def test_lm_eval_local_completions_equals_its_hf_model(server, llama_path, monkeypatch, tmp_path):
    """lm-evaluation-harness scores a multiple-choice task against `lmgen serve` (local-completions: echo,
    logprobs, the prompt's token ids) as it scores it with transformers (its hf model): the same accuracy, the
    same choice for every item, the same loglikelihoods."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(LMEVAL_TASK), include_defaults=False)

    def evaluate(model_type: str, **model_args) -> dict:
        return lm_eval.simple_evaluate(model=model_type, model_args={**model_args, "add_bos_token": True},
                                       tasks=["lmgen_tiny_mc"], task_manager=tasks, batch_size=32, log_samples=True)

    served = evaluate("local-completions", base_url=f"{server.url}/v1/completions", model="tiny",
                      tokenizer=str(llama_path), tokenizer_backend="huggingface", max_retries=1)
    reference = evaluate("hf", pretrained=str(llama_path), dtype="float32", device="cpu")
    assert served["results"]["lmgen_tiny_mc"]["acc,none"] == reference["results"]["lmgen_tiny_mc"]["acc,none"]
    items = [sorted(result["samples"]["lmgen_tiny_mc"], key=lambda s: s["doc_id"]) for result in (served, reference)]
    assert len(items[0]) == len(items[1]) == 32
    for mine, theirs in zip(*items):
        assert mine["acc"] == theirs["acc"]
        scores, expected = ([float(r[0]) for r in item["filtered_resps"]] for item in (mine, theirs))
        assert scores == pytest.approx(expected, abs=1e-4)
        assert scores.index(max(scores)) == expected.index(max(expected))
