"""A draft model: a small model of the target's vocabulary drafts the next tokens (speculative.py).

It runs inside the engine beside the target, on its own paged KV cache: its own BlockPool, KVCache
and ModelRunner (Engine gives it a share of the KV-cache memory; the drop-in ``assistant_model``
lends its own engine's). Each drafting request has a ``DraftSequence``: its tokens as the draft
model last saw them and how many of them are in the draft's cache. Before drafting, the sequence
follows the request: computed tokens that still agree with the request's stay computed (a rejected
draft's slots are written over), and the rest (the tokens accepted since, or everything after the
request first drafts) are computed again: the draft keeps its own cache through the target's
preemptions and prefix-cache hits, and catches up on whatever it has not seen. All drafting requests
of a step run together: one forward over every sequence's missing tokens (several where they are more
than max_num_batched_tokens), whose last positions give the first drafts, then a one-token step for
each further draft.

A greedy request drafts the draft model's argmax. A sampled one draws from the draft model's
distribution under the request's temperature and warpers (not its logits processors), with the
request's generator, and hands that distribution on (``Request.draft_probs``) for rejection sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmgen.cache.block_pool import BlockPool
from lmgen.engine.request import Request
from lmgen.engine.runner import ModelRunner
from lmgen.engine.scheduler import ScheduledBatch
from lmgen.engine.speculative import Draft, SpeculativeConfig
from lmgen.errors import InvalidArgumentError, ModelNotFoundError
from lmgen.loader.checkpoint import resolve_model_path
from lmgen.loader.model import LoadedModel, load_model, read_checkpoint
from lmgen.loader.tokenizer import Tokenizer
from lmgen.sampling.sampler import Warpers, _draw, greedy_tokens


def load_draft_model(config: SpeculativeConfig, target_tokenizer: Tokenizer, device: torch.device,
                     dtype: torch.dtype, max_model_len: int) -> LoadedModel:
    """The draft checkpoint ``config.model``, checked to share the target's tokenizer, on the target's device
    and dtype."""
    try:
        path = resolve_model_path(config.model)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"the draft model (speculative_config 'model'): {exc}") from None
    checkpoint = read_checkpoint(path)  # a folder or a GGUF file, like the target
    check_same_vocabulary(target_tokenizer, checkpoint.tokenizer, repr(config.model))
    return load_model(checkpoint, device, dtype, max_model_len)


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """Drafts are token ids the target checks as its own: both tokenizers must give every token the same id."""
    if draft.vocab_size != target.vocab_size:
        raise InvalidArgumentError(
            f"the draft model {draft_name} has a vocabulary of {draft.vocab_size} tokens, the target "
            f"{target.vocab_size}: speculative decoding needs a draft model with the target's tokenizer")
    target_ids, draft_ids = target.backend.get_vocab(), draft.backend.get_vocab()
    differing = [token for token, token_id in target_ids.items() if draft_ids.get(token) != token_id]
    if differing:
        token = min(differing, key=target_ids.__getitem__)  # the lowest id: the same message every time
        raise InvalidArgumentError(
            f"the draft model {draft_name}'s tokenizer gives {len(differing)} of its {draft.vocab_size} tokens "
            f"other ids than the target's (e.g. {token!r}: {draft_ids.get(token)} there, {target_ids[token]} in "
            "the target): speculative decoding needs a draft model with the target's tokenizer")


@dataclass(eq=False)
class DraftSequence:
    """A request as the draft model runs it (a scheduler.PlainSequence): the request's tokens, then the drafts
    made after them; the first ``num_computed_tokens`` are in the draft's cache."""

    all_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_drafted: int = 0  # trailing tokens that are drafts, not (yet) the request's

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    def follow(self, token_ids: list[int]) -> None:
        """Take the request's tokens, keeping computed the leading ones that still agree with them (drafts
        are the only tokens that can disagree: a request's own tokens never change)."""
        agree, end = self.num_tokens - self.num_drafted, min(self.num_tokens, len(token_ids))
        while agree < end and self.all_token_ids[agree] == token_ids[agree]:
            agree += 1
        self.all_token_ids[agree:] = token_ids[agree:]
        self.num_computed_tokens = min(self.num_computed_tokens, agree, len(token_ids) - 1)
        self.num_drafted = 0


