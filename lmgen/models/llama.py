"""The Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM.

The three differ only in data read from config.json (q/k/v bias, sliding windows),
so one implementation serves them. Parameter names follow Hugging Face's, with
q/k/v and gate/up fused at load time (``packed_modules``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmgen import kernels
from lmgen.errors import UnsupportedModelError
from lmgen.layers.attention import AttentionMetadata, paged_attention, reads_cache_in_place
from lmgen.layers.linear import Embedding, FusedLinear, Linear, SiluAndMul
from lmgen.layers.norm import RMSNorm
from lmgen.layers.rotary import RopeConfig, RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


def _layer_windows(config: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers decides it."""
    window = config.get("sliding_window")
    if "layer_types" in config and config["layer_types"]:
        return tuple(window if t == "sliding_attention" else None for t in config["layer_types"])
    if window is None or config.get("use_sliding_window", True) is False:
        return (None,) * num_layers
    first = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0
    return tuple(window if i >= first else None for i in range(num_layers))


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layer_windows: tuple[int | None, ...]
    rope: RopeConfig
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        num_layers = config["num_hidden_layers"]
        attention_bias = bool(config.get("attention_bias", False))
        is_qwen2 = "Qwen2ForCausalLM" in config.get("architectures", ())
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always biases q/k/v, never o
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            layer_windows=_layer_windows(config, num_layers),
            rope=RopeConfig.from_hf(config, head_dim),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = FusedLinear(args.hidden_size, self.split_sizes, bias=args.qkv_bias)
        self.o_proj = Linear(q_size, args.hidden_size, bias=args.o_bias)
        self.window = args.layer_windows[layer_idx]
        self.scale = args.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k heads sit side by side: rotate them in one go
        qk = qkv[:, : self.split_sizes[0] + self.split_sizes[1]].view(num_tokens, -1, self.head_dim)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, self.split_sizes[0] + self.split_sizes[1]:].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        size = args.intermediate_size
        self.gate_up_proj = FusedLinear(args.hidden_size, [size, size], bias=args.mlp_bias)
        self.act = SiluAndMul()
        self.down_proj = Linear(size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output, residual: the stream it adds to (None before the
        first layer). Each residual add happens inside the next norm (one call for both)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, meta, kv_cache), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Causal LM over a flat batch of tokens from many requests (see AttentionMetadata)."""

    # checkpoint module name -> (fused module name, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, args: ModelArgs, max_model_len: int) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = None if args.tie_word_embeddings else Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(args.rope, max_model_len)
        self._one_call: tuple[list[KVCache], torch.ScriptObject | None] | None = None  # see one_call_layers

    @classmethod
    def from_config(cls, config: dict, max_model_len: int) -> "LlamaForCausalLM":
        return cls(ModelArgs.from_hf(config), max_model_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions, token_seq_lens: [T]. Returns the final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, token_seq_lens, x.dtype)
        layers = self.one_call_layers(meta, kv_caches)
        if layers is not None and self.model.norm.weight.dtype == x.dtype:  # the layers' kernels, no Python between
            x, residual = torch.ops.lmgen.decode_layers(x, cos, sin, meta.slot_mapping, meta.block_tables,
                                                        meta.seq_lens, layers)
        else:
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x, residual = layer(x, residual, cos, sin, meta, kv_cache)
        return self.model.norm(x, residual)[0]

    def one_call_layers(self, meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.ScriptObject | None:
        """What torch.ops.lmgen.decode_layers takes besides the step's tensors (weights, caches, shapes) when
        this step can run all layers in one call: a decode step of few rows on lmgen's CPU kernels, outside
        torch.compile. None otherwise."""
        if torch.compiler.is_compiling():  # first: a traced graph must not depend on the batch size here
            return None
        device = meta.block_tables.device
        if not reads_cache_in_place(meta, self.args.head_dim, device) or meta.block_tables.shape[0] > kernels.MAX_ROWS:
            return None
        if self._one_call is None or self._one_call[0] is not kv_caches:  # weights never change once loaded
            self._one_call = kv_caches, self._gather_one_call_layers(kv_caches)
        return self._one_call[1]

    def _gather_one_call_layers(self, kv_caches: list[KVCache]) -> torch.ScriptObject | None:
        """Per layer both norms' weights, then (weight, scales, zeros, bias) of q/k/v, o, gate/up and down,
        with the caches and shapes; None if some layer's linear cannot run on lmgen's kernels."""
        operands: list[torch.Tensor | None] = []
        for layer in self.model.layers:
            linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            each = [linear.kernel_operands() for linear in linears]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(o is None for o in each) or {norm.dtype for norm in norms} != {self.model.norm.weight.dtype}:
                return None
            operands += [*norms, *(tensor for o in each for tensor in o)]
        args = self.args
        windows = [window or 0 for window in args.layer_windows]
        return torch.classes.lmgen.DecodeLayers(operands, [k for k, _ in kv_caches], [v for _, v in kv_caches], windows,
                                                args.num_heads, args.num_kv_heads, args.head_dim ** -0.5,
                                                args.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        head = self.model.embed_tokens.unembed if self.lm_head is None else self.lm_head
        return head(hidden).float()


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
