"""Mixture-of-experts layers: a router picks each token's top-k experts (small gated MLPs), whose
outputs are summed with the router's weights (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS).

A layer's experts are stored stacked, one tensor per projection (``gate_up_proj.weight``
[E, 2 * intermediate, hidden], ``down_proj.weight`` [E, hidden, intermediate]; quantized, their
storage forms with the same leading expert dimension), which checkpoints' per-expert tensors load
into by index (lmgen/loader/checkpoint.py: ``experts.N.gate_proj`` -> ``experts.gate_up_proj[N]``).

A step's tokens are grouped by expert (sorted by the expert they chose, gathered, one product per
expert that any token chose, added back with the routing weights), so each expert's weights are
read once per step however many tokens chose it: what makes decoding a MoE on a CPU as fast as a
dense model of its active parameters, since only the chosen experts leave memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lmgen.errors import UnsupportedModelError
from lmgen.layers.linear import Linear, MLPActivation


@dataclass(frozen=True)
class MoEConfig:
    """A layer's experts and router, as a family's config.json describes them."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # each expert's
    norm_topk: bool  # the top-k probabilities renormalised to sum to 1 (Mixtral; Qwen's norm_topk_prob)
    # Mixtral weighs the experts' outputs with float32 routing weights; the others round them to the activations' dtype
    float32_weights: bool = False
    shared_expert_size: int = 0  # Qwen2-MoE: a gated MLP every token passes through besides its experts; 0: none
    # GPT-OSS: the top-k router logits are chosen first and only their softmax weighs the experts; its router
    # and its experts' projections have biases
    softmax_after_topk: bool = False
    biases: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UnsupportedModelError(f"mixture of experts: {name} must be a positive integer, "
                                            f"got {getattr(self, name)!r}")
        if self.top_k > self.num_experts:
            raise UnsupportedModelError(f"mixture of experts: each token cannot choose {self.top_k} of "
                                        f"{self.num_experts} experts")
        if self.shared_expert_size < 0:
            raise UnsupportedModelError(f"mixture of experts: shared expert size {self.shared_expert_size}")


class ExpertLinear(Linear):
    """The same projection of each of a layer's experts, stacked: weight [E, out, in]. Like FusedLinear,
    ``shard_sizes`` says which rows each checkpoint tensor fills (gate, then up)."""

    def __init__(self, num_experts: int, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes))
        self.weight = nn.Parameter(torch.empty(num_experts, self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts, self.out_features), requires_grad=False) if bias else None
        self.shard_sizes = list(shard_sizes)


def expert_view(stack: nn.Module, expert: int) -> nn.Module:
    """One expert of a stacked linear (float or quantized) as a linear of its own: the same module with
    each parameter indexed at `expert`, sharing the stack's memory."""
    view = copy.copy(stack)
    view._parameters = {name: None if p is None else nn.Parameter(p[expert], requires_grad=False)
                        for name, p in stack._parameters.items()}
    return view


class Experts(nn.Module):
    """A layer's experts: gate/up and down stacked (see ExpertLinear)."""

    def __init__(self, hidden_size: int, config: MoEConfig, activation: MLPActivation) -> None:
        super().__init__()
        size = config.intermediate_size
        self.num_experts = config.num_experts
        self.gate_up_proj = ExpertLinear(config.num_experts, hidden_size, [size, size], config.biases)
        self.down_proj = ExpertLinear(config.num_experts, size, [hidden_size], config.biases)
        self.act = activation
        self._views: list[tuple[nn.Module, nn.Module]] = []  # per expert (gate_up, down), made on first use

    def views(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each expert's (gate_up, down) linears, made on the first step (after loading and packing, so they
        take the stacks' final layout); made again if quantizing replaced the stacks."""
        if not self._views or self._views[0][0].weight.data_ptr() != self.gate_up_proj.weight.data_ptr():
            self._views = [(expert_view(self.gate_up_proj, e), expert_view(self.down_proj, e))
                           for e in range(self.num_experts)]
        return self._views

    def forward(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, hidden] sorted by expert, `counts[e]` of them for expert e -> each row's expert output."""
        out = torch.empty_like(rows)
        start = 0
        for (gate_up, down), count in zip(self.views(), counts):
            if count:  # an expert no token chose is never read
                out[start:start + count] = down(self.act(gate_up(rows[start:start + count])))
                start += count
        return out


class MoE(nn.Module):
    """The MLP of a mixture-of-experts layer: softmax router, top-k experts, optional gated shared expert.

    `activation` is the experts' (gated, over their fused gate/up projections).

    ``tokens_per_expert`` counts the tokens routed to each expert since it was last zeroed (router
    statistics: ``lmgen.layers.moe.tokens_per_expert``).
    """

    def __init__(self, hidden_size: int, config: MoEConfig, activation: MLPActivation,
                 shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.router = Linear(hidden_size, config.num_experts, bias=config.biases)
        self.experts = Experts(hidden_size, config, activation)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_expert is not None else None
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        config = self.config
        logits = self.router(x).float()
        if config.softmax_after_topk:
            top, chosen = logits.topk(config.top_k, dim=-1)  # [T, k]
            weights = torch.softmax(top, dim=-1)
        else:
            weights, chosen = torch.softmax(logits, dim=-1).topk(config.top_k, dim=-1)
        if config.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not config.float32_weights:
            weights = weights.to(x.dtype)
        # each (token, choice) slot, sorted by expert: its token, and how many slots each expert has
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=config.num_experts)
        self.tokens_per_expert += counts
        tokens = order // config.top_k
        outputs = self.experts(x.index_select(0, tokens), counts.tolist())
        weighted = (outputs * weights.flatten()[order, None]).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, tokens, weighted)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def tokens_per_expert(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router statistics: each MoE layer's name -> tokens routed to each of its experts [E] since the
    counts were last zeroed (``counts.zero_()`` on the returned tensors)."""
    return {name: module.tokens_per_expert for name, module in model.named_modules() if isinstance(module, MoE)}
