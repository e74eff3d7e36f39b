"""Speculative decoding (prompt lookup, a draft model): greedy outputs are token for token the outputs without
it, sampled ones repeat with a seed, and every per-position setting sees the drafts before the position."""

import json
import shutil

import jsonschema
import pytest
import torch

from chi_square import fits
from conftest import ALL_VARIANTS
from lmgen import LLM, BeamSearchParams, InvalidArgumentError, SamplingParams
from lmgen.engine.request import Request
from lmgen.engine.speculative import SpeculativeConfig, propose_ngram
from lmgen.errors import LmgenError
from lmgen.outputs import SpecDecodeStats
from lmgen.sampling.sampler import ScoreRecorder, accept_greedy

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "disable_by_batch_size": None}
DRAFT = {"num_speculative_tokens": 4, "disable_by_batch_size": None}  # and "model": the draft's folder
# prompts whose continuations repeat them, so that drafts are made and (some) accepted
REPEATING = [[1, *([7, 8, 9, 10, 11] * 6)], [1, *range(20, 40), *range(20, 30)], [1, 5, 9, 5, 9, 5, 9, 5]]


INTEGERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 8, "maxItems": 8}


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _logprob_values(output) -> list[float]:
    """Each token's entries (the chosen token's and the top ones'), in token id order, one after another."""
    return [entry[t].logprob for entry in output.logprobs for t in sorted(entry)]


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


