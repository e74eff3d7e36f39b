"""Tiny random-weight checkpoints saved with transformers, for parity tests.

Each variant is a config that exercises one code path (rope scaling, biases,
sliding windows, ...). Weights are random, so outputs are gibberish, but they are
the same gibberish in transformers and lmgen, which is what the tests check.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Portugal is a country in southern Europe; Lisbon is its capital.",
    "A list of colors: red, blue, green, yellow, purple and orange.",
    "Once upon a time there was a little cat who liked to sleep in the sun.",
    "café, naïve, façade, 東京, Ελληνικά, emoji 🙂🚀 and numbers 1234567890",
]

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

GPT2_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class name, overrides of BASE (GPT-2: of GPT2_BASE))
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-untied-bias-headdim": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, head_dim=24)),
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "llama-linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-dynamic-rope": ("LlamaConfig", dict(max_position_embeddings=40, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),  # q/k norms; q wider than hidden
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                        rope_parameters={  # 5 sliding layers, then a global one on its own rope
                                            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                                            "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    # Phi-4-mini's shape: partial rotary; an original length no prompt here crosses (longrope: test_families)
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, num_key_value_heads=2, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5, original_max_position_embeddings=128,
        short_factor=[1.0 + i / 10 for i in range(4)], long_factor=[2.0 + i for i in range(4)]))),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                                      logits_scaling=8.0, tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True)),  # layer 3 without rotary
    "gpt2": ("GPT2Config", {}),
    "gpt2-untied": ("GPT2Config", dict(tie_word_embeddings=False)),
    # mixtures of experts: 8 experts (4 for Mixtral), so that a batch leaves some unchosen
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=128, tie_word_embeddings=True)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, head_dim=32, num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[1])),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2)),
    # sinks, sliding and full layers alternating, YaRN past its original length, biases everywhere (made to
    # matter: build_checkpoint), a clamp the experts' products reach (limit 1)
    "gpt-oss": ("GptOssConfig", dict(head_dim=16, sliding_window=8, num_local_experts=8, num_experts_per_tok=4,
                                     intermediate_size=64, swiglu_limit=1.0, rope_parameters=dict(
                                         rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=64))),
}
MOE_VARIANTS = ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "gpt-oss")
# Checkpoints for tests of their own (not every parity test's prompts suit them)
EXTRA_VARIANTS: dict[str, tuple[str, dict]] = {
    # longrope with prompts past the original length (transformers recomputes a sequence that crosses it)
    "phi3-long": ("Phi3Config", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=1.0, original_max_position_embeddings=16,
        short_factor=[1.0 + i / 10 for i in range(8)], long_factor=[2.0 + i for i in range(8)]))),
}


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with <s>/</s>/<pad>, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    import json

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "clean_up_tokenization_spaces": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}",
    }))


def build_checkpoint(folder: Path, variant: str, dtype: torch.dtype = torch.float32, **changes) -> Path:
    """Save a random `variant` model (and a tokenizer) into `folder`, its config changed by `changes`."""
    import transformers

    config_class, overrides = {**VARIANTS, **EXTRA_VARIANTS}[variant]
    config = getattr(transformers, config_class)(**{**(GPT2_BASE if config_class == "GPT2Config" else BASE),
                                                    **overrides, **changes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    # Norms start as ones (Gemma's as zeros): make their weights matter. Not in "llama", whose seed-0
    # tokens other tests pick as stop tokens (tests/engine/test_beam_search.py).
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if variant != "llama" and ("norm" in name or ".ln_" in name):
                parameter.add_(torch.randn_like(parameter) * 0.2)
            if variant == "gpt-oss" and "bias" in name:  # its biases start as zeros
                parameter.add_(torch.randn_like(parameter) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def truncated_copy(source: Path, folder: Path, num_layers: int) -> Path:
    """A copy of a Llama-shaped checkpoint keeping its first `num_layers` layers: a draft model that agrees
    with its source often but not always (speculative decoding's tests)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    kept = {name: tensor for name, tensor in tensors.items()
            if ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) < num_layers}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_layers}))
    return folder


def to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] -> MXFP4 blocks [..., K/32, 16] uint8 (value 2j in byte j's low nibble, 2j + 1 in its high
    one) and scales [..., K/32] uint8 (each block's power of two, biased by 127), as OpenAI's GPT-OSS checkpoints
    store their experts: each block scaled so that its largest value fits E2M1's 6, then rounded to E2M1."""
    from lmgen.models.gpt_oss import FP4_VALUES

    groups = weight.reshape(*weight.shape[:-1], -1, 32)
    exponents = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0))
    scaled = groups / torch.exp2(exponents)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponents + 127).to(torch.uint8)


def mxfp4_copy(source: Path, folder: Path) -> Path:
    """A copy of a GPT-OSS checkpoint with its experts in MXFP4 (``*_blocks``, ``*_scales``), and the
    quantization_config that says so."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    tensors = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out]; MXFP4 blocks run along in
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = to_mxfp4(tensor.transpose(1, 2))
        else:
            tensors[name] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# llama.cpp's recipes (tests/layers/test_ggml_recipes.py, tests/data/record_llama_cpp_quants.py): 8 layers (its
# layer rules pick 0, 3, 6 and 7), rows of 256 (K-quants) and 320 (their fallbacks)
RECIPE_QWEN2_SHAPE = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=8, num_attention_heads=4,
                          num_key_value_heads=2)


def recipe_qwen2_checkpoint(root: Path) -> Path:
    """Qwen2 of RECIPE_QWEN2_SHAPE with the tied embedding (the LM head's rules), biases, and in layer 0's up
    projection an all-zero row 3 and a flat row 4 (blocks of no or one distinct value)."""
    from safetensors.torch import load_file, save_file

    folder = build_checkpoint(root / "qwen2", "qwen2", **RECIPE_QWEN2_SHAPE)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3] = 0
    tensors["model.layers.0.mlp.up_proj.weight"][4] = -0.25
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# llama.cpp's recipes for mixtures of experts: RECIPE_QWEN2_SHAPE's layers, experts' down projections of 320
# columns (fallbacks); Qwen2-MoE's 4 experts with a shared expert, Mixtral's 8 (llama.cpp's rules for 8 experts).
# name -> (variant, llama.cpp architecture, changes)
RECIPE_MOE = {
    "qwen2moe": ("qwen2-moe", "qwen2moe", dict(num_experts=4, moe_intermediate_size=320,
                                               shared_expert_intermediate_size=320)),
    "mixtral": ("mixtral", "llama", dict(num_local_experts=8, sliding_window=None)),
}


def recipe_moe_checkpoint(root: Path, name: str) -> Path:
    variant, _, changes = RECIPE_MOE[name]
    return build_checkpoint(root / name, variant, **{**RECIPE_QWEN2_SHAPE, **changes})
