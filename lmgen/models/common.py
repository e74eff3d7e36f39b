"""Reading the config.json keys that most families share into ModelSpec fields."""

from __future__ import annotations

from dataclasses import replace

from lmgen.layers.linear import Activation
from lmgen.layers.moe import MoEConfig
from lmgen.layers.rotary import RopeConfig
from lmgen.models.contract import LayerSpec


def layer_windows(config: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers decides it."""
    window = config.get("sliding_window")
    if config.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in config["layer_types"])
    if window is None or config.get("use_sliding_window", True) is False:
        return (None,) * num_layers
    first = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0
    return tuple(window if i >= first else None for i in range(num_layers))


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def common_fields(config: dict, activation_key: str = "hidden_act") -> dict:
    """ModelSpec fields from the keys Llama-shaped configs share: sizes, norm epsilon, biases, tied
    head, one rope for every layer, sliding windows."""
    num_heads, num_layers = config["num_attention_heads"], config["num_hidden_layers"]
    windows = layer_windows(config, num_layers)
    return dict(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_heads=num_heads,
        num_kv_heads=config.get("num_key_value_heads") or num_heads, head_dim=head_dim(config),
        layers=tuple(LayerSpec(window=w) for w in windows), ropes=(RopeConfig.from_hf(config, head_dim(config)),),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        activation=Activation.from_hf(config.get(activation_key, "silu")),
        qkv_bias=bool(config.get("attention_bias", False)), o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)))


def sparse_layers(config: dict, layers: tuple[LayerSpec, ...], moe: MoEConfig) -> tuple[LayerSpec, ...]:
    """`layers` with `moe` in place of the MLP where the config puts experts: every layer, or (Qwen-MoE)
    every decoder_sparse_step-th layer not in mlp_only_layers."""
    step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
    return tuple(replace(layer, moe=moe) if i not in dense and (i + 1) % step == 0 else layer
                 for i, layer in enumerate(layers))
