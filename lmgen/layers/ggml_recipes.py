"""llama.cpp's quantization recipes (``q4_k_m``, ``q6_k``, ``q8_0``) applied to a float checkpoint while it loads.

``LLM(folder, quantization="q4_k_m")`` gives each weight the GGUF block type ``llama-quantize`` would give it
(``recipe_types``), quantizes it as llama.cpp does (lmgen/layers/ggml_quant.py) and keeps the blocks
for lmgen's block kernels (lmgen/layers/ggml.py), exactly as if a Q4_K_M file made from the checkpoint
had been loaded. Q4_K_M is Q4_K, with more bits where quantizing hurts most: Q6_K for the LM head (or the
tied embedding), for attn_v and ffn_down in the first and last eighths of the layers and every third
between; and since Q4_K and Q6_K need rows of 256 values, Q5_0 and Q8_0 stand in for them on narrower
rows (Qwen2.5-0.5B's 896: there Q4_K_M is mostly Q5_0). The layers are counted in order, as
llama.cpp 0.3 counts them (older ones counted in the file's order, which put ``blk.10`` before ``blk.2``).

A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS) is quantized as llama.cpp quantizes
its files, where each projection's experts are one tensor: a stack takes one type (the projection's rules;
its experts' checkpoint tensors are quantized into it one by one), the experts' and the shared expert's
down projections are ffn_down of their layer, and the router (and Qwen2-MoE's shared expert gate) stays
in float. With exactly 8 experts llama.cpp gives attn_k and attn_v Q8_0 in every recipe and attn_output
Q5_K in Q4_K_M (its rule for Mixtral 8x7B).

GPT-2's llama.cpp file holds its tied table twice (the embedding in the default type, the head in the
head's); lmgen holds it once, in the head's.

Where lmgen's block kernels do not run the model (a GPU, tensor parallelism) or read a type (Q5_1), the
weights are dequantized back to the model's dtype: the same values, float memory. The quantizers are C++
beside those kernels, so a machine that cannot build them (no AVX2, no compiler) is refused the recipes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lmgen.layers.ggml import dequantize_blocks, weight_tensors
from lmgen.layers.ggml_quant import (BLOCK_SIZES, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, quantize_blocks,
                                     require_quantizers)
from lmgen.layers.moe import ExpertLinear

#: method -> the type of the tensors its rules do not single out
RECIPES = {"q4_k_m": Q4_K, "q6_k": Q6_K, "q8_0": Q8_0}
# the type llama.cpp takes for rows that are no whole blocks of the one chosen (none: kept in float)
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.\d+\.")  # one expert's checkpoint tensor: ...experts.N.gate_proj.weight
_ROWS_PER_CHUNK_VALUES = 1 << 22


def recipe_types(model: nn.Module, method: str, lm_head: bool) -> dict[str, int | None]:
    """The ggml type of each checkpoint weight (lmgen's names; a mixture of experts' stack of one projection
    under one name) that `method` quantizes; None: kept in float. Refuses, before anything is built, where the
    quantizers cannot run."""
    require_quantizers(f"quantization {method!r}")
    tied = getattr(model, "lm_head", None) is None
    weights = {t: module.weight.shape[-1] for _, module, tensors in weight_tensors(model) for t in tensors
               if _quantized(t, lm_head)}
    num_layers = 1 + max((int(found[1]) for t in weights if (found := _LAYER.match(t))), default=-1)
    num_experts = max((m.weight.shape[0] for m in model.modules() if isinstance(m, ExpertLinear)), default=1)
    types = {}
    for name, columns in weights.items():
        layer = _LAYER.match(name)
        place = (int(layer[1]), num_layers) if layer else None
        chosen = _llama_type(method, _kind(name), place, columns, tied, num_experts)
        if columns % BLOCK_SIZES[chosen][0]:
            chosen = _FALLBACK.get(chosen)
            if chosen is not None and columns % BLOCK_SIZES[chosen][0]:
                chosen = None
        types[name] = chosen
    return types


def _quantized(name: str, lm_head: bool) -> bool:
    module = name.split(".")[-2]
    if module in ("embed_tokens", "lm_head"):
        return lm_head
    return module not in ("embed_positions", "router", "shared_expert_gate")


def _kind(name: str) -> str:
    """llama.cpp's category of a tensor, as far as its recipes tell them apart (a shared expert's and the
    experts' down projections are ffn_down too)."""
    module = name.split(".")[-2]
    return {"v_proj": "attn_v", "qkv_proj": "attn_v", "k_proj": "attn_k", "o_proj": "attn_output",
            "down_proj": "ffn_down", "lm_head": "output", "embed_tokens": "token_embd"}.get(module, "other")


