"""ModelRunner: a scheduled batch -> tensors -> forward -> logits -> sampled tokens."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from lmgen.cache.kv_cache import KVCache
from lmgen.engine.compiled import CompiledDecode
from lmgen.engine.cuda_graphs import GraphedDecode
from lmgen.engine.request import Request
from lmgen.engine.scheduler import ScheduledBatch
from lmgen.layers.attention import AttentionMetadata
from lmgen.outputs import Logprob
from lmgen.sampling.processors import WithDrafts
from lmgen.sampling.sampler import SamplingBatch, row_starts, sample, top_logprobs
from lmgen.sampling.structured import GrammarBackend, allocate_bitmask, apply_bitmask


@dataclass
class PromptScoring:
    """The step's rows whose logits score the prompt token after them (SamplingParams.prompt_logprobs)."""

    rows: list[int] = field(default_factory=list)  # among the step's tokens
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    requests: list[Request] = field(default_factory=list)  # whose rows, in order
    counts: list[int] = field(default_factory=list)  # how many rows each

    def add(self, request: Request, start: int, end: int, first_row: int) -> None:
        """The rows of the request's positions start..end-1 (the first at `first_row`) that predict a prompt
        token not scored yet: a preempted request computes its scored positions again."""
        first = max(start, len(request.prompt_logprobs) - 1)
        last = min(end, request.num_prompt_tokens - 1)  # the last prompt position predicts the first output token
        if first < last:
            self.rows += range(first_row + first - start, first_row + last - start)
            self.targets += request.prompt_token_ids[first + 1:last + 1]
            self.requests.append(request)
            self.counts.append(last - first)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    token_seq_lens: torch.Tensor  # [T] the length of each token's request (all its tokens, computed or not)
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [R] rows whose next token is chosen: each choosing request's last token,
    choosing_requests: list[Request]  # then (speculative decoding) each of its drafts
    prompt_scoring: PromptScoring


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device,
                 compile_decode: bool = False, graphs: GraphedDecode | None = None) -> None:
        self.model = model
        self._decode = CompiledDecode(model, device) if compile_decode else None
        self.graphs = graphs  # decode steps replayed from CUDA graphs (on a GPU)
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self._windows = set(model.spec.layer_windows)
        self._mask_worker = ThreadPoolExecutor(1, thread_name_prefix="lmgen-grammar")

    def prepare(self, batch: ScheduledBatch, masks: bool = True) -> StepInputs:
        """The step's tensors; with `masks`, what attention builds before the forward too
        (AttentionMetadata.prepare). The batch holds Requests, or (a draft model's step) PlainSequences: no
        drafts to check, no prompt to score, and a logits row after each one's last token once it is computed."""
        bs = self.block_size
        ids, positions, seq_lens, slots, token_request, token_offset = [], [], [], [], [], []
        tables, query_starts, request_lens, sample_indices, choosing = [], [], [], [], []
        scoring = PromptScoring()
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        # Python ints rather than numpy arrays: a decode step has one token per request, and numpy's
        # cost per call (ten calls per request) was most of this function's
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start, end, blocks = request.num_computed_tokens, request.num_computed_tokens + n, request.block_ids
            plain = not isinstance(request, Request)  # a PlainSequence
            drafts = () if plain else request.draft_token_ids
            tokens = request.all_token_ids + drafts if drafts else request.all_token_ids
            tables += blocks + [0] * (max_blocks - len(blocks))
            ids += tokens[start:end]
            positions += range(start, end)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            # rope scaling follows the whole sequence, chunked or not; a draft, the sequence as far as it goes
            seq_lens += ([max(request.num_tokens, p + 1) for p in range(start, end)] if drafts
                         else [request.num_tokens] * n)
            token_request += [i] * n
            token_offset += range(n)
            if not plain and request.prompt_logprobs is not None:
                scoring.add(request, start, end, len(ids) - n)
            query_starts.append(start)
            request_lens.append(end)
            if end == len(tokens) and (plain or request.max_tokens > 0):  # the whole sequence is in the cache: time for a new token (and its drafts')
                sample_indices += range(len(ids) - 1 - len(drafts), len(ids))
                choosing.append(request)
        # all of them in one tensor (one copy to a GPU), cut into views
        parts = (ids, positions, seq_lens, slots, tables, query_starts, request_lens, token_request, token_offset,
                 sample_indices)
        (input_ids, positions, token_seq_lens, slot_mapping, tables, query_starts, request_lens, token_request,
         token_offset, sample_indices) = torch.from_numpy(np.fromiter(
            itertools.chain.from_iterable(parts), dtype=np.int64)).to(self.device).split(list(map(len, parts)))
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=tables.view(len(batch), max_blocks), query_starts=query_starts,
            seq_lens=request_lens, token_request=token_request, token_offset=token_offset,
            max_query_len=max(batch.num_new_tokens), block_size=bs)
        if masks:
            meta.prepare(self._windows, self.model.spec.head_dim, self.device)
        return StepInputs(input_ids, positions, token_seq_lens, meta, sample_indices, choosing, scoring)

    @torch.inference_mode()
    def all_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [T, vocab] of every token in the batch (for scoring and perplexity)."""
        return self.model.compute_logits(self._hidden(self.prepare(batch)))

    @torch.inference_mode()
    def last_logits(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Logits [N, vocab] after the last token of each of the batch's PlainSequences (a draft model's step)
        that it computes to the end, in order; None if it computes none to the end."""
        inputs = self.prepare(batch)
        hidden = self._hidden(inputs)
        return self.model.compute_logits(hidden[inputs.sample_indices]) if len(inputs.sample_indices) else None

    def _hidden(self, inputs: StepInputs) -> torch.Tensor:
        return self.model(inputs.input_ids, inputs.positions, inputs.token_seq_lens, inputs.meta,
                          self.kv_cache.layers)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, grammar: GrammarBackend | None = None,
                ) -> list[tuple[Request, list[int], list[dict[int, Logprob]] | None]]:
        """Run one step; returns (request, new tokens, their logprobs) for each request that chose tokens: one,
        or a drafting request's accepted drafts and one token more.

        Requests with a grammar matcher get their logits masked by `grammar` first.
        """
        self.kv_cache.copy_blocks(batch.block_copies)  # forked sequences' shared blocks about to be written
        graphed = self.graphs is not None and self.graphs.takes(batch.num_new_tokens)
        inputs = self.prepare(batch, masks=not graphed)  # a graph builds its masks itself
        requests = inputs.choosing_requests
        starts = row_starts([r.draft_token_ids for r in requests])
        constrained = [(r, start) for r, start in zip(requests, starts) if r.matcher is not None]
        if constrained:  # the grammar engine fills the masks off the GIL while the model runs
            bitmask = allocate_bitmask(sum(1 + len(r.draft_token_ids) for r, _ in constrained),
                                       self.model.spec.vocab_size)
            masks_done = self._mask_worker.submit(grammar.fill_bitmask, [r.matcher for r, _ in constrained],
                                                  [list(r.draft_token_ids) for r, _ in constrained], bitmask)
        # A decode step whose layers run in one kernel call is faster eager than compiled
        compiled = (self._decode is not None and inputs.meta.decode_only
                    and self.model.one_call_layers(inputs.meta, self.kv_cache.layers) is None)
        forward = self._decode if compiled else self.model
        step_args = inputs.input_ids, inputs.positions, inputs.token_seq_lens, inputs.meta, self.kv_cache.layers
        hidden = self.graphs(forward, *step_args) if graphed else forward(*step_args)
        if inputs.prompt_scoring.rows:
            self._score_prompts(hidden, inputs.prompt_scoring)
        if not requests:
            return []
        if len(inputs.sample_indices) < hidden.shape[0]:  # else every row, in order
            hidden = hidden[inputs.sample_indices]
        logits = self.model.compute_logits(hidden)
        recording = any(r.params.score_recorder is not None for r in requests)
        raw = logits.clone() if recording else None  # masks and processors below change logits in place
        if constrained:
            masks_done.result()
            apply_bitmask(logits, [start + j for r, start in constrained for j in range(1 + len(r.draft_token_ids))],
                          bitmask)
        _process(logits, requests, starts)
        if any(r.beam is not None for r in requests):
            logits, raw, requests = _hand_to_beams(logits, raw, requests, starts)
            if not requests:
                return []
        return self._sample(logits, raw, requests)

    def _sample(self, logits: torch.Tensor, raw: torch.Tensor | None, requests: list[Request],
                ) -> list[tuple[Request, list[int], list[dict[int, Logprob]] | None]]:
        """Choose the requests' tokens from their processed logits; hand recorders their rows (one per token)."""
        params = SamplingBatch.build([r.params for r in requests], [r.generator for r in requests], self.device,
                                     [r.draft_token_ids for r in requests], [r.draft_probs for r in requests])
        tokens, logprobs, scores = sample(logits, params)
        for request, start, chosen in zip(requests, params.starts, tokens):
            if request.params.score_recorder is not None:
                for row in range(start, start + len(chosen)):
                    request.params.score_recorder.add(request.index, raw[row], scores[row])
        return list(zip(requests, tokens, logprobs))

    def _score_prompts(self, hidden: torch.Tensor, scoring: PromptScoring) -> None:
        """Append each scoring request's new prompt logprobs: the float32 log-softmax of the raw logits (before
        any processor, as vLLM's) at its rows, for the prompt token that follows each."""
        rows = torch.tensor(scoring.rows, device=self.device)
        logprobs = self.model.compute_logits(hidden[rows]).log_softmax(dim=-1)
        num_top = [r.params.prompt_logprobs for r, count in zip(scoring.requests, scoring.counts) for _ in range(count)]
        entries = iter(top_logprobs(logprobs, torch.tensor(scoring.targets), num_top))
        for request, count in zip(scoring.requests, scoring.counts):
            request.prompt_logprobs += itertools.islice(entries, count)


