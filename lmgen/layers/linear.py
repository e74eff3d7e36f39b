"""Linear and embedding layers whose parameters are allocated but never initialised.

Checkpoint weights overwrite every parameter, so random initialisation would be
wasted work (and, on the meta device, pulls in heavy imports). Parameters take the
current default device and dtype (see ``lmgen.models.build``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmgen import kernels
from lmgen.errors import UnsupportedModelError
from lmgen.layers.precision import compute_dtype

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: A linear layer as lmgen's kernels take it: (weight, scales, zeros, bias); float weights have
#: no scales, int8 has scales, int4 scales and zeros (see torch.ops.lmgen.decode_layers).
KernelOperands = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

# Without lmgen's kernels: with few rows (small-batch decode) reading half-precision weights wins
# even with PyTorch's slow kernel, since upcasting rewrites every weight each step; from about 16
# rows on (measured on bench-125m, AVX2) the float32 GEMM wins by 3x and more.
_UPCAST_MIN_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: lmgen's kernels where they run, else float32 for many rows where half precision has no
    fast kernel."""
    rows = x.numel() // x.shape[-1]
    if kernels.fits(weight.shape[1], weight.device) and weight.dtype in _KERNEL_DTYPES:
        out = torch.ops.lmgen.gemv(x.reshape(rows, -1), weight).view(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    target = compute_dtype(weight.dtype, weight.device)
    if target != weight.dtype and rows >= _UPCAST_MIN_ROWS:
        out = F.linear(x.to(target), weight.to(target), None if bias is None else bias.to(target))
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def kernel_operands(self) -> KernelOperands | None:
        """(weight, scales, zeros, bias) as lmgen's product kernels read them, or None where they cannot."""
        if self.weight.dtype not in _KERNEL_DTYPES or self.in_features % kernels.COLUMN_MULTIPLE:
            return None
        return self.weight, None, None, self.bias


class FusedLinear(Linear):
    """One matmul standing for several checkpoint linears stacked on the output dim.

    q/k/v and gate/up projections are loaded into row slices of one weight, so a
    layer runs one GEMM instead of three (or two): checkpoint tensor ``i`` fills rows
    ``sum(shard_sizes[:i])`` on, of every parameter (see ``loader.checkpoint.load_weights``).
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> logits [T, vocab] (the tied LM head)."""
        return linear(hidden, self.weight)


class Activation(enum.IntEnum):  # the values are the kernels' (cpu.cpp: ActivationKind)
    SILU = 0
    GELU_TANH = 1  # GELU's tanh approximation (gelu_pytorch_tanh, gelu_new)
    # GPT-OSS's experts, gated only: gate clamped above and up on both sides at `limit`, then
    # (up + 1) * gate * sigmoid(alpha * gate)
    CLAMPED_SWIGLU = 2

    @classmethod
    def from_hf(cls, name: str) -> "Activation":
        """config.json's activation name; others are refused by name."""
        names = {"silu": cls.SILU, "swish": cls.SILU, "gelu_pytorch_tanh": cls.GELU_TANH, "gelu_new": cls.GELU_TANH}
        if name not in names:
            raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(names)}")
        return names[name]


@dataclass(frozen=True)
class SwigluClamp:
    """Activation.CLAMPED_SWIGLU's settings (GPT-OSS's swiglu_alpha and swiglu_limit)."""

    alpha: float
    limit: float

    def __post_init__(self) -> None:
        if not (self.alpha > 0 and self.limit > 0):
            raise UnsupportedModelError(f"clamped SwiGLU: alpha {self.alpha} and limit {self.limit} must be positive")


class MLPActivation(nn.Module):
    """The MLP's activation: gated (SwiGLU, GeGLU) on a fused gate/up projection, act(gate) * up;
    else act(x). The clamped SwiGLU (gated only) takes its settings from `clamp`."""

    def __init__(self, kind: Activation, gated: bool, clamp: SwigluClamp | None = None) -> None:
        super().__init__()
        if (kind == Activation.CLAMPED_SWIGLU) != (clamp is not None) or (clamp is not None and not gated):
            raise UnsupportedModelError("the clamped SwiGLU, and it alone, takes a clamp, and it is gated")
        self.kind, self.gated, self.clamp = kind, gated, clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, limit = (self.clamp.alpha, self.clamp.limit) if self.clamp else (0.0, 0.0)
        if kernels.serve(x.device):
            return torch.ops.lmgen.activation(x, int(self.kind), self.gated, alpha, limit)  # one call instead of four
        gate, up = x.chunk(2, dim=-1) if self.gated else (x, None)
        if self.kind == Activation.CLAMPED_SWIGLU:  # as transformers' GptOssExperts, op for op
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))
        acted = F.silu(gate) if self.kind == Activation.SILU else F.gelu(gate, approximate="tanh")
        return acted if up is None else acted * up
