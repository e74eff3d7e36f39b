"""LLM behaviour on a tiny random Llama: batching, seeds, stops, streaming, memory pressure."""

import pytest
import torch

from lmgen import LLM, InvalidArgumentError, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float32")


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_generate_returns_text_tokens_and_reason(llm):
    [out] = llm.generate("Portugal is", SamplingParams(max_tokens=5, temperature=0))
    completion = out.outputs[0]
    assert len(completion.token_ids) == 5 and completion.finish_reason == "length"
    assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert out.prompt == "Portugal is" and out.prompt_token_ids == llm.tokenizer.encode("Portugal is")
    assert out.finished


def test_token_id_prompts_and_text_prompts_agree(llm):
    ids = llm.tokenizer.encode("A list of colors: red, blue")
    by_text, by_ids = llm.generate(["A list of colors: red, blue", ids], GREEDY)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(llm):
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    [alone] = llm.generate("Once upon a time", seeded)
    others = [SamplingParams(max_tokens=n, temperature=t, seed=s, top_k=k)
              for n, t, s, k in [(5, 1.0, 1, 0), (30, 0.7, 2, 40), (12, 0, None, 0), (20, 1.3, None, 5),
                                 (8, 0.5, 3, 0), (16, 1.0, 4, 0), (24, 0.8, 5, 10)]]
    prompts = ["Portugal is", "The quick brown fox", "café", "A list", "Lisbon", "numbers 12", "emoji 🙂"]
    outputs = llm.generate(prompts[:3] + ["Once upon a time"] + prompts[3:], others[:3] + [seeded] + others[3:])
    assert outputs[3].outputs[0].token_ids == alone.outputs[0].token_ids
    again = llm.generate("Once upon a time", seeded)[0]
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids


def test_different_seeds_differ(llm):
    a, b = (llm.generate("Once", SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0] for s in (1, 2))
    assert a.outputs[0].token_ids != b.outputs[0].token_ids


def test_small_kv_budget_preempts_and_still_completes_everything(llama_path, llm):
    prompts = [f"Prompt number {i}: the quick brown fox" for i in range(8)]
    expected = token_ids(llm.generate(prompts, GREEDY))
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K+V, 2 layers, 16 tokens, 2 kv heads, head_dim 16, float32
    small = LLM(str(llama_path), dtype="float32", kv_cache_memory=8 * block_bytes)  # 128 tokens for all
    assert token_ids(small.generate(prompts, GREEDY)) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.pool.num_free_blocks == small.engine.pool.num_blocks


def test_stop_string_is_matched_across_tokens_and_excluded(llm):
    [full] = llm.generate("The quick brown fox", GREEDY)
    text = full.outputs[0].text
    stop = text[5:9]
    [cut] = llm.generate("The quick brown fox", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    kept = llm.generate("The quick brown fox", SamplingParams(
        max_tokens=24, temperature=0, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    [full] = llm.generate("Lisbon is", GREEDY)
    first = full.outputs[0].token_ids[0]
    [stopped] = llm.generate("Lisbon is", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[first]))
    assert stopped.outputs[0].token_ids == [first]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == first
    [held] = llm.generate("Lisbon is", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[first],
                                                     min_tokens=3))
    assert len(held.outputs[0].token_ids) >= 3 and first not in held.outputs[0].token_ids[:3]


def test_eos_stops_unless_ignored(llm):
    [full] = llm.generate("Lisbon is", GREEDY)
    eos = full.outputs[0].token_ids[2]
    llm.engine.eos_token_ids = frozenset([eos])  # pretend the model's EOS is the third greedy token
    try:
        [stopped] = llm.generate("Lisbon is", GREEDY)
        [ignored] = llm.generate("Lisbon is", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    finally:
        llm.engine.eos_token_ids = frozenset([2])
    assert stopped.outputs[0].token_ids == full.outputs[0].token_ids[:3]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason is None
    assert ignored.outputs[0].token_ids == full.outputs[0].token_ids


def test_stream_concatenates_to_the_final_text(llm):
    prompts = ["café 東京 🙂", " leading spaces", "Ελληνικά and 🚀"]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=7)
    final = {o.prompt: o.outputs[0].text for o in llm.generate(prompts, params)}
    streamed: dict[str, str] = {p: "" for p in prompts}
    for delta in llm.stream(prompts, params):
        streamed[delta.prompt] += delta.text
    assert streamed == final


def test_stopping_a_stream_early_aborts_and_frees_blocks(llm):
    stream = llm.stream("Once upon a time", SamplingParams(max_tokens=100, temperature=0))
    next(stream)
    stream.close()
    llm.engine.step()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
    assert not llm.engine.has_unfinished_requests()


def test_logprobs_match_the_model_distribution(llm):
    prompt = llm.tokenizer.encode("Portugal is")
    [out] = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=3))
    [entry] = out.outputs[0].logprobs
    expected = llm.engine.score([prompt])[0][-1].log_softmax(-1)
    chosen = out.outputs[0].token_ids[0]
    assert chosen in entry and entry[chosen].rank == 1
    top = expected.topk(3)
    assert set(entry) == set(top.indices.tolist())
    for tid, lp in entry.items():
        assert lp.logprob == pytest.approx(expected[tid].item(), abs=1e-5)
        assert lp.decoded_token == llm.tokenizer.decode([tid])


