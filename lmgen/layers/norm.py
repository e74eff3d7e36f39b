"""RMS normalisation, computed in float32 exactly as transformers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmgen import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)  # loaded from the checkpoint
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual): the layer's residual add
        and the next norm in one call, as vLLM fuses them."""
        if kernels.serve(x.device) and x.dtype == self.weight.dtype:
            if residual is None:
                return torch.ops.lmgen.rms_norm(x, self.weight, self.eps)  # one call instead of ten
            return torch.ops.lmgen.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._normalise(x)
        x = x + residual
        return self._normalise(x), x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back before the weight: transformers' order, which
        # matters for parity in half precision.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)
