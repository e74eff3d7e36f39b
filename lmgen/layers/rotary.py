"""Rotary position embeddings and the rope_scaling variants of Hugging Face configs.

Frequencies are computed in float32 the way transformers computes them, so cos/sin
match it bit for bit. "dynamic" NTK scaling and "longrope" (Phi-3) depend on the sequence
length, so each token's cos/sin follow its request's length after this step (what
transformers does for one sequence): dynamic computes them per token, longrope picks each
token's row from its short- or long-factor table; every other type uses one precomputed
table (YaRN's blends each original frequency with it divided by its factor, and scales
cos/sin). A partial rotary (``partial_rotary_factor``, Phi-4-mini) rotates the first
``rotary_dim`` dimensions of each head and passes the rest through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmgen import kernels
from lmgen.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")
#: Types whose frequencies are computed on the CPU from each request's length, every step (longrope
#: also follows the length, but picks between two tables on the device).
HOST_COMPUTED_ROPE_TYPES = ("dynamic",)


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    max_position_embeddings: int = 2048
    params: dict = field(default_factory=dict)  # factor, low_freq_factor, ...
    rotary_dim: int = 0  # the dimensions of each head it rotates; 0: all (head_dim)

    def __post_init__(self) -> None:
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)

    @classmethod
    def from_hf(cls, config: dict, head_dim: int, parameters: dict | None = None) -> "RopeConfig":
        """Read both the transformers 5 ``rope_parameters`` and the older ``rope_scaling``; `parameters`
        overrides them (the per-layer-type entries of Gemma 3's)."""
        rope = dict(parameters or config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # Phi-3's early name
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        max_positions = int(config.get("max_position_embeddings", 2048))
        if rope_type in ("llama3", "longrope", "yarn"):
            rope.setdefault("original_max_position_embeddings",
                            config.get("original_max_position_embeddings", max_positions))
        return cls(head_dim, float(theta), rope_type, max_positions, rope, int(head_dim * partial))

    @property
    def computed_on_host(self) -> bool:
        return self.rope_type in HOST_COMPUTED_ROPE_TYPES


def _longrope(cfg: RopeConfig, long: bool) -> tuple[torch.Tensor, float]:
    """Phi-3's inverse frequencies (short or long factors) and the factor cos/sin are scaled by."""
    p, dim = cfg.params, cfg.rotary_dim
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / original
    scaling = p.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = torch.tensor(p["long_factor" if long else "short_factor"], dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (factors * cfg.theta ** exponents), scaling


def _yarn(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies (GPT-OSS, Qwen3 long context) and the factor cos/sin are scaled by, as
    transformers computes them: each frequency blends the original one (fast dimensions, which turn
    beta_fast times or more over the original length) and the one divided by `factor` (slow ones, beta_slow
    turns or fewer), along a linear ramp between them."""
    p, dim = cfg.params, cfg.rotary_dim
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / original
    scaling = p.get("attention_factor")
    if scaling is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        scaling = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                   else _yarn_mscale(factor))

    def dimension_turning(turns: float) -> float:  # the dimension that turns `turns` times over the original length
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = dimension_turning(p.get("beta_fast") or 32), dimension_turning(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = cfg.theta ** (torch.arange(0, dim, 2).float() / dim)
    kept = 1 - ramp  # the share of each original frequency
    return 1.0 / (factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept, scaling


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
    inv_freq = _base_inv_freq(cfg.theta, cfg.rotary_dim)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.params["factor"]
    if cfg.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, cfg.params)
    return inv_freq


def _inv_freq_and_scaling(cfg: RopeConfig, long: bool) -> tuple[torch.Tensor, float]:
    """A table's inverse frequencies and the factor its cos/sin are scaled by."""
    if cfg.rope_type == "longrope":
        return _longrope(cfg, long)
    if cfg.rope_type == "yarn":
        return _yarn(cfg)
    return static_inv_freq(cfg), 1.0


def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class RotaryEmbedding:
    """Gives cos/sin [T, 1, rotary_dim] in the activations' dtype for a flat batch of token positions."""

    def __init__(self, cfg: RopeConfig, max_len: int) -> None:
        self.cfg = cfg
        self.max_len = max_len
        # (device, dtype, long factors) -> cos/sin of every position, [max_len, 1, rotary_dim]: built on
        # first use, so that a step only indexes them (casting after indexing gives the same values, in 4
        # more calls)
        self.tables: dict[tuple[torch.device, torch.dtype, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if (device, dtype, long) not in self.tables:
            positions = torch.arange(self.max_len, dtype=torch.float32)
            inv_freq, scaling = _inv_freq_and_scaling(self.cfg, long)
            cos, sin = (t * scaling for t in _cos_sin(positions[:, None] * inv_freq[None, :]))
            self.tables[device, dtype, long] = tuple(t.to(device, dtype)[:, None, :] for t in (cos, sin))
        return self.tables[device, dtype, long]

    def __call__(self, positions: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] absolute positions; seq_lens: [T] the length of each token's sequence (a prompt's
        whole length for each of its chunks, as transformers rotates a prompt in one pass)."""
        if self.cfg.rope_type == "dynamic" and bool((seq_lens > self.cfg.max_position_embeddings).any()):
            return tuple(t.to(dtype)[:, None, :] for t in self._dynamic(positions, seq_lens))
        cos, sin = self._table(positions.device, dtype)
        if self.cfg.rope_type == "longrope":  # a token past the original length takes the long factors' row
            is_long = (seq_lens > self.cfg.params["original_max_position_embeddings"])[:, None, None]
            long_cos, long_sin = self._table(positions.device, dtype, long=True)
            return (torch.where(is_long, long_cos[positions], cos[positions]),
                    torch.where(is_long, long_sin[positions], sin[positions]))
        return cos[positions], sin[positions]

    def _dynamic(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, dim = self.cfg, self.cfg.rotary_dim
        max_pos, factor = cfg.max_position_embeddings, cfg.params["factor"]
        length = seq_lens.clamp(min=max_pos).float().cpu()
        base = cfg.theta * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = _base_inv_freq(base, dim)
        cos, sin = _cos_sin(positions.float().cpu()[:, None] * inv_freq)
        return cos.to(positions.device), sin.to(positions.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, 1, rotary_dim] in x's dtype (as transformers rotates)."""
    if kernels.serve(x.device):
        return torch.ops.lmgen.rotary(x, cos, sin)  # one call instead of eight
    width = cos.shape[-1]
    turning, passing = x[..., :width], x[..., width:]
    half = width // 2
    rotated = torch.cat((-turning[..., half:], turning[..., :half]), dim=-1)
    return torch.cat((turning * cos + rotated * sin, passing), dim=-1)