def test_chat_uses_the_template(llm):
    reply = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=4, temperature=0))
    expected = llm.tokenizer.encode_chat([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert reply.prompt_token_ids == expected and len(reply.outputs[0].token_ids) == 4


def test_default_length_is_256_without_generation_config(llm):
    assert llm.engine.default_max_tokens == 256


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(stop=[""]), "stop"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(temperature=float("inf")), "temperature"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(length_penalty=float("nan")), "length_penalty"), (dict(repetition_penalty=1e-300), "repetition_penalty"),
    (dict(seed=2**70), "seed"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**kwargs)


def test_more_logprobs_than_the_vocabulary_is_refused_before_queueing(llm):
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        llm.generate("Portugal is", SamplingParams(max_tokens=2, logprobs=10**6))
    assert not llm.engine.has_unfinished_requests()


def test_a_temperature_too_small_to_sample_with_is_greedy(llm):
    cold = SamplingParams(max_tokens=24, temperature=3.6e-183)  # found by fuzzing the server: NaN probabilities
    assert cold.temperature == 0.0 and cold.greedy
    [cold_output], [greedy_output] = llm.generate("Portugal is", cold), llm.generate("Portugal is", GREEDY)
    assert cold_output.outputs[0].text == greedy_output.outputs[0].text


@pytest.mark.parametrize("bad_prompt, message", [("", "empty"), ([], "empty"), ([1, 10**6], "token ids")])
def test_bad_prompts_are_rejected_and_the_engine_keeps_serving(llm, bad_prompt, message):
    with pytest.raises(InvalidArgumentError, match=message):
        llm.generate(["a valid prompt", bad_prompt], GREEDY)  # all or nothing: the valid one is withdrawn too
    assert llm.generate("still serving", GREEDY)[0].outputs[0].finish_reason == "length"
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


def test_prompt_longer_than_the_context_says_both_numbers(llm):
    too_long = [5] * 300
    with pytest.raises(InvalidArgumentError, match=r"300 tokens.*256"):
        llm.generate([too_long], GREEDY)


def test_output_stops_at_the_context_length(llama_path):
    small = LLM(str(llama_path), dtype="float32", max_model_len=20)
    [out] = small.generate([[1] * 15], SamplingParams(max_tokens=50, temperature=0))
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_seed_uses_the_engine_seed_when_the_request_has_none(llama_path):
    params = SamplingParams(max_tokens=12, temperature=1.0)
    runs = [LLM(str(llama_path), dtype="float32", seed=11).generate("Once", params)[0] for _ in range(2)]
    assert runs[0].outputs[0].token_ids == runs[1].outputs[0].token_ids


def test_generation_config_supplies_defaults(llama_path, tmp_path):
    import json
    import shutil

    folder = tmp_path / "with-gen-config"
    shutil.copytree(llama_path, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "max_new_tokens": 9, "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    llm = LLM(str(folder), dtype="float32")
    assert llm.engine.eos_token_ids == frozenset([2, 7]) and llm.engine.default_max_tokens == 9
    defaults = llm.default_sampling_params()
    assert defaults.temperature == 0.6 and defaults.top_p == 0.9
    assert llm.default_sampling_params(temperature=0).greedy


def test_n_completions_share_the_request_and_differ(llm):
    [out] = llm.generate("Once upon a time", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5))
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)
    [again] = llm.generate("Once upon a time", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    streamed = {i: "" for i in range(3)}
    for delta in llm.stream("Once upon a time", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5)):
        for completion in delta.outputs:
            streamed[completion.index] += completion.text
    assert streamed == {o.index: o.text for o in out.outputs}