def _mixed_batch(plain: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """16 greedy requests on the repeating prompts: max_tokens of 3 to 23 (reached at every point of a
    step's drafts), stop ids and stop strings taken from the prompts' own continuations (met inside drafts)."""
    greedy = dict(temperature=0, ignore_eos=True)
    free = [o.outputs[0] for o in plain.generate(REPEATING, SamplingParams(max_tokens=24, **greedy))]
    params = [SamplingParams(max_tokens=3 + 4 * i, **greedy) for i in range(6)]
    params += [SamplingParams(max_tokens=24, stop_token_ids=[free[i % 3].token_ids[3 + 3 * i]], **greedy)
               for i in range(5)]
    wordy = max(range(3), key=lambda i: len(free[i].text))  # a random model's tokens may have no text
    text = free[wordy].text
    params += [SamplingParams(max_tokens=24, stop=[text[len(text) * i // 6:][:2]], **greedy) for i in range(1, 6)]
    return [REPEATING[i % 3] for i in range(11)] + [REPEATING[wordy]] * 5, params


# phi3-long: the 8-token prompt crosses 16. The draft model: the target's own weights (so it agrees)
@pytest.mark.parametrize("variant", [*ALL_VARIANTS, "phi3-long"])
def test_greedy_output_with_speculation_is_the_output_without(checkpoint_factory, variant):
    """With each proposer, alone and in a batch of 16 with a KV cache so small that requests are preempted."""
    path = str(checkpoint_factory(variant))
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLM(path, dtype="float32")
    expected = _tokens(plain, REPEATING, greedy)
    prompts, params = _mixed_batch(plain)
    batched = [o.outputs[0] for o in plain.generate(prompts, params)]
    block = plain.engine.kv_cache.nbytes // plain.engine.kv_cache.num_blocks // 4  # of 4 tokens
    for config, share in ((NGRAM, 1), ({**DRAFT, "model": path}, 2)):  # the draft model: half the cache
        llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=24 * block * share, speculative_config=config)
        assert [_tokens(llm, [p], greedy)[0] for p in REPEATING] == expected  # alone
        outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
        assert [(o.token_ids, o.text, o.finish_reason) for o in outputs] == [
            (o.token_ids, o.text, o.finish_reason) for o in batched]
        assert llm.engine.scheduler.num_preemptions > 0
        # drafts were checked; the target's own weights as the draft agree with it (whether a random model
        # repeats its prompt, which prompt lookup needs, depends on its weights)
        record = llm.engine.spec_decode
        assert record.num_draft_tokens > 0 and (config is NGRAM or record.num_accepted_tokens > 0)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_a_busy_mixed_batch_with_speculation_gives_the_tokens_without(llama_path, llama_draft_path, method):
    """16 requests that all draft: greedy ones (with logprobs, penalties, a grammar), sampled ones, stop ids,
    stop strings and max_tokens inside drafts, a KV cache so small that requests are preempted (and the draft
    model's too small for all drafting requests at once), chunked prompts. The deterministic ones give the
    tokens they give without; the seeded ones repeat themselves."""
    prompts = [REPEATING[i % 3] + [i + 3] * (i % 4) for i in range(16)]
    greedy = dict(temperature=0, ignore_eos=True)
    params = [SamplingParams(max_tokens=5 + i, **greedy) for i in range(4)]
    params += [SamplingParams(max_tokens=20, stop=["aïve" * 5], include_stop_str_in_output=True, **greedy),
               SamplingParams(max_tokens=20, stop_token_ids=[208], **greedy),
               SamplingParams(max_tokens=9, **greedy),
               SamplingParams(max_tokens=20, repetition_penalty=1.3, **greedy),
               SamplingParams(max_tokens=20, logprobs=2, **greedy),
               SamplingParams(max_tokens=20, structured={"json_schema": INTEGERS}, **greedy),
               SamplingParams(max_tokens=20, min_tokens=10, stop_token_ids=[431], logprobs=0, **greedy),
               SamplingParams(max_tokens=20, no_repeat_ngram_size=2, **greedy)]
    params += [SamplingParams(max_tokens=20, temperature=0.5, top_p=0.9, seed=i, logprobs=1) for i in range(3)]
    params += [SamplingParams(max_tokens=60, temperature=0.7, seed=3, structured={"json_schema": INTEGERS})]
    small = dict(dtype="float32", block_size=4, kv_cache_memory=2 * 2 * 2 * 16 * 4 * 4 * 40,
                 max_num_batched_tokens=24)
    plain = [o.outputs[0] for o in LLM(str(llama_path), **small).generate(prompts, params)]
    config = NGRAM if method == "ngram" else {**DRAFT, "model": str(llama_draft_path)}
    llm = LLM(str(llama_path), speculative_config=config, **small)
    fast, again = ([o.outputs[0] for o in llm.generate(prompts, params)] for _ in range(2))
    deterministic = slice(0, 12)
    assert [o.token_ids for o in fast[deterministic]] == [o.token_ids for o in plain[deterministic]]
    assert [o.text for o in fast[deterministic]] == [o.text for o in plain[deterministic]]
    assert [o.finish_reason for o in fast] == [o.finish_reason for o in plain]
    assert _logprob_values(fast[8]) == pytest.approx(_logprob_values(plain[8]), abs=1e-4)
    assert [o.token_ids for o in again] == [o.token_ids for o in fast]  # the seeded ones too
    assert [len(o.logprobs) for o in fast[12:15]] == [len(o.token_ids) for o in fast[12:15]]
    assert fast[15].finish_reason == "stop" and len(json.loads(fast[15].text)) == 8
    assert plain[4].text.endswith("aïve" * 5) and plain[4].finish_reason == "stop"
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.spec_decode.num_accepted_tokens > 0
    if method == "draft_model":  # finished requests gave their draft blocks back
        assert llm.engine.proposer.pool.num_free_blocks == llm.engine.proposer.pool.num_blocks


def test_each_sequence_reports_its_drafts_and_the_engine_counts_the_same(llama_path):
    """CompletionOutput.spec_decode: a verifying step gives its accepted drafts and one token more (greedy,
    ignore_eos: nothing ends a step early), so the record says what each step gave; the engine's totals (for
    /metrics) are the records' sum."""
    llm = LLM(str(llama_path), dtype="float32", speculative_config=NGRAM)
    engine, greedy = llm.engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(REPEATING):
        engine.add_request(prompt, greedy, request_id=str(i))
    engine.add_request(REPEATING[0], SamplingParams(max_tokens=20, n=2, seed=0), request_id="n")
    records, steps = {}, 0
    while engine.has_unfinished_requests():
        got = {}
        for delta in engine.step():
            completion = delta.outputs[0]
            key = (delta.request_id, completion.index)
            got[key] = got.get(key, 0) + len(completion.token_ids)
            before, records[key] = records.get(key, SpecDecodeStats()), completion.spec_decode
            if completion.spec_decode.num_drafts > before.num_drafts and delta.request_id != "n":
                accepted = completion.spec_decode.num_accepted_tokens - before.num_accepted_tokens
                assert got[key] == accepted + 1
                steps += 1
    assert sum(records.values(), SpecDecodeStats()) == engine.spec_decode
    assert steps == sum(records[(str(i), 0)].num_drafts for i in range(3)) > 0
    assert records[("n", 0)] != records[("n", 1)]  # each sequence its own record
    record = records[("0", 0)]
    assert 0 < record.acceptance_rate == record.num_accepted_tokens / record.num_draft_tokens <= 1
    assert record.mean_acceptance_length == 1 + record.num_accepted_tokens / record.num_drafts
    assert LLM(str(llama_path)).generate(REPEATING[:1], greedy)[0].outputs[0].spec_decode is None  # not speculating
    merged = llm.generate(REPEATING[:1], greedy)[0].outputs[0].spec_decode  # the whole output's record
    assert merged == record


# settings that change these prompts' greedy outputs at positions drafts are checked at (or, top_k=1, do not)
PER_POSITION = [dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.3),
                dict(no_repeat_ngram_size=3), dict(logit_bias={326: -5.0}), dict(bad_words_ids=[[326, 326, 326]]),
                dict(sequence_bias={(236, 236): -4.0}), dict(min_tokens=20, stop_token_ids=[208]),
                dict(temperature=1.0, top_k=1)]


def test_processors_penalties_and_logprobs_see_the_drafts_before_each_position(llama_path):
    """Greedy requests with per-position settings, and logprobs, give with speculation what they give without."""
    params = [SamplingParams(max_tokens=20, ignore_eos=True, logprobs=3, **({"temperature": 0} | setting))
              for setting in [{}, *PER_POSITION]]
    prompts = [prompt for prompt in REPEATING for _ in params]
    plain = [o.outputs[0] for o in LLM(str(llama_path), dtype="float32").generate(prompts, params * 3)]
    llm = LLM(str(llama_path), dtype="float32", speculative_config=NGRAM)
    fast = [o.outputs[0] for o in llm.generate(prompts, params * 3)]
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]
    assert [v for o in fast for v in _logprob_values(o)] == pytest.approx([v for o in plain
                                                                           for v in _logprob_values(o)], abs=1e-4)
    assert llm.engine.spec_decode.num_accepted_tokens > 0
    by_setting = [[plain[p * len(params) + i].token_ids for p in range(3)] for i in range(len(params))]
    assert all(outputs != by_setting[0] for outputs in by_setting[1:-1])  # each setting bites
    assert by_setting[-1] == by_setting[0]  # top_k=1 samples the argmax


def test_seeded_sampled_requests_repeat_themselves_with_speculation(llama_path):
    params = [SamplingParams(max_tokens=24, ignore_eos=True, seed=seed, temperature=0.4, **setting)
              for seed in range(2) for setting in ({}, {"top_p": 0.8}, {"min_p": 0.1, "repetition_penalty": 1.1})]
    llm = LLM(str(llama_path), dtype="float32", speculative_config=NGRAM)
    first, second = (_tokens(llm, [prompt for prompt in REPEATING for _ in params], params * 3) for _ in range(2))
    assert first == second and llm.engine.spec_decode.num_accepted_tokens > 0
    assert len({tuple(tokens) for tokens in first}) > len(first) // 2  # not the argmax each time


@pytest.fixture(scope="module")
def noisy_draft_path(llama_path, tmp_path_factory):
    """The tiny Llama with noise on every weight: a draft model of its vocabulary whose distributions differ
    from its own (about half its top-3 drafts are accepted)."""
    from safetensors.torch import load_file, save_file

    draft = shutil.copytree(llama_path, tmp_path_factory.mktemp("drafts") / "noisy")
    generator = torch.Generator().manual_seed(1)
    tensors = {name: tensor + 0.25 * tensor.std() * torch.randn(tensor.shape, generator=generator)
               for name, tensor in load_file(draft / "model.safetensors").items()}
    save_file(tensors, draft / "model.safetensors", metadata={"format": "pt"})
    return draft


def output_probs(models: list[LLM], prompt: list[int], top_k: int) -> dict[tuple[int, ...], float]:
    """The probability of each output of len(models) tokens sampled with top_k (temperature 1), the i-th token
    from models[i]'s distribution."""
    probs = {(): 1.0}
    for llm in models:
        prefixes = list(probs)
        logits = llm.engine.score([prompt + list(prefix) for prefix in prefixes])
        probs = {prefix + (token,): probs[prefix] * p for prefix, rows in zip(prefixes, logits)
                 for token, p in zip(*(lambda top: (top.indices.tolist(), top.values.softmax(-1).tolist()))(
                     rows[-1].topk(top_k)))}
    return probs


def test_sampled_outputs_with_a_draft_model_follow_the_target_distribution(llama_path, noisy_draft_path):
    """600 seeded 4-token outputs with top_k=3: the first token sampled alone, the next two drafted by a draft
    model that often disagrees and verified (accepted, or replaced by a draw from the residual), the last drawn
    after two accepted drafts or alone. The counts of their first two tokens (where a wrong residual shows most)
    and of the whole outputs fit the target's probabilities (chi-square), not those of outputs whose drafts were
    all accepted; seeds repeat their tokens."""
    target, draft = LLM(str(llama_path), dtype="float32"), LLM(str(noisy_draft_path), dtype="float32")
    prompt, top_k = [1, 7, 8, 9, 10], 3
    llm = LLM(str(llama_path), dtype="float32", max_num_seqs=128, speculative_config={
        "model": str(noisy_draft_path), "num_speculative_tokens": 2, "disable_by_batch_size": None})
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_k=top_k, seed=seed, ignore_eos=True)
              for seed in range(600)]
    outputs = [tuple(o.outputs[0].token_ids) for o in llm.generate([prompt] * len(params), params)]
    record = llm.engine.spec_decode
    assert record.num_drafts == len(params) and 0.2 < record.acceptance_rate < 0.8  # both ways taken often

    def counts(length: int, probs: dict[tuple[int, ...], float]) -> torch.Tensor:
        found = [output[:length] for output in outputs]
        return torch.tensor([found.count(cell) for cell in probs], dtype=torch.float64)

    for length in (2, 4):
        expected = output_probs([target] * length, prompt, top_k)
        assert counts(length, expected).sum() == len(outputs)  # none outside the target's top 3s
        assert fits(counts(length, expected), torch.tensor(list(expected.values())))
    all_accepted = output_probs([target, draft, draft, target], prompt, top_k)
    assert not fits(counts(4, all_accepted), torch.tensor(list(all_accepted.values())))
    assert [tuple(tokens) for tokens in _tokens(llm, [prompt] * 8, params[:8])] == outputs[:8]  # in another batch


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_output_with_speculation_is_valid(llama_path, llama_draft_path, method):
    """Sampled JSON always matches its schema (greedy JSON is what it is without: the mixed batch's test)."""
    strings = {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 6, "maxItems": 6}
    records = {"type": "array", "items": {"type": "object", "properties": {  # the grammar forces the keys
        "name": {"type": "string", "maxLength": 6}, "id": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["name", "id"], "additionalProperties": False}, "minItems": 3, "maxItems": 3}
    schemas = [INTEGERS, strings, records, records]
    params = [SamplingParams(max_tokens=200, temperature=0.7, seed=seed, structured={"json_schema": schema})
              for seed, schema in enumerate(schemas)]
    config = NGRAM if method == "ngram" else {**DRAFT, "model": str(llama_draft_path)}
    llm = LLM(str(llama_path), dtype="float32", speculative_config=config)
    for output, schema in zip(llm.generate(["Answer:"] * len(params), params), schemas):
        assert output.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
    assert llm.engine.spec_decode.num_accepted_tokens > 0


def test_recorded_scores_have_a_row_per_token_as_without(llama_path):
    """transformers' output_scores / output_logits through the engine: the rows of the accepted tokens."""
    def recorded(llm: LLM, temperature: float) -> ScoreRecorder:
        recorder = ScoreRecorder(scores=True, logits=True)
        llm.generate(REPEATING[:1], SamplingParams(max_tokens=16, temperature=temperature, seed=0, ignore_eos=True,
                                                   repetition_penalty=1.2, score_recorder=recorder))
        return recorder

    llm = LLM(str(llama_path), dtype="float32", speculative_config=NGRAM)
    fast, plain = recorded(llm, 0), recorded(LLM(str(llama_path), dtype="float32"), 0)
    assert llm.engine.spec_decode.num_accepted_tokens > 0
    for kind in ("scores", "logits"):
        assert torch.allclose(torch.stack(getattr(fast, kind)[0]), torch.stack(getattr(plain, kind)[0]), atol=1e-4)
    assert len(recorded(llm, 0.8).scores[0]) == 16


def test_beams_do_not_draft(llama_path):
    params = BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True)
    llm = LLM(str(llama_path), dtype="float32", speculative_config=NGRAM)
    outputs = llm.beam_search(REPEATING, params)
    plain = LLM(str(llama_path), dtype="float32").beam_search(REPEATING, params)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == [[c.token_ids for c in o.outputs] for o in plain]
    assert llm.engine.spec_decode.num_draft_tokens == 0


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
    ({"model": "./missing-draft", "num_speculative_tokens": 4},
     r"the draft model \(speculative_config 'model'\): no checkpoint folder at './missing-draft'"),
    ({"model": "./missing-draft", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
    ({"method": "draft_model"}, "method 'draft_model' needs a 'model'"),
    ({"method": "ngram", "model": "./draft"}, "'model' is for method 'draft_model'"),
    ({"model": 3}, "model must be a checkpoint's folder or hub id, got int"),
    ({"method": "ngram", "lookahead": 3}, "unknown keys"),
    ("ngram", "must be a dict"),
])
def test_bad_speculative_configs_are_named(config, message):
    with pytest.raises(LmgenError, match=message):
        LLM(speculative_config=config)


