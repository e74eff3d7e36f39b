"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

The three differ only in data read from config.json (q/k/v bias, sliding windows). Their
checkpoints hold q/k/v and gate/up as separate tensors, fused at load time
(``packed_modules``); Llama's ``post_attention_layernorm`` is the norm before the MLP.
"""

from __future__ import annotations

from dataclasses import replace

from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec
from lmgen.models.transformer import TransformerForCausalLM

#: checkpoint module name -> (fused module name, shard index): q/k/v and gate/up stored apart
SEPARATE_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
#: Llama's name for the norm before the MLP
PRE_MLP_NORM = (r"\.post_attention_layernorm\.", ".pre_feedforward_layernorm.")


class LlamaForCausalLM(TransformerForCausalLM):
    packed_modules = SEPARATE_PROJECTIONS
    checkpoint_renames = (PRE_MLP_NORM,)

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**common_fields(config))


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return replace(super().spec_from_config(config), qkv_bias=True, o_bias=False)  # always q/k/v, never o


MistralForCausalLM = LlamaForCausalLM