def test_logit_bias_forces_a_token(llm):
    [out] = llm.generate("Portugal", SamplingParams(max_tokens=5, temperature=0, logit_bias={300: 100.0}))
    assert out.outputs[0].token_ids == [300] * 5


def test_penalties_change_repetitive_greedy_output(llm):
    base = llm.generate("the the the", SamplingParams(max_tokens=20, temperature=0))[0].outputs[0].token_ids
    for kwargs in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0), dict(repetition_penalty=5.0)):
        tokens = llm.generate("the the the", SamplingParams(max_tokens=20, temperature=0, **kwargs))[0]
        assert tokens.outputs[0].token_ids != base
        assert len(set(tokens.outputs[0].token_ids)) >= len(set(base))


def test_repetition_penalty_matches_transformers(llm):
    import transformers

    prompt = llm.tokenizer.encode("the quick brown fox")
    logits = llm.engine.score([prompt])[0][-1]
    ids = torch.tensor([prompt], device=logits.device)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits[None].clone())[0]
    from lmgen.sampling.processors import repetition_penalty_processor

    got = repetition_penalty_processor(logits.shape[0], 1.7)(prompt, logits.clone())
    assert torch.allclose(got, expected)


def test_prefix_cache_gives_identical_outputs_and_hits(llama_path):
    shared = list(range(10, 60))  # 50 tokens: three full blocks of 16 are shareable
    prompts = [shared + [100 + i, 200 + i] for i in range(6)]
    params = [SamplingParams(max_tokens=16, temperature=0), SamplingParams(max_tokens=16, temperature=0.8, seed=3)]
    plain = LLM(str(llama_path), dtype="float32", enable_prefix_caching=False)
    cached = LLM(str(llama_path), dtype="float32")
    for p in params:
        expected = token_ids(plain.generate(prompts, p))
        first = token_ids(cached.generate(prompts[:1], p))  # fills the cache
        assert first == expected[:1]
        assert token_ids(cached.generate(prompts, p)) == expected
    assert cached.engine.scheduler.num_prefix_hit_tokens >= 48 * 6
    assert plain.engine.scheduler.num_prefix_hit_tokens == 0


def test_prefix_cache_survives_eviction_and_preemption(llama_path):
    prompts = [[1] + list(range(20 + i, 60 + i)) for i in range(8)]  # overlapping, shifted prefixes
    params = SamplingParams(max_tokens=20, temperature=0)
    expected = token_ids(LLM(str(llama_path), dtype="float32", enable_prefix_caching=False).generate(prompts, params))
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4
    tight = LLM(str(llama_path), dtype="float32", kv_cache_memory=10 * block_bytes)  # 160 tokens for all
    for _ in range(2):  # the second round finds some prefixes cached, others evicted
        assert token_ids(tight.generate(prompts, params)) == expected
        assert token_ids(tight.generate(prompts[::-1], params)) == expected[::-1]
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.scheduler.num_prefix_hit_tokens > 0
    assert tight.engine.pool.num_free_blocks == tight.engine.pool.num_blocks
