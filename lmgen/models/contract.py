"""The model contract: what a family declares, and all that the engine and kernels may assume.

A family reads its config.json into a ``ModelSpec``: a frozen description with named fields,
validated when it is made (a missing or inconsistent piece is an error naming it, never a
wrong model). Everything outside lmgen/models reads a model through it:

- the engine and the KV cache: ``vocab_size``, ``num_layers``, ``num_kv_heads``, ``head_dim``,
  ``layer_windows`` (per-layer sliding windows), ``context_length``, ``rope_computed_on_host`` and
  ``routes_on_host`` (no CUDA graphs: such ropes are computed, and mixture-of-experts layers group
  their tokens, on the host each step), ``rope_switch_length`` (a request crossing it recomputes its
  cache);
- the one-call CPU decode step: ``one_call_settings()`` and, per layer, its tensors by name
  (lmgen/models/transformer.py ``_layer_tensors``; lmgen/kernels/cpu.cpp ``DecodeLayers``);
- the loader: the model class's ``checkpoint_tensors`` (names, transposes) and
  ``packed_modules`` (fused q/k/v and gate/up shards).

The model built from a spec satisfies ``CausalLM``; ``check_contract`` says what a model lacks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from lmgen.errors import UnsupportedModelError
from lmgen.layers.linear import Activation, MLPActivation, SwigluClamp
from lmgen.layers.moe import MoEConfig
from lmgen.layers.norm import Norm, NormKind
from lmgen.layers.rotary import RopeConfig

#: Where a decoder layer may normalise (ModelSpec.norm_places) -> the module's name in the layer.
NORM_PLACES = {
    "input": "input_layernorm",  # before attention (all but OLMo 2)
    "post_attention": "post_attention_layernorm",  # attention's output, before the residual add (Gemma, OLMo 2)
    "pre_mlp": "pre_feedforward_layernorm",  # before the MLP (Llama's post_attention_layernorm)
    "post_mlp": "post_feedforward_layernorm",  # the MLP's output (Gemma, OLMo 2)
}


class QkNorm(enum.IntEnum):  # the values are the kernels' (cpu.cpp: QkNorm)
    NONE = 0
    PER_HEAD = 1  # each head of q and k over head_dim, before rotary (Qwen3, Gemma 3)
    WHOLE_PROJECTION = 2  # all of q's and all of k's heads at once (OLMo 2)


@dataclass(frozen=True)
class LayerSpec:
    window: int | None = None  # sliding window in tokens; None: full attention
    rope: int | None = 0  # which of ModelSpec.ropes rotates q and k; None: no rotary (SmolLM3's NoPE layers)
    moe: MoEConfig | None = None  # a mixture of experts in place of the MLP (lmgen/layers/moe.py); None: the MLP


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    ropes: tuple[RopeConfig, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    norm: NormKind = NormKind.RMS
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma: weights store w for a gain of 1 + w
    norm_places: frozenset[str] = frozenset({"input", "pre_mlp"})
    qk_norm: QkNorm = QkNorm.NONE
    activation: Activation = Activation.SILU
    gated_mlp: bool = True
    swiglu_clamp: SwigluClamp | None = None  # Activation.CLAMPED_SWIGLU's alpha and limit (GPT-OSS)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attention_softcap: float | None = None  # Gemma 2
    attention_sinks: bool = False  # GPT-OSS: a learned logit per head in each softmax's denominator (self_attn.sinks)
    embedding_scale: float = 1.0  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: float = 1.0  # Granite: each sublayer's output is scaled before the residual add
    logits_divisor: float = 1.0  # Granite: logits_scaling
    logit_softcap: float | None = None  # Gemma 2: final_logit_softcapping
    learned_positions: bool = False  # GPT-2: a table of max_position_embeddings rows added to the embedding

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UnsupportedModelError(
                    f"model spec: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"model spec: {self.num_heads} attention heads cannot share "
                                        f"{self.num_kv_heads} key/value heads evenly")
        if not self.layers:
            raise UnsupportedModelError("model spec: no layers")
        unknown = set(self.norm_places) - set(NORM_PLACES)
        if unknown:
            raise UnsupportedModelError(
                f"model spec: unknown norm places {sorted(unknown)}; known: {list(NORM_PLACES)}")
        if (self.activation == Activation.CLAMPED_SWIGLU) != (self.swiglu_clamp is not None):
            raise UnsupportedModelError("model spec: swiglu_clamp goes with the clamped SwiGLU activation, and only")
        for i, layer in enumerate(self.layers):
            if layer.rope is not None and not 0 <= layer.rope < len(self.ropes):
                raise UnsupportedModelError(f"model spec: layer {i} uses rope {layer.rope}, but there are "
                                            f"{len(self.ropes)}")
            if layer.window is not None and layer.window < 1:
                raise UnsupportedModelError(f"model spec: layer {i} has sliding window {layer.window}")
            if layer.moe is not None and not (isinstance(layer.moe, MoEConfig) and self.gated_mlp):
                raise UnsupportedModelError(f"model spec: layer {i}'s experts must be a MoEConfig of gated MLPs")
        if len({layer.moe for layer in self.layers} - {None}) > 1:  # as every family's config.json describes them
            raise UnsupportedModelError("model spec: the mixture-of-experts layers must share one MoEConfig")
        for rope in self.ropes:
            if rope.head_dim != self.head_dim or rope.rotary_dim % 2 or not 0 < rope.rotary_dim <= self.head_dim:
                raise UnsupportedModelError(f"model spec: a rope rotates {rope.rotary_dim} of {rope.head_dim} "
                                            f"dimensions of heads of {self.head_dim}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(layer.window for layer in self.layers)

    @property
    def rope_computed_on_host(self) -> bool:
        """Whether some rope's frequencies are computed on the CPU each step (which a CUDA graph cannot replay)."""
        return any(rope.computed_on_host for rope in self.ropes)

    @property
    def routes_on_host(self) -> bool:
        """Whether some layer is a mixture of experts, whose tokens are grouped by expert on the host each
        step (which a CUDA graph cannot replay)."""
        return any(layer.moe is not None for layer in self.layers)

    @property
    def rope_switch_length(self) -> int | None:
        """The length past which a sequence's rope changes for all its tokens (longrope's original length:
        transformers recomputes a sequence that crosses it); None if it never does."""
        lengths = {rope.params["original_max_position_embeddings"]
                   for rope in self.ropes if rope.rope_type == "longrope"}
        return min(lengths, default=None)

    @property
    def context_length(self) -> int:
        """The longest sequence the checkpoint supports: linear and dynamic scaling stretch
        max_position_embeddings by their factor, YaRN its original length (as vLLM derives it)."""
        factors = [rope.params["factor"] for rope in self.ropes if rope.rope_type in ("linear", "dynamic")]
        yarn = [rope.params["original_max_position_embeddings"] * rope.params["factor"]
                for rope in self.ropes if rope.rope_type == "yarn" and rope.params.get("factor")]
        return int(max([self.max_position_embeddings * max(factors, default=1), *yarn]))

    def make_norm(self, size: int) -> Norm:
        return Norm(size, self.norm_eps, self.norm, self.norm_offset)

    def make_activation(self) -> MLPActivation:
        return MLPActivation(self.activation, self.gated_mlp, self.swiglu_clamp)

    def one_call_settings(self) -> dict[str, float]:
        """The model-wide settings decode_layers reads (cpu.cpp: DecodeLayers), by name."""
        settings = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "norm_kind": int(self.norm),
                    "norm_eps": self.norm_eps, "norm_offset": self.norm_offset, "qk_norm": int(self.qk_norm),
                    "activation": int(self.activation), "gated": float(self.gated_mlp),
                    "scale": self.attention_scale or self.head_dim ** -0.5, "softcap": self.attention_softcap or 0.0,
                    "residual_scale": self.residual_scale}
        if self.swiglu_clamp is not None:
            settings.update(swiglu_alpha=self.swiglu_clamp.alpha, swiglu_limit=self.swiglu_clamp.limit)
        moe = next((layer.moe for layer in self.layers if layer.moe is not None), None)
        if moe is not None:  # the experts' sizes and whether there is a shared expert come with the tensors
            settings.update(moe_top_k=moe.top_k, moe_norm_topk=float(moe.norm_topk),
                            moe_float32_weights=float(moe.float32_weights),
                            moe_softmax_after_topk=float(moe.softmax_after_topk))
        return settings


