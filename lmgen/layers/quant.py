"""Weight-only quantization of linear layers (int8, one scale per output channel).

Weights are stored as int8 and read directly by PyTorch's packed-weight kernel, so a
decode step reads a quarter of the float32 bytes (half of bfloat16's); activations
stay in floating point. Quantization replaces each Linear after its weights are
loaded, one layer at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmgen.errors import InvalidArgumentError
from lmgen.layers.linear import Linear

QUANTIZATION_METHODS = ("int8",)


def check_method(method: str | None) -> None:
    if method is not None and method not in QUANTIZATION_METHODS:
        raise InvalidArgumentError(
            f"quantization {method!r} is not supported; use one of: {', '.join(QUANTIZATION_METHODS)}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ≈ q * scale[:, None], |error| <= scale / 2."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, linear: Linear) -> None:
        super().__init__()
        q, scale = quantize_int8(linear.weight.data)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(q, requires_grad=False)
        # The CPU kernel is fast with bfloat16 activations and scales (slow with float32 ones).
        self.scales = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.device.type == "cpu":
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)
        else:
            out = F.linear(rows, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]


def quantize_model(model: nn.Module, method: str) -> None:
    """Replace every Linear of `model` by its quantized form, freeing the float weights as it goes."""
    check_method(method)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, child_name, Int8Linear(child))
