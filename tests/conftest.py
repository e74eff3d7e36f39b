import pytest
import torch

from checkpoints import VARIANTS, build_checkpoint, truncated_copy
from lmgen import kernels

# Loaded once for the session (engines load them too): which kernels a layer uses must not
# depend on whether an earlier test happened to load a model.
kernels.load()


@pytest.fixture(scope="session")
def cpu_kernels():
    """For the tests of lmgen's CPU kernels: they skip where the kernels cannot run by design (no
    AVX2, no compiler, LMGEN_CPU_KERNELS=0), saying why, and fail where the kernels should have
    built and did not: a compile error in cpu.cpp must not pass as a skip."""
    if kernels.build_failed:
        pytest.fail(f"lmgen's CPU kernels did not build on a machine that can run them: {kernels.why_not}",
                    pytrace=False)
    if not kernels.loaded:
        pytest.skip(f"lmgen's CPU kernels cannot run here: {kernels.why_not}")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Builds (once per session) the tiny random checkpoint of a variant and returns its folder."""
    cache = {}

    def make(variant: str):
        if variant not in cache:
            cache[variant] = build_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return make


@pytest.fixture(scope="session")
def llama_path(checkpoint_factory):
    return checkpoint_factory("llama")


@pytest.fixture(scope="session")
def llama_draft_path(llama_path, tmp_path_factory):
    """The tiny Llama's first layer alone: a draft model for it (speculative decoding) that agrees often."""
    return truncated_copy(llama_path, tmp_path_factory.mktemp("drafts") / "llama-1-layer", num_layers=1)


ALL_VARIANTS = list(VARIANTS)


def qwen_chat_checkpoint(folder, build_tokenizer, config_class: str, **fields):
    """A tiny random model (transformers' `config_class`, `fields` over the shared BASE) in `folder`, with the
    tokenizer and chat template that `build_tokenizer` (tests/loader/tokenizer_fixtures.py) writes in Qwen's
    layout: <|im_end|> ends a reply."""
    import transformers

    from checkpoints import BASE
    from lmgen.loader.tokenizer import Tokenizer
    from tests.loader.tokenizer_fixtures import Backends

    build_tokenizer(folder, Backends())
    tokenizer = Tokenizer.from_pretrained(folder)
    config = getattr(transformers, config_class)(**{
        **BASE, **fields, "vocab_size": -(-len(tokenizer) // 64) * 64, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "pad_token_id": tokenizer.token_to_id("<|endoftext|>")})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qwen_tools_path(tmp_path_factory):
    """A tiny random Qwen2 with Qwen 2.5's tokenizer layout and chat template, which renders tools and
    shows the Hermes call format (<tool_call>): tool calling end to end on random weights."""
    from tests.loader.tokenizer_fixtures import build_qwen2

    return qwen_chat_checkpoint(tmp_path_factory.mktemp("qwen-tools"), build_qwen2, "Qwen2Config")


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory):
    """A tiny random Qwen3 with Qwen3's tokenizer (<think> and </think> added tokens) and chat template, which
    shows Hermes calls and thinking (enable_thinking): reasoning end to end on random weights."""
    from tests.loader.tokenizer_fixtures import build_qwen3

    return qwen_chat_checkpoint(tmp_path_factory.mktemp("qwen3"), build_qwen3, "Qwen3Config", **VARIANTS["qwen3"][1])


@pytest.fixture(scope="session")
def gpt_oss_harmony_path(tmp_path_factory):
    """The tiny random GPT-OSS with gpt-oss's tokenizer layout (the harmony markers special tokens, its chat
    template) and stop tokens (<|return|>, <|call|>, <|endoftext|>, as its generation_config.json names them)."""
    import json

    import transformers

    from checkpoints import BASE, VARIANTS
    from lmgen.loader.tokenizer import Tokenizer
    from tests.loader.tokenizer_fixtures import Backends, build_gpt_oss

    folder = tmp_path_factory.mktemp("gpt-oss-harmony")
    build_gpt_oss(folder, Backends())
    tokenizer = Tokenizer.from_pretrained(folder)
    stops = [tokenizer.token_to_id(marker) for marker in ("<|return|>", "<|endoftext|>", "<|call|>")]
    config = transformers.GptOssConfig(**{
        **BASE, **VARIANTS["gpt-oss"][1], "vocab_size": -(-len(tokenizer) // 64) * 64, "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.token_to_id("<|startoftext|>"), "eos_token_id": stops[0],
        "pad_token_id": stops[1]})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": stops, "pad_token_id": stops[1]}))
    return folder


@pytest.fixture(scope="session")
def llama_log_softmax(llama_path):
    """transformers' float32 log-softmax [len, vocab] at every position of a token-id prompt, on the tiny Llama."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path, dtype=torch.float32)

    def log_softmax(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)

    return log_softmax
