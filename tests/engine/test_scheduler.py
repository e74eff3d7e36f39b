"""Scheduler behaviour with no model: budgets, chunked prefill, preemption, abort."""

import torch

from lmgen.cache.block_pool import BlockPool
from lmgen.engine.request import Request, RequestStatus
from lmgen.engine.scheduler import Scheduler, SchedulerConfig
from lmgen.params import SamplingParams


def make_request(name: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), max_tokens,
                   torch.Generator())


def run_step(scheduler: Scheduler, sample_token: int = 7):
    """What the engine does after the model ran: advance counters, append a token where one was sampled."""
    batch = scheduler.schedule()
    scheduler.commit(batch)
    for request in batch.requests:
        if request.num_computed_tokens == request.num_tokens:
            request.append_token(sample_token, max_model_len=10_000)
            if request.finished:
                scheduler.finish(request)
    return batch


def test_token_budget_mixes_chunked_prefill_and_decode():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10, block_size=4), BlockPool(64))
    short, long = make_request("short", 3), make_request("long", 25)
    scheduler.add(short)
    scheduler.add(long)
    first = run_step(scheduler)
    assert first.num_new_tokens == [3, 7]  # short prefilled whole, long gets the rest of the budget
    second = run_step(scheduler)
    assert [r.request_id for r in second.requests] == ["short", "long"]
    assert second.num_new_tokens == [1, 9]  # one decode token, the next prefill chunk
    assert long.num_computed_tokens == 16 and long.num_output_tokens == 0


def test_blocks_follow_the_tokens():
    pool = BlockPool(64)
    scheduler = Scheduler(SchedulerConfig(block_size=4), pool)
    request = make_request("r", 5)
    scheduler.add(request)
    run_step(scheduler)
    assert len(request.block_ids) == 2  # 5 tokens in blocks of 4
    for _ in range(3):
        run_step(scheduler)
    assert len(request.block_ids) == 2  # tokens 6..8 still fit
    run_step(scheduler)
    assert len(request.block_ids) == 3


def test_preemption_frees_blocks_and_requeues_first():
    pool = BlockPool(4)  # 16 token slots
    scheduler = Scheduler(SchedulerConfig(block_size=4), pool)
    a, b = make_request("a", 7, max_tokens=8), make_request("b", 7, max_tokens=8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)  # both prefilled: 2 blocks each, pool full
    assert pool.num_free_blocks == 0
    run_step(scheduler)  # token 8 still fits in two blocks
    batch = run_step(scheduler)  # a and b both need a third block for token 9: b is preempted
    assert b in batch.preempted and b.status is RequestStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_output_tokens == 2
    assert scheduler.waiting[0] is b
    for _ in range(50):
        if not scheduler.has_unfinished():
            break
        run_step(scheduler)
    assert a.finished and b.finished
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert pool.num_free_blocks == 4


def test_abort_frees_blocks():
    pool = BlockPool(8)
    scheduler = Scheduler(SchedulerConfig(block_size=4), pool)
    request = make_request("r", 9)
    scheduler.add(request)
    run_step(scheduler)
    assert pool.num_free_blocks == 5
    request.finish("abort")
    scheduler.finish(request)
    assert pool.num_free_blocks == 8 and not scheduler.has_unfinished()


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, block_size=4), BlockPool(64))
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 2))
    batch = run_step(scheduler)
    assert len(batch) == 2 and len(scheduler.waiting) == 1


def test_prefix_cache_hit_skips_computed_blocks_but_never_the_last_token():
    pool = BlockPool(16)
    scheduler = Scheduler(SchedulerConfig(block_size=4), pool)
    first = make_request("first", 10, max_tokens=1)
    scheduler.add(first)
    run_step(scheduler)  # computes 10 tokens: blocks 0 and 1 full and cached, then finishes
    assert first.finished and pool.num_cached_blocks == 2
    same_prefix = make_request("second", 10, max_tokens=1)
    scheduler.add(same_prefix)
    batch = run_step(scheduler)
    assert batch.num_new_tokens == [2]  # 8 tokens from the cache, 2 computed
    exact = make_request("third", 8, max_tokens=1)  # all 8 tokens cached: the last block is recomputed
    scheduler.add(exact)
    assert run_step(scheduler).num_new_tokens == [4]
    assert scheduler.num_prefix_hit_tokens == 8 + 4


