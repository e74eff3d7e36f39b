"""RMS normalisation, computed in float32 exactly as transformers does."""

import torch
import torch.nn.functional as F
from torch import nn

from lmgen import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)  # loaded from the checkpoint
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.loaded and x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return torch.ops.lmgen.rms_norm(x, self.weight, self.eps)  # one call instead of ten
        # Normalise in float32, cast back before the weight: transformers' order, which
        # matters for parity in half precision.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)
