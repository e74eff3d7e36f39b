"""The transformers-shaped API: the tutorial's snippets with one changed import line, against transformers."""

import threading

import pytest
import torch
import transformers

import lmgen
from lmgen import InvalidArgumentError

PROMPTS = ["A list of colors: red, blue", "Portugal is"]


@pytest.fixture(scope="module")
def pair(llama_path):
    """(lmgen module-level API objects, transformers objects) on the same tiny random Llama."""
    ours = (lmgen.AutoModelForCausalLM.from_pretrained(str(llama_path), dtype="float32"),
            lmgen.AutoTokenizer.from_pretrained(str(llama_path), padding_side="left"))
    theirs = (transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32),
              transformers.AutoTokenizer.from_pretrained(llama_path, padding_side="left"))
    return ours, theirs


def run_tutorial_batch(api, model, tokenizer, **kwargs):
    tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids = model.generate(**inputs, **kwargs)
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_left_padded_batch_is_token_identical(pair):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    ours, our_text = run_tutorial_batch(lmgen, model, tokenizer, max_new_tokens=50)
    theirs, their_text = run_tutorial_batch(transformers, hf_model, hf_tokenizer, max_new_tokens=50)
    assert torch.equal(ours, theirs)
    assert our_text == their_text


def test_tokenizer_call_matches_transformers(pair):
    (_, tokenizer), (_, hf_tokenizer) = pair
    tokenizer.pad_token = tokenizer.eos_token
    hf_tokenizer.pad_token = hf_tokenizer.eos_token
    ours = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    theirs = hf_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.attention_mask, theirs.attention_mask)
    assert tokenizer("Portugal is")["input_ids"] == hf_tokenizer("Portugal is")["input_ids"]


def test_legacy_default_is_20_new_tokens_with_the_warning(pair):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    inputs = tokenizer(["Portugal is"], return_tensors="pt")
    with pytest.warns(UserWarning, match="max_new_tokens"):
        ids = model.generate(**inputs)
    expected = hf_model.generate(**hf_tokenizer(["Portugal is"], return_tensors="pt"))
    assert torch.equal(ids, expected)


def test_right_padding_warns_and_still_gives_the_left_padded_answer(pair, caplog):
    (model, tokenizer), _ = pair
    tokenizer.pad_token = tokenizer.eos_token
    left = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=10)
    tokenizer.padding_side = "right"
    try:
        inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        right = model.generate(**inputs, max_new_tokens=10)
    finally:
        tokenizer.padding_side = "left"
    assert "right-padding was detected" in caplog.text
    assert torch.equal(left[:, -10:], right[:, -10:])


def test_seeded_sampling_is_reproducible(pair):
    (model, tokenizer), _ = pair
    inputs = tokenizer(["Once upon a time"], return_tensors="pt")
    runs = []
    for _ in range(2):
        lmgen.set_seed(42)
        runs.append(model.generate(**inputs, max_new_tokens=20, do_sample=True, top_p=0.9))
    assert torch.equal(runs[0], runs[1])
    lmgen.set_seed(43)
    assert not torch.equal(runs[0], model.generate(**inputs, max_new_tokens=20, do_sample=True, top_p=0.9))


def test_num_return_sequences_with_sampling(pair):
    (model, tokenizer), _ = pair
    ids = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=5,
                         do_sample=True, num_return_sequences=3)
    assert ids.shape[0] == 6


def test_chat_template_generation_prompt_matches_transformers(pair):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    messages = [{"role": "user", "content": "Hello!"}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=False)
    assert torch.equal(ours, theirs)
    assert torch.equal(model.generate(ours, max_new_tokens=12), hf_model.generate(theirs, max_new_tokens=12))


def test_model_call_returns_transformers_logits(pair):
    (model, tokenizer), (hf_model, _) = pair
    tokenizer.pad_token = tokenizer.eos_token
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ours = model(**inputs).logits
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
    mask = inputs.attention_mask.bool()
    assert (ours[mask] - theirs[mask]).abs().max() <= 1e-4


def test_streamers(pair, capsys):
    (model, tokenizer), _ = pair
    inputs = tokenizer(["Once upon a time"], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=12, streamer=lmgen.TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(ids[0, inputs.input_ids.shape[1]:])
    streamer = lmgen.TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=12, streamer=streamer))
    thread.start()
    assert "".join(streamer) == printed.rstrip("\n")
    thread.join()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=5, do_smaple=True), "not used by the model.*do_smaple"),
    (dict(max_new_tokens=5, num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=5, do_sample=True, temperature=0.0), "strictly positive"),
    (dict(max_new_tokens=5, num_beams=2, num_return_sequences=3), r"has to be smaller or equal to `num_beams`"),
    (dict(max_new_tokens=5, num_beams=2, early_stopping="sometimes"), "early_stopping"),
])
def test_pitfalls_raise_transformers_errors(pair, kwargs, message):
    (model, tokenizer), _ = pair
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate(**tokenizer(["Hi"], return_tensors="pt"), **kwargs)


