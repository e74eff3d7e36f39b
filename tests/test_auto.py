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
    (dict(max_new_tokens=5, num_beams=4), "num_beams=4 is not supported by lmgen yet"),
])
def test_pitfalls_raise_transformers_errors(pair, kwargs, message):
    (model, tokenizer), _ = pair
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate(**tokenizer(["Hi"], return_tensors="pt"), **kwargs)


def test_temperature_without_sampling_warns(pair):
    (model, tokenizer), _ = pair
    with pytest.warns(UserWarning, match="do_sample"):
        model.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=3, temperature=0.7)