def _process(logits: torch.Tensor, requests: list[Request], starts: list[int]) -> None:
    """Run each request's logits processors on its rows (in place): on the row after each draft as if the
    drafts before it were accepted."""
    for request, start in zip(requests, starts):
        if request.beam is not None:  # transformers' beam search runs the processors on log-probabilities
            logits[start] = logits[start].log_softmax(dim=-1)
        if not request.logits_processors:
            continue
        drafts = request.draft_token_ids
        for j in range(len(drafts) + 1):
            token_ids = WithDrafts(request.all_token_ids + drafts[:j], j) if j else request.all_token_ids
            for process in request.logits_processors:
                logits[start + j] = process(token_ids, logits[start + j])


def _hand_to_beams(logits: torch.Tensor, raw: torch.Tensor | None, requests: list[Request], starts: list[int],
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[Request]]:
    """Give each beam's processed log-probabilities to its group (which chooses its tokens); the other
    requests' rows go on to the sampler."""
    rows, rest = [], []
    for request, start in zip(requests, starts):
        if request.beam is not None:  # one row: beams do not draft
            request.beam.receive(request, logits[start], None if raw is None else raw[start])
        else:
            rows += range(start, start + 1 + len(request.draft_token_ids))
            rest.append(request)
    return logits[rows], None if raw is None else raw[rows], rest
