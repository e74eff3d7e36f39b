"""RMS normalisation, computed in float32 exactly as transformers does."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)  # loaded from the checkpoint
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upcast for the statistics, cast back before the weight: transformers' order,
        # which matters for bit-level parity in half precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