def test_temperature_without_sampling_warns(pair):
    (model, tokenizer), _ = pair
    with pytest.warns(UserWarning, match="do_sample"):
        model.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=3, temperature=0.7)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(typical_p=0.5), "typical_p"), (dict(eta_cutoff=0.01), "eta_cutoff"), (dict(length_penalty=2.0), "num_beams"),
    (dict(output_scores=True), "return_dict_in_generate"),
])
def test_flags_the_mode_ignores_warn(pair, kwargs, flag):
    (model, tokenizer), _ = pair
    with pytest.warns(UserWarning, match=flag):
        model.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=2, **kwargs)


# ---- user processors and stopping criteria, output scores ---------------------------------------

class BanToken(transformers.LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


class StopOnToken(transformers.StoppingCriteria):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def padded_batch(pair):
    """The tutorial's left-padded batch, tokenized on both sides, and lmgen's plain greedy continuation."""
    (model, tokenizer), (_, hf_tokenizer) = pair
    tokenizer.pad_token = tokenizer.eos_token
    hf_tokenizer.pad_token = hf_tokenizer.eos_token
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    plain = model.generate(**inputs, max_new_tokens=10)[:, inputs.input_ids.shape[1]:]
    return inputs, hf_tokenizer(PROMPTS, return_tensors="pt", padding=True), plain


def test_user_logits_processors_match_transformers(pair):
    (model, _), (hf_model, _) = pair
    inputs, hf_inputs, plain = padded_batch(pair)
    demote = int(plain[1, 1])
    processors = transformers.LogitsProcessorList([
        BanToken(int(plain[0, 0])),
        lambda input_ids, scores: scores - 5.0 * (torch.arange(scores.shape[-1], device=scores.device) == demote)])
    ours = model.generate(**inputs, max_new_tokens=10, logits_processor=processors)
    assert torch.equal(ours, hf_model.generate(**hf_inputs, max_new_tokens=10, logits_processor=processors))
    assert not torch.equal(ours[:, inputs.input_ids.shape[1]:], plain)


def test_user_processors_run_after_the_built_in_ones_and_before_the_warpers(pair):
    (model, tokenizer), _ = pair
    seen = []

    def spy(input_ids, scores):
        seen.append((input_ids.shape, scores.to("cpu", copy=True)))
        return scores

    inputs = tokenizer(["Once upon a time"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=0.5, top_k=0, suppress_tokens=[7],
                         logits_processor=[spy], return_dict_in_generate=True, output_scores=True, output_logits=True)
    for step, (ids_shape, scores) in enumerate(seen):
        assert ids_shape == (1, inputs.input_ids.shape[1] + step)
        expected = out.logits[step].clone()
        expected[:, 7] = float("-inf")
        torch.testing.assert_close(scores, expected)  # the raw logits through the built-in processors
        torch.testing.assert_close(out.scores[step], expected / 0.5)  # then temperature


def test_user_stopping_criteria_match_transformers(pair):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    inputs, hf_inputs, plain = padded_batch(pair)
    criteria = transformers.StoppingCriteriaList([StopOnToken(int(plain[0, 3]))])
    ours = model.generate(**inputs, max_new_tokens=10, stopping_criteria=criteria)
    assert torch.equal(ours, hf_model.generate(**hf_inputs, max_new_tokens=10, stopping_criteria=criteria))
    stopped_at = int((plain[0] == plain[0, 3]).nonzero()[0])
    assert bool((ours[0, inputs.input_ids.shape[1] + stopped_at + 1:] == model.generation_config.pad_token_id).all())
    length = lambda input_ids, scores: input_ids.shape[-1] >= 9  # noqa: E731 (a plain callable)
    single = tokenizer(["Portugal is"], return_tensors="pt")
    assert torch.equal(model.generate(**single, max_new_tokens=10, stopping_criteria=[length]),
                       hf_model.generate(**hf_tokenizer(["Portugal is"], return_tensors="pt"), max_new_tokens=10,
                                         stopping_criteria=transformers.StoppingCriteriaList([length])))


def test_max_time_stops_at_the_first_check_after_the_deadline(pair):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    ours = model.generate(**tokenizer(["Portugal is"], return_tensors="pt"), max_new_tokens=30, max_time=1e-6)
    theirs = hf_model.generate(**hf_tokenizer(["Portugal is"], return_tensors="pt"), max_new_tokens=30, max_time=1e-6)
    assert torch.equal(ours, theirs) and ours.shape[1] == theirs.shape[1]


def test_output_scores_logits_and_transition_scores_match_transformers(pair):
    (model, _), (hf_model, _) = pair
    inputs, hf_inputs, _ = padded_batch(pair)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, repetition_penalty=1.3, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    ours, theirs = model.generate(**inputs, **kwargs), hf_model.generate(**hf_inputs, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores) == len(ours.logits) == 8
    for mine, reference in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)
    for normalize in (False, True):
        torch.testing.assert_close(
            model.compute_transition_scores(ours.sequences, ours.scores, normalize_logits=normalize),
            hf_model.compute_transition_scores(theirs.sequences, theirs.scores, normalize_logits=normalize),
            atol=1e-4, rtol=1e-4)
    assert ours["sequences"] is ours.sequences and ours[1] is ours.scores
    assert list(ours.keys()) == ["sequences", "scores", "logits"]


def test_sampled_scores_are_the_warped_ones_and_finished_rows_score_zero(pair):
    (model, _), (hf_model, _) = pair
    inputs, _, plain = padded_batch(pair)
    lmgen.set_seed(0)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=5, temperature=0.8,
                         renormalize_logits=True, return_dict_in_generate=True, output_scores=True)
    assert all(int(step.isfinite().sum(-1).max()) <= 5 for step in out.scores)
    transition = model.compute_transition_scores(out.sequences, out.scores)
    torch.testing.assert_close(transition, hf_model.compute_transition_scores(out.sequences, out.scores))
    assert bool((transition <= 0).all())  # log-probabilities of tokens that were in the warped support
    early = model.generate(**inputs, max_new_tokens=6, eos_token_id=int(plain[0, 1]), return_dict_in_generate=True,
                           output_scores=True)
    assert torch.equal(model.compute_transition_scores(early.sequences, early.scores, normalize_logits=True)[0, 2:],
                       torch.zeros(len(early.scores) - 2))


