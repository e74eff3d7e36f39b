"""Decode steps replayed from CUDA graphs.

On a GPU, a decode step of a small model is a few hundred kernels of a few microseconds
each, and launching them one by one from Python takes longer than running them. A CUDA
graph records the launches once and replays them all in one call. A graph has fixed
shapes and addresses, so one is recorded per bucket (rows in the batch and block-table
width, each rounded up to a power of two), over static input tensors that each step's
inputs are copied into. Rows beyond the batch write their keys and values into a scratch
block that no request owns and attend to it alone. A bucket's graph is recorded when it
is first used; all graphs share one memory pool, which is safe because they replay one
at a time and each output is read before the next replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from lmgen.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

#: A step to record, given as a function of no arguments; recording returns the replay, which
#: returns the step's output (for a CUDA graph, the same tensor each time).
Recorder = Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]]


def record_cuda_graph(device: torch.device) -> Recorder:
    """Records steps as CUDA graphs on `device`, all drawing on one memory pool."""
    pool = torch.cuda.graph_pool_handle()

    def record(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        with torch.cuda.device(device):
            step()  # once outside the graph: cuBLAS handles and workspaces cannot be created while recording
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay

    return record


#: How each device type records steps; decode steps on other devices launch their kernels one by one.
RECORDERS: dict[str, Callable[[torch.device], Recorder]] = {"cuda": record_cuda_graph}


def bucket(n: int, most: int) -> int:
    """n rounded up to a power of two, at most `most` (n <= most)."""
    return min(1 << (n - 1).bit_length(), most)


@dataclass
class _StaticInputs:
    """A graph's inputs, at its bucket's shape; `fill` copies a step's inputs in and pads the rest."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    token_seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_starts: torch.Tensor
    seq_lens: torch.Tensor

    @classmethod
    def padding(cls, rows: int, width: int, scratch_block: int, block_size: int,
                device: torch.device) -> "_StaticInputs":
        """Every row a padding row: one token at position 0 in the scratch block."""
        def full(value: int, *shape: int) -> torch.Tensor:
            return torch.full(shape or (rows,), value, dtype=torch.int64, device=device)

        tables = full(0, rows, width)
        tables[:, 0] = scratch_block
        return cls(input_ids=full(0), positions=full(0), token_seq_lens=full(1),
                   slot_mapping=full(scratch_block * block_size), block_tables=tables, query_starts=full(0),
                   seq_lens=full(1))

    def fill(self, step: _StaticInputs, padding: _StaticInputs) -> None:
        rows, width = step.block_tables.shape
        for field in fields(self):
            mine, given, pad = (getattr(x, field.name) for x in (self, step, padding))
            mine[rows:].copy_(pad[rows:])
            if field.name == "block_tables":  # columns past the step's widest request: never read (masked)
                mine[:rows, :width].copy_(given)
            else:
                mine[:rows].copy_(given)

    def metadata(self, block_size: int, windows: set[int | None]) -> AttentionMetadata:
        rows = self.input_ids.shape[0]
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping, block_tables=self.block_tables, query_starts=self.query_starts,
            seq_lens=self.seq_lens, token_request=torch.arange(rows, device=self.input_ids.device),
            token_offset=torch.zeros_like(self.input_ids), max_query_len=1, block_size=block_size)
        meta.build_masks(windows)  # inside the graph: the masks follow seq_lens at each replay
        return meta


class GraphedDecode:
    """Runs decode steps of up to `max_batch` requests from recorded graphs."""

    def __init__(self, windows: set[int | None], max_batch: int, max_blocks: int, scratch_block: int,
                 block_size: int, device: torch.device, record: Recorder) -> None:
        self.max_batch, self.max_blocks = max_batch, max_blocks
        self._windows, self._scratch_block, self._block_size = windows, scratch_block, block_size
        self._device, self._record = device, record
        self._graphs: dict[tuple[int, int], tuple[_StaticInputs, _StaticInputs, Callable[[], torch.Tensor]]] = {}

    def takes(self, num_new_tokens: list[int]) -> bool:
        """Whether a step (new tokens per request) is one this replays: decode only, few enough rows."""
        return len(num_new_tokens) <= self.max_batch and max(num_new_tokens) == 1

    def __call__(self, forward: Callable[..., torch.Tensor], input_ids: torch.Tensor, positions: torch.Tensor,
                 token_seq_lens: torch.Tensor, meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        """Like `forward` (the model's, or its compiled form) on a decode step: hidden states [B, hidden]."""
        rows, width = meta.block_tables.shape
        key = bucket(rows, self.max_batch), bucket(width, self.max_blocks)
        if key not in self._graphs:
            self._graphs[key] = self._record_bucket(forward, *key, kv_caches)
        static, padding, replay = self._graphs[key]
        static.fill(_StaticInputs(input_ids, positions, token_seq_lens, meta.slot_mapping, meta.block_tables,
                                  meta.query_starts, meta.seq_lens), padding)
        return replay()[:rows]

    def _record_bucket(self, forward: Callable[..., torch.Tensor], rows: int, width: int, kv_caches: list,
                       ) -> tuple[_StaticInputs, _StaticInputs, Callable[[], torch.Tensor]]:
        logger.info("recording the decode step for %d requests of up to %d KV blocks", rows, width)
        padding = _StaticInputs.padding(rows, width, self._scratch_block, self._block_size, self._device)
        static = _StaticInputs.padding(rows, width, self._scratch_block, self._block_size, self._device)

        def step() -> torch.Tensor:
            meta = static.metadata(self._block_size, self._windows)
            return forward(static.input_ids, static.positions, static.token_seq_lens, meta, kv_caches)

        return static, padding, self._record(step)
