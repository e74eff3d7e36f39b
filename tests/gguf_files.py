"""Tiny GGUF files written the way llama.cpp's converter writes them, from tiny transformers checkpoints.

`write_gguf` turns a checkpoint folder (tests/checkpoints.py) into a GGUF file of one architecture:
llama.cpp's metadata keys and tensor names (the `gguf` package's name map), its layouts (q/k rows
permuted for llama-style models, Gemma's norms stored as 1 + w, GPT-2's Conv1D weights transposed
and its head written out, rope factors as tensors, a mixture of experts' per-expert matrices stacked
[experts, out, in] per projection), each tensor in the type `tensor_type` picks, and
the tokenizer as metadata: the checkpoint's byte-level BPE, or a SentencePiece vocabulary with scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

PERMUTED = ("llama", "granite", "smollm3")  # llama.cpp's LlamaModel and its subclasses
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
#: the range of random K-quant blocks' f16 scales d (and dmin)
K_SCALES = (0.002, 0.02)


def float32(name: str, array: np.ndarray) -> Q:
    return Q.F32


def write_gguf(folder: Path, out: Path, arch: str, tensor_type: Callable[[str, np.ndarray], Q] = float32,
               tokenizer: dict | None = None, encode: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Path:
    """`folder`'s model as a GGUF file of llama.cpp architecture `arch`; `tokenizer`: metadata from
    `bpe_metadata` / `sentencepiece_metadata` (default: the folder's byte-level BPE); `encode`: a quantized
    tensor's blocks (default: the gguf package's quantizer, random blocks for the K-quants it lacks)."""
    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), arch)
    tokenizer = _padded(tokenizer or bpe_metadata(folder), config["vocab_size"])
    for key, value in {**_model_metadata(config, arch), **tokenizer}.items():
        _add(writer, key.replace("{arch}", arch), value)
    for name, array in _tensors(folder, config, arch):
        kind = tensor_type(name, array) if array.ndim > 1 else Q.F32
        floating = kind in (Q.F32, Q.F16)
        data = encode(name, array) if encode and not floating else _encode(array, kind)
        writer.add_tensor(name, data, raw_dtype=None if floating else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _padded(tokenizer: dict, vocab_size: int) -> dict:
    """llama.cpp lists one token per row of the embedding: the ids the tokenizer lacks as unused [PADn]."""
    tokens = tokenizer["tokenizer.ggml.tokens"]
    missing = range(len(tokens), vocab_size)
    padded = {"tokenizer.ggml.tokens": [*tokens, *(f"[PAD{i}]" for i in missing)],
              "tokenizer.ggml.token_type": [*tokenizer["tokenizer.ggml.token_type"], *(UNUSED for _ in missing)]}
    if "tokenizer.ggml.scores" in tokenizer:
        padded["tokenizer.ggml.scores"] = [*tokenizer["tokenizer.ggml.scores"], *(0.0 for _ in missing)]
    return tokenizer | padded


def _add(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def _model_metadata(config: dict, arch: str) -> dict:
    if arch == "gpt2":
        return {"{arch}.block_count": config["n_layer"], "{arch}.context_length": config["n_positions"],
                "{arch}.embedding_length": config["n_embd"], "{arch}.feed_forward_length": 4 * config["n_embd"],
                "{arch}.attention.head_count": config["n_head"],
                "{arch}.attention.layer_norm_epsilon": float(config["layer_norm_epsilon"])}
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    meta = {"{arch}.block_count": config["num_hidden_layers"], "{arch}.context_length": config["max_position_embeddings"],
            "{arch}.embedding_length": config["hidden_size"], "{arch}.feed_forward_length": config["intermediate_size"],
            "{arch}.attention.head_count": heads, "{arch}.attention.head_count_kv": config["num_key_value_heads"],
            "{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            "{arch}.rope.freq_base": float(full.get("rope_theta", 10000.0)),
            "{arch}.attention.key_length": head_dim, "{arch}.attention.value_length": head_dim,
            "{arch}.rope.dimension_count": int(head_dim * full.get("partial_rotary_factor", 1.0))}
    if full.get("rope_type") == "linear":
        meta |= {"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": float(full["factor"])}
    if full.get("rope_type") == "longrope":
        original = full["original_max_position_embeddings"]
        scale = config["max_position_embeddings"] / original
        meta |= {"{arch}.rope.scaling.original_context_length": original,
                 "{arch}.rope.scaling.attn_factor": math.sqrt(1 + math.log(scale) / math.log(original))
                 if scale > 1 else 1.0}
    if arch.startswith("gemma"):
        meta["{arch}.attention.sliding_window"] = config["sliding_window"]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                meta["{arch}." + key] = float(config[key])
    if arch == "gemma3":
        meta["{arch}.rope.freq_base_swa"] = float(rope["sliding_attention"]["rope_theta"])
    if "num_experts_per_tok" in config:  # a mixture of experts: Mixtral's as wide as feed_forward_length
        meta |= {"{arch}.expert_count": config.get("num_experts") or config["num_local_experts"],
                 "{arch}.expert_used_count": config["num_experts_per_tok"]}
        if "moe_intermediate_size" in config:
            meta["{arch}.expert_feed_forward_length"] = config["moe_intermediate_size"]
        if config.get("shared_expert_intermediate_size"):
            meta["{arch}.expert_shared_feed_forward_length"] = config["shared_expert_intermediate_size"]
    if arch == "granite":
        meta |= {"{arch}.embedding_scale": float(config["embedding_multiplier"]),
                 "{arch}.residual_scale": float(config["residual_multiplier"]),
                 "{arch}.attention.scale": float(config["attention_multiplier"]),
                 "{arch}.logit_scale": float(config["logits_scaling"])}
    return meta


def _tensors(folder: Path, config: dict, arch: str):
    """(GGUF name, float32 array) in llama.cpp's layouts."""
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     config.get("num_hidden_layers") or config["n_layer"])
    for hf_name, tensor in _stacked_experts(load_file(str(folder / "model.safetensors"))).items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # GPT-2's causal mask
        base, _, leaf = hf_name.rpartition(".")
        name = f"{names.get_name(base)}.{leaf}"
        tensor = tensor.float()
        if arch in PERMUTED and base.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if base.endswith("q_proj") else "num_key_value_heads"]
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:]).swapaxes(1, 2) \
                .reshape(tensor.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            tensor = tensor + 1
        if arch == "gpt2" and base.endswith(("c_attn", "c_proj", "c_fc")) and leaf == "weight":
            tensor = tensor.T.contiguous()  # Conv1D stores [in, out]
        yield name, tensor.numpy()
        if arch == "gpt2" and name == "token_embd.weight":
            yield "output.weight", tensor.numpy()  # llama.cpp writes GPT-2's head out
    yield from _rope_tensors(config, arch)


def _stacked_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each layer's per-expert matrices (``mlp.experts.N.gate_proj.weight``) stacked by projection
    (``mlp.experts.gate_proj.weight`` [experts, out, in]), as llama.cpp's converter writes them."""
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        if match := re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+\.weight)", name):
            stacks.setdefault(f"{match[1]}.{match[3]}", {})[int(match[2])] = tensor
        else:
            out[name] = tensor
    return out | {name: torch.stack([experts[i] for i in sorted(experts)]) for name, experts in stacks.items()}


