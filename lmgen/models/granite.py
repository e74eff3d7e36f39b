"""GraniteForCausalLM: Llama's layer with multipliers on the embedding, on each sublayer's
output before the residual add, on attention scores (in place of 1/sqrt(head_dim)) and a
divisor on the logits."""

from __future__ import annotations

from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec
from lmgen.models.llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**common_fields(config), embedding_scale=float(config.get("embedding_multiplier", 1.0)),
                         residual_scale=float(config.get("residual_multiplier", 1.0)),
                         attention_scale=float(config.get("attention_multiplier", 1.0)),
                         logits_divisor=float(config.get("logits_scaling", 1.0)))
