import pytest

from lmgen.cache.block_pool import BlockPool, OutOfBlocksError, chain_hash


def test_allocate_and_free_round_trip():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.usage == 0.0


def test_allocating_more_than_free_fails_without_side_effects():
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_double_free_is_an_error():
    pool = BlockPool(2)
    [block] = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError):
        pool.free([block])


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_cached_blocks_are_found_by_prefix_and_shared():
    pool = BlockPool(4)
    first = pool.allocate(2)
    h1 = chain_hash(None, [1, 2])
    h2 = chain_hash(h1, [3, 4])
    pool.cache(first[0], h1)
    pool.cache(first[1], h2)
    assert pool.lookup([h1, h2, chain_hash(h2, [5, 6])]) == first  # the longest cached prefix
    assert pool.lookup([chain_hash(None, [9, 9])]) == []
    pool.take(first)
    assert pool.ref_count(first[0]) == 2
    pool.free(first)
    pool.free(first)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2  # free, but still cached
    pool.take(pool.lookup([h1]))  # revived from the free queue
    assert pool.num_free_blocks == 3


def test_eviction_takes_the_least_recently_freed_and_tails_first():
    pool = BlockPool(3)
    a = pool.allocate(3)
    hashes = [chain_hash(None, [i]) for i in range(3)]
    for block, h in zip(a, hashes):
        pool.cache(block, h)
    pool.free(a)  # freed tail first: a[2], a[1], a[0]
    [evicted] = pool.allocate(1)
    assert evicted == a[2]
    assert pool.lookup(hashes) == a[:2]


def test_chain_hash_depends_on_the_whole_prefix():
    assert chain_hash(chain_hash(None, [1]), [2]) != chain_hash(chain_hash(None, [3]), [2])
    assert chain_hash(None, [12, 3]) != chain_hash(None, [1, 23])


def test_fork_shares_blocks_and_free_returns_them_once_every_owner_let_go():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    child = pool.fork(blocks)
    assert child == blocks and child is not blocks
    assert [pool.ref_count(b) for b in blocks] == [2, 2] and pool.num_free_blocks == 2
    pool.free(blocks)
    assert pool.num_free_blocks == 2  # the child still holds them
    pool.free(child)
    assert pool.num_free_blocks == 4


def test_copy_on_write_replaces_only_a_shared_block():
    pool = BlockPool(4)
    parent = pool.allocate(2)
    child = pool.fork(parent)
    source, copy = pool.copy_on_write(child, 1)
    assert source == parent[1] and child == [parent[0], copy] and copy not in parent
    assert pool.ref_count(parent[0]) == 2 and pool.ref_count(parent[1]) == 1 and pool.ref_count(copy) == 1
    assert pool.copy_on_write(parent, 1) is None  # now private to the parent: written in place
    pool.free(child)
    pool.free(parent)
    assert pool.num_free_blocks == 4


def test_copy_on_write_without_a_free_block_raises_and_changes_nothing():
    pool = BlockPool(1)
    parent = pool.allocate(1)
    child = pool.fork(parent)
    with pytest.raises(OutOfBlocksError):
        pool.copy_on_write(child, 0)
    assert child == parent and pool.ref_count(parent[0]) == 2