def test_return_dict_without_outputs_holds_only_the_sequences(pair):
    (model, tokenizer), _ = pair
    out = model.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=3, return_dict_in_generate=True)
    assert out.scores is None and out.logits is None and "scores" not in out
    assert torch.equal(out["sequences"], out.sequences) and out.to_tuple() == (out.sequences,)


REPEATING_PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The"


@pytest.fixture(scope="module")
def assistants(llama_path):
    """(lmgen's, transformers') assistant model: the tiny Llama again, loaded apart (a draft that agrees)."""
    return (lmgen.AutoModelForCausalLM.from_pretrained(str(llama_path), dtype="float32"),
            transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32))


@pytest.mark.parametrize("speculation", ["prompt lookup", "assistant model"])
def test_speculative_generate_gives_transformers_tokens_at_any_batch_size(pair, assistants, speculation):
    (model, tokenizer), (hf_model, hf_tokenizer) = pair
    if speculation == "prompt lookup":
        ours_args = theirs_args = dict(prompt_lookup_num_tokens=5, max_matching_ngram_size=3)
    else:
        ours_args, theirs_args = ({"assistant_model": assistant} for assistant in assistants)
    engine = model.llm.engine
    accepted = engine.spec_decode.num_accepted_tokens
    ours = model.generate(**tokenizer([REPEATING_PROMPT], return_tensors="pt"), max_new_tokens=30, **ours_args)
    theirs = hf_model.generate(**hf_tokenizer([REPEATING_PROMPT], return_tensors="pt"), max_new_tokens=30,
                               **theirs_args)
    assert torch.equal(ours, theirs)
    assert engine.spec_decode.num_accepted_tokens > accepted and engine.proposer is None  # drafted for this call only
    # a batch, which transformers' speculative generate refuses: its tokens without speculation
    tokenizer.pad_token, hf_tokenizer.pad_token = tokenizer.eos_token, hf_tokenizer.eos_token
    prompts = [*PROMPTS, REPEATING_PROMPT]
    ours = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=30, **ours_args)
    theirs = hf_model.generate(**hf_tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=30)
    assert torch.equal(ours, theirs)
    pool = assistants[0].llm.engine.pool  # the assistant's KV cache, lent for drafting: all given back
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lookup_num_tokens=0), "`prompt_lookup_num_tokens` must be a positive integer, got 0"),
    (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=-1), "`max_matching_ngram_size` must be a positive"),
    (dict(assistant_model="small"), "assistant_model must be an lmgen AutoModelForCausalLM .from_pretrained., got str"),
    (dict(prompt_lookup_num_tokens=3, assistant_model="small"), "prompt_lookup_num_tokens or assistant_model, not both"),
    (dict(prompt_lookup_num_tokens=3, num_beams=2), r"beam search \(num_beams > 1\) chooses one token a step"),
])
def test_bad_speculation_arguments_are_named(pair, kwargs, message):
    (model, tokenizer), _ = pair
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate(**tokenizer(["Portugal is"], return_tensors="pt"), max_new_tokens=3, **kwargs)
