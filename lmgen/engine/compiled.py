"""The decode step through torch.compile (Inductor): fused kernels in place of a dozen
dispatched ops per layer, which on a CPU cost more than the batch-1 matmuls they surround.

Where lmgen's CPU kernels run a decode step's layers in one call (any batch on an AVX2 CPU,
see ``TransformerForCausalLM.one_call_layers``) that call is faster, and the runner takes it
instead; this graph serves the other decode steps (no kernels, a GPU). Only steps in which every request decodes one token are compiled; a prefill is
a few big GEMMs, where compiling buys nothing, so it stays on the eager path (the reference the
compiled one is tested against). Sizes that change from step to step (requests in the
batch, KV blocks per request) are marked dynamic, so one graph serves every batch of two
or more rows at any context length; batch 1 gets its own graph, since PyTorch
specializes sizes of 1. Inductor keeps its kernels in an on-disk cache
(TORCHINDUCTOR_CACHE_DIR), so later runs of the same model compile much faster.
"""

from __future__ import annotations

import logging

import torch

from lmgen import kernels
from lmgen.errors import InvalidArgumentError
from lmgen.layers.attention import AttentionMetadata
from lmgen.layers.moe import MoE

logger = logging.getLogger(__name__)


class CompiledDecode:
    """Call like the model's forward, with decode-only metadata."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        if device.type == "cpu":
            _require_cpp_compiler()
        # Rounding each fused intermediate to the storage dtype as eager does keeps half-precision
        # outputs close to the reference path's (and float32 ones identical). The C++ wrapper
        # calls the step's few hundred kernels without Python in between (3 ms less per step
        # on bench-125m).
        options = {"emulate_precision_casts": True, "cpp_wrapper": True}
        for module in model.modules():  # experts are chosen on the host each step: eager, between the graphs
            if isinstance(module, MoE):  # (disabled here, not by a decorator: importing torch._dynamo costs 70 MiB)
                module.forward = torch.compiler.disable(module.forward)
        self._forward = torch.compile(model.forward, dynamic=False, options=options)
        self._seen_shapes: set[bool] = set()
        # a graph cached on disk calls lmgen's ops with the signatures it was compiled against: key it by their source
        self._cache_key_tag = f"lmgen-kernels-{kernels.source_digest()}"

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
                 meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        single = input_ids.shape[0] == 1
        if single not in self._seen_shapes:
            self._seen_shapes.add(single)
            logger.info("compiling the decode step for %s (once per process; Inductor caches it on disk)",
                        "batch 1" if single else "batches of 2 or more")
        for tensor in (input_ids, positions, token_seq_lens, meta.slot_mapping, meta.query_starts, meta.seq_lens,
                       meta.block_tables, *meta.masks.values()):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)  # requests in the batch
        torch._dynamo.maybe_mark_dynamic(meta.block_tables, 1)  # KV blocks of the longest request
        for mask in meta.masks.values():
            torch._dynamo.maybe_mark_dynamic(mask, 3)  # its keys
        with torch.compiler.config.patch(cache_key_tag=self._cache_key_tag):
            return self._forward(input_ids, positions, token_seq_lens, meta, kv_caches)


def _require_cpp_compiler() -> None:
    """Inductor builds C++ kernels on a CPU: fail at load time, not in the first request, if it cannot."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - whatever the reason, the fix is the same
        raise InvalidArgumentError("compile=True needs a C++ compiler for torch.compile on a CPU (g++ or clang++; "
                                   "set CXX to choose one): install one, or load without compile") from exc