def _more_bits(place: int, count: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighths of the layers, and every third between."""
    return place < count // 8 or place >= 7 * count // 8 or (place - count // 8) % 3 == 2


def _llama_type(method: str, kind: str, place: tuple[int, int] | None, columns: int, tied: bool,
                num_experts: int) -> int:
    """llama.cpp's choice for one tensor (llama_tensor_get_type, before the fallback for narrow rows). `place`:
    (its layer, the number of layers): llama.cpp counts attn_v and a dense model's ffn_down tensors in the
    order of their layers, one a layer, and reads a mixture of experts' ffn_down layer from the tensor's name
    (its experts' and its shared expert's alike), which come to the same."""
    default = RECIPES[method]
    if kind == "output" or (kind == "token_embd" and tied):  # the tied embedding is the LM head
        return Q8_0 if columns % BLOCK_SIZES[default][0] or default == Q8_0 else Q6_K
    if num_experts == 8 and kind in ("attn_v", "attn_k"):  # llama.cpp's rule for Mixtral 8x7B, in every recipe
        return Q8_0
    if num_experts == 8 and kind == "attn_output" and method == "q4_k_m":
        return Q5_K
    if method == "q4_k_m" and kind in ("attn_v", "ffn_down") and place is not None and _more_bits(*place):
        return Q6_K
    return default


# ---- the checkpoint's tensors, quantized ---------------------------------------------------------
def quantize_to_blocks(tensors: Iterable[tuple[str, object]], types: dict[str, int | None], strides: dict[str, int],
                       dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """A checkpoint's tensors with each weight named in `types` quantized: as its blocks, rows padded to
    `strides[name]` bytes, where a block layer holds it (quantized when loaded, into the layer's weight);
    else dequantized back to `dtype`."""
    for name, ref in tensors:
        weight = _EXPERT.sub(".experts.", name)  # one expert's matrix is quantized as its stack's
        ggml_type = types.get(weight)
        if ggml_type is None:
            yield name, ref
        elif weight in strides:
            yield name, _Blocks(ref, ggml_type, strides[weight])
        else:
            yield name, dequantize_blocks(_Blocks(ref, ggml_type).load().numpy(), ggml_type).to(dtype)


class _Blocks:
    """A float weight's rows as `ggml_type` blocks (uint8 [rows, stride or the row's bytes]), quantized when
    loaded, a chunk of rows at a time: straight into the parameter's rows (``load_into``, as a file's tensor
    reads itself into place: lmgen/loader/checkpoint.py), or into a tensor of its own (``load``)."""

    def __init__(self, ref: object, ggml_type: int, stride: int = 0) -> None:
        rows, self.columns = ref.shape
        values, nbytes = BLOCK_SIZES[ggml_type]
        self.ref, self.ggml_type, self.row_bytes = ref, ggml_type, self.columns // values * nbytes
        self.shape = (rows, stride or self.row_bytes)

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.uint8)
        self.load_into(out)
        return out

    def load_into(self, out: torch.Tensor) -> None:
        out[:, self.row_bytes:] = 0  # the rows' padding
        step = max(1, _ROWS_PER_CHUNK_VALUES // self.columns)
        chunks = self.ref.split(step) if isinstance(self.ref, torch.Tensor) else self.ref.row_chunks(step)
        first = 0
        for chunk in chunks:
            quantize_blocks(chunk, self.ggml_type, out[first:first + len(chunk)])
            first += len(chunk)
