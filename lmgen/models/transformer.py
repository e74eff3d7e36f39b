"""The decoder-only transformer that every supported family is, built from a ModelSpec.

A family (one file in this folder) reads its config.json into a ``ModelSpec`` (lmgen/models/
contract.py): sizes, where its layers normalise and how, q/k norms, the MLP's activation,
attention scale and soft cap, rotary tables per layer, sliding windows, multipliers. This
file turns a spec into modules and runs them; the one-call decode step
(``torch.ops.lmgen.decode_layers``) runs the same sequence of kernels from the same spec, so
every family decodes in one call.

Module names are lmgen's own and close to Hugging Face's Llama/Gemma names (``model.layers.N.
self_attn.qkv_proj``, ``...input_layernorm``, ``...pre_feedforward_layernorm``); a family maps
its checkpoint's names onto them (``checkpoint_renames``), so weights still load by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lmgen.layers.attention import AttentionMetadata, paged_attention, reads_cache_in_place
from lmgen.layers.linear import Embedding, FusedLinear, Linear
from lmgen.layers.moe import MoE, MoEConfig
from lmgen.layers.norm import Norm
from lmgen.layers.rotary import RotaryEmbedding, apply_rotary
from lmgen.models.contract import NORM_PLACES, LayerSpec, ModelSpec, QkNorm

KVCache = tuple[torch.Tensor, torch.Tensor]
Rotations = list[tuple[torch.Tensor, torch.Tensor]]  # (cos, sin) [T, 1, rotary_dim] of each of the spec's ropes


def add_and_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: Norm | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the next sublayer reads, the residual stream): x added to the stream (None before the first
    layer: x is the stream), normalised where the layer has a norm there (the add inside the norm's call)."""
    if residual is None:
        return (x if norm is None else norm(x)), x
    if norm is None:
        summed = x + residual
        return summed, summed
    return norm(x, residual)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = FusedLinear(spec.hidden_size, self.split_sizes, bias=spec.qkv_bias)
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        self.qk_norm = spec.qk_norm
        self.q_norm = self.k_norm = None
        if spec.qk_norm != QkNorm.NONE:
            per_head = spec.qk_norm == QkNorm.PER_HEAD
            self.q_norm = spec.make_norm(spec.head_dim if per_head else q_size)
            self.k_norm = spec.make_norm(spec.head_dim if per_head else kv_size)
        self.window, self.rope = layer.window, layer.rope
        self.scale = spec.attention_scale or spec.head_dim ** -0.5
        self.softcap = spec.attention_softcap
        self.sinks = nn.Parameter(torch.empty(spec.num_heads), requires_grad=False) if spec.attention_sinks else None

    def forward(self, x: torch.Tensor, rotations: Rotations, meta: AttentionMetadata, kv_cache: KVCache,
                ) -> torch.Tensor:
        num_tokens, head_dim = x.shape[0], self.head_dim
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        if self.qk_norm == QkNorm.PER_HEAD:
            q = self.q_norm(q.reshape(-1, head_dim))
            k = self.k_norm(k.reshape(-1, head_dim))
        elif self.qk_norm == QkNorm.WHOLE_PROJECTION:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(num_tokens, -1, head_dim), k.view(num_tokens, -1, head_dim)
        if self.rope is not None:
            cos, sin = rotations[self.rope]
            if self.q_norm is None:  # q and k heads sit side by side in qkv: rotate them in one go
                qk = apply_rotary(qkv[:, : self.split_sizes[0] + self.split_sizes[1]].view(num_tokens, -1, head_dim),
                                  cos, sin)
                q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
            else:
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.view(num_tokens, self.num_kv_heads, head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window, self.softcap, self.sinks)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, size: int) -> None:
        super().__init__()
        if spec.gated_mlp:
            self.gate_up_proj = FusedLinear(spec.hidden_size, [size, size], bias=spec.mlp_bias)
        else:
            self.up_proj = Linear(spec.hidden_size, size, bias=spec.mlp_bias)
        self.act = spec.make_activation()
        self.down_proj = Linear(size, spec.hidden_size, bias=spec.mlp_bias)

    @property
    def up(self) -> nn.Module:
        """The projection before the activation (gate and up fused, when gated)."""
        return self.gate_up_proj if hasattr(self, "gate_up_proj") else self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up(x)))


