"""SmolLM3ForCausalLM: Llama's layer, with no rotary in some layers (``no_rope_layers``: 0 marks
them; by default every 4th)."""

from __future__ import annotations

from dataclasses import replace

from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec
from lmgen.models.llama import LlamaForCausalLM


class SmolLM3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        fields = common_fields(config)
        interval = config.get("no_rope_layer_interval", 4)
        uses_rope = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(len(fields["layers"]))]
        layers = tuple(replace(layer, rope=0 if rope else None) for layer, rope in zip(fields["layers"], uses_rope))
        return ModelSpec(**{**fields, "layers": layers})
