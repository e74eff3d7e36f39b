"""SamplingParams.prompt_logprobs: each prompt token's logprob and the top k, against transformers' log-softmax."""

import pytest
import torch

from lmgen import LLM, InvalidArgumentError, SamplingParams
from lmgen.engine.request import Request
from lmgen.engine.runner import PromptScoring

PROMPT = "A list of colors: red, blue, green, yellow, purple, orange, black, white and gray"
SCORE = SamplingParams(max_tokens=0, prompt_logprobs=3)


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float32")


def check_against(reference: torch.Tensor, ids: list[int], scored: list, k: int) -> None:
    """Entry i holds token i's logprob and rank under position i - 1's distribution, and its top k."""
    assert scored[0] is None and len(scored) == len(ids)
    for position, (token, entry) in enumerate(zip(ids[1:], scored[1:])):
        expected = reference[position]
        assert entry[token].logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert entry[token].rank == int((expected > expected[token]).sum()) + 1
        top = expected.topk(k)
        alternatives = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= k)
        assert [t for _, t, _ in alternatives] == top.indices.tolist()
        assert [v for _, _, v in alternatives] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert set(entry) <= {token, *top.indices.tolist()}
        assert all(lp.decoded_token is not None for lp in entry.values())


def test_equal_to_transformers_with_and_without_generating(llm, llama_log_softmax):
    ids = llm.tokenizer.encode(PROMPT)
    expected = llama_log_softmax(ids)
    [scored] = llm.generate(PROMPT, SCORE)
    check_against(expected, ids, scored.prompt_logprobs, 3)
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length" and scored.finished
    [generated] = llm.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0))
    assert len(generated.outputs[0].token_ids) == 4
    check_against(expected, ids, generated.prompt_logprobs, 0)


def test_chunked_prefill_accumulates_across_chunks(llama_path, llama_log_softmax):
    chunked = LLM(str(llama_path), dtype="float32", max_num_batched_tokens=8)
    ids = chunked.tokenizer.encode(PROMPT)
    assert len(ids) > 3 * 8
    [scored] = chunked.generate(PROMPT, SCORE)
    check_against(llama_log_softmax(ids), ids, scored.prompt_logprobs, 3)


def test_a_prefix_cache_hit_still_scores_the_whole_prompt(llama_path, llama_log_softmax):
    llm = LLM(str(llama_path), dtype="float32", block_size=4)
    ids = llm.tokenizer.encode(PROMPT)
    llm.generate(PROMPT, SamplingParams(max_tokens=1))
    scheduler = llm.engine.scheduler
    hits = scheduler.num_prefix_hit_tokens
    llm.generate(PROMPT, SamplingParams(max_tokens=1))
    assert scheduler.num_prefix_hit_tokens - hits >= len(ids) - 4  # the prompt's blocks are cached
    [scored] = llm.generate(PROMPT, SCORE)
    check_against(llama_log_softmax(ids), ids, scored.prompt_logprobs, 3)


def test_n_sequences_and_beams_share_one_list(llm):
    ids = llm.tokenizer.encode(PROMPT)
    [alone] = llm.generate(PROMPT, SCORE)
    [sampled] = llm.generate(PROMPT, SamplingParams(n=3, max_tokens=3, seed=1, prompt_logprobs=3))
    assert len(sampled.outputs) == 3 and sampled.prompt_logprobs == alone.prompt_logprobs
    [beams] = llm.generate(PROMPT, SamplingParams(n=2, num_beams=2, temperature=0, max_tokens=3, prompt_logprobs=3))
    assert len(beams.outputs) == 2 and beams.prompt_logprobs == alone.prompt_logprobs
    [scored] = llm.generate(ids, SamplingParams(n=2, max_tokens=0, prompt_logprobs=3))
    assert [(o.index, o.token_ids, o.finish_reason) for o in scored.outputs] == [(0, [], "length"), (1, [], "length")]
    assert scored.prompt_logprobs == alone.prompt_logprobs


def test_streamed_once_in_the_first_delta(llm):
    deltas = list(llm.stream(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True,
                                                    prompt_logprobs=1)))
    assert [d.prompt_logprobs is not None for d in deltas] == [True] + [False] * (len(deltas) - 1)
    assert len(deltas[0].prompt_logprobs) == len(deltas[0].prompt_token_ids)


def test_a_recomputed_prompt_scores_only_what_is_missing():
    """A preempted request computes its prompt again from the start: the positions it scored are not scored twice."""
    request = Request("r", list(range(10)), SamplingParams(prompt_logprobs=1), 4, torch.Generator())
    request.prompt_logprobs += [{1: None}] * 4  # positions 0-3 scored (tokens 1-4)
    scoring = PromptScoring()
    scoring.add(request, 0, 6, first_row=7)  # positions 0-5 computed again, at rows 7-12
    assert (scoring.rows, scoring.targets, scoring.counts) == ([11, 12], [5, 6], [2])
    scoring.add(request, 6, 10, first_row=20)  # the last position predicts the first output token
    assert (scoring.rows[2:], scoring.targets[2:], scoring.counts[1:]) == ([20, 21, 22], [7, 8, 9], [3])


@pytest.mark.parametrize("fields, message", [
    (dict(prompt_logprobs=-1), "prompt_logprobs must be an integer >= 0"),
    (dict(prompt_logprobs=True), "prompt_logprobs must be an integer >= 0"),
    (dict(prompt_logprobs=2.0), "prompt_logprobs must be an integer >= 0"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(max_tokens=0, prompt_logprobs=1, num_beams=2), "max_tokens must be at least 1"),
])
def test_bad_settings_are_clear_errors(fields, message):
    with pytest.raises(InvalidArgumentError, match=message):
        SamplingParams(**fields)


def test_more_than_max_logprobs_is_refused(llm):
    with pytest.raises(InvalidArgumentError, match=r"prompt_logprobs asks for the top 21 tokens, more than "
                                                   r"max_logprobs \(20\)"):
        llm.generate(PROMPT, SamplingParams(prompt_logprobs=21))
    with pytest.raises(InvalidArgumentError, match="logprobs asks for the top 30"):
        llm.generate(PROMPT, SamplingParams(logprobs=30))
    assert not llm.engine.has_unfinished_requests()
