"""Beam search in the engine: parity with transformers' generate, shared KV blocks, preemption, copy on write."""

import pytest
import torch
import transformers

import lmgen
from lmgen import LLM, BeamSearchParams, SamplingParams
from lmgen.cache.block_pool import BlockPool
from lmgen.cache.kv_cache import KVCache
from lmgen.engine.request import Request
from lmgen.engine.scheduler import Scheduler, SchedulerConfig
from lmgen.llm import collect

# A left-padded batch of two prompts of different lengths (pad 0, BOS 1).
INPUT_IDS = torch.tensor([[1, 50, 60, 70, 80, 90], [0, 0, 0, 1, 33, 44]])
# Tokens the tiny random Llama (tests/checkpoints.py, seed 0) emits along its beams, used as EOS so that
# hypotheses finish early: 510 and 195 end beams of the first prompt within a few steps, 251 of the second.
SETTINGS = [  # num_beams, num_return_sequences, length_penalty, early_stopping, eos_token_id, max_new_tokens
    (2, 1, 1.0, False, 510, 10),
    (4, 2, 0.5, True, 510, 12),
    (4, 4, 2.0, "never", [388, 510], 12),
    (4, 2, 1.0, False, 251, 9),
    (2, 2, 0.5, "never", 195, 7),
    (3, 3, 1.0, True, [195, 251], 11),
    (4, 2, 2.0, True, 195, 8),
]
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # K and V x layers x block_size 4 x kv heads x head_dim x float32


@pytest.fixture(scope="module")
def models(llama_path):
    ours = lmgen.AutoModelForCausalLM.from_pretrained(str(llama_path), dtype="float32", device_map="cpu",
                                                      block_size=4)
    return ours, transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float32", device="cpu")


def beam_kwargs(num_beams, n, length_penalty, early_stopping, eos, max_new_tokens):
    return dict(attention_mask=(INPUT_IDS != 0).long(), num_beams=num_beams, num_return_sequences=n,
                length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos,
                max_new_tokens=max_new_tokens, pad_token_id=0, return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("setting", SETTINGS)
def test_beam_search_matches_transformers(models, setting):
    ours, theirs = models
    kwargs = beam_kwargs(*setting)
    expected = theirs.generate(INPUT_IDS, **kwargs)
    got = ours.generate(INPUT_IDS, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.beam_indices, expected.beam_indices)
    torch.testing.assert_close(ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices),
                               theirs.compute_transition_scores(expected.sequences, expected.scores,
                                                                expected.beam_indices), rtol=1e-4, atol=1e-5)


def test_the_chosen_eos_ids_do_end_hypotheses_early(models):
    ours, _ = models
    out = ours.generate(INPUT_IDS, **beam_kwargs(4, 4, 1.0, False, 510, 12))
    new = out.sequences[:, INPUT_IDS.shape[1]:]
    assert any(510 in row[:-1].tolist() for row in new)  # an EOS before the last step: a finished hypothesis


def test_beam_search_without_return_dict_gives_the_sequences(models):
    ours, theirs = models
    kwargs = dict(attention_mask=(INPUT_IDS != 0).long(), num_beams=3, num_return_sequences=2, max_new_tokens=6,
                  pad_token_id=0, eos_token_id=510)
    assert torch.equal(ours.generate(INPUT_IDS, **kwargs), theirs.generate(INPUT_IDS, **kwargs))


@pytest.mark.parametrize("variant", ["qwen2", "mistral-sliding"])
def test_beam_search_matches_transformers_on_other_architectures(checkpoint_factory, variant):
    path = checkpoint_factory(variant)
    ours = lmgen.AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", device_map="cpu", block_size=4)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    kwargs = beam_kwargs(4, 2, 1.0, False, 2, 10)
    expected, got = theirs.generate(INPUT_IDS, **kwargs), ours.generate(INPUT_IDS, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-5)


