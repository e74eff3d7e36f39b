"""Float weights quantized into GGUF block formats, as llama.cpp's reference quantizers do.

``quantize_blocks`` writes a weight's rows as the blocks llama.cpp's ``llama-quantize`` writes for the
same float tensor (without an importance matrix): the same bytes, so that a checkpoint quantized while
loading (``quantization="q4_k_m"``: lmgen/layers/ggml_recipes.py) runs the weights a GGUF file made
from it would hold. The quantizers are C++ beside lmgen's block kernels (lmgen/kernels/ggml_quantize.cpp:
llama.cpp's searches, its float32 rounding step by step, rows on all threads), so they run where those
kernels are built; elsewhere (no AVX2, no compiler, ``LMGEN_CPU_KERNELS=0``) quantizing is refused.
"""

from __future__ import annotations

import torch

from lmgen import kernels
from lmgen.errors import InvalidArgumentError

Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 6, 7, 8, 12, 13, 14
#: ggml type -> (values, bytes) of its block
BLOCK_SIZES = {Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


def require_quantizers(asked: str) -> None:
    """Raise a clear error, naming what was `asked`, unless lmgen's kernels (which hold the quantizers) run here."""
    if not kernels.load():
        why = kernels.why_not.partition("\n")[0]  # a failed build's first line; the log has the compiler's output
        raise InvalidArgumentError(f"{asked} needs lmgen's CPU kernels (they hold llama.cpp's quantizers), which "
                                   f"are off here ({why}); use 'int4' or 'int8'")


def quantize_blocks(weight: torch.Tensor, ggml_type: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """A float weight [N, K] -> its rows as `ggml_type` blocks, uint8 [N, K / values * bytes]; written into the
    first bytes of each row of `out` if given (uint8 [N, at least that]: a padded row's padding is left)."""
    require_quantizers(f"quantizing to ggml type {ggml_type}")
    if out is None:
        values, nbytes = BLOCK_SIZES[ggml_type]
        out = torch.empty(len(weight), weight.shape[-1] // values * nbytes, dtype=torch.uint8)
    torch.ops.lmgen.quantize_blocks(weight, ggml_type, out)
    return out
