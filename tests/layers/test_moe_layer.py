"""The mixture-of-experts layer against a token-by-token reference: routing, grouping, shared expert,
quantized experts, router statistics."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmgen import QuantConfig, UnsupportedModelError
from lmgen.layers.linear import Activation, Linear, MLPActivation
from lmgen.layers.moe import MoE, MoEConfig, expert_view, tokens_per_expert
from lmgen.layers.quant import Int4Linear, Int8Linear, quantize_model

HIDDEN, EXPERTS = 64, 8


class SharedExpert(nn.Module):  # the shape of the decoder's MLP: act(gate) * up, then down
    def __init__(self, size: int) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = Linear(HIDDEN, 2 * size), Linear(size, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _moe(config: MoEConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(HIDDEN, config, MLPActivation(Activation.SILU, gated=True),
              SharedExpert(128) if config.shared_expert_size else None)
    for p in moe.parameters():
        p.data.normal_(0, 0.2)
    return moe


def _expert(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, moe.experts.gate_up_proj.weight[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, moe.experts.down_proj.weight[e])


def _reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token alone: its top-k experts' outputs weighed by their (renormalised) probabilities."""
    config, rows = moe.config, []
    for token in x:
        probs = torch.softmax(F.linear(token, moe.router.weight), dim=-1)
        weights, chosen = probs.topk(config.top_k)
        if config.norm_topk:
            weights = weights / weights.sum()
        row = sum(w * _expert(moe, int(e), token) for w, e in zip(weights, chosen))
        if moe.shared_expert is not None:
            row = row + torch.sigmoid(moe.shared_expert_gate(token)) * moe.shared_expert(token)
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("config", [
    MoEConfig(EXPERTS, 2, 64, norm_topk=True, float32_weights=True),  # Mixtral's
    MoEConfig(EXPERTS, 3, 64, norm_topk=False, shared_expert_size=128),  # Qwen2-MoE's
])
def test_grouped_experts_match_each_token_alone_and_read_each_expert_once(config):
    moe = _moe(config)
    x = torch.randn(20, HIDDEN)
    calls = []
    moe.experts.gate_up_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    out = moe(x)
    torch.testing.assert_close(out, _reference(moe, x), atol=1e-5, rtol=1e-4)
    # one product per expert that some token chose, over all its tokens: 20 tokens x top-k slots
    assert len(calls) <= EXPERTS and sum(calls) == 20 * config.top_k
    assert sorted(calls) == sorted(c for c in moe.tokens_per_expert.tolist() if c)


def test_router_statistics_count_the_tokens_each_expert_took_until_zeroed():
    moe = _moe(MoEConfig(EXPERTS, 2, 64, norm_topk=True))
    model = nn.ModuleDict({"layer": moe})
    moe(torch.randn(5, HIDDEN))
    moe(torch.randn(3, HIDDEN))
    (counts,) = tokens_per_expert(model).values()
    assert counts.sum().item() == 8 * 2
    counts.zero_()
    moe(torch.randn(1, HIDDEN))
    assert tokens_per_expert(model)["layer"].sum().item() == 2


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts_compute_with_their_dequantized_weights(method):
    moe = _moe(MoEConfig(EXPERTS, 2, 64, norm_topk=True))
    x = torch.randn(6, HIDDEN)
    container = nn.ModuleDict({"mlp": moe})
    quantize_model(container, QuantConfig(method, group_size=32))
    stacks = moe.experts.gate_up_proj, moe.experts.down_proj
    assert all(isinstance(s, Int8Linear if method == "int8" else Int4Linear) for s in stacks)
    assert isinstance(moe.router, Linear) and not isinstance(moe.router, Int8Linear)  # routing stays exact
    out = moe(x)
    # the same layer with float experts holding what the integers stand for
    dequantized = _moe(MoEConfig(EXPERTS, 2, 64, norm_topk=True))
    dequantized.router.weight.data.copy_(moe.router.weight)
    for stack, float_stack in zip(stacks, (dequantized.experts.gate_up_proj, dequantized.experts.down_proj)):
        for e in range(EXPERTS):
            float_stack.weight.data[e] = expert_view(stack, e)._dequantized()
    expected = dequantized(x)
    # activations pass through int8 per group in lmgen's kernels (as in tests/layers/test_quant.py), twice here
    assert (out - expected).norm() < 0.03 * expected.norm()


def test_a_moe_config_that_does_not_hold_together_names_the_fault():
    with pytest.raises(UnsupportedModelError, match="cannot choose 9 of 8 experts"):
        MoEConfig(8, 9, 64, norm_topk=True)
    with pytest.raises(UnsupportedModelError, match="num_experts must be a positive integer"):
        MoEConfig(0, 1, 64, norm_topk=True)