def test_beam_sample_is_seeded_and_well_formed(models):
    ours, _ = models
    engine = ours.llm.engine
    params = SamplingParams(n=2, num_beams=4, temperature=0.8, top_k=20, max_tokens=8, seed=5)
    first, again = (ours.llm.generate([[1, 50, 60]], params)[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    scores = [o.score for o in first.outputs]
    assert scores == sorted(scores, reverse=True) and all(len(o.token_ids) == 8 for o in first.outputs)
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_beam_sample_through_generate(models):
    ours, _ = models
    lmgen.set_seed(0)
    out = ours.generate(INPUT_IDS, attention_mask=(INPUT_IDS != 0).long(), do_sample=True, num_beams=2,
                        num_return_sequences=2, max_new_tokens=5, pad_token_id=0)
    assert out.shape == (4, INPUT_IDS.shape[1] + 5)


@pytest.mark.parametrize("setting", [(3, 2, 1.0, False, 510, 12), (4, 4, 0.5, True, 510, 12),
                                     (2, 1, 2.0, "never", 510, 10)])
def test_stop_strings_end_beams_as_in_transformers(models, llama_path, setting):
    ours, theirs = models
    kwargs = beam_kwargs(*setting)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_path)
    unstopped = theirs.generate(INPUT_IDS, **kwargs).sequences
    text = tokenizer.decode(unstopped[-1, INPUT_IDS.shape[1]:])
    # two letters from the second half of the second prompt's last hypothesis, and a string no beam makes
    start = next(i for i in range(len(text) // 2, len(text) - 1) if text[i: i + 2].isalpha())
    stop_strings = [text[start: start + 2], "never made"]
    expected = theirs.generate(INPUT_IDS, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
    got = ours.generate(INPUT_IDS, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
    assert not torch.equal(expected.sequences, unstopped)  # the stop string did end hypotheses
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-5)


def test_renormalized_beam_scores_match_transformers(models):
    ours, theirs = models
    kwargs = dict(beam_kwargs(3, 2, 1.0, False, 510, 10), renormalize_logits=True, repetition_penalty=1.5)
    expected = theirs.generate(INPUT_IDS, **kwargs)
    got = ours.generate(INPUT_IDS, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    # sums of up to 10 renormalized log-probabilities: another CPU's summation order moved them by 3.4e-4
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices),
                               theirs.compute_transition_scores(expected.sequences, expected.scores,
                                                                expected.beam_indices), rtol=1e-3, atol=1e-5)
    unnormalized = theirs.generate(INPUT_IDS, **dict(kwargs, renormalize_logits=False))
    assert not torch.allclose(unnormalized.sequences_scores, expected.sequences_scores)  # renormalizing mattered


def test_a_beam_that_completes_a_stop_string_finishes_with_it_cut_from_the_text(llm):
    prompt = INPUT_IDS[1, 3:].tolist()
    free = llm.generate([prompt], SamplingParams(n=3, num_beams=3, max_tokens=12, temperature=0, ignore_eos=True))
    best = free[0].outputs[0].text
    stop = best[len(best) // 2: len(best) // 2 + 2]  # two characters from the middle of the best beam
    [result] = llm.generate([prompt], SamplingParams(n=3, num_beams=3, max_tokens=12, temperature=0,
                                                     ignore_eos=True, stop=[stop]))
    stopped = [c for c in result.outputs if c.finish_reason == "stop"]
    assert stopped and all(c.stop_reason == stop and stop not in c.text for c in stopped)
    assert all(llm.tokenizer.decode(c.token_ids).startswith(c.text) for c in stopped)


def test_beams_report_the_logprobs_their_scores_sum(llm):
    [result] = llm.generate([[1, 33, 44]], SamplingParams(n=3, num_beams=3, max_tokens=8, temperature=0,
                                                          ignore_eos=True, logprobs=2, repetition_penalty=1.3))
    for beam in result.outputs:
        assert len(beam.logprobs) == len(beam.token_ids)
        chosen = [entry[token] for entry, token in zip(beam.logprobs, beam.token_ids)]
        assert sum(lp.logprob for lp in chosen) == pytest.approx(beam.cumulative_logprob, abs=1e-4)
        for entry in beam.logprobs:
            assert 2 <= len(entry) <= 3 and {lp.rank for lp in entry.values()} >= {1, 2}
            assert all(lp.decoded_token == llm.tokenizer.decode([tid]) for tid, lp in entry.items())


def test_max_time_ends_every_beam(llm):
    [result] = llm.generate([[1, 33, 44]], SamplingParams(n=2, num_beams=2, max_tokens=50, temperature=0,
                                                          ignore_eos=True, max_time=1e-6))
    assert [len(c.token_ids) for c in result.outputs] == [1, 1]  # the first round already ran out of time


def test_llm_beam_search_returns_every_beam_best_first(llm):
    [result] = llm.beam_search([[1, 33, 44]], BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5))
    assert len(result.outputs) == 3 and result.finished
    for beam in result.outputs:
        assert beam.text == llm.tokenizer.decode(beam.token_ids, skip_special_tokens=True)
        assert beam.score == pytest.approx(beam.cumulative_logprob / len(beam.token_ids) ** 0.5, rel=1e-5)
    assert [b.score for b in result.outputs] == sorted((b.score for b in result.outputs), reverse=True)


def run_engine(engine, prompts, params):
    """Run requests to the end; returns their outputs and the most KV blocks in use at once."""
    ids = [engine.add_request(p, params) for p in prompts]
    deltas, peak = [], 0
    while engine.has_unfinished_requests():
        deltas += engine.step()
        peak = max(peak, engine.pool.num_blocks - engine.pool.num_free_blocks)
    return collect(deltas, ids), peak


def test_beams_share_the_prompt_blocks(llama_path):
    engine = LLM(str(llama_path), dtype="float32", device="cpu", block_size=4).engine
    prompt = list(range(3, 32))  # 29 tokens: 8 blocks
    params = SamplingParams(num_beams=4, max_tokens=10, temperature=0, ignore_eos=True)
    _, peak = run_engine(engine, [prompt], params)
    # one beam alone needs 10 blocks (39 tokens); four private copies would need 40
    assert peak <= 8 + 4 * 2
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("num_blocks, engine_args", [
    (8, {}), (11, {}), (8, dict(enable_prefix_caching=False)),
    (9, dict(max_num_batched_tokens=3)),  # beams recompute in chunks
    (64, dict(max_num_seqs=2)),  # fewer sequences at once than beams in a group
])
def test_preemption_under_a_tiny_kv_cache_gives_the_same_beams(llama_path, num_blocks, engine_args):
    prompts = [[1, 50, 60, 70, 80, 90, 11, 12, 13], [1, 33, 44]]
    params = SamplingParams(n=4, num_beams=4, max_tokens=14, temperature=0, stop_token_ids=[510], ignore_eos=True)
    roomy = LLM(str(llama_path), dtype="float32", device="cpu", block_size=4).engine
    tiny = LLM(str(llama_path), dtype="float32", device="cpu", block_size=4,
               kv_cache_memory=BLOCK_BYTES * num_blocks, **engine_args).engine
    expected, _ = run_engine(roomy, prompts, params)
    got, _ = run_engine(tiny, prompts, params)
    assert tiny.scheduler.num_preemptions > 0
    for want, have in zip(expected, got):
        assert [o.token_ids for o in have.outputs] == [o.token_ids for o in want.outputs]
        assert [o.score for o in have.outputs] == pytest.approx([o.score for o in want.outputs], rel=1e-5)
    assert tiny.pool.num_free_blocks == tiny.pool.num_blocks


def test_abort_frees_a_beam_group(llama_path):
    engine = LLM(str(llama_path), dtype="float32", device="cpu", block_size=4).engine
    request_id = engine.add_request([1, 50, 60, 70, 80], SamplingParams(num_beams=3, max_tokens=20, temperature=0))
    for _ in range(3):
        engine.step()
    engine.abort_request(request_id)
    [out] = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.pool.num_free_blocks == engine.pool.num_blocks


def test_beam_settings_are_validated():
    with pytest.raises(lmgen.InvalidArgumentError, match="smaller or equal to `num_beams`"):
        SamplingParams(n=3, num_beams=2)
    with pytest.raises(lmgen.InvalidArgumentError, match="early_stopping"):
        SamplingParams(num_beams=2, early_stopping="soon")


# ---- copy on write without a model ----------------------------------------------------------------------
def test_scheduler_copies_a_shared_partial_block_before_writing_it():
    pool = BlockPool(8)
    scheduler = Scheduler(SchedulerConfig(block_size=4), pool)
    parent = Request("p", [1, 2, 3, 4, 5, 6], SamplingParams(), 4, torch.Generator())
    scheduler.add(parent)
    scheduler.commit(scheduler.schedule())  # 6 tokens computed: one full block, one partial
    child = Request("c", [1, 2, 3, 4, 5, 6], SamplingParams(), 4, torch.Generator())
    child.block_ids, child.num_computed_tokens = pool.fork(parent.block_ids), 6
    child.all_token_ids.append(9)
    parent.all_token_ids.append(8)
    scheduler.add(child)
    batch = scheduler.schedule()
    [(source, copy)] = batch.block_copies  # the first to write copies; the other then owns the original
    assert {parent.block_ids[1], child.block_ids[1]} == {source, copy}
    assert parent.block_ids[0] == child.block_ids[0] and pool.ref_count(parent.block_ids[0]) == 2
    assert pool.ref_count(source) == pool.ref_count(copy) == 1


def test_kv_cache_copies_blocks_in_every_layer():
    cache = KVCache(2, 4, 2, 1, 3, torch.float32, torch.device("cpu"))
    for k, v in cache.layers:
        k[1], v[1] = 1.0, 2.0
    cache.copy_blocks([(1, 3)])
    assert all(bool((k[3] == 1.0).all()) and bool((v[3] == 2.0).all()) for k, v in cache.layers)
    assert all(bool((k[2] == 0).all()) for k, _ in cache.layers)


# ---- n > 1 sampling forks the prompt's blocks too -------------------------------------------------------
def test_n_sequences_share_the_prompt_blocks_and_sample_as_separate_requests(llama_path):
    engine = LLM(str(llama_path), dtype="float32", device="cpu", block_size=4).engine
    prompt = list(range(3, 32))  # 29 tokens: 8 blocks
    [family], peak = run_engine(engine, [prompt], SamplingParams(n=3, max_tokens=4, seed=11, ignore_eos=True))
    assert peak <= 8 + 3 * 2  # not 3 x 9
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    alone = [run_engine(engine, [prompt], SamplingParams(max_tokens=4, seed=11 + i, ignore_eos=True))[0][0]
             for i in range(3)]
    assert [o.token_ids for o in family.outputs] == [a.outputs[0].token_ids for a in alone]
