"""One rank's share of a model under tensor parallelism, cut from the one decoder every family is.

A rank builds the family's model from a smaller spec (``Shard.spec``: its attention heads, key/value
heads, MLP and experts' intermediate columns, its slice of the vocabulary), so each layer's modules
are the plain ones at a smaller size and run unchanged. The checkpoint's tensors are cut to fit as
they stream in (``Shard.tensors``): each parameter's dims that are smaller on the rank than in the
whole model are split there (q/k/v and gate/up rows, o_proj and down_proj columns, the vocabulary),
the rest replicated. Quantizing happens before cutting, so each rank holds exactly its rows and
columns of the whole model's int8/int4 weights and their scales (a group of int4 columns never
straddles two ranks): the products are the same numbers as on one rank.

What the split leaves partial is summed by one all-reduce after attention and one after the MLP
(or mixture of experts: its experts' and shared expert's partial outputs are linear in their
columns, so one sum serves the block), added as forward hooks on those modules
(``Shard.finish``); a row-split layer's bias is loaded on rank 0 only so that the sum adds it once.
Embedding lookups fall on one rank and are summed too; logits are gathered by the caller.
With fewer key/value heads than ranks each head is replicated on world / num_kv_heads ranks, as
vLLM does, and OLMo 2's norm over a whole projection sums its squares across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmgen.errors import UnsupportedModelError
from lmgen.layers.moe import ExpertLinear
from lmgen.layers.norm import Norm, NormKind
from lmgen.loader.checkpoint import checkpoint_target
from lmgen.models.contract import ModelSpec, QkNorm

#: The modules whose rows are the vocabulary (split into contiguous slices, the last padded).
VOCAB_MODULES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` ranks."""

    rank: int
    world: int

    def spec(self, spec: ModelSpec) -> ModelSpec:
        """The rank's spec: its heads, key/value heads, intermediate columns and vocabulary slice (padded);
        raises naming the size that the ranks cannot share."""
        world = self.world
        moe = next((layer.moe for layer in spec.layers if layer.moe is not None), None)
        counts = {"attention heads": spec.num_heads, "MLP intermediate size": spec.intermediate_size}
        if moe is not None:
            counts.update({"experts' intermediate size": moe.intermediate_size,
                           "shared expert's intermediate size": moe.shared_expert_size or world})
        for what, count in counts.items():
            if count % world:
                raise UnsupportedModelError(f"tensor_parallel_size {world} does not divide the model's {count} "
                                            f"{what}: use a size that does")
        kv = spec.num_kv_heads
        if kv % world and world % kv:
            raise UnsupportedModelError(f"tensor_parallel_size {world} and the model's {kv} key/value heads do not "
                                        "divide one another: use a size that does")
        if moe is not None:
            moe = replace(moe, intermediate_size=moe.intermediate_size // world,
                          shared_expert_size=moe.shared_expert_size // world)
        return replace(spec, num_heads=spec.num_heads // world, num_kv_heads=max(kv // world, 1),
                       intermediate_size=spec.intermediate_size // world, vocab_size=-(-spec.vocab_size // world),
                       layers=tuple(layer if layer.moe is None else replace(layer, moe=moe) for layer in spec.layers))

    def tensors(self, tensors: Iterable[tuple[str, object]], model: nn.Module, whole: nn.Module,
                ) -> Iterator[tuple[str, object]]:
        """The checkpoint's tensors (lmgen's names, quantized already if they are to be) cut to the rank's
        `model`; `whole` is the whole model on the meta device (its shapes)."""
        params, whole_params = dict(model.named_parameters()), dict(whole.named_parameters())
        for name, source in tensors:
            if checkpoint_target(model, name)[0] in params:
                source = self._cut(name, source, model, whole, params, whole_params)
            yield name, source  # else not a weight (rotary tables, a tied head): the loader decides

    def _cut(self, name: str, source, model: nn.Module, whole: nn.Module, params: dict, whole_params: dict):
        """One checkpoint tensor cut to the rank's part of what it fills (as it is where the rank holds all)."""
        target, expert, shard, sizes = checkpoint_target(model, name)
        module_name = target.rpartition(".")[0]
        module = model.get_submodule(module_name)
        whole_piece = _piece(whole_params[target], expert, shard, checkpoint_target(whole, name)[3])
        local_piece = _piece(params[target], expert, shard, sizes)
        row_bias = target.endswith(".bias") and _row_split(module_name, whole_params, params)
        if whole_piece == local_piece and not (row_bias and self.rank):
            return source
        tensor = source if isinstance(source, torch.Tensor) else source.load()
        if row_bias:  # a row-split layer's bias: the all-reduce adds rank 0's
            return torch.zeros_like(tensor)
        # a fused layer saved whole (Phi-3's qkv_proj, GPT-2's c_attn) is cut part by part
        fused = (whole.get_submodule(module_name).shard_sizes, module.shard_sizes) if (
            sizes is None and len(getattr(module, "shard_sizes", None) or ()) > 1) else None
        fused_dim = 1 if expert is None and _stacked(module) else 0
        for dim, (g, n) in enumerate(zip(whole_piece, local_piece)):
            if g == n:
                continue
            if module_name in VOCAB_MODULES and dim == 0:
                tensor = self._vocab_rows(tensor, n)
            elif fused is not None and dim == fused_dim:
                tensor = torch.cat([self._split(part, dim, g_part, n_part, target) for part, g_part, n_part
                                    in zip(tensor.split(fused[0], dim), *fused)], dim)
            else:
                tensor = self._split(tensor, dim, g, n, target)
        return tensor.contiguous()

    def _split(self, tensor: torch.Tensor, dim: int, whole: int, local: int, target: str) -> torch.Tensor:
        """The rank's `local` of `whole` along `dim`: its 1/world; or, when fewer pieces than ranks (key/value
        heads), the piece of the ranks sharing it."""
        if whole % local:
            raise UnsupportedModelError(f"{target}: {whole} along dim {dim} cannot be cut into pieces of {local}")
        return tensor.narrow(dim, self.rank * (whole // local) // self.world * local, local)

    def _vocab_rows(self, tensor: torch.Tensor, rows: int) -> torch.Tensor:
        """The rank's slice of the vocabulary's rows, padded with zero rows past the vocabulary's end."""
        part = tensor[self.rank * rows:(self.rank + 1) * rows]
        return F.pad(part, (0, 0) * (part.dim() - 1) + (0, rows - part.shape[0]))

    def finish(self, model: nn.Module, whole_spec: ModelSpec) -> None:
        """After loading: the all-reduces after attention and after the MLP, the embedding's lookup of the
        rank's vocabulary slice, OLMo 2's whole-projection norms summed across ranks."""
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(_all_reduce_output)
            layer.mlp.register_forward_hook(_all_reduce_output)
            attention = layer.self_attn
            if whole_spec.qk_norm == QkNorm.WHOLE_PROJECTION:
                attention.q_norm = ShardedNorm(attention.q_norm, whole_spec.num_heads * whole_spec.head_dim, 1)
                attention.k_norm = ShardedNorm(attention.k_norm, whole_spec.num_kv_heads * whole_spec.head_dim,
                                               max(self.world // whole_spec.num_kv_heads, 1))
        embedding = model.model.embed_tokens
        model.model.embed_tokens = VocabSlice(embedding, self.rank * embedding.weight.shape[0])
        # the one-call decode runs every layer in C++, where no all-reduce can come between: a share runs
        # layer by layer
        model.one_call_layers = _no_one_call


def _no_one_call(meta: object, kv_caches: list) -> None:
    return None


def _piece(param: torch.Tensor, expert: int | None, shard: int, sizes: list[int] | None) -> list[int]:
    """The shape of the part of `param` one checkpoint tensor fills (as the loader narrows it)."""
    shape = list(param.shape[1:] if expert is not None else param.shape)
    if sizes is not None:
        shape[0] = sizes[shard]
    return shape


def _stacked(module: nn.Module) -> bool:
    return isinstance(module, ExpertLinear) or bool(getattr(module, "stack", ()))


def _row_split(module_name: str, whole_params: dict, params: dict) -> bool:
    """Whether a layer has its input columns split (o_proj, down_proj)."""
    weight = module_name + ".weight"
    return weight in params and whole_params[weight].shape[-1] != params[weight].shape[-1]


def _all_reduce_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


class VocabSlice(nn.Module):
    """The embedding of one rank's slice of the vocabulary: ids outside it look up zeros, and the ranks'
    rows are summed. ``unembed`` (a tied head) gives the slice's logits."""

    def __init__(self, embedding: nn.Module, start: int) -> None:
        super().__init__()
        self.embedding, self.start = embedding, start

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.embedding.weight.shape[0])
        rows = self.embedding(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0)
        dist.all_reduce(rows)
        return rows

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.unembed(hidden)


class ShardedNorm(nn.Module):
    """An RMS norm over a projection whose columns are split across ranks (OLMo 2's q and k norms): the
    squares are summed across ranks (each counted once where `replicas` ranks hold the same columns)."""

    def __init__(self, norm: Norm, whole_size: int, replicas: int) -> None:
        super().__init__()
        self.norm, self.whole_size, self.replicas = norm, whole_size, replicas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        squares = x.float().square().sum(dim=-1, keepdim=True)
        dist.all_reduce(squares)
        normed = x.float() * torch.rsqrt(squares / (self.replicas * self.whole_size) + norm.eps)
        if norm.kind == NormKind.RMS_GAIN_IN_FLOAT:
            return (normed * (norm.weight.float() + norm.offset)).to(x.dtype)
        return norm.weight * normed.to(x.dtype)
