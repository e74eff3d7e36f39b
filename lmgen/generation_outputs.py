"""What transformers' ``generate(return_dict_in_generate=True)`` returns, and ``compute_transition_scores``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch


class _ModelOutput:
    """transformers' ModelOutput access: attributes, and a dict / tuple of the fields that are set."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class GenerateDecoderOnlyOutput(_ModelOutput):
    """transformers' output of non-beam generation: attribute and dict access (unset fields are left out).

    ``scores`` and ``logits`` hold one [batch, vocab] tensor per generated token
    (``output_scores``: after processors and warpers; ``output_logits``: the model's own).
    Where a row finished before the longest one, its later steps say "certainly the pad
    token" (0 there, -inf elsewhere), so its transition scores there are 0.
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None  # not kept by lmgen's paged attention
    hidden_states: None = None
    cache: None = None  # lmgen's KV cache is paged and shared between requests; it is never handed out


@dataclass
class GenerateBeamDecoderOnlyOutput(_ModelOutput):
    """transformers' output of beam search, fields in its order.

    ``sequences_scores`` (with ``output_scores``): each returned hypothesis's score;
    ``scores`` / ``logits``: one [batch * num_beams, vocab] tensor per beam step, rows in
    beam order; ``beam_indices`` [batch * num_return_sequences, steps]: the row of
    ``scores`` each token was chosen from, -1 past the hypothesis's end. Where a prompt's
    beam search ended before the longest one, its later steps hold the "certain pad"
    filler (transformers keeps computing those beams; no hypothesis reads them).
    """

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: None = None
    hidden_states: None = None
    cache: None = None


def stack_steps(rows: list[list[torch.Tensor]], num_steps: int, pad_token_id: int,
                device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Each output row's per-step [vocab] tensors -> one [rows, vocab] tensor per step, on `device`.

    A row that finished early is filled with a certain pad token (0, the rest -inf).
    """
    filler = torch.full_like(rows[0][0], float("-inf"))
    filler[pad_token_id] = 0.0
    return tuple(torch.stack([row[step] if step < len(row) else filler for row in rows]).to(device)
                 for step in range(num_steps))


def compute_transition_scores(sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                              beam_indices: torch.Tensor | None = None,
                              normalize_logits: bool = False) -> torch.Tensor:
    """transformers' compute_transition_scores: the score of each generated token, [batch, steps].

    With ``normalize_logits`` the scores are log-softmaxed over the vocabulary first;
    steps a beam did not take (``beam_indices`` < 0) score 0.
    """
    vocab_size = scores[0].shape[-1]
    if beam_indices is None:  # non-beam generation: row i always continues row i
        beam_indices = torch.arange(scores[0].shape[0], device=sequences.device)[:, None].expand(-1, len(scores))
    stacked = torch.stack(scores).reshape(len(scores), -1).transpose(0, 1)  # [batch * vocab, steps]
    if normalize_logits:
        stacked = stacked.reshape(-1, vocab_size, len(scores)).log_softmax(dim=1).reshape(-1, len(scores))
    not_taken = beam_indices < 0
    num_steps = int((~not_taken).sum(-1).max())
    beam_indices = beam_indices[:, :num_steps].masked_fill(not_taken[:, :num_steps], 0)
    indices = sequences[:, sequences.shape[-1] - num_steps:] + beam_indices * vocab_size
    transition = stacked.to(sequences.device).gather(0, indices)
    return transition.masked_fill(not_taken[:, :num_steps], 0.0)
