"""Every logits processor and warper against transformers' own: its builder, its order, its definitions.

Unit parity: a batch of random logits whose rows have different settings goes through
lmgen's per-request processors and batched warpers (the runner's path), and each row
through the list transformers' ``_get_logits_processor`` builds for the same settings.
End to end: greedy ``generate`` with each setting gives transformers' tokens on a tiny
random Llama, for a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import lmgen
from lmgen.sampling.processors import build_processors
from lmgen.sampling.sampler import SamplingBatch, sample
from transformers_reference import EOS, transformers_processors

VOCAB = 160  # above 100, so top-h's cap on candidates matters
TOKENS = [1, 20, 30, 5, 7, 9, 5, 7, 8, 5, 7]  # ends in "5 7", after "5 7 9" and "5 7 8": n-gram bans and biases bite

# name: (generation settings, prompt length, tokens generated so far, logits to overwrite in that row)
CASES: dict[str, tuple[dict, int, int, dict[int, float]]] = {
    "greedy": ({}, 8, 3, {}),
    "repetition_penalty": ({"repetition_penalty": 1.3}, 8, 3, {}),
    "no_repeat_ngram_size=1": ({"no_repeat_ngram_size": 1}, 8, 3, {}),
    "no_repeat_ngram_size=2": ({"no_repeat_ngram_size": 2}, 8, 3, {}),
    "no_repeat_ngram_size=3": ({"no_repeat_ngram_size": 3}, 8, 3, {}),
    "bad_words_ids": ({"bad_words_ids": [[6], [7, 10], [5, 7, 12], [EOS], [3, 4]]}, 8, 3, {}),
    "sequence_bias": ({"sequence_bias": [[[9], 2.5], [[7, 10], -3.0], [[5, 7, 11], 1.5], [[8, 12], 4.0],
                                         [[5, 7, 9], 0.5]]}, 8, 3, {}),
    "min_new_tokens": ({"min_new_tokens": 5}, 8, 3, {EOS: 9.0}),
    "min_new_tokens reached": ({"min_new_tokens": 3}, 8, 3, {EOS: 9.0}),
    "min_length": ({"min_length": 12}, 8, 3, {EOS: 9.0}),
    "forced_bos_token_id": ({"forced_bos_token_id": 4}, 1, 0, {}),
    "forced_bos_token_id later": ({"forced_bos_token_id": 4}, 1, 1, {}),
    "forced_eos_token_id now": ({"forced_eos_token_id": [EOS, 3], "max_new_tokens": 4}, 8, 3, {}),
    "forced_eos_token_id later": ({"forced_eos_token_id": EOS, "max_new_tokens": 5}, 8, 3, {}),
    "remove_invalid_values": ({"remove_invalid_values": True}, 8, 3,
                              {3: float("nan"), 4: float("inf"), 5: float("-inf")}),
    "exponential_decay positive EOS": ({"exponential_decay_length_penalty": (1, 1.5)}, 8, 3, {EOS: 1.5}),
    "exponential_decay negative EOS": ({"exponential_decay_length_penalty": (1, 1.5)}, 8, 3, {EOS: -2.0}),
    "exponential_decay not yet": ({"exponential_decay_length_penalty": (3, 1.5)}, 8, 3, {EOS: -2.0}),
    "suppress_tokens": ({"suppress_tokens": [1, 3, 6]}, 8, 3, {}),
    "begin_suppress_tokens first": ({"begin_suppress_tokens": [4, 5]}, 11, 0, {}),
    "begin_suppress_tokens later": ({"begin_suppress_tokens": [4, 5]}, 8, 3, {}),
    "begin_suppress_tokens after forced BOS": ({"begin_suppress_tokens": [4, 5], "forced_bos_token_id": 9}, 1, 1, {}),
    "renormalize_logits": ({"renormalize_logits": True, "repetition_penalty": 1.2}, 8, 3, {}),
    "temperature": ({"do_sample": True, "temperature": 0.7, "top_k": 0}, 8, 3, {}),
    "default top_k=50": ({"do_sample": True}, 8, 3, {}),
    "top_k": ({"do_sample": True, "top_k": 5}, 8, 3, {}),
    "top_p": ({"do_sample": True, "top_p": 0.9, "top_k": 0}, 8, 3, {}),
    "min_p": ({"do_sample": True, "min_p": 0.1, "top_k": 0}, 8, 3, {}),
    "typical_p": ({"do_sample": True, "typical_p": 0.8, "top_k": 0}, 8, 3, {}),
    "epsilon_cutoff": ({"do_sample": True, "epsilon_cutoff": 0.006, "top_k": 0}, 8, 3, {}),
    "eta_cutoff": ({"do_sample": True, "eta_cutoff": 0.003, "top_k": 0}, 8, 3, {}),
    "top_h": ({"do_sample": True, "top_h": 0.6, "top_k": 0}, 8, 3, {}),
    "top_h=1": ({"do_sample": True, "top_h": 1.0, "top_k": 0}, 8, 3, {}),
    "everything": ({"do_sample": True, "temperature": 0.8, "top_h": 0.95, "top_k": 60, "top_p": 0.97, "min_p": 0.01,
                    "typical_p": 0.98, "epsilon_cutoff": 0.0005, "eta_cutoff": 0.0005, "repetition_penalty": 1.2,
                    "no_repeat_ngram_size": 2, "sequence_bias": [[[9], 1.0]], "suppress_tokens": [3],
                    "min_new_tokens": 5, "renormalize_logits": True}, 8, 3, {}),
}


def lmgen_scores(rows: list[tuple[dict, list[int], int]], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each row's processed scores the way the engine makes them: processors, batched warpers, recorder."""
    params = []
    for settings, _, prompt_length in rows:
        config = lmgen.GenerationConfig(eos_token_id=EOS, return_dict_in_generate=True, output_scores=True,
                                        **settings).resolved(None)
        params.append(config.to_sampling_params(prompt_length, seed=0, score_recorder=config.score_recorder()))
    raw, processed = logits, logits.clone()
    for row, (p, (_, token_ids, prompt_length)) in enumerate(zip(params, rows)):
        for process in build_processors(p, prompt_length, VOCAB, frozenset(p.stop_token_ids), p.max_tokens):
            processed[row] = process(token_ids, processed[row])
    batch = SamplingBatch.build(params, [torch.Generator().manual_seed(row) for row in range(len(rows))],
                                torch.device("cpu"))
    _, _, scores = sample(processed, batch)
    for row, p in enumerate(params):
        p.score_recorder.add(0, raw[row], scores[row])
    return [p.score_recorder.scores[0][0] for p in params]