def moe_block(spec: ModelSpec, config: MoEConfig) -> MoE:
    shared = MLP(spec, config.shared_expert_size) if config.shared_expert_size else None
    return MoE(spec.hidden_size, config, spec.make_activation(), shared)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec) -> None:
        super().__init__()
        for place, name in NORM_PLACES.items():
            setattr(self, name, spec.make_norm(spec.hidden_size) if place in spec.norm_places else None)
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec, spec.intermediate_size) if layer.moe is None else moe_block(spec, layer.moe)
        self.residual_scale = spec.residual_scale

    def norm_at(self, place: str) -> Norm | None:
        return getattr(self, NORM_PLACES[place])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rotations: Rotations,
                meta: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output, residual: the stream it adds to (None before the first
        layer). Returns this layer's output and the stream it adds to (the add happens in the next norm)."""
        attention_in, residual = add_and_norm(x, residual, self.norm_at("input"))
        x = self._finish(self.self_attn(attention_in, rotations, meta, kv_cache), self.norm_at("post_attention"))
        mlp_in, residual = add_and_norm(x, residual, self.norm_at("pre_mlp"))
        return self._finish(self.mlp(mlp_in), self.norm_at("post_mlp")), residual

    def _finish(self, out: torch.Tensor, norm: Norm | None) -> torch.Tensor:
        """A sublayer's output as the stream adds it: normalised (Gemma, OLMo 2), scaled (Granite)."""
        out = out if norm is None else norm(out)
        return out if self.residual_scale == 1.0 else out * self.residual_scale


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_positions = (Embedding(spec.max_position_embeddings, spec.hidden_size)
                                if spec.learned_positions else None)
        self.layers = nn.ModuleList(DecoderLayer(spec, layer) for layer in spec.layers)
        self.norm = spec.make_norm(spec.hidden_size)


