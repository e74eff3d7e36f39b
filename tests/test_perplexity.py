"""Sliding-window perplexity, checked against the same computation in transformers."""

import io
import math
import re
import sys

import pytest
import torch

from checkpoints import CORPUS
from lmgen import LLM, InvalidArgumentError, perplexity
from lmgen.perplexity import windows

TEXT = "\n\n".join(CORPUS * 3)


@pytest.mark.parametrize("num_tokens,context,stride", [(100, 32, 16), (100, 32, 32), (10, 32, 16), (33, 32, 8)])
def test_windows_score_every_token_after_the_first_once(num_tokens, context, stride):
    scored = []
    for begin, end, first in windows(num_tokens, context, stride):
        assert end - begin <= context and begin < first <= end
        scored.extend(range(first, end))
    if stride < context:
        assert scored == list(range(1, num_tokens))
    else:  # adjacent windows: a window's first token has nothing to be predicted from
        assert scored == [t for t in range(1, num_tokens) if t % stride]


def transformers_perplexity(path, text: str, context: int, stride: int) -> float:
    """The loop of transformers' guide "Perplexity of fixed-length models", counting the labels
    each window's loss actually averages over (the first window's first token has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    input_ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + context, seq_len)
        trg_len = end - prev_end
        ids = input_ids[:, begin:end]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("context,stride", [(48, 16), (64, 64)])
def test_matches_transformers(llama_path, context, stride):
    result = perplexity(LLM(str(llama_path), dtype="float32"), TEXT, context, stride)
    assert result.num_windows > 2
    assert result.perplexity == pytest.approx(transformers_perplexity(llama_path, TEXT, context, stride), rel=1e-4)


def test_defaults_fit_the_model(llama_path):
    result = perplexity(LLM(str(llama_path), dtype="float32", max_model_len=128), TEXT)
    assert (result.context, result.stride) == (127, 63)
    assert result.perplexity == pytest.approx(math.exp(result.nll))


@pytest.mark.parametrize("kwargs,message", [
    (dict(context=256), r"context must be in \[2, 255\]"),
    (dict(context=32, stride=33), r"stride must be in \[1, context=32\]"),
    (dict(context=32, stride=0), r"stride must be in \[1, context=32\], got 0"),  # not the default stride
    (dict(context=0), r"context must be in \[2, 255\] for this model, got 0"),
    (dict(text=""), "fewer than 2 tokens"),  # BOS alone
])
def test_bad_arguments_are_clear_errors(llama_path, kwargs, message):
    llm = LLM(str(llama_path), dtype="float32")
    with pytest.raises(InvalidArgumentError, match=message):
        perplexity(llm, **{"text": TEXT, **kwargs})


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr, bar", [(Terminal(), True), (io.StringIO(), False)])
def test_a_progress_bar_only_on_a_terminal(llama_path, monkeypatch, stderr, bar):
    monkeypatch.setattr(sys, "stderr", stderr)
    result = perplexity(LLM(str(llama_path), dtype="float32"), TEXT, 48, 16)
    drawn = re.search(rf"perplexity: +0%\|.*\| 0/{result.num_windows} .* window/s\]", stderr.getvalue())
    assert bool(drawn) == bar


def test_a_short_text_is_one_window_of_its_own_length(llama_path):
    llm = LLM(str(llama_path), dtype="float32")
    num_text_tokens = len(llm.tokenizer.encode(CORPUS[0]))
    result = perplexity(llm, CORPUS[0])
    assert result.context == 255 > num_text_tokens
    assert (result.num_windows, result.window_tokens, result.num_tokens) == (1, num_text_tokens, num_text_tokens - 1)
