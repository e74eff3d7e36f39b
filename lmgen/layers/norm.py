"""The normalisations of the supported families, each computed as transformers computes it.

One module serves them all; what differs is data (``NormKind``), which the one-call decode
step (``torch.ops.lmgen.decode_layers``) reads too:

- ``RMS``: Llama's RMS norm (and Qwen, Mistral, Phi-3, Granite, SmolLM3): the row normalised in
  float32, rounded to the activations' dtype, then times the weight (rounding again);
- ``RMS_GAIN_IN_FLOAT``: Gemma's and OLMo 2's: the normalised row times ``weight + offset`` in
  float32, rounded once (Gemma stores w for a gain of 1 + w: offset 1);
- ``LAYER``: LayerNorm with a bias (GPT-2).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from lmgen import kernels


class NormKind(enum.IntEnum):  # the values are the kernels' (cpu.cpp: NormKind)
    RMS = 0
    RMS_GAIN_IN_FLOAT = 1
    LAYER = 2


class Norm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, kind: NormKind = NormKind.RMS, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)  # loaded from the checkpoint
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if kind == NormKind.LAYER else None
        self.eps, self.kind, self.offset = eps, kind, offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual): the layer's residual add
        and the next norm in one call, as vLLM fuses them."""
        if kernels.serve(x.device) and x.dtype == self.weight.dtype:
            if residual is None:  # one call instead of ten
                return torch.ops.lmgen.norm(x, self.weight, self.bias, int(self.kind), self.eps, self.offset)
            return torch.ops.lmgen.add_norm(x, residual, self.weight, self.bias, int(self.kind), self.eps, self.offset)
        if residual is None:
            return self._normalise(x)
        x = x + residual
        return self._normalise(x), x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == NormKind.LAYER:
            return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        if self.kind == NormKind.RMS_GAIN_IN_FLOAT:
            return (normed * (self.weight.float() + self.offset)).to(x.dtype)
        # Llama's order: cast back before the weight, which matters for parity in half precision
        return self.weight * normed.to(x.dtype)
