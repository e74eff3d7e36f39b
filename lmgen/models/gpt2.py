"""GPT2LMHeadModel: LayerNorms with biases, learned positions, a GELU MLP without a gate, biases
on every projection, no rotary. Its checkpoint stores linear weights transposed ([in, out],
transformers' Conv1D) under names of its own (with or without the ``transformer.`` prefix)."""

from __future__ import annotations

from lmgen.layers.linear import Activation
from lmgen.layers.norm import NormKind
from lmgen.models.contract import LayerSpec, ModelSpec, unsupported_keys
from lmgen.models.transformer import TransformerForCausalLM


class GPT2LMHeadModel(TransformerForCausalLM):
    checkpoint_renames = (
        (r"^(transformer\.)?h\.", "model.layers."), (r"^(transformer\.)?wte\.", "model.embed_tokens."),
        (r"^(transformer\.)?wpe\.", "model.embed_positions."), (r"^(transformer\.)?ln_f\.", "model.norm."),
        (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".pre_feedforward_layernorm."),
        (r"\.attn\.c_attn\.", ".self_attn.qkv_proj."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    )
    transposed = r"\.(qkv_proj|o_proj|up_proj|down_proj)\.weight$"
    skipped = r"\.attn\.(masked_)?bias$"  # the causal mask, saved as a buffer by old checkpoints

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        unsupported_keys(config, {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                                  "add_cross_attention": False})
        hidden, heads = config["n_embd"], config["n_head"]
        return ModelSpec(
            vocab_size=config["vocab_size"], hidden_size=hidden, intermediate_size=config.get("n_inner") or 4 * hidden,
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            layers=(LayerSpec(rope=None),) * config["n_layer"], ropes=(),
            max_position_embeddings=config["n_positions"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            norm=NormKind.LAYER, norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            activation=Activation.from_hf(config.get("activation_function", "gelu_new")), gated_mlp=False,
            qkv_bias=True, o_bias=True, mlp_bias=True, learned_positions=True)
