"""OlmoeForCausalLM: Llama's layer with a mixture of experts in place of the MLP (64 experts, top 8) and
RMS norms over the whole q and k projections, as OLMo 2 has (but Llama's norms before attention and
the MLP)."""

from __future__ import annotations

from lmgen.layers.moe import MoEConfig
from lmgen.models.common import common_fields, sparse_layers
from lmgen.models.contract import ModelSpec, QkNorm, unsupported_keys
from lmgen.models.llama import LlamaForCausalLM
from lmgen.models.mixtral import ROUTER_NAME


class OlmoeForCausalLM(LlamaForCausalLM):
    checkpoint_renames = (*LlamaForCausalLM.checkpoint_renames, ROUTER_NAME)

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        unsupported_keys(config, {"clip_qkv": None})
        fields = common_fields(config)
        moe = MoEConfig(config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"],
                        norm_topk=bool(config.get("norm_topk_prob", False)))
        return ModelSpec(**{**fields, "layers": sparse_layers(config, fields["layers"], moe)},
                         qk_norm=QkNorm.WHOLE_PROJECTION)
