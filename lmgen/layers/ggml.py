"""Linear layers whose weights stay in a GGUF file's block formats (llama.cpp's ggml types).

A Q4_K_M or Q8_0 file runs with exactly the weights llama.cpp runs: loading copies each
tensor's blocks from the file as they are (``GGMLLinear.weight``, uint8 [out, bytes per row]),
and lmgen's kernels (``kernels/ggml_blocks.cpp``) read them in products of a few rows (decode),
rounding the activations to int8 per block of the format (32 values; 256 for the K-quants) as
llama.cpp does. Q4_K, Q5_0, Q6_K and Q8_0 rows are laid out 8 at a time once loaded (``pack``: each
block's 8 rows side by side, which the kernel multiplies at once, up to 2.8x the speed of a row at a
time; Q4_K then takes 148 bytes a row per 256 values, not the file's 144), as llama.cpp's CPU backend
repacks Q4_K. Products of more rows (prefill) run the laid-out parts on the same kernel and dequantize
the others a tile of rows at a time for a float32 GEMM. Without lmgen's
kernels (no compiler, ``LMGEN_CPU_KERNELS=0``, a GPU) or when the caller asks for a dtype or a
quantization, the GGUF loader dequantizes every tensor instead (lmgen/loader/gguf.py).

A fused layer (q/k/v, gate/up) stacks its checkpoint tensors' rows, which GGUF files may store in
different types (Q4_K_M keeps v in Q6_K or Q8_0 beside q and k in Q4_K): each part keeps its type
(``layout``: (type, rows) per part), and rows are as many bytes apart as the widest part's.

A mixture of experts' stacked projection (lmgen.layers.moe.ExpertLinear) keeps its experts' blocks as
the file stores them, weight uint8 [experts, out, bytes per row], one layout for all (a file stores
each projection's experts in one tensor of one type); each chosen expert runs as
``moe.expert_view``, a GGMLLinear over its slice of the stack (no copy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmgen.errors import UnsupportedModelError
from lmgen.layers.linear import Embedding, FusedLinear, KernelOperands, Linear
from lmgen.layers.moe import ExpertLinear

#: ggml type -> (values, bytes) of its block: the types lmgen's kernels read (gguf's GGML_QUANT_SIZES)
BLOCK_FORMATS = {8: (32, 34), 2: (32, 18), 6: (32, 22), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
#: ggml type -> (the type its rows have laid out 8 at a time, bytes a row per block so): kernels/ggml_blocks.cpp
LAID_OUT = {12: (268, 148), 6: (262, 22), 14: (270, 210), 8: (264, 34)}
_LAID_OUT_TYPES = {laid_out for laid_out, _ in LAID_OUT.values()}
#: Up to this many activation rows the block kernels multiply (int8 activations, integer products, the
#: weights read once per row group); more rows dequantize tiles of weight rows for float products,
#: which reuse each tile across all the rows, except rows laid out 8 at a time: their kernel beats a
#: float GEMM at any count (512 rows, 1 thread: Q4_K 2.2x, Q5_0 1.6x, Q6_K 1.3x, Q8_0 1.2-1.4x the speed).
BLOCK_PRODUCT_MAX_ROWS = 64
#: Values per dequantized tile of a prefill product (4 MiB of float32): bounds its transient memory
#: (1 MiB tiles made a 512-token prefill ~10% slower).
_TILE_VALUES = 1 << 20


def dequantize_blocks(blocks: np.ndarray, ggml_type: int) -> torch.Tensor:
    """float32 values of rows of blocks (uint8 [rows, bytes]) of any ggml type: the gguf package's dequantize,
    which knows every type (lmgen's kernels read only the BLOCK_FORMATS)."""
    try:  # an optional extra, as for transformers
        import gguf
    except ImportError:
        raise UnsupportedModelError('GGUF blocks are dequantized with the gguf package (llama.cpp\'s): pip install '
                                    '"lmgen[gguf]" (in a source checkout: pip install -e ".[gguf]")') from None
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(ggml_type)))


def row_bytes(ggml_type: int, in_features: int, laid_out: bool = False) -> int:
    values, nbytes = BLOCK_FORMATS[ggml_type]
    return in_features // values * (LAID_OUT[ggml_type][1] if laid_out else nbytes)


def readable(ggml_type: int, in_features: int) -> bool:
    """Whether lmgen's kernels read rows of `in_features` values stored as `ggml_type`."""
    return ggml_type in BLOCK_FORMATS and in_features % BLOCK_FORMATS[ggml_type][0] == 0


