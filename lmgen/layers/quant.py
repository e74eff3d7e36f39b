"""Weight-only quantization: int8 per output channel, int4 per group of input columns.

Weights stay integers in memory and CPU kernels read them directly: lmgen's own, for
products of any number of rows (``lmgen.kernels``: decode and prefill), else PyTorch's
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``, bfloat16 activations, their
fast path) where that beats dequantizing for a float GEMM. On a GPU int4 runs on PyTorch's
CUDA kernel (``_weight_int4pack_mm``, tinygemm); int8 there dequantizes each weight for its
matmul, which measured faster than PyTorch's CUDA ``_weight_int8pack_mm`` (224 vs 156
tokens/s at batch 1 on an H200), as do other devices: correct, not fast.

A quantized weight has a *storage form*, the same on every machine, which checkpoints
hold and loading fills (for the row ``n`` of a weight [N, K]):

- int8: ``weight`` int8 [N, K], ``scales`` [N]:  w = q * scale[n]
- int4: ``weight`` uint8 [N, K/2], two columns per byte (column 2j in the low nibble),
  ``scales`` and ``zeros`` [N, K/group_size]:  w = (q - 8) * scale[n, g] + zero[n, g]

lmgen's int8 kernel reads the storage form as it is; its int4 kernel works on 8 rows at
once and wants their 8-column chunks side by side, 4 bytes a row holding its columns j
(low nibble) and j + 4 (high), and their group scales and zeros likewise
(``interleave_int4``): one load and two masks give 4 columns of all 8 rows, so each
product lands one row per lane (no horizontal sums), the 8 rows are one stream, and a
group's 8 scales are one vector. PyTorch's int4 kernel wants its own layout, which
depends on the CPU's vector width. ``Int4Linear.pack`` rearranges the storage form for
whichever kernel will read it, once the weights are in; checkpoints are written from the
storage form. The LM head and the embedding table (one tensor when tied) are int8 in
both methods: rows of the table must be gathered, and the head's quality matters most.

Loading quantizes each tensor as it is read (``quantize_tensors``), so the
full-precision model never exists in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmgen import kernels
from lmgen.errors import InvalidArgumentError, UnsupportedModelError
from lmgen.layers.ggml import GGMLLinear
from lmgen.layers.linear import Embedding, KernelOperands, Linear
from lmgen.layers.precision import native_on_cpu

if TYPE_CHECKING:
    from lmgen.loader.checkpoint import TensorRef

#: lmgen's own int8/int4, then llama.cpp's recipes of GGUF blocks applied while loading (lmgen/layers/ggml_recipes.py)
SAVED_METHODS = ("int8", "int4")
QUANTIZATION_METHODS = (*SAVED_METHODS, "q4_k_m", "q6_k", "q8_0")
#: The group sizes PyTorch's int4 kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 64
#: lmgen's int4 kernel works on this many weight rows at once, in chunks of this many columns (their
#: layout: interleave_int4).
INT4_KERNEL_ROWS, INT4_KERNEL_COLUMNS = 8, 8
#: ``quantization_config.quant_method`` of the checkpoints lmgen writes.
CHECKPOINT_QUANT_METHOD = "lmgen"
CHECKPOINT_FORMAT_VERSION = 1

_HEAD_MODULES = ("embed_tokens", "lm_head")
# GPT-2's learned positions (small, and added, not gathered) and MoE routers, which choose the experts
_FULL_PRECISION_MODULES = ("embed_positions", "router", "shared_expert_gate")
_STORAGE_NAMES = {"int8": ("weight", "scales"), "int4": ("weight", "scales", "zeros")}
_SCALE_DTYPE = torch.bfloat16  # what the kernels take with bfloat16 activations
_MIN_SCALE = 1e-12  # keeps an all-zero row or group from dividing by zero
# Quantizing works in float32 on this many weights at a time, so a large embedding
# table does not need several float32 copies of itself.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class QuantConfig:
    """How a model's weights are quantized; saved as config.json's ``quantization_config``."""

    method: str  # a QUANTIZATION_METHODS entry
    group_size: int = DEFAULT_GROUP_SIZE  # int4: input columns sharing one scale and zero
    lm_head: bool = True  # also the LM head and the embedding table (int8 per row)

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise InvalidArgumentError(
                f"quantization {self.method!r} is not supported; use one of: {', '.join(QUANTIZATION_METHODS)}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise InvalidArgumentError(f"int4 group size {self.group_size!r} is not supported; use one of: "
                                       f"{', '.join(map(str, INT4_GROUP_SIZES))}")

    def method_for(self, name: str, ndim: int) -> str | None:
        """How checkpoint tensor `name` is stored: int8/int4, or None for full precision.

        In the supported families every 2-D ``*.weight`` (lmgen's names) belongs to a linear layer (one
        expert's, in a MoE), except the embedding tables and the routers.
        """
        if ndim != 2 or not name.endswith(".weight") or name.split(".")[-2] in _FULL_PRECISION_MODULES:
            return None
        if name.split(".")[-2] in _HEAD_MODULES:
            return "int8" if self.lm_head else None
        return self.method

    def to_hf(self) -> dict:
        return {"quant_method": CHECKPOINT_QUANT_METHOD, "format_version": CHECKPOINT_FORMAT_VERSION,
                "method": self.method, "group_size": self.group_size, "lm_head": self.lm_head}

    @classmethod
    def from_hf(cls, hf_config: dict) -> "QuantConfig | None":
        """The quantization a checkpoint's weights were saved with (None: full precision)."""
        saved = hf_config.get("quantization_config")
        if saved is None:
            return None
        method = saved.get("quant_method")
        if method == "mxfp4":  # GPT-OSS's experts: its family dequantizes them while loading (models/gpt_oss.py)
            return None
        if method != CHECKPOINT_QUANT_METHOD or saved.get("method") not in SAVED_METHODS:
            name = saved.get("method") if method == CHECKPOINT_QUANT_METHOD else method
            raise UnsupportedModelError(
                f"the checkpoint is quantized with {name!r}, which lmgen cannot load: it reads its own int8/int4 "
                "checkpoints (`lmgen quantize`); load the full-precision model with quantization='int8' or 'int4'")
        if saved.get("format_version", 1) > CHECKPOINT_FORMAT_VERSION:
            raise UnsupportedModelError(f"the checkpoint's quantized format {saved['format_version']} is newer "
                                        "than this lmgen reads: upgrade lmgen")
        return cls(saved["method"], saved.get("group_size", DEFAULT_GROUP_SIZE), saved.get("lm_head", True))


def resolve_quantization(requested: QuantConfig | None, saved: QuantConfig | None,
                         group_size_given: bool) -> QuantConfig | None:
    """The quantization to load with: a quantized checkpoint's own, which a request may only repeat."""
    if saved is None or requested is None:
        return saved or requested
    other_group_size = group_size_given and saved.method == "int4" and requested.group_size != saved.group_size
    if requested.method != saved.method or other_group_size:
        raise InvalidArgumentError(
            f"the checkpoint is already quantized ({saved.method}, group size {saved.group_size}) and cannot be "
            f"requantized: drop the quantization arguments, or quantize the full-precision checkpoint")
    return saved


# ---- quantizing tensors ------------------------------------------------------------------
def check_group_size(layer: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        fitting = [str(g) for g in INT4_GROUP_SIZES if in_features % g == 0]
        fix = (f"use group size {' or '.join(fitting)}" if fitting else "use int8 for this model")
        raise InvalidArgumentError(
            f"int4 group size {group_size} does not divide the {in_features} input features of {layer}: {fix}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ≈ q * scale[:, None], |error| <= scale / 2 (plus the scale's rounding)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=_MIN_SCALE).to(_SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` columns: 16 levels from the group's min to its max.

    Returns (nibbles uint8 [N, K/2], scales [N, K/group_size], zeros [N, K/group_size]).
    """
    rows, cols = weight.shape
    w = weight.float().view(rows, cols // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=_MIN_SCALE).to(_SCALE_DTYPE)
    zeros = (low + 8 * scales.float()).to(_SCALE_DTYPE)  # the value of level 8
    levels = (w - zeros.float()[..., None]) / scales.float()[..., None] + 8
    q = levels.round_().clamp_(0, 15).to(torch.uint8).view(rows, cols)
    return pack_int4(q), scales, zeros


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """levels uint8 [N, K] -> the storage form's uint8 [N, K/2], column 2j in the low nibble of byte j."""
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def unpack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] two levels per byte -> levels uint8 [N, K]."""
    return torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).view(nibbles.shape[0], -1)


def interleave_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Storage form -> lmgen's int4 kernel layout (same shapes; N a multiple of 8). Each row's 8-column
    chunks become 4 bytes, byte j holding the chunk's column j (low nibble) and j + 4 (high); in each
    group of 8 rows, chunk c of rows 0-7 (32 bytes) comes before chunk c + 1; the 8 rows' scales (and
    zeros) of group g lie side by side likewise."""
    rows = nibbles.shape[0]
    halves = unpack_int4(nibbles).view(rows, -1, 2, INT4_KERNEL_COLUMNS // 2)
    chunks = (halves[:, :, 0] | (halves[:, :, 1] << 4)).view(rows, -1)
    return (_interleave_rows(chunks, INT4_KERNEL_COLUMNS // 2), _interleave_rows(scales, 1),
            _interleave_rows(zeros, 1))


def deinterleave_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lmgen's int4 kernel layout -> the storage form (interleave_int4 undone)."""
    rows = nibbles.shape[0]
    chunks = _deinterleave_rows(nibbles, INT4_KERNEL_COLUMNS // 2).view(rows, -1, 1, INT4_KERNEL_COLUMNS // 2)
    levels = torch.cat([chunks & 0xF, chunks >> 4], dim=2).view(rows, -1)
    return pack_int4(levels), _deinterleave_rows(scales, 1), _deinterleave_rows(zeros, 1)


def _interleave_rows(t: torch.Tensor, unit: int) -> torch.Tensor:
    rows, width = t.shape
    units = t.view(rows // INT4_KERNEL_ROWS, INT4_KERNEL_ROWS, width // unit, unit)
    return units.transpose(1, 2).contiguous().view(rows, width)


def _deinterleave_rows(t: torch.Tensor, unit: int) -> torch.Tensor:
    rows, width = t.shape
    units = t.view(rows // INT4_KERNEL_ROWS, width // unit, INT4_KERNEL_ROWS, unit)
    return units.transpose(1, 2).contiguous().view(rows, width)


def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] that int4 storage stands for."""
    rows, groups = scales.shape
    grouped = unpack_int4(nibbles).float().view(rows, groups, -1) - 8
    return (grouped * scales.float()[..., None] + zeros.float()[..., None]).view(rows, -1)


def quantize_weight(weight: torch.Tensor | TensorRef, method: str, group_size: int = DEFAULT_GROUP_SIZE
                    ) -> dict[str, torch.Tensor]:
    """The storage-form tensors of one float weight [N, K], by name ("weight", "scales", ...); a file's
    tensor (TensorRef, GGUFTensor) is read a chunk of rows at a time."""
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // weight.shape[1])
    parts = weight.split(rows_per_chunk) if isinstance(weight, torch.Tensor) else weight.row_chunks(rows_per_chunk)
    chunks = [quantize_int8(part) if method == "int8" else quantize_int4(part, group_size) for part in parts]
    return {name: torch.cat(parts) for name, parts in zip(_STORAGE_NAMES[method], zip(*chunks))}


def quantize_tensors(tensors: Iterable[tuple[str, TensorRef | torch.Tensor]], config: QuantConfig
                     ) -> Iterator[tuple[str, TensorRef | torch.Tensor]]:
    """A checkpoint's tensors with every weight to quantize replaced by its storage form, one at a time."""
    for name, ref in tensors:
        method = config.method_for(name, len(ref.shape))
        if method is None:
            yield name, ref
            continue
        prefix = name.removesuffix("weight")
        if method == "int4":
            check_group_size(prefix.rstrip("."), ref.shape[1], config.group_size)
        for storage_name, tensor in quantize_weight(ref, method, config.group_size).items():
            yield prefix + storage_name, tensor


# ---- quantized modules -------------------------------------------------------------------
def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantizedLinear(nn.Module):
    """A linear layer over quantized weights; loading fills its storage-form parameters.

    Keeps the float layer's bias and ``shard_sizes`` (fused q/k/v, gate/up), so a
    checkpoint's split tensors load into row slices as they do for float weights. A stack of
    experts' linears (lmgen.layers.moe.ExpertLinear, weight [E, out, in]) keeps its leading
    dimension (``stack``) on every storage tensor; each expert runs as ``moe.expert_view``.
    """

    method: str  # the storage form's QUANTIZATION_METHODS entry
    kernel_max_rows = math.inf  # from this many rows on, dequantizing and a float GEMM are faster
    lmgen_layout = True  # the weight is laid out as lmgen's kernels read it

    def __init__(self, linear: Linear | Embedding) -> None:
        super().__init__()
        *self.stack, self.out_features, self.in_features = linear.weight.shape
        self.bias = getattr(linear, "bias", None)
        self.shard_sizes = getattr(linear, "shard_sizes", None)
        self.use_kernel = linear.weight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.lmgen_layout and kernels.fits(self.in_features, rows.device):
            out = self._lmgen_kernel(rows)
        elif self.use_kernel and rows.shape[0] < self.kernel_max_rows:
            out = self._kernel(rows.to(torch.bfloat16)).to(x.dtype)
        else:  # on a CPU in float32, whose GEMM is the fast one there without bf16 units
            dtype = torch.float32 if rows.device.type == "cpu" else x.dtype
            out = F.linear(rows.to(dtype), self._dequantized().to(dtype)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def kernel_operands(self) -> KernelOperands | None:
        """(weight, scales, zeros, bias) as lmgen's product kernels read them, or None where they cannot."""
        if not self.lmgen_layout or self.in_features % kernels.COLUMN_MULTIPLE:
            return None
        return self.weight, self.scales, getattr(self, "zeros", None), self.bias

    def _lmgen_kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [M, K] -> [M, N] in their dtype, on lmgen's kernel for the storage form."""
        raise NotImplementedError

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """bfloat16 rows [M, K] -> [M, N] on PyTorch's kernel."""
        raise NotImplementedError

    def _dequantized(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features], from the storage form."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weight [N, K] with one scale per output row; the storage form is the kernel's."""

    method = "int8"
    # Without bf16 units the int8 kernel costs about twice float32's GEMM per row from
    # 96 rows on (prefill; measured on bench-125m's shapes, AVX2), while dequantizing
    # costs one pass over the weight.
    kernel_max_rows = math.inf if native_on_cpu(torch.bfloat16) else 96

    def __init__(self, linear: Linear | Embedding) -> None:
        super().__init__(linear)
        rows, device = (*self.stack, self.out_features), linear.weight.device
        self.weight = _empty((*rows, self.in_features), torch.int8, device)
        self.scales = _empty(rows, _SCALE_DTYPE, device)

    def _lmgen_kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmgen.gemv_int8(rows, self.weight, self.scales)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.weight, self.scales)

    def _dequantized(self) -> torch.Tensor:
        if kernels.serve(self.weight.device):
            return torch.ops.lmgen.dequantize_int8(self.weight, self.scales)
        return self.weight.float() * self.scales.float()[:, None]


class Int8Embedding(Int8Linear):
    """An int8 embedding table; as a tied LM head (``unembed``) it is an Int8Linear."""

    def __init__(self, embedding: Embedding) -> None:
        super().__init__(embedding)
        self.out_dtype = embedding.weight.dtype  # the model's activations

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids] * self.scales[ids, None].to(self.out_dtype)  # int8 * float: promoted, one rounding

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (the tied LM head)."""
        return Int8Linear.forward(self, hidden)


class Int4Linear(QuantizedLinear):
    """int4 weight with a scale and zero per group of input columns (see the module docstring)."""

    method = "int4"
    # PyTorch's kernels take output sizes that are multiples of 16 (its CUDA one 8, but one rule
    # serves both), lmgen's multiples of 8 (INT4_KERNEL_ROWS); other layers dequantize.
    _KERNEL_ROW_MULTIPLE = 16
    lmgen_layout = False  # until pack() interleaves the storage form

    def __init__(self, linear: Linear, group_size: int) -> None:
        super().__init__(linear)
        self.group_size = group_size
        rows, device = (*self.stack, self.out_features), linear.weight.device
        self.weight = _empty((*rows, self.in_features // 2), torch.uint8, device)
        self.scales = _empty((*rows, self.in_features // group_size), _SCALE_DTYPE, device)
        self.zeros = _empty((*rows, self.in_features // group_size), _SCALE_DTYPE, device)
        # PyTorch's layouts are per weight: a stack of experts without lmgen's kernels dequantizes
        self.use_kernel = not self.stack and self.out_features % self._KERNEL_ROW_MULTIPLE == 0 and (
            self.use_kernel or device.type == "cuda" and _inner_k_tiles(self.in_features) > 0)

    def pack(self, laid_out: bool = False) -> None:
        """Lay the storage form out for the kernel that will read it (as many bytes, another order).

        With lmgen's kernels, where the shape fits them: ``interleave_int4``'s layout, in the
        tensors' own memory, which their products of any number of rows read (`laid_out`: the storage
        holds that layout already, mapped from a file of packed weights: lmgen/loader/mapped.py). Else
        PyTorch's layout for the device (its CPU one depends on the vector width; its CUDA one,
        tinygemm's, on the tiles of K it reads at once).
        """
        if kernels.serve(self.weight.device) and self.out_features % INT4_KERNEL_ROWS == 0:
            # one weight, or each of a stack's (experts), interleaved in place
            if not laid_out:
                storage = [t.data.view(-1, *t.shape[-2:]) for t in (self.weight, self.scales, self.zeros)]
                for weights in zip(*storage):
                    for tensor, interleaved in zip(weights, interleave_int4(*weights)):
                        tensor.copy_(interleaved)
            self.lmgen_layout, self.use_kernel = True, False
            return
        if not self.use_kernel:
            return
        if self.weight.device.type == "cuda":  # tinygemm wants column 2j in the high nibble
            nibbles = self.weight.data
            packed = torch.ops.aten._convert_weight_to_int4pack((nibbles << 4) | (nibbles >> 4),
                                                                _inner_k_tiles(self.in_features))
        else:
            levels = unpack_int4(self.weight.data).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)  # innerKTiles: unused on CPU
        self.packed_weight = nn.Parameter(packed, requires_grad=False)
        # [K/group_size, N, 2]: the kernels' layout of scales and zeros
        pairs = torch.stack([self.scales.data, self.zeros.data], dim=-1).transpose(0, 1).contiguous()
        self.scales_and_zeros = nn.Parameter(pairs, requires_grad=False)
        del self.weight, self.scales, self.zeros

    def _lmgen_kernel(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.lmgen.gemv_int4(rows, self.weight, self.scales, self.zeros)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        product = torch._weight_int4pack_mm if rows.device.type == "cuda" else torch._weight_int4pack_mm_for_cpu
        return product(rows, self.packed_weight, self.group_size, self.scales_and_zeros)

    def _dequantized(self) -> torch.Tensor:
        if self.lmgen_layout:
            return torch.ops.lmgen.dequantize_int4(self.weight, self.scales, self.zeros)
        return dequantize_int4(self.weight, self.scales, self.zeros)


def _inner_k_tiles(in_features: int) -> int:
    """The most tiles of 16 columns (2, 4 or 8) that PyTorch's CUDA int4 kernel can read at once from
    rows of this width; 0 if it cannot take them."""
    return next((tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0), 0)


# ---- the model -------------------------------------------------------------------------
def _quantized_module(name: str, module: Linear | Embedding, method: str, config: QuantConfig) -> nn.Module:
    if isinstance(module, Embedding):
        return Int8Embedding(module)
    if method == "int8":
        return Int8Linear(module)
    check_group_size(name, module.in_features, config.group_size)
    return Int4Linear(module, config.group_size)


def prepare_quantized(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """Swap each linear (and the embedding, with ``config.lm_head``) for an empty quantized module.

    Call before loading: the float parameters it drops were never written, so they
    never took up memory. Loading then fills the storage forms and ``pack_quantized``
    ends. Returns the (name, float module) pairs it replaced.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, (Linear, Embedding)):
            method = config.method_for(f"{name}.weight", 2)
            if method is not None:
                model.set_submodule(name, _quantized_module(name, module, method, config))
                replaced.append((name, module))
    return replaced


def pack_quantized(model: nn.Module, laid_out: bool = False) -> None:
    """Rearrange every loaded int4 layer and GGUF block layer for its kernel (`laid_out`: only mark them so, see
    Int4Linear.pack and GGMLLinear.pack)."""
    for module in model.modules():
        if isinstance(module, (Int4Linear, GGMLLinear)):
            module.pack(laid_out)


def quantize_model(model: nn.Module, config: QuantConfig) -> None:
    """Quantize an already loaded float model in place (loading a checkpoint quantizes on the way in)."""
    for name, float_module in prepare_quantized(model, config):
        quantized = model.get_submodule(name)
        weight = float_module.weight.data
        for index, one in enumerate(weight.view(-1, *weight.shape[-2:])):  # the weight, or each expert's of a stack
            for storage_name, tensor in quantize_weight(one, quantized.method, config.group_size).items():
                storage = getattr(quantized, storage_name).data
                storage.view(-1, *storage.shape[len(quantized.stack):])[index].copy_(tensor)
    pack_quantized(model)