class TransformerForCausalLM(nn.Module):
    """Causal LM over a flat batch of tokens from many requests (see AttentionMetadata).

    A family subclasses it with ``spec_from_config`` and, where its checkpoint's names differ from
    lmgen's, ``checkpoint_renames`` (regular expression, replacement), ``packed_modules`` (checkpoint
    module -> (fused module, shard)) and ``transposed`` (lmgen names whose checkpoint tensor is
    stored [in, out]); ``skipped`` matches checkpoint tensors that are not weights.
    """

    packed_modules: dict[str, tuple[str, int]] = {}
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    transposed: str | None = None
    skipped: str | None = None

    def __init__(self, spec: ModelSpec, max_model_len: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = None if spec.tie_word_embeddings else Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotaries = [RotaryEmbedding(rope, max_model_len) for rope in spec.ropes]
        self._one_call: tuple[list[KVCache], torch.ScriptObject | None] | None = None  # see one_call_layers

    @classmethod
    def spec_from_config(cls, config: dict) -> ModelSpec:
        """The family's reading of its config.json."""
        raise NotImplementedError(f"{cls.__name__} does not say how to read its config.json")

    @classmethod
    def checkpoint_tensors(cls, tensors: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """The checkpoint's (name, tensor) pairs under lmgen's names, [out, in] weights."""
        for name, tensor in tensors:
            if cls.skipped and re.search(cls.skipped, name):
                continue
            for pattern, replacement in cls.checkpoint_renames:
                name = re.sub(pattern, replacement, name)
            if cls.transposed and re.search(cls.transposed, name):
                tensor = tensor.load().t() if hasattr(tensor, "load") else tensor.t()
            yield name, tensor

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.spec.embedding_scale != 1.0:  # Gemma's sqrt(hidden) is rounded to the dtype first
            x = x * torch.tensor(self.spec.embedding_scale, dtype=x.dtype)
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(positions)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions, token_seq_lens: [T]. Returns the final hidden states [T, hidden]."""
        x = self.embed(input_ids, positions)
        rotations = [rotary(positions, token_seq_lens, x.dtype) for rotary in self.rotaries]
        layers = self.one_call_layers(meta, kv_caches)
        if layers is not None and self.model.norm.weight.dtype == x.dtype:  # the layers' kernels, no Python between
            rotary = [table for pair in rotations for table in pair]
            x, residual = torch.ops.lmgen.decode_layers(x, rotary, meta.slot_mapping, *meta.query_rows(), layers)
        else:
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x, residual = layer(x, residual, rotations, meta, kv_cache)
        return add_and_norm(x, residual, self.model.norm)[0]

    def one_call_layers(self, meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.ScriptObject | None:
        """What torch.ops.lmgen.decode_layers takes besides the step's tensors (weights, caches, settings)
        when this step can run all layers in one call: a step of few tokens whose attention reads the cache
        in place (decode, drafts being checked, short prompt chunks) on lmgen's CPU kernels, outside
        torch.compile. None otherwise."""
        if torch.compiler.is_compiling():  # first: a traced graph must not depend on the batch size here
            return None
        device = meta.block_tables.device
        if not reads_cache_in_place(meta, self.spec.head_dim, device):
            return None
        if self._one_call is None or self._one_call[0] is not kv_caches:  # weights never change once loaded
            self._one_call = kv_caches, self._gather_one_call_layers(kv_caches)
        return self._one_call[1]

    def _gather_one_call_layers(self, kv_caches: list[KVCache]) -> torch.ScriptObject | None:
        """The DecodeLayers handle: the spec's settings, then each layer's tensors by name; None if some
        layer's linear cannot run on lmgen's kernels."""
        dtype = self.model.norm.weight.dtype
        settings = {name: float(value) for name, value in self.spec.one_call_settings().items()}
        handle = torch.classes.lmgen.DecodeLayers(settings)
        for layer, plan, (k_cache, v_cache) in zip(self.model.layers, self.spec.layers, kv_caches):
            tensors = _layer_tensors(layer)
            if tensors is None or any(t.dtype != dtype for name, t in tensors.items() if "norm" in name):
                return None
            tensors.update(k_cache=k_cache, v_cache=v_cache)
            handle.add_layer(tensors, plan.window or 0, -1 if plan.rope is None else plan.rope)
        return handle

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        head = self.model.embed_tokens.unembed if self.lm_head is None else self.lm_head
        logits, spec = head(hidden), self.spec
        if spec.logits_divisor != 1.0:  # Granite
            logits = logits / spec.logits_divisor
        if spec.logit_softcap:  # Gemma 2
            logits = torch.tanh(logits / spec.logit_softcap) * spec.logit_softcap
        return logits.float()


def _layer_tensors(layer: DecoderLayer) -> dict[str, torch.Tensor] | None:
    """A layer's weights under the names decode_layers reads (cpu.cpp: DecodeLayers::add_layer); None
    where some linear cannot run on lmgen's kernels."""
    tensors = {}
    norms = {f"{place}_norm": layer.norm_at(place) for place in NORM_PLACES}
    norms.update(q_norm=layer.self_attn.q_norm, k_norm=layer.self_attn.k_norm)
    for name, norm in norms.items():
        if norm is not None:
            tensors[f"{name}.weight"] = norm.weight
            if norm.bias is not None:
                tensors[f"{name}.bias"] = norm.bias
    if layer.self_attn.sinks is not None:
        tensors["sinks"] = layer.self_attn.sinks
    linears = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj}
    if isinstance(layer.mlp, MoE):
        moe = layer.mlp
        linears.update(router=moe.router, experts_up=moe.experts.gate_up_proj, experts_down=moe.experts.down_proj)
        if moe.shared_expert is not None:
            linears.update(shared_up=moe.shared_expert.up, shared_down=moe.shared_expert.down_proj,
                           shared_gate=moe.shared_expert_gate)
        tensors["moe_counts"] = moe.tokens_per_expert
    else:
        linears.update(up=layer.mlp.up, down=layer.mlp.down_proj)
    for name, linear in linears.items():
        operands = linear.kernel_operands()
        if operands is None:
            return None
        for part, tensor in zip(("weight", "scales", "zeros", "bias"), operands):
            if tensor is not None:
                tensors[f"{name}.{part}"] = tensor
    return tensors