def test_prefix_caching_can_be_turned_off():
    pool = BlockPool(16)
    scheduler = Scheduler(SchedulerConfig(block_size=4, enable_prefix_caching=False), pool)
    for name in ("a", "b"):
        scheduler.add(make_request(name, 10, max_tokens=1))
        assert run_step(scheduler).num_new_tokens == [10]
    assert pool.num_cached_blocks == 0


def test_a_request_crossing_the_rope_switch_length_recomputes_and_never_reuses_the_other_regime():
    """longrope: past 8 tokens every token's rope changes, so the sequence is computed again (as
    transformers does), and its prefix-cache hashes differ from the same tokens' below the length."""
    pool = BlockPool(64)
    scheduler = Scheduler(SchedulerConfig(block_size=4, rope_switch_length=8), pool)
    crossing, short = make_request("crossing", 6, max_tokens=6), make_request("short", 6, max_tokens=2)
    scheduler.add(crossing)
    assert run_step(scheduler).num_new_tokens == [6]
    short_hashes, short_block = crossing.full_block_hashes(4, 4), crossing.block_ids[0]
    run_step(scheduler)  # 7 computed, 8 tokens: still the short rope
    assert crossing.num_tokens == 8 and crossing.hash_salt is None
    run_step(scheduler)
    assert run_step(scheduler).num_new_tokens == [9]  # 9 tokens: all of them again, with the long rope
    assert crossing.hash_salt is not None and crossing.block_ids[0] != short_block
    assert crossing.full_block_hashes(4, 4) != short_hashes
    scheduler.add(short)  # the same first block, below the length: the short-rope copy is its, the long one not
    run_step(scheduler)
    assert scheduler.num_prefix_hit_tokens == 4
    assert short.block_ids[0] == short_block


def partial_prefills(max_num_partial_prefills: int = 2) -> Scheduler:
    """A budget of 16 tokens; the test prompts share their tokens, so no prefix caching."""
    return Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_partial_prefills=max_num_partial_prefills,
                                     block_size=4, enable_prefix_caching=False), BlockPool(64))


def scheduled(scheduler: Scheduler, num_steps: int) -> list[list[tuple[str, int]]]:
    """(request, tokens) of each of the next steps."""
    return [[(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]
            for batch in (run_step(scheduler) for _ in range(num_steps))]


def test_a_burst_of_equal_prompts_is_served_first_come_first_served_while_decoders_keep_their_token():
    scheduler = partial_prefills()
    prompts = [make_request(f"p{i}", 6, max_tokens=4) for i in range(5)]
    for request in prompts:
        scheduler.add(request)
    assert scheduled(scheduler, 3) == [
        [("p0", 6), ("p1", 6), ("p2", 4)],  # each prompt whole (shorter than its share of 8), the budget cuts p2
        [("p0", 1), ("p1", 1), ("p2", 2), ("p3", 6), ("p4", 6)],  # decoders first, then the queue in order
        [("p0", 1), ("p1", 1), ("p2", 1), ("p3", 1), ("p4", 1)],
    ]


def test_a_long_prompt_shares_the_step_with_the_short_ones_behind_it_then_takes_the_budget_alone():
    scheduler = partial_prefills()
    long, short, other = make_request("long", 50), make_request("short", 5), make_request("other", 20)
    for request in (long, short, other):
        scheduler.add(request)
    assert scheduled(scheduler, 5) == [
        [("long", 8), ("short", 5), ("other", 3)],  # three prompts pending: each takes at most 8 of 16
        [("long", 8), ("short", 1), ("other", 7)],  # two still prefilling: long's 8 and the rest to other
        [("long", 8), ("short", 1), ("other", 7)],
        [("long", 12), ("short", 1), ("other", 3)],  # other's last 3: long gets its 8 and what other left
        [("long", 14), ("short", 1), ("other", 1)],  # long alone: uncapped, its last 14
    ]
    assert short.num_output_tokens == 5 and other.num_output_tokens == 2 and long.num_output_tokens == 1


def test_what_the_short_prompts_leave_goes_back_to_the_capped_one():
    scheduler = partial_prefills()
    long, short = make_request("long", 40), make_request("short", 3)
    scheduler.add(long)
    scheduler.add(short)
    assert run_step(scheduler).num_new_tokens == [13, 3]  # capped at 8, then given the 5 short left
    assert len(long.block_ids) == 4  # blocks for all 13 of its tokens


def test_one_partial_prefill_is_first_come_first_served_whole():
    scheduler = partial_prefills(max_num_partial_prefills=1)
    for request in (make_request("long", 40), make_request("short", 5)):
        scheduler.add(request)
    assert run_step(scheduler).num_new_tokens == [16]
