"""Qwen3ForCausalLM: Llama's layer with an RMS norm on each head of q and k before rotary."""

from __future__ import annotations

from lmgen.models.common import common_fields
from lmgen.models.contract import ModelSpec, QkNorm
from lmgen.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**common_fields(config), qk_norm=QkNorm.PER_HEAD)
