"""Rotary position embeddings and the rope_scaling variants of Hugging Face configs.

Frequencies are computed in float32 the way transformers computes them, so cos/sin
match it bit for bit. "dynamic" NTK scaling depends on the sequence length, so its
cos/sin are computed per token from the request's length after this step (what
transformers does for one sequence); every other type uses a precomputed table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmgen import kernels
from lmgen.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    max_position_embeddings: int = 2048
    params: dict = field(default_factory=dict)  # factor, low_freq_factor, ...

    @classmethod
    def from_hf(cls, config: dict, head_dim: int) -> "RopeConfig":
        """Read both the transformers 5 ``rope_parameters`` and the older ``rope_scaling``."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
        return cls(head_dim, float(theta), rope_type, int(config.get("max_position_embeddings", 2048)), rope)


def context_length(config: dict) -> int:
    """The longest sequence a checkpoint supports: linear and dynamic scaling stretch
    max_position_embeddings by their factor (as vLLM derives it)."""
    length = int(config.get("max_position_embeddings", 2048))
    rope = RopeConfig.from_hf(config, head_dim=2)
    if rope.rope_type in ("linear", "dynamic"):
        length = int(length * rope.params["factor"])
    return length


def _base_inv_freq(theta: float | torch.Tensor, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if isinstance(theta, torch.Tensor):  # one base per token: [T] -> [T, dim/2]
        return 1.0 / (theta[:, None] ** exponents[None, :])
    return 1.0 / (theta ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def static_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] of every type whose frequencies do not move."""
    inv_freq = _base_inv_freq(cfg.theta, cfg.head_dim)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.params["factor"]
    if cfg.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, cfg.params)
    return inv_freq


def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class RotaryEmbedding:
    """Gives cos/sin [T, 1, head_dim] in the activations' dtype for a flat batch of token positions."""

    def __init__(self, cfg: RopeConfig, max_len: int) -> None:
        self.cfg = cfg
        self.max_len = max_len
        # (device, dtype) -> cos/sin of every position, [max_len, 1, head_dim]: built on first use, so
        # that a step only indexes them (casting after indexing gives the same values, in 4 more calls)
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, dtype) not in self.tables:
            positions = torch.arange(self.max_len, dtype=torch.float32)
            cos, sin = _cos_sin(positions[:, None] * static_inv_freq(self.cfg)[None, :])
            self.tables[device, dtype] = tuple(t.to(device, dtype)[:, None, :] for t in (cos, sin))
        return self.tables[device, dtype]

    def __call__(self, positions: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] absolute positions; seq_lens: [T] each token's sequence length after this step."""
        if self.cfg.rope_type == "dynamic" and bool((seq_lens > self.cfg.max_position_embeddings).any()):
            return tuple(t.to(dtype)[:, None, :] for t in self._dynamic(positions, seq_lens))
        cos, sin = self._table(positions.device, dtype)
        return cos[positions], sin[positions]

    def _dynamic(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, dim = self.cfg, self.cfg.head_dim
        max_pos, factor = cfg.max_position_embeddings, cfg.params["factor"]
        length = seq_lens.clamp(min=max_pos).float().cpu()
        base = cfg.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = _base_inv_freq(base, dim)
        cos, sin = _cos_sin(positions.float().cpu()[:, None] * inv_freq)
        return cos.to(positions.device), sin.to(positions.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim] in x's dtype (as transformers rotates)."""
    if kernels.serve(x.device):
        return torch.ops.lmgen.rotary(x, cos, sin)  # one call instead of eight
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
