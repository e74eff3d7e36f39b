"""llama.cpp's quantization recipes (``q4_k_m``, ``q6_k``, ``q8_0``) applied to a float checkpoint while it loads.

``LLM(folder, quantization="q4_k_m")`` gives each weight the GGUF block type ``llama-quantize`` would give it
(``recipe_types``), quantizes it as llama.cpp does (lmgen/layers/ggml_quant.py) and keeps the blocks
for lmgen's block kernels (lmgen/layers/ggml.py), exactly as if a Q4_K_M file made from the checkpoint
had been loaded. Q4_K_M is Q4_K, with more bits where quantizing hurts most: Q6_K for the LM head (or the
tied embedding), for attn_v and ffn_down in the first and last eighths of the layers and every third
between; and since Q4_K and Q6_K need rows of 256 values, Q5_0 and Q8_0 stand in for them on narrower
rows (Qwen2.5-0.5B's 896: there Q4_K_M is mostly Q5_0). The layers are counted in order, as
llama.cpp 0.3 counts them (older ones counted in the file's order, which put ``blk.10`` before ``blk.2``).

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

from lmgen.errors import InvalidArgumentError
from lmgen.layers.ggml import dequantize_blocks, weight_tensors
from lmgen.layers.ggml_quant import (BLOCK_SIZES, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, quantize_blocks,
                                     require_quantizers)
from lmgen.layers.moe import ExpertLinear

#: method -> the type of the tensors its rules do not single out
RECIPES = {"q4_k_m": Q4_K, "q6_k": Q6_K, "q8_0": Q8_0}
# the type llama.cpp takes for rows that are no whole blocks of the one chosen (none: kept in float)
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROWS_PER_CHUNK_VALUES = 1 << 22


def recipe_types(model: nn.Module, method: str, lm_head: bool) -> dict[str, int | None]:
    """The ggml type of each checkpoint weight (lmgen's names) that `method` quantizes; None: kept in float.
    Refuses, before anything is built, where the quantizers cannot run."""
    require_quantizers(f"quantization {method!r}")
    if any(isinstance(m, ExpertLinear) for m in model.modules()):
        raise InvalidArgumentError(f"quantization {method!r} runs dense models; for a mixture of experts use "
                                   "'int4' or 'int8'")
    tied = getattr(model, "lm_head", None) is None
    weights = {t: module.weight.shape[1] for _, module, tensors in weight_tensors(model) for t in tensors
               if _quantized(t, lm_head)}
    order = {kind: _places([t for t in weights if _kind(t) == kind]) for kind in ("attn_v", "ffn_down")}
    types = {}
    for name, columns in weights.items():
        chosen = _llama_type(method, _kind(name), order.get(_kind(name), {}).get(name), columns, tied)
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
    """llama.cpp's category of a tensor, as far as its recipes tell them apart."""
    module = name.split(".")[-2]
    return {"v_proj": "attn_v", "qkv_proj": "attn_v", "down_proj": "ffn_down", "lm_head": "output",
            "embed_tokens": "token_embd"}.get(module, "other")


def _places(names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (its place, how many): llama.cpp counts a kind's tensors in the order of their layers."""
    ordered = sorted(names, key=lambda n: int(_LAYER.match(n)[1]))
    return {name: (i, len(ordered)) for i, name in enumerate(ordered)}


def _more_bits(place: int, count: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighths of the layers, and every third between."""
    return place < count // 8 or place >= 7 * count // 8 or (place - count // 8) % 3 == 2


def _llama_type(method: str, kind: str, place: tuple[int, int] | None, columns: int, tied: bool) -> int:
    """llama.cpp's choice for one tensor (llama_tensor_get_type, before the fallback for narrow rows)."""
    default = RECIPES[method]
    if kind == "output" or (kind == "token_embd" and tied):  # the tied embedding is the LM head
        return Q8_0 if columns % BLOCK_SIZES[default][0] or default == Q8_0 else Q6_K
    if method == "q4_k_m" and kind in ("attn_v", "ffn_down") and place is not None and _more_bits(*place):
        return Q6_K
    return default


# ---- the checkpoint's tensors, quantized ---------------------------------------------------------
def quantize_to_blocks(tensors: Iterable[tuple[str, object]], types: dict[str, int | None], strides: dict[str, int],
                       dtype: torch.dtype) -> Iterator[tuple[str, object]]:
    """A checkpoint's tensors with each weight named in `types` quantized: as its blocks, rows padded to
    `strides[name]` bytes, where a block layer holds it; else dequantized back to `dtype`."""
    for name, ref in tensors:
        ggml_type = types.get(name)
        if ggml_type is None:
            yield name, ref
        elif name in strides:
            yield name, _blocks(ref, ggml_type, strides[name])
        else:
            yield name, dequantize_blocks(_blocks(ref, ggml_type, 0).numpy(), ggml_type).to(dtype)


def _blocks(ref: object, ggml_type: int, stride: int) -> torch.Tensor:
    """The weight's rows as `ggml_type` blocks (uint8 [rows, stride or the row's bytes]), read a chunk of rows
    at a time."""
    rows, columns = ref.shape
    values, nbytes = BLOCK_SIZES[ggml_type]
    row_bytes = columns // values * nbytes
    out = torch.empty(rows, stride or row_bytes, dtype=torch.uint8)
    out[:, row_bytes:] = 0  # the rows' padding
    step = max(1, _ROWS_PER_CHUNK_VALUES // columns)
    chunks = ref.split(step) if isinstance(ref, torch.Tensor) else ref.row_chunks(step)
    first = 0
    for chunk in chunks:
        quantize_blocks(chunk, ggml_type, out[first:first + len(chunk)])
        first += len(chunk)
    return out
