"""GptOssForCausalLM: a mixture of experts in every layer (top-4 of a biased router, the softmax over the four
chosen logits), experts with biases and a clamped SwiGLU, attention with q/k/v/o biases and a learned sink
logit per head, sliding-window and full layers alternating (``layer_types``), YaRN rope, RMS norms whose gain
is applied in float32.

Its checkpoints store each layer's experts as whole stacks, [in, out] per expert, with gate and up
interleaved (gate in even columns, up in odd ones); OpenAI's release stores them in MXFP4 (``*_blocks``: two
4-bit E2M1 values a byte, 32 to a block; ``*_scales``: a power-of-two exponent per block, biased by 127), which
are dequantized here while loading. Both become lmgen's per-expert [out, in] tensors, gate and up apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from lmgen.errors import UnsupportedModelError
from lmgen.layers.linear import Activation, SwigluClamp
from lmgen.layers.moe import MoEConfig
from lmgen.layers.norm import NormKind
from lmgen.models.common import common_fields, sparse_layers
from lmgen.models.contract import ModelSpec
from lmgen.models.llama import LlamaForCausalLM

#: the 16 values of a 4-bit E2M1 code (sign bit, two exponent bits, one mantissa bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: transformers' GptOssConfig defaults where they differ from what lmgen's common_fields assume for a missing key
CONFIG_DEFAULTS = dict(attention_bias=True, rms_norm_eps=1e-5, head_dim=64, sliding_window=128,
                       max_position_embeddings=131072, rope_theta=150000.0, swiglu_alpha=1.702, swiglu_limit=7.0)
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)
_EXPERT_STACK = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8 (value 2j in byte j's low nibble, 2j + 1 in its high one), scales [..., G] uint8
    -> float32 [..., G * 32]: each block's values times 2 ** (scale - 127), exact."""
    lut = torch.tensor(FP4_VALUES)
    values = torch.stack((lut[(blocks & 0x0F).int()], lut[(blocks >> 4).int()]), dim=-1).flatten(-2)
    return torch.ldexp(values, scales.int()[..., None] - 127).flatten(-2)


def _loaded(tensor: object) -> torch.Tensor:
    return tensor.load() if hasattr(tensor, "load") else tensor


class GptOssForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        config = {**CONFIG_DEFAULTS, **config}
        if not (config.get("rope_parameters") or config.get("rope_scaling")):
            config["rope_parameters"] = {**DEFAULT_ROPE, "rope_theta": config["rope_theta"]}
        # transformers' default: sliding-window layers first, full ones between (hidden_act is unused)
        layer_types = config.get("layer_types") or [("sliding_attention", "full_attention")[i % 2]
                                                    for i in range(config["num_hidden_layers"])]
        fields = common_fields({**config, "layer_types": layer_types, "hidden_act": "silu"})
        num_experts = config.get("num_local_experts") or config["num_experts"]
        moe = MoEConfig(num_experts, config["num_experts_per_tok"], config["intermediate_size"], norm_topk=False,
                        softmax_after_topk=True, biases=True)
        clamp = SwigluClamp(float(config["swiglu_alpha"]), float(config["swiglu_limit"]))
        return ModelSpec(**{**fields, "layers": sparse_layers(config, fields["layers"], moe),
                            "activation": Activation.CLAMPED_SWIGLU}, swiglu_clamp=clamp,
                         norm=NormKind.RMS_GAIN_IN_FLOAT, attention_sinks=True)

    @classmethod
    def checkpoint_tensors(cls, tensors: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """The experts' stacks as one tensor per expert and projection (MXFP4 ones dequantized once both their
        blocks and scales are read); every other tensor renamed as Llama's."""
        waiting: dict[str, dict[str, object]] = {}  # an MXFP4 stack's blocks or scales, until the other comes
        for name, tensor in super().checkpoint_tensors(tensors):
            stack = _EXPERT_STACK.fullmatch(name)
            if stack is None:
                yield name, tensor
                continue
            prefix, projection, part = stack[1], stack[2], stack[3] or ""
            if part in ("_blocks", "_scales"):
                pieces = waiting.setdefault(f"{prefix}.{projection}", {})
                pieces[part] = tensor
                if len(pieces) == 2:
                    del waiting[f"{prefix}.{projection}"]
                    yield from _experts(prefix, projection, ".weight", _loaded(pieces["_blocks"]),
                                        _loaded(pieces["_scales"]))
            elif part == "_bias":
                yield from _experts(prefix, projection, ".bias", _loaded(tensor))
            else:  # a float stack [E, in, out]
                yield from _experts(prefix, projection, ".weight", _loaded(tensor).transpose(1, 2))
        if waiting:
            raise UnsupportedModelError(f"the checkpoint has MXFP4 blocks without scales, or scales without blocks, "
                                        f"for {', '.join(sorted(waiting))}")


def _experts(prefix: str, projection: str, leaf: str, stack: torch.Tensor, scales: torch.Tensor | None = None,
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each expert's tensor of a stack [E, out, ...] (MXFP4 blocks with their `scales`: dequantized one expert at
    a time), under lmgen's per-expert names; gate_up's rows de-interleaved into a gate and an up tensor, as
    Llama's (the two shards of lmgen's gate_up_proj; a llama.cpp recipe gives each its type)."""
    for expert, rows in enumerate(stack):
        if scales is not None:
            rows = dequantize_mxfp4(rows, scales[expert])
        if projection == "gate_up_proj":
            yield f"{prefix}.{expert}.gate_proj{leaf}", rows[0::2].contiguous()
            yield f"{prefix}.{expert}.up_proj{leaf}", rows[1::2].contiguous()
        else:
            yield f"{prefix}.{expert}.{projection}{leaf}", rows.contiguous()
