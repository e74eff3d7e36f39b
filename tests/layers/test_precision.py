"""Half precision on CPUs without half-precision units: the float32 paths agree with the plain ones."""

import pytest
import torch
import torch.nn.functional as F

from lmgen.layers.linear import linear
from lmgen.layers.precision import compute_dtype, native_on_cpu


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_linear_matches_float32_math_rounded_to_bfloat16(rows):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(rows, 64).bfloat16(), torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16()
    expected = F.linear(x.float(), weight.float(), bias.float())
    got = linear(x, weight, bias)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_compute_dtype():
    cpu = torch.device("cpu")
    assert compute_dtype(torch.float32, cpu) == torch.float32
    expected = torch.bfloat16 if native_on_cpu(torch.bfloat16) else torch.float32
    assert compute_dtype(torch.bfloat16, cpu) == expected
    assert compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
