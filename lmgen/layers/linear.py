"""Linear layers, including the fused ones that hold several checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Linear):
    """One matmul standing for several checkpoint linears stacked on the output dim.

    q/k/v and gate/up projections are loaded into row slices of one weight, so a
    layer runs one GEMM instead of three (or two). ``shard(param, i)`` is the view
    that checkpoint tensor ``i`` is loaded into.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.shard_sizes[:index])
        return param.narrow(0, start, self.shard_sizes[index])


class SiluAndMul(nn.Module):
    """SwiGLU's activation on a fused gate/up projection: silu(gate) * up."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up
