"""Qwen2MoeForCausalLM and Qwen3MoeForCausalLM: Qwen2's and Qwen3's layers with a mixture of experts in
place of the MLP (many small experts, moe_intermediate_size each) in every decoder_sparse_step-th layer
not in mlp_only_layers, the others keeping a dense MLP. Qwen2-MoE adds a shared expert that every token
passes through, its output scaled by a sigmoid gate."""

from __future__ import annotations

from lmgen.layers.moe import MoEConfig
from lmgen.models.common import common_fields, sparse_layers
from lmgen.models.contract import ModelSpec, QkNorm
from lmgen.models.llama import LlamaForCausalLM
from lmgen.models.mixtral import ROUTER_NAME


def _moe_fields(config: dict, shared_expert_size: int = 0) -> dict:
    fields = common_fields(config)
    num_experts = config.get("num_experts") or config["num_local_experts"]  # transformers 5 saves Qwen3-MoE's so
    moe = MoEConfig(num_experts, config["num_experts_per_tok"], config["moe_intermediate_size"],
                    norm_topk=bool(config.get("norm_topk_prob", False)), shared_expert_size=shared_expert_size)
    return {**fields, "layers": sparse_layers(config, fields["layers"], moe)}


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    checkpoint_renames = (*LlamaForCausalLM.checkpoint_renames, ROUTER_NAME)

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        fields = _moe_fields(config, config.get("shared_expert_intermediate_size") or 0)
        return ModelSpec(**{**fields, "qkv_bias": bool(config.get("qkv_bias", True)), "o_bias": False})


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**_moe_fields(config), qk_norm=QkNorm.PER_HEAD)
