"""Every supported architecture and rope variant against transformers on the same weights."""

import pytest
import torch
import transformers

from conftest import ALL_VARIANTS
from lmgen import LLM, SamplingParams

PROMPTS = [
    [1, 5, 9, 200, 17, 33, 45],
    [1, 100, 7],
    list(range(3, 40)),  # long enough to cross mistral's sliding window of 8
    [1, 250, 251, 252, 253, 254, 255, 256, 300, 301, 302, 303],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ALL_VARIANTS)
def pair(request, checkpoint_factory):
    path = checkpoint_factory(request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, LLM(str(path), dtype="float32")


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        hf(torch.tensor([[1]]))  # dynamic rope keeps state between calls: reset it with a short input
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_logits_match_transformers(pair):
    hf, llm = pair
    scores = [logits.cpu() for logits in llm.engine.score(PROMPTS)]  # one batch of prompts of different lengths
    for prompt, logits in zip(PROMPTS, scores):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0].float()
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= 1e-4


def test_greedy_matches_transformers_alone_and_batched(pair):
    hf, llm = pair
    expected = [hf_greedy(hf, p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in PROMPTS]
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    assert alone == expected
    assert batched == expected


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_chunked_prefill_matches_transformers(checkpoint_factory, variant):
    """A prompt longer than the step's token budget is prefilled in chunks, beside decodes."""
    path = checkpoint_factory(variant)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=8)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    outputs = llm.generate(PROMPTS, greedy)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p) for p in PROMPTS]


def test_demo_model_matches_transformers():
    """The embedded demo model: lmgen and transformers agree on its logits and greedy tokens."""
    from lmgen.loader.checkpoint import DEMO_MODEL_PATH

    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32).eval()
    llm = LLM(dtype="float32")
    prompts = [llm.tokenizer.encode(text) for text in ("The LORD said", "A wise man", "Once upon a time")]
    for prompt, logits in zip(prompts, llm.engine.score(prompts)):
        with torch.no_grad():
            assert (logits.cpu() - hf(torch.tensor([prompt])).logits[0]).abs().max().item() <= 1e-4
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    outputs = llm.generate(prompts, greedy)
    for prompt, output in zip(prompts, outputs):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
        assert output.outputs[0].token_ids == expected.tolist()