class GGMLLinear(nn.Module):
    """A linear layer over GGUF blocks: one ggml type per part (a fused layer's shards, else one); or a stack
    of experts' (``stack``: [experts], the weight's leading dimension)."""

    lays_out_rows = True  # whether `pack` lays rows out 8 at a time where their type has such a layout

    def __init__(self, linear: Linear | Embedding, types: list[int]) -> None:
        super().__init__()
        *self.stack, self.out_features, self.in_features = linear.weight.shape
        self.shard_sizes = getattr(linear, "shard_sizes", None)  # the loader fills a fused layer's shards
        sizes = self.shard_sizes or [self.out_features]
        self.types = list(types)
        # the parts whose rows `pack` lays out 8 at a time: rows are as many bytes apart as that takes
        self.to_lay_out = [self.lays_out_rows and t in LAID_OUT and rows % 8 == 0 for t, rows in zip(types, sizes)]
        stride = max(row_bytes(t, self.in_features, lay) for t, lay in zip(types, self.to_lay_out))
        self.weight = nn.Parameter(torch.empty(*self.stack, self.out_features, stride, dtype=torch.uint8,
                                               device=linear.weight.device), requires_grad=False)
        self.layout = torch.tensor(list(zip(types, sizes)), dtype=torch.int64)  # what gemv_blocks reads
        self.bias = getattr(linear, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= BLOCK_PRODUCT_MAX_ROWS or all(t in _LAID_OUT_TYPES for t in self.types):
            out = torch.ops.lmgen.gemv_blocks(rows, self.weight, self.layout)
        else:
            out = self._tiled_product(rows.float()).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def pack(self, laid_out: bool = False) -> None:
        """Lay the rows of the parts that have such a layout out 8 at a time, in place, once loaded
        (`laid_out`: the weight, mapped from a file of prepared weights, holds that layout already)."""
        first = 0
        for part, (ggml_type, rows) in enumerate(self.layout.tolist()):
            if self.to_lay_out[part] and ggml_type in LAID_OUT:
                if not laid_out:
                    for weight in self.weight.data.view(-1, *self.weight.shape[-2:]):  # the weight, or each expert's
                        torch.ops.lmgen.pack_blocks(weight[first:first + rows], ggml_type, self.in_features)
                self.types[part] = self.layout[part, 0] = LAID_OUT[ggml_type][0]
            first += rows

    def kernel_operands(self) -> KernelOperands:
        """(blocks, layout, no zeros, bias): cpu.cpp's product() tells blocks by their uint8 and no zeros. A
        stack's layout is the same for each expert (cpu.cpp's expert() takes each operand's slice)."""
        return self.weight, self.layout.expand(*self.stack, *self.layout.shape), None, self.bias

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features]."""
        return torch.cat([torch.ops.lmgen.dequantize_blocks(part, ggml_type, self.in_features)
                          for part, ggml_type in self._parts()])

    def _tiled_product(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows [M, K] -> [M, N]: the parts laid out 8 rows at a time on their kernel, the others
        dequantizing a tile of weight rows at a time."""
        out = rows.new_empty(rows.shape[0], self.out_features)
        first, tile = 0, max(1, _TILE_VALUES // self.in_features)
        for part, ggml_type in self._parts():
            if ggml_type in _LAID_OUT_TYPES:
                out[:, first:first + len(part)] = torch.ops.lmgen.gemv_blocks(rows, part, torch.tensor([[ggml_type, len(part)]]))
                first += len(part)
                continue
            for piece in part.split(tile):
                weight = torch.ops.lmgen.dequantize_blocks(piece, ggml_type, self.in_features)
                torch.mm(rows, weight.t(), out=out[:, first:first + len(piece)])  # no product buffer
                first += len(piece)
        return out

    def _parts(self) -> list[tuple[torch.Tensor, int]]:
        return list(zip(self.weight.split(self.layout[:, 1].tolist()), self.types))


class GGMLEmbedding(GGMLLinear):
    """An embedding table kept as blocks: the rows looked up are dequantized; as a tied LM head
    (``unembed``) it is a GGMLLinear."""

    lays_out_rows = False  # rows are looked up one at a time

    def __init__(self, embedding: Embedding, ggml_type: int) -> None:
        super().__init__(embedding, [ggml_type])
        self.out_dtype = embedding.weight.dtype  # the model's activations

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.lmgen.dequantize_blocks(self.weight[ids.reshape(-1)], self.types[0], self.in_features)
        return rows.to(self.out_dtype).view(*ids.shape, self.in_features)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (the tied LM head)."""
        return GGMLLinear.forward(self, hidden)


def weight_tensors(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(module name, module, the checkpoint tensors its weight is made of) of each embedding table and each
    linear (a fused one's shards in order) and each stack of experts' projections that blocks can hold."""
    fused = {}  # fused module name -> its shards' checkpoint module names, in order
    for part, (module, shard) in getattr(model, "packed_modules", {}).items():
        fused.setdefault(module, {})[shard] = part
    found = []
    for name, module in model.named_modules():
        if type(module) is Embedding:
            found.append((name, module, [f"{name}.weight"]))
        elif type(module) in (Linear, FusedLinear, ExpertLinear):
            parent, _, leaf = name.rpartition(".")
            shards = fused.get(leaf)
            found.append((name, module, [f"{parent}.{shards[i]}.weight" for i in sorted(shards)] if shards
                          else [f"{name}.weight"]))
    return found


def prepare_ggml(model: nn.Module, types: dict[str, int]) -> dict[str, int]:
    """Swap each linear whose file tensors (lmgen name -> ggml type in `types`) lmgen's kernels all read
    for a GGMLLinear; the others load dequantized. Returns the swapped tensors' row strides in bytes
    (lmgen name -> stride), which the GGUF loader copies their blocks into."""
    strides = {}
    for name, module, tensors in weight_tensors(model):
        in_features = module.weight.shape[-1]
        if not all(t in types and readable(types[t], in_features) for t in tensors):
            continue
        swapped = (GGMLEmbedding(module, types[tensors[0]]) if isinstance(module, Embedding)
                   else GGMLLinear(module, [types[t] for t in tensors]))
        model.set_submodule(name, swapped)
        strides.update(dict.fromkeys(tensors, swapped.weight.shape[-1]))
    return strides