class DraftModelProposer:
    """Drafts with a small model on its own KV cache (`runner`'s, whose blocks `pool` hands out)."""

    def __init__(self, config: SpeculativeConfig, runner: ModelRunner, pool: BlockPool, max_model_len: int,
                 max_num_batched_tokens: int, vocab_size: int, device: torch.device) -> None:
        self.config, self.runner, self.pool = config, runner, pool
        self.max_model_len = max_model_len  # the draft model's: no drafts past it
        self.max_num_batched_tokens = max_num_batched_tokens  # tokens in one of its forwards
        self.vocab_size, self.device = vocab_size, device  # the target's: the drafts' distributions are laid out so
        self._sequences: dict[Request, DraftSequence] = {}

    def propose(self, requests: list[Request], limits: list[int]) -> list[Draft]:
        sequences = [self._sequences.setdefault(request, DraftSequence()) for request in requests]
        for request, sequence in zip(requests, sequences):
            sequence.follow(request.all_token_ids)
        rows = [row for row, (sequence, limit) in enumerate(zip(sequences, limits))
                if self._reserve(sequence, limit, requests)]
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        while rows:  # the first passes compute each sequence's missing tokens, later ones one draft each
            chunks = self._chunks([sequences[row] for row in rows])
            batch = [sequences[row] for row in rows[:len(chunks)]]
            logits = self.runner.last_logits(ScheduledBatch(batch, chunks))
            for sequence, count in zip(batch, chunks):
                sequence.num_computed_tokens += count
            if logits is None:  # a long catch-up's chunk: no sequence is through
                continue
            done = [row for row, sequence in zip(rows, batch) if sequence.num_computed_tokens == sequence.num_tokens]
            tokens, distributions = self._choose(logits, [requests[row] for row in done])
            for row, token, distribution in zip(done, tokens, distributions):
                sequence = sequences[row]
                sequence.all_token_ids.append(token)
                sequence.num_drafted += 1
                drafts[row].append(token)
                if distribution is not None:
                    probs[row].append(distribution)
            rows = [row for row in rows if len(drafts[row]) < limits[row]]
        return [(tokens, torch.stack(per_draft).to(self.device) if per_draft else None)
                for tokens, per_draft in zip(drafts, probs)]

    def _chunks(self, sequences: list[DraftSequence]) -> list[int]:
        """How many of their missing tokens the leading sequences compute in the next forward: all, up to
        max_num_batched_tokens in all (a long catch-up, such as a long prompt's, takes several forwards, as the
        target's prompt chunks do); the sequences after the budget runs out wait for the next one."""
        budget, counts = self.max_num_batched_tokens, []
        for sequence in sequences:
            count = min(sequence.num_tokens - sequence.num_computed_tokens, budget)
            if count == 0:
                break
            counts.append(count)
            budget -= count
        return counts

    def release(self, request: Request) -> None:
        sequence = self._sequences.pop(request, None)
        if sequence is not None:
            self.pool.free(sequence.block_ids)

    def _reserve(self, sequence: DraftSequence, limit: int, drafting: list[Request]) -> bool:
        """Blocks for the sequence and all its drafts but the last (whose KV is never needed); short of them,
        the requests not drafting now give theirs up first. False if there are still too few, or the draft
        model's context is too short."""
        num_tokens = sequence.num_tokens + limit - 1
        if num_tokens > self.max_model_len:
            return False
        needed = -(-num_tokens // self.runner.block_size) - len(sequence.block_ids)
        if needed > self.pool.num_free_blocks:
            for request in set(self._sequences) - set(drafting):
                self.release(request)  # it computes its tokens again if it drafts again
        if needed > self.pool.num_free_blocks:
            return False
        if needed > 0:
            sequence.block_ids += self.pool.allocate(needed)
        return True

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each row's next draft, and the distribution it was drawn from (None for a greedy request's argmax)."""
        logits = _over_vocabulary(logits, self.vocab_size)
        tokens = greedy_tokens(logits)
        distributions: list[torch.Tensor | None] = [None] * len(requests)
        sampled = [row for row, request in enumerate(requests) if request.params.temperature > 0]
        if sampled:
            warpers = Warpers.build([requests[row].params for row in sampled], logits.device)
            probs = warpers(logits[sampled]).softmax(dim=-1)
            tokens[sampled] = _draw(probs, [requests[row].generator for row in sampled]).to(tokens.device)
            for row, distribution in zip(sampled, probs):
                distributions[row] = distribution
        return tokens.tolist(), distributions


def _over_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [N, vocab_size]: checkpoints of one tokenizer may pad their embedding tables to different sizes
    (rows past the tokenizer's tokens); the draft's extra rows are cut, missing ones never chosen."""
    extra = vocab_size - logits.shape[-1]
    if extra <= 0:
        return logits[:, :vocab_size]
    return torch.nn.functional.pad(logits, (0, extra), value=float("-inf"))
