"""Fixed-size KV blocks: a free list and reference counts. Pure Python, no torch."""

from __future__ import annotations

from collections import deque


class OutOfBlocksError(RuntimeError):
    """Raised by allocate() when fewer blocks are free than asked for."""


class BlockPool:
    """Hands out block ids in [0, num_blocks); a block is free when its count is 0.

    Reference counts let several sequences share a block later (prefix caching,
    beams); freeing decrements and returns the block to the pool at zero.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free."""
        for block in blocks:
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed more often than allocated")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]
