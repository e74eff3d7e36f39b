"""The transformers controls on lmgen's own SamplingParams: validation, engine hooks, and no cost when unused."""

from __future__ import annotations

import pytest
import torch

from lmgen import LLM, InvalidArgumentError, SamplingParams
from lmgen.sampling.processors import WithDrafts, build_processors
from lmgen.sampling.sampler import ScoreRecorder, Warpers


@pytest.fixture(scope="module")
def llm(llama_path):
    return LLM(str(llama_path), dtype="float32")


@pytest.mark.parametrize("kwargs, field", [
    (dict(typical_p=0.0), "typical_p"), (dict(typical_p=1.5), "typical_p"), (dict(epsilon_cutoff=1.0), "epsilon"),
    (dict(eta_cutoff=-0.1), "eta_cutoff"), (dict(top_h=0.0), "top_h"), (dict(no_repeat_ngram_size=-1), "no_repeat"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"), (dict(bad_words_ids=[[-3]]), "bad_words_ids"),
    (dict(sequence_bias={(): 1.0}), "sequence_bias"), (dict(suppress_tokens=["a"]), "suppress_tokens"),
    (dict(forced_eos_token_id=2, suppress_tokens=[2, 3]), "suppress_tokens"), (dict(max_time=0), "max_time"),
    (dict(exponential_decay_length_penalty=(-1, 1.1)), "exponential_decay"),
    (dict(logits_processors=[3]), "callables"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**kwargs)


def test_transformers_shapes_are_normalized():
    params = SamplingParams(bad_words_ids=[[1, 2], [3]], sequence_bias=[[[4, 5], -1]], forced_eos_token_id=2,
                            suppress_tokens=[7], exponential_decay_length_penalty=[3, 2])
    assert params.bad_words_ids == ((1, 2), (3,)) and params.sequence_bias == {(4, 5): -1.0}
    assert params.forced_eos_token_id == (2,) and params.suppress_tokens == (7,)
    assert params.exponential_decay_length_penalty == (3, 2.0)


def test_settings_nobody_uses_cost_nothing():
    assert build_processors(SamplingParams(), 5, 100, frozenset({2}), 16) == []
    warpers = Warpers.build([SamplingParams(temperature=0.8), SamplingParams(temperature=1.2)], torch.device("cpu"))
    assert all(getattr(warpers, name) is None for name in
               ("top_h", "top_k", "top_p_tail", "min_p", "typical_p", "epsilon", "eta"))


def test_top_p_leaves_rows_without_it_alone_and_keeps_the_best_token():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0], [-1e4, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 50.0]])
    warpers = Warpers.build([SamplingParams(temperature=1.0, top_p=p) for p in (0.5, 1.0, 0.01)], torch.device("cpu"))
    kept = warpers(logits).isfinite()
    assert kept.tolist() == [[False, False, False, True], [True] * 4, [False, False, False, True]]


def test_token_ids_outside_the_vocabulary_are_refused_up_front(llm):
    with pytest.raises(InvalidArgumentError, match="vocabulary size is 512"):
        llm.generate("Portugal is", SamplingParams(max_tokens=3, bad_words_ids=[[5, 600]]))
    assert not llm.engine.has_unfinished_requests()


def test_processors_apply_through_the_engine(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [plain] = llm.generate("Portugal is", greedy)
    first = plain.outputs[0].token_ids[0]
    [banned] = llm.generate("Portugal is", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                          suppress_tokens=[first], no_repeat_ngram_size=1))
    tokens = banned.outputs[0].token_ids
    assert first not in tokens and len(set(tokens)) == len(tokens)


def test_stopping_criteria_and_max_time_finish_requests(llm):
    stop_after_three = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                      stopping_criteria=[lambda token_ids: len(token_ids) >= 6])
    [out] = llm.generate([1, 20, 30], stop_after_three)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "stop"
    [timed] = llm.generate([1, 20, 30], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, max_time=1e-9))
    assert len(timed.outputs[0].token_ids) == 1 and timed.outputs[0].finish_reason == "length"


def test_score_recorder_keeps_each_completion_apart(llm):
    recorder = ScoreRecorder(scores=True, logits=True)
    [out] = llm.generate("Once", SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=3, ignore_eos=True,
                                                top_k=3, score_recorder=recorder))
    for completion in out.outputs:
        scores, logits = recorder.scores[completion.index], recorder.logits[completion.index]
        assert len(scores) == len(logits) == 4
        for step, token in enumerate(completion.token_ids):
            assert int(scores[step].isfinite().sum()) <= 3 and scores[step][token].isfinite()
            assert bool(logits[step].isfinite().all())


@pytest.mark.parametrize("setting", [dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.3),
                                     dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5, 6, 7]]),
                                     dict(min_tokens=4, stop_token_ids=[7])])
def test_processors_count_drafts_only_while_they_are_drafts(setting):
    """Speculative decoding calls a request's processors after each draft, then goes on from the accepted ones:
    each call must give what processors that saw only that sequence give."""
    params = SamplingParams(**setting)

    def build() -> list:
        return build_processors(params, 3, 12, frozenset(params.stop_token_ids), 50)

    def run(processors: list, token_ids: list[int]) -> torch.Tensor:
        logits = torch.linspace(-2, 3, 12)
        for process in processors:
            logits = process(token_ids, logits)
        return logits

    kept, bites = build(), False
    calls = [WithDrafts([1, 2, 3, 5, 6, 7, 5, 6][:n], n - 5) if n > 5 else [1, 2, 3, 5, 6][:n] for n in range(3, 9)]
    calls += [[1, 2, 3, 5, 6, 9], WithDrafts([1, 2, 3, 5, 6, 9, 5], 1), [1, 2, 3, 5, 6, 9, 6, 7, 7]]  # 7, 5, 6 rejected
    for token_ids in calls:
        expected = run(build(), list(token_ids))
        assert torch.equal(run(kept, token_ids), expected), token_ids
        bites |= not torch.equal(expected, run([], token_ids))
    assert bites
