"""Olmo2ForCausalLM: norms after attention and after the MLP (none before them), RMS norms
applied in float32, and q/k norms over the whole q and k projections."""

from __future__ import annotations

from lmgen.layers.norm import NormKind
from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec, QkNorm
from lmgen.models.llama import SEPARATE_PROJECTIONS
from lmgen.models.transformer import TransformerForCausalLM


class Olmo2ForCausalLM(TransformerForCausalLM):
    packed_modules = SEPARATE_PROJECTIONS  # its post_attention_layernorm is lmgen's: after attention

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**common_fields(config), norm=NormKind.RMS_GAIN_IN_FLOAT,
                         norm_places=frozenset({"post_attention", "post_mlp"}), qk_norm=QkNorm.WHOLE_PROJECTION)