def test_no_drafts_while_more_requests_run_than_disable_by_batch_size(llama_path):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(llama_path), dtype="float32", speculative_config={**NGRAM, "disable_by_batch_size": 2})
    prompts = REPEATING * 2  # 6 running requests: none drafts
    assert _tokens(llm, prompts, greedy) == _tokens(LLM(str(llama_path), dtype="float32"), prompts, greedy)
    assert llm.engine.spec_decode.num_draft_tokens == 0
    _tokens(llm, REPEATING[:1], greedy)  # one request: it drafts
    assert llm.engine.spec_decode.num_draft_tokens > 0


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
    """Drafts that never match: after the first failure the request drafts none for a while (as many steps as
    num_speculative_tokens), then tries one draft, and so on."""
    from lmgen.engine import speculative

    monkeypatch.setattr(speculative, "propose_ngram", lambda tokens, k, *_: [0] * k)  # never the greedy token
    llm = LLM(str(llama_path), dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    limits, propose = [], llm.engine.proposer.propose
    llm.engine.proposer.propose = lambda requests, asked: limits.extend(asked) or propose(requests, asked)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    output = llm.generate(REPEATING[:1], greedy)[0].outputs[0]
    assert output.token_ids == _tokens(LLM(str(llama_path), dtype="float32"), REPEATING[:1], greedy)[0]
    # the first token and 4 drafts rejected (2 tokens), then 5 steps a try: 4 without drafts and one with
    assert limits == [4] + [1] * ((30 - 2) // 5)
    assert output.spec_decode == SpecDecodeStats(len(limits), sum(limits), 0)


@pytest.fixture(scope="module")
def other_tokenizers(llama_path, tmp_path_factory):
    """Copies of the tiny Llama whose tokenizers differ from its own (one token more, two ids swapped), and
    the size of its own."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("other-tokenizers")
    bigger, swapped = shutil.copytree(llama_path, folder / "bigger"), shutil.copytree(llama_path, folder / "swapped")
    tokenizer = Tokenizer.from_file(str(bigger / "tokenizer.json"))
    size = tokenizer.get_vocab_size()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save(str(bigger / "tokenizer.json"))
    data = json.loads((swapped / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (swapped / "tokenizer.json").write_text(json.dumps(data))
    return bigger, swapped, size


def test_a_draft_model_with_another_vocabulary_is_refused(llama_path, other_tokenizers):
    bigger, swapped, size = other_tokenizers
    with pytest.raises(InvalidArgumentError, match=f"has a vocabulary of {size + 1} tokens, the target {size}: "
                                                   "speculative decoding needs a draft model with the target's "
                                                   "tokenizer"):
        LLM(str(llama_path), speculative_config={"model": str(bigger)})
    with pytest.raises(InvalidArgumentError, match=f"tokenizer gives 2 of its {size} tokens other ids than the "
                                                   r"target's \(e.g. '[ab]': \d+ there, \d+ in the target\)"):
        LLM(str(llama_path), speculative_config={"model": str(swapped)})


def test_a_draft_model_whose_embedding_table_is_padded_larger_drafts_real_tokens(llama_path, tmp_path):
    """Checkpoints of one tokenizer may pad their vocabulary differently: the draft's extra rows never win (here
    they score NaN, which an argmax picks first)."""
    from safetensors.torch import load_file, save_file

    draft = shutil.copytree(llama_path, tmp_path / "padded")
    tensors = load_file(draft / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]  # tied: the LM head too
    tensors["model.embed_tokens.weight"] = torch.cat([embedding, torch.full((8, embedding.shape[1]), torch.nan)])
    save_file(tensors, draft / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    llm = LLM(str(llama_path), dtype="float32", speculative_config={**DRAFT, "model": str(draft)})
    assert _tokens(llm, REPEATING, greedy) == _tokens(LLM(str(llama_path), dtype="float32"), REPEATING, greedy)
    assert llm.engine.spec_decode.num_accepted_tokens > 0


def _requests(prompt: list[int], *params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", prompt, p, 32, torch.Generator().manual_seed(p.seed or 0)) for i, p in enumerate(params)]


def test_the_draft_model_drafts_its_greedy_continuation_or_samples_its_distribution(llama_path, llama_draft_path):
    """One propose call for a greedy and two sampled requests (same seed): the greedy drafts are what the
    draft model generates itself, the sampled ones come with the (warped) distributions they were drawn from."""
    prompt = REPEATING[1]
    own = _tokens(LLM(str(llama_draft_path), dtype="float32"), [prompt],
                  SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    proposer = LLM(str(llama_path), dtype="float32",
                   speculative_config={**DRAFT, "model": str(llama_draft_path)}).engine.proposer
    sampled = SamplingParams(temperature=0.9, top_k=20, seed=5)
    requests = _requests(prompt, SamplingParams(temperature=0), sampled, sampled)
    (greedy, no_probs), (drawn, probs), (again, _) = proposer.propose(requests, [4, 3, 3])
    assert greedy == own and no_probs is None
    assert drawn == again  # the same seed draws the same drafts
    assert probs.shape == (3, 512) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(dim=-1), torch.ones(3)) and (probs > 0).sum(dim=-1).max() <= 20  # top_k
    assert all(probs[i, token] > 0 for i, token in enumerate(drawn))


def test_the_draft_model_catches_up_in_chunks_of_max_num_batched_tokens(llama_path, llama_draft_path):
    """Long prompts (with speculation the draft model computes them too) run through the draft model in forwards
    of max_num_batched_tokens tokens at most, as through the target; the output is the output without."""
    prompts = [[1, *range(3, 90)], [1, *range(100, 150)] * 2]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    small = dict(dtype="float32", max_num_batched_tokens=16)
    llm = LLM(str(llama_path), speculative_config={**DRAFT, "model": str(llama_draft_path)}, **small)
    runner, sizes = llm.engine.proposer.runner, []
    forward = runner.last_logits
    runner.last_logits = lambda batch: sizes.append(batch.total_tokens) or forward(batch)
    assert _tokens(llm, prompts, greedy) == _tokens(LLM(str(llama_path), **small), prompts, greedy)
    assert max(sizes) == 16 and sum(sizes) > sum(map(len, prompts))


def test_an_aborted_request_frees_its_draft_blocks(llama_path, llama_draft_path):
    llm = LLM(str(llama_path), dtype="float32", speculative_config={**DRAFT, "model": str(llama_draft_path)})
    engine, pool = llm.engine, llm.engine.proposer.pool
    engine.add_request(REPEATING[0], SamplingParams(max_tokens=30, temperature=0), request_id="a")
    while engine.spec_decode.num_draft_tokens == 0:
        engine.step()
    assert pool.num_free_blocks < pool.num_blocks
    engine.abort_request("a")
    assert pool.num_free_blocks == pool.num_blocks
