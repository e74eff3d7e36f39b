"""Phi3ForCausalLM: Phi-3, Phi-3.5 and Phi-4-mini.

Llama's layer with q/k/v and gate/up already fused in the checkpoint (``qkv_proj``,
``gate_up_proj``: lmgen's own names), longrope (short and long rope factors, chosen by each
request's length) and, in Phi-4-mini, a partial rotary over the first part of each head.
"""

from __future__ import annotations

from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec
from lmgen.models.llama import PRE_MLP_NORM
from lmgen.models.transformer import TransformerForCausalLM


class Phi3ForCausalLM(TransformerForCausalLM):
    checkpoint_renames = (PRE_MLP_NORM,)

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**common_fields(config))
