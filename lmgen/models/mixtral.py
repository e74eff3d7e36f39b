"""MixtralForCausalLM: Mistral's layer with a mixture of experts in place of the MLP (8 experts, top 2,
the two weights renormalised), experts named w1 (gate), w3 (up) and w2 (down) in its checkpoints."""

from __future__ import annotations

from lmgen.layers.moe import MoEConfig
from lmgen.models.common import common_fields, sparse_layers
from lmgen.models.contract import ModelSpec
from lmgen.models.llama import PRE_MLP_NORM, LlamaForCausalLM

#: the router is lmgen's mlp.router (each family's "gate"), kept apart from the experts' gate projections
ROUTER_NAME = (r"\.mlp\.gate\.", ".mlp.router.")


class MixtralForCausalLM(LlamaForCausalLM):
    checkpoint_renames = (PRE_MLP_NORM, (r"\.block_sparse_moe\.", ".mlp."), ROUTER_NAME,
                          (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."), (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
                          (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."))

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        fields = common_fields(config)
        moe = MoEConfig(config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"],
                        norm_topk=True, float32_weights=True)
        return ModelSpec(**{**fields, "layers": sparse_layers(config, fields["layers"], moe)})
