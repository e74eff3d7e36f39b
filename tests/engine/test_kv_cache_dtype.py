"""kv_cache_dtype: keys and values stored in another dtype than the model computes in, read back into the
model's dtype by attention (the reference path, the decode kernel and the one-call decode)."""

import logging

import pytest
import torch

from lmgen import LLM, AutoModelForCausalLM, InvalidArgumentError, SamplingParams
from lmgen.engine.config import EngineConfig

# a short prompt beside two long ones: the first step splits (decode kernel and SDPA), the rest decode
PROMPTS = [list(range(3 + i, 3 + i + length)) for i, length in enumerate([5, 19, 40])]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)


def _outputs(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral-sliding", "gemma2"])
def test_a_half_precision_cache_keeps_a_float32_models_greedy_tokens(checkpoint_factory, variant):
    """Keys and values rounded to float16 (bfloat16) on their way into the cache: the same greedy tokens as the
    float32 cache, each chosen token's log-probability within 0.005 (0.02) of its (at most 1e-3 and 7.5e-3 seen)."""
    path = str(checkpoint_factory(variant))
    reference = _outputs(LLM(path, dtype="float32"))
    for kv_cache_dtype, tolerance in (("float16", 0.005), ("bfloat16", 0.02)):
        outputs = _outputs(LLM(path, dtype="float32", kv_cache_dtype=kv_cache_dtype))
        for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(outputs, reference):
            assert tokens == expected_tokens, kv_cache_dtype
            for token, step, expected in zip(tokens, logprobs, expected_logprobs):
                assert abs(step[token].logprob - expected[token].logprob) < tolerance, kv_cache_dtype


def test_half_the_bytes_a_token_hold_twice_the_tokens(llama_path, caplog):
    """The budget buys blocks of the cache's dtype; from_pretrained takes the engine's argument too."""
    full = LLM(str(llama_path), dtype="float32", kv_cache_memory="1MiB").engine
    assert full.kv_cache.layers[0][0].dtype == torch.float32  # auto: the model's dtype
    with caplog.at_level(logging.INFO, logger="lmgen.engine.engine"):
        half = AutoModelForCausalLM.from_pretrained(str(llama_path), dtype=torch.float32, kv_cache_dtype="bf16",
                                                    kv_cache_memory="1MiB").llm.engine
    assert half.dtype == torch.float32 and half.kv_cache.layers[0][0].dtype == torch.bfloat16
    assert half.kv_cache.num_blocks == 2 * full.kv_cache.num_blocks
    assert half.kv_cache.nbytes == full.kv_cache.nbytes == 2**20
    assert f"KV cache {half.kv_cache.num_blocks} blocks of 16 tokens (torch.bfloat16, 1 MiB)" in caplog.text


@pytest.mark.parametrize("value, dtype", [("auto", torch.float32), ("float16", torch.float16),
                                          ("fp16", torch.float16), ("half", torch.float16), ("bf16", torch.bfloat16),
                                          ("float32", torch.float32)])
def test_vllms_spellings_name_the_same_dtypes(value, dtype):
    assert EngineConfig(kv_cache_dtype=value).kv_cache_torch_dtype(torch.float32) == dtype
    assert EngineConfig(kv_cache_dtype="auto").kv_cache_torch_dtype(torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("value, message", [
    ("fp8", "kv_cache_dtype 'fp8' is not supported: lmgen does not store fp8 keys and values yet"),
    ("fp8_e5m2", "does not store fp8"), ("int8", "kv_cache_dtype 'int8' is not supported; use one of: auto"),
    (None, "kv_cache_dtype None is not supported"),
])
def test_other_values_are_refused(value, message):
    with pytest.raises(InvalidArgumentError, match=message):
        EngineConfig(kv_cache_dtype=value)
