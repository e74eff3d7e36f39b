"""Speculative decoding (prompt lookup): greedy outputs are token for token the outputs without it."""

import pytest

from conftest import ALL_VARIANTS
from lmgen import LLM, InvalidArgumentError, SamplingParams
from lmgen.engine.speculative import SpeculativeConfig, propose_ngram
from lmgen.sampling.sampler import accept_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "disable_by_batch_size": None}
# prompts whose continuations repeat them, so that drafts are made and (some) accepted
REPEATING = [[1, *([7, 8, 9, 10, 11] * 6)], [1, *range(20, 40), *range(20, 30)], [1, 5, 9, 5, 9, 5, 9, 5]]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_ngram_proposals_follow_the_latest_earlier_occurrence_of_the_longest_tail():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert propose_ngram(tokens, 2, 1, 3) == [4, 5]  # "1 2 3" last seen before the tail at 4
    assert propose_ngram(tokens, 10, 1, 3) == [4, 5, 1, 2, 3]  # no further than the sequence goes
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []  # no tail recurs
    assert propose_ngram([5, 6, 5], 2, 1, 3) == [6, 5]  # a 1-gram when no longer one recurs
    assert propose_ngram(tokens, 0, 1, 3) == []


def test_verification_accepts_the_agreeing_drafts_and_adds_the_target_token():
    assert accept_greedy([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accept_greedy([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accept_greedy([4, 5, 6], [8, 5, 6, 7]) == [8]


@pytest.mark.parametrize("variant", [*ALL_VARIANTS, "phi3-long"])  # phi3-long: the 8-token prompt crosses 16
def test_greedy_output_with_prompt_lookup_is_the_output_without(checkpoint_factory, variant):
    path = str(checkpoint_factory(variant))
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = _tokens(LLM(path, dtype="float32"), REPEATING, greedy)
    llm = LLM(path, dtype="float32", speculative_config=NGRAM)
    assert [_tokens(llm, [p], greedy)[0] for p in REPEATING] == expected  # alone
    assert _tokens(llm, REPEATING, greedy) == expected  # in one batch
    assert llm.engine.num_draft_tokens > 0


def test_a_busy_mixed_batch_with_speculation_gives_the_tokens_without(llama_path):
    """16 requests: greedy ones that draft, sampled and logprob ones that do not, stop strings and
    max_tokens inside drafts, a KV cache so small that requests are preempted, chunked prompts."""
    prompts = [REPEATING[i % 3] + [i + 3] * (i % 4) for i in range(16)]
    params = [SamplingParams(max_tokens=5 + i, temperature=0, ignore_eos=True) for i in range(8)]
    params += [SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[9], ignore_eos=True),
               SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True),
               SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True),
               SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.3, ignore_eos=True)] * 2
    small = dict(dtype="float32", block_size=4, kv_cache_memory=2 * 2 * 2 * 16 * 4 * 4 * 40,
                 max_num_batched_tokens=24)
    plain = [o.outputs[0] for o in LLM(str(llama_path), **small).generate(prompts, params)]
    llm = LLM(str(llama_path), speculative_config=NGRAM, **small)
    fast = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    assert [o.text for o in fast] == [o.text for o in plain]
    assert [o.finish_reason for o in fast] == [o.finish_reason for o in plain]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.num_accepted_draft_tokens > 0


def test_stop_strings_inside_drafts_end_the_output_where_they_would_without():
    llm, plain = LLM(dtype="float32", speculative_config=NGRAM), LLM(dtype="float32")
    prompt = "And the LORD said unto Moses, And the LORD said unto Moses, And the LORD"
    for stop in (["Moses"], ["said unto"], [" the"]):
        params = SamplingParams(max_tokens=40, temperature=0, stop=stop)
        assert llm.generate(prompt, params)[0].outputs[0].text == plain.generate(prompt, params)[0].outputs[0].text


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle"}, "speculative method 'eagle' is not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min .5. is more than"),
    ({"model": "path/to/draft", "num_speculative_tokens": 4}, "a draft model is not supported yet"),
    ({"method": "ngram", "lookahead": 3}, "unknown keys"),
    ("ngram", "must be a dict"),
])
def test_bad_speculative_configs_are_named(config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        LLM(speculative_config=config)


def test_no_drafts_while_more_requests_run_than_disable_by_batch_size(llama_path):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(llama_path), dtype="float32", speculative_config={**NGRAM, "disable_by_batch_size": 2})
    prompts = REPEATING * 2  # 6 running requests: none drafts
    assert _tokens(llm, prompts, greedy) == _tokens(LLM(str(llama_path), dtype="float32"), prompts, greedy)
    assert llm.engine.num_draft_tokens == 0
    _tokens(llm, REPEATING[:1], greedy)  # one request: it drafts
    assert llm.engine.num_draft_tokens > 0


def test_a_config_object_is_taken_as_it_is():
    config = SpeculativeConfig(num_speculative_tokens=2)
    assert LLM(speculative_config=config).engine.config.speculative_config is config


def test_drafting_adapts_to_how_many_drafts_were_accepted():
    config = SpeculativeConfig(num_speculative_tokens=5)
    assert config.next_limit(drafted=3, accepted=3) == 5  # all accepted: two more, at most the configured
    assert config.next_limit(drafted=2, accepted=2) == 4
    assert config.next_limit(drafted=5, accepted=2) == 2  # as many as were accepted
    assert config.next_limit(drafted=5, accepted=0) == 0  # none: the request pauses drafting


def test_a_request_whose_drafts_fail_pauses_drafting(llama_path, monkeypatch):
    """Drafts that never match: after the first failure the request drafts only now and then."""
    from lmgen.engine import speculative

    monkeypatch.setattr(speculative, "propose_ngram", lambda tokens, k, *_: [0] * k)  # never the greedy token
    llm = LLM(str(llama_path), dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    assert _tokens(llm, REPEATING[:1], greedy) == _tokens(LLM(str(llama_path), dtype="float32"), REPEATING[:1], greedy)
    assert llm.engine.num_accepted_draft_tokens == 0
    assert llm.engine.num_draft_tokens <= 4 + 30 // 5 + 1  # 4 at first, then one try after each pause
