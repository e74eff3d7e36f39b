import pytest

from lmgen.cache.block_pool import BlockPool, OutOfBlocksError


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
