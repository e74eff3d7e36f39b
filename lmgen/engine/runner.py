"""ModelRunner: a scheduled batch -> tensors -> forward -> logits -> sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmgen.cache.kv_cache import KVCache
from lmgen.engine.request import Request
from lmgen.engine.scheduler import ScheduledBatch
from lmgen.layers.attention import AttentionMetadata
from lmgen.outputs import Logprob
from lmgen.sampling.sampler import SamplingBatch, sample


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    token_seq_lens: torch.Tensor  # [T] each token's request length after the step
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] rows of the flat batch whose next token is sampled
    sampled_requests: list[Request]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids, positions, seq_lens, slots, token_request, token_offset = [], [], [], [], [], []
        query_starts, request_lens, sample_indices, sampled = [], [], [], []
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int64)
        total = 0
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start, end = request.num_computed_tokens, request.num_computed_tokens + n
            pos = np.arange(start, end)
            table = np.asarray(request.block_ids, dtype=np.int64)
            block_tables[i, : len(table)] = table
            ids.extend(request.all_token_ids[start:end])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            seq_lens.append(np.full(n, end))
            token_request.append(np.full(n, i))
            token_offset.append(np.arange(n))
            query_starts.append(start)
            request_lens.append(end)
            total += n
            if end == request.num_tokens:  # the whole sequence is in the cache: time for a new token
                sample_indices.append(total - 1)
                sampled.append(request)
        flat = self._to_device
        meta = AttentionMetadata(
            slot_mapping=flat(np.concatenate(slots)), block_tables=flat(block_tables),
            query_starts=flat(query_starts), seq_lens=flat(request_lens),
            token_request=flat(np.concatenate(token_request)), token_offset=flat(np.concatenate(token_offset)),
            max_query_len=max(batch.num_new_tokens), block_size=bs)
        return StepInputs(flat(ids), flat(np.concatenate(positions)), flat(np.concatenate(seq_lens)), meta,
                          flat(sample_indices), sampled)

    def _to_device(self, values) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(self.device)

    @torch.inference_mode()
    def all_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [T, vocab] of every token in the batch (for scoring and perplexity)."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.token_seq_lens, inputs.meta,
                            self.kv_cache.layers)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Request, int, dict[int, Logprob] | None]]:
        """Run one step; returns (request, sampled token, logprobs) for each request that sampled."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.token_seq_lens, inputs.meta,
                            self.kv_cache.layers)
        if not inputs.sampled_requests:
            return []
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        for row, request in enumerate(inputs.sampled_requests):
            for process in request.logits_processors:
                logits[row] = process(request.all_token_ids, logits[row])
        params = SamplingBatch.build([r.params for r in inputs.sampled_requests],
                                     [r.generator for r in inputs.sampled_requests], self.device)
        tokens, logprobs = sample(logits, params)
        return list(zip(inputs.sampled_requests, tokens.tolist(), logprobs))