class CausalLM(Protocol):
    """What the engine calls on a model (lmgen/models/transformer.py implements it for every family)."""

    spec: ModelSpec
    packed_modules: dict[str, tuple[str, int]]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
                meta, kv_caches: list) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def one_call_layers(self, meta, kv_caches: list) -> torch.ScriptObject | None: ...

    @classmethod
    def checkpoint_tensors(cls, tensors): ...


def check_contract(model: object) -> None:
    """Raise naming what `model` lacks of the contract, CausalLM's members (a family that forgets a piece)."""
    names = [*CausalLM.__annotations__, *(name for name in vars(CausalLM) if not name.startswith("_"))]
    members = [name for name in names if not hasattr(model, name)]
    if members:
        raise UnsupportedModelError(f"{type(model).__name__} lacks {', '.join(members)} of the model contract "
                                    "(lmgen/models/contract.py)")
    if not isinstance(model.spec, ModelSpec):
        raise UnsupportedModelError(f"{type(model).__name__}.spec must be a ModelSpec, got {type(model.spec).__name__}")


def unsupported_keys(config: dict, refused: dict[str, object]) -> None:
    """Refuse config.json keys whose value lmgen does not implement (key -> the only value it runs)."""
    for key, supported in refused.items():
        if key in config and config[key] not in (supported, None):
            raise UnsupportedModelError(f"config.json sets {key}={config[key]!r}, which lmgen does not implement "
                                        f"(it runs {key}={supported!r})")
