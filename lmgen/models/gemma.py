"""Gemma2ForCausalLM and Gemma3ForCausalLM (text).

Gemma's layer normalises before and after both attention and the MLP, with RMS norms whose
gain is 1 + w, applied in float32; a GELU (tanh) gated MLP; attention scaled by
query_pre_attn_scalar; the embedding scaled by sqrt(hidden); sliding-window and global layers
alternating (``layer_types``). Gemma 2 soft-caps attention scores and the final logits; Gemma 3
adds q/k norms and gives sliding layers their own rope base (``rope_local_base_freq``).
Its checkpoint names are lmgen's.
"""

from __future__ import annotations

import math

from lmgen.layers.norm import NormKind
from lmgen.layers.rotary import RopeConfig
from lmgen.models.common import common_fields, head_dim
from lmgen.models.contract import LayerSpec, ModelSpec, QkNorm, unsupported_keys
from lmgen.models.llama import SEPARATE_PROJECTIONS
from lmgen.models.transformer import TransformerForCausalLM


def _layer_types(config: dict, every: int) -> list[str]:
    """config.json's layer_types, or the older sliding_window_pattern: every `every`-th layer global."""
    if config.get("layer_types"):
        return config["layer_types"]
    every = config.get("sliding_window_pattern", every)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(config["num_hidden_layers"])]


def _gemma_fields(config: dict, layer_types: list[str]) -> dict:
    unsupported_keys(config, {"use_bidirectional_attention": False})
    fields = common_fields({**config, "layer_types": layer_types},
                           activation_key="hidden_activation" if "hidden_activation" in config else "hidden_act")
    fields.update(
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)), norm=NormKind.RMS_GAIN_IN_FLOAT,
        norm_offset=1.0, norm_places=frozenset({"input", "post_attention", "pre_mlp", "post_mlp"}),
        attention_scale=config.get("query_pre_attn_scalar", 256) ** -0.5,
        attention_softcap=config.get("attn_logit_softcapping"), logit_softcap=config.get("final_logit_softcapping"),
        embedding_scale=math.sqrt(config["hidden_size"]))
    return fields


class Gemma2ForCausalLM(TransformerForCausalLM):
    packed_modules = SEPARATE_PROJECTIONS

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        return ModelSpec(**_gemma_fields(config, _layer_types(config, every=2)))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        layer_types = _layer_types(config, every=6)
        fields = _gemma_fields(config, layer_types)
        # rope_parameters per layer type (transformers 5), or a global rope_theta (+ rope_scaling) and a local base
        per_type = config.get("rope_parameters") or {}
        full = per_type.get("full_attention") or {"rope_theta": config.get("rope_theta", 1_000_000.0),
                                                  **(config.get("rope_scaling") or {})}
        local = per_type.get("sliding_attention") or {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
        dim = head_dim(config)
        ropes = (RopeConfig.from_hf(config, dim, full), RopeConfig.from_hf(config, dim, local))
        layers = tuple(LayerSpec(window=layer.window, rope=int(kind == "sliding_attention"))
                       for layer, kind in zip(fields["layers"], layer_types))
        return ModelSpec(**{**fields, "ropes": ropes, "layers": layers}, qk_norm=QkNorm.PER_HEAD)