def _rope_tensors(config: dict, arch: str):
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.array(rope["long_factor"], np.float32)
        yield "rope_factors_short.weight", np.array(rope["short_factor"], np.float32)
    if rope.get("rope_type") == "llama3":  # llama.cpp stores Llama 3's scaling as a factor per frequency
        import transformers
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = transformers.LlamaConfig(**config)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        head_dim = hf_config.head_dim
        base = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
        yield "rope_freqs.weight", (base / scaled).numpy().astype(np.float32)


def _encode(array: np.ndarray, kind: Q) -> np.ndarray:
    if kind == Q.F32:
        return array.astype(np.float32)
    if kind == Q.F16:
        return array.astype(np.float16)
    if kind in K_QUANTS:
        return random_k_blocks(array.shape, kind, np.random.default_rng(array.size))
    return gguf.quants.quantize(array.astype(np.float32), kind)


def random_k_blocks(shape: tuple[int, ...], kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot quantize to them) with small finite f16 scales."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    rows, blocks = math.prod(shape[:-1]), shape[-1] // block_size
    data = rng.integers(0, 256, (rows, blocks, block_bytes), dtype=np.uint8)
    with_min = kind in (Q.Q4_K, Q.Q5_K)
    scales = rng.uniform(*K_SCALES, (rows, blocks, 2 if with_min else 1)).astype("<f2").view(np.uint8)
    if with_min:  # d and dmin lead the block
        data[..., :4] = scales
    else:  # Q6_K: d ends it
        data[..., -2:] = scales
    return data.reshape(*shape[:-1], blocks * block_bytes)


def bpe_metadata(folder: Path, pre: str = "gpt2") -> dict:
    """The checkpoint's byte-level BPE tokenizer.json as GGUF tokenizer metadata."""
    data = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [CONTROL if t in special else NORMAL for t in tokens],
            "tokenizer.ggml.merges": merges, **_special_ids(vocab, config), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": config["chat_template"]}


def sentencepiece_metadata(folder: Path, chat_template: str, specials: dict[str, str]) -> dict:
    """A SentencePiece-style tokenizer.json (▁ pieces, <0xNN> bytes) as llama.cpp writes a Llama 2 or Gemma
    vocabulary: scores (the merge order) and token types, no merges. `specials`: bos_token, ... -> token."""
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**data["model"]["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    control = {t["content"] for t in data["added_tokens"] if t["special"]} - {specials.get("unk_token")}
    types = [UNKNOWN if t == specials.get("unk_token") else CONTROL if t in control else
             BYTE if t.startswith("<0x") else UNUSED if t.startswith("<pad") else NORMAL for t in tokens]
    scores = [-float(i) if kind == NORMAL else 0.0 for i, kind in enumerate(types)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types, **_special_ids(vocab, specials),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.chat_template": chat_template}


def _special_ids(vocab: dict[str, int], config: dict) -> dict:
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}
    return {f"tokenizer.ggml.{key}": vocab[config[name]] for name, key in keys.items() if config.get(name) in vocab}