def test_every_processor_and_warper_in_one_batch_matches_transformers():
    torch.manual_seed(0)
    logits = torch.randn(len(CASES), VOCAB) * 2
    rows, expected = [], []
    for row, (settings, prompt_length, num_generated, overrides) in enumerate(CASES.values()):
        for token, value in overrides.items():
            logits[row, token] = value
        token_ids = TOKENS[len(TOKENS) - prompt_length - num_generated:]
        rows.append((settings, token_ids, prompt_length))
        expected.append(transformers_processors(settings, prompt_length)(torch.tensor([token_ids]),
                                                                          logits[row:row + 1].clone())[0])
    for name, ours, theirs in zip(CASES, lmgen_scores(rows, logits.clone()), expected):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


def test_the_cases_exercise_their_processors():
    """Guard against a vacuous parity test: each setting changes its row, or the order has nothing to check."""
    torch.manual_seed(1)
    logits = torch.randn(VOCAB) * 2
    for name, (settings, prompt_length, num_generated, overrides) in CASES.items():
        if name in ("greedy", "min_new_tokens reached", "forced_bos_token_id later", "forced_eos_token_id later",
                    "exponential_decay not yet", "begin_suppress_tokens later"):
            continue  # these check that a processor stays quiet
        row = logits.clone()
        for token, value in overrides.items():
            row[token] = value
        token_ids = TOKENS[len(TOKENS) - prompt_length - num_generated:]
        processed = transformers_processors(settings, prompt_length)(torch.tensor([token_ids]), row[None].clone())[0]
        assert not torch.equal(processed, row), name


# ---- end to end: greedy generate on a tiny random Llama ---------------------------------------------

PROMPTS = ["A list of colors: red, blue", "Portugal is"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def models(llama_path):
    ours = lmgen.AutoModelForCausalLM.from_pretrained(str(llama_path), dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_path, padding_side="left")
    return ours, theirs, tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def plain(models):
    """Each row's greedy new tokens without any processor, to aim the settings at tokens that matter."""
    ours, _, inputs = models
    return ours.generate(**inputs, max_new_tokens=MAX_NEW)[:, inputs.input_ids.shape[1]:].tolist()


GREEDY_SETTINGS = {
    "repetition_penalty": lambda plain: dict(repetition_penalty=1.5),
    "no_repeat_ngram_size": lambda plain: dict(no_repeat_ngram_size=2),
    "bad_words_ids": lambda plain: dict(bad_words_ids=[[plain[0][2]], plain[1][:2]]),
    "sequence_bias": lambda plain: dict(sequence_bias=[[[plain[0][0]], -20.0], [plain[1][1:3], -50.0],
                                                       [[plain[0][3]], 5.0]]),
    "suppress_tokens": lambda plain: dict(suppress_tokens=[plain[0][0], plain[1][4]]),
    "begin_suppress_tokens": lambda plain: dict(begin_suppress_tokens=[plain[0][0], plain[1][0]]),
    "forced_eos_token_id": lambda plain: dict(forced_eos_token_id=EOS),
    "exponential_decay_length_penalty": lambda plain: dict(exponential_decay_length_penalty=(3, 2.0)),
    "min_new_tokens": lambda plain: dict(min_new_tokens=MAX_NEW, eos_token_id=plain[0][1]),
    "min_length": lambda plain: dict(min_length=16, eos_token_id=plain[1][0]),
    "max_length (counts the padded width)": lambda plain: dict(max_length=14, max_new_tokens=None),
    "renormalize_logits": lambda plain: dict(renormalize_logits=True),
    "remove_invalid_values": lambda plain: dict(remove_invalid_values=True),
}


@pytest.mark.parametrize("name", list(GREEDY_SETTINGS))
def test_greedy_generate_with_each_setting_matches_transformers(models, plain, name):
    ours, theirs, inputs = models
    kwargs = dict(max_new_tokens=MAX_NEW) | GREEDY_SETTINGS[name](plain)
    expected = theirs.generate(**inputs, **kwargs)
    assert torch.equal(ours.generate(**inputs, **kwargs), expected)


def test_forced_bos_token_with_a_one_token_prompt_matches_transformers(models):
    ours, theirs, _ = models
    bos_only = torch.tensor([[1]])
    kwargs = dict(max_new_tokens=6, forced_bos_token_id=77, begin_suppress_tokens=[5, 9])
    result = ours.generate(bos_only, **kwargs)
    assert result[0, 1] == 77
    assert torch.equal(result, theirs.generate(bos_only, **kwargs))
