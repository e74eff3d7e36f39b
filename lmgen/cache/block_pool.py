"""Fixed-size KV blocks: a free list, reference counts and the prefix cache. Pure Python, no torch.

Prefix caching: once a block is full, it is registered under a hash of its tokens
chained with the previous block's hash, so the hash names the whole prefix. A later
request whose prompt starts with the same tokens takes those blocks (reference count
+1) instead of recomputing them. Freed blocks keep their contents and their hash
while they wait in the free queue; allocation takes the least recently freed block
first and only then forgets what it held (LRU eviction).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


class OutOfBlocksError(RuntimeError):
    """Raised by allocate() when fewer blocks are free than asked for."""


def chain_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The hash of a full block: its tokens and everything before them (via `parent`)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.digest()


class BlockPool:
    """Hands out block ids in [0, num_blocks); a block is free when its count is 0."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # block -> hash, for cached blocks
        self._block_of: dict[bytes, int] = {}  # hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by requests, 0.0 to 1.0 (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget(block)
            self._ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks reaching zero become free (and stay cached).

        Pass a sequence's blocks in order: the tail is freed first so it is evicted first,
        keeping the shared beginnings of prompts cached longest.
        """
        for block in reversed(blocks):
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} freed more often than allocated")
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ---- sharing (beams, n > 1) ------------------------------------------------------
    def fork(self, blocks: Sequence[int]) -> list[int]:
        """A second owner of `blocks` (reference count +1 each): a forked sequence shares its parent's blocks.

        A shared block must not be written: see copy_on_write() for the one a sequence writes next.
        """
        for block in blocks:
            self._ref_counts[block] += 1
        return list(blocks)

    def copy_on_write(self, blocks: list[int], index: int) -> tuple[int, int] | None:
        """Make ``blocks[index]`` private before it is written: when it is shared, replace it by a fresh block.

        Returns (source, destination) whose KV contents the caller copies, or None when the
        block was already private. Raises OutOfBlocksError when no block is free.
        """
        source = blocks[index]
        if self._ref_counts[source] == 1:
            return None
        [copy] = self.allocate(1)
        self._ref_counts[source] -= 1  # still held by the other owners, so never freed here
        blocks[index] = copy
        return source, copy

    # ---- prefix cache ----------------------------------------------------------------
    def cache(self, block: int, block_hash: bytes) -> None:
        """Register a full, computed block under its prefix hash (first registration wins)."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def lookup(self, block_hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `block_hashes` (not yet taken)."""
        blocks = []
        for block_hash in block_hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, blocks: Sequence[int]) -> None:
        """Add a reference to cached blocks found by lookup(), reviving free ones."""
        for block in blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
