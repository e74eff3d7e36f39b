"""Engine: load a checkpoint, accept requests, and run the step loop.

``step()`` is the whole loop: schedule -> run the model -> sample -> update requests
-> emit RequestOutput deltas. Every front end feeds ``add_request`` and consumes
``step`` (or the async wrapper the server uses).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from lmgen.cache.block_pool import BlockPool
from lmgen.cache.kv_cache import KVCache, bytes_per_block
from lmgen.distributed.parallel import TensorParallelLM, load_tensor_parallel
from lmgen.engine.beam import BeamGroup
from lmgen.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_GPU_KV_CACHE_FRACTION, EngineConfig, parse_size
from lmgen.engine.cuda_graphs import RECORDERS, GraphedDecode
from lmgen.engine.draft_model import DraftModelProposer, check_same_vocabulary, load_draft_model
from lmgen.engine.output import OutputState, with_token_text
from lmgen.engine.request import Request
from lmgen.engine.runner import ModelRunner
from lmgen.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from lmgen.engine.speculative import NgramProposer, Proposer, SpeculativeConfig
from lmgen.errors import InvalidArgumentError
from lmgen.loader.checkpoint import DEMO_MODEL_PATH, resolve_model_path
from lmgen.loader.model import LoadedModel, load_model, read_checkpoint
from lmgen.models.contract import ModelSpec
from lmgen.outputs import Logprob, RequestOutput, SpecDecodeStats
from lmgen.params import DEFAULT_MAX_TOKENS, SamplingParams
from lmgen.sampling.processors import build_processors
from lmgen.sampling.structured import GrammarBackend, LLGuidanceBackend

logger = logging.getLogger(__name__)


def _as_id_set(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


class Engine:
    """One model, one KV cache, many requests."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        started = time.perf_counter()
        self.model_path = resolve_model_path(config.model or DEMO_MODEL_PATH, config.revision, config.gguf_file)
        checkpoint = read_checkpoint(self.model_path)
        self.hf_config, self.generation_config = checkpoint.hf_config, checkpoint.generation_config
        self.tokenizer = checkpoint.tokenizer
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.hf_config.get("dtype") or self.hf_config.get("torch_dtype"), self.device)
        self.kv_cache_dtype = config.kv_cache_torch_dtype(self.dtype)
        # GGUF blocks stay whole: a rank's share of a row-split weight would cut through them
        load = partial(load_model, checkpoint, self.device, self.dtype, config.max_model_len, config.quant_config(),
                       config.quantization_group_size is not None,
                       gguf_blocks=config.dtype == "auto" and config.tensor_parallel_size == 1,
                       map_weights=config.map_weights)
        loaded = (load() if config.tensor_parallel_size == 1 else
                  load_tensor_parallel(config, self.model_path, self.hf_config, self.device, load))
        self.model, self.max_model_len, self.quantization = loaded.model, loaded.max_model_len, loaded.quantization
        speculative = config.speculative_config
        draft = (load_draft_model(speculative, self.tokenizer, self.device, self.dtype, self.max_model_len)
                 if speculative is not None and speculative.model else None)
        budget = self._kv_cache_budget()
        draft_budget = 0 if draft is None else self._draft_share(budget, draft.model.spec)
        self.kv_cache = self._allocate_kv_cache(self.model.spec, budget - draft_budget)  # of each rank
        if isinstance(self.model, TensorParallelLM):
            self.model.share_cache(self.kv_cache)
        graphs = self._graphed_decode()  # its padding rows write into the cache's last block, kept from the pool
        self.pool = BlockPool(self.kv_cache.num_blocks - (graphs is not None))
        self.scheduler = Scheduler(SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.max_num_partial_prefills, config.block_size,
            config.enable_prefix_caching, self.model.spec.rope_switch_length), self.pool)
        if config.compile and graphs is not None:
            logger.warning("compile=True is ignored on a GPU, where decode steps replay CUDA graphs: compiled ones "
                           "replayed slower (6.8 vs 2.4 ms per batch-1 step of bench-125m on an H200); add "
                           "enforce_eager=True to compile without graphs")
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, config.compile and graphs is None, graphs)
        self.proposer = self._proposer(draft, draft_budget)  # what drafts the next tokens; None: no speculation
        self.eos_token_ids = self._eos_token_ids()
        self.default_max_tokens = int(self.generation_config.get("max_new_tokens") or DEFAULT_MAX_TOKENS)
        self._rng = random.Random(config.seed)
        self._families: dict[str, list[Request]] = {}  # caller's request id -> its n sequences
        self._outputs: dict[str, OutputState] = {}
        self._beam_groups: dict[str, BeamGroup] = {}  # caller's request id -> its beams (num_beams > 1)
        self._prompt_forks: dict[Request, list[Request]] = {}  # first of n sequences -> the others, until it prefilled
        self._ready: list[RequestOutput] = []  # deltas made between steps (aborts), sent by the next step()
        self._grammar_backend: GrammarBackend | None = None  # built on the first structured request
        self.spec_decode = SpecDecodeStats()  # speculative decoding's record over all requests so far
        logger.info("loaded %s (%s, %s) in %.1f s; KV cache %d blocks of %d tokens (%s, %.0f MiB)",
                    self.model_path, self.dtype, self.device, time.perf_counter() - started,
                    self.kv_cache.num_blocks, config.block_size, self.kv_cache_dtype, self.kv_cache.nbytes / 2**20)

    # ---- loading -------------------------------------------------------------------------
    def _kv_cache_budget(self) -> int:
        if self.config.kv_cache_memory is not None:
            return parse_size(self.config.kv_cache_memory)
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0] * DEFAULT_GPU_KV_CACHE_FRACTION)
        return DEFAULT_CPU_KV_CACHE_BYTES

    def _bytes_per_block(self, spec: ModelSpec) -> int:
        return bytes_per_block(spec.num_layers, self.config.block_size, spec.num_kv_heads, spec.head_dim,
                               self.kv_cache_dtype)

    def _draft_share(self, budget: int, draft_spec: ModelSpec) -> int:
        """The draft model's part of the KV-cache budget: as many tokens as the target's part holds (a small
        draft's tokens take little room)."""
        draft_bytes = self._bytes_per_block(draft_spec)
        return budget * draft_bytes // (draft_bytes + self._bytes_per_block(self.model.spec))

    def _allocate_kv_cache(self, spec: ModelSpec, budget: int, num_draft_tokens: int = 0) -> KVCache:
        """A cache of `budget` bytes at most, for a model of `spec` (the target's, or the draft model's, which
        also holds `num_draft_tokens` drafts past a request's tokens)."""
        block_size, per_block = self.config.block_size, self._bytes_per_block(spec)
        useful = self.config.max_num_seqs * -(-(self.max_model_len + num_draft_tokens) // block_size)
        num_blocks = min(budget // per_block, useful)
        if num_blocks < 1:
            owner = "the draft model's share of " if num_draft_tokens else ""
            raise InvalidArgumentError(f"{owner}kv_cache_memory, {budget} bytes, is smaller than one KV block "
                                       f"({per_block} bytes); raise kv_cache_memory")
        return KVCache(spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                       self.kv_cache_dtype, self.device)

    def _proposer(self, draft: LoadedModel | None, draft_budget: int) -> Proposer | None:
        """What speculative_config asks for: prompt lookup, or the draft model on its own KV cache."""
        speculative = self.config.speculative_config
        if speculative is None:
            return None
        if draft is None:
            return NgramProposer(speculative)
        cache = self._allocate_kv_cache(draft.model.spec, draft_budget, speculative.num_speculative_tokens)
        logger.info("draft model %s: KV cache %d blocks (%.0f MiB)", speculative.model, cache.num_blocks,
                    cache.nbytes / 2**20)
        return DraftModelProposer(speculative, ModelRunner(draft.model, cache, self.device),
                                  BlockPool(cache.num_blocks), self.max_model_len, self.config.max_num_batched_tokens,
                                  self.model.spec.vocab_size, self.device)

    def draft_proposer(self, draft: Engine, num_speculative_tokens: int) -> DraftModelProposer:
        """A proposer that drafts with another engine's model, on that engine's KV cache (idle meanwhile): the
        drop-in generate's assistant_model, loaded once."""
        if draft.has_unfinished_requests():
            raise InvalidArgumentError("the draft model's engine is generating: draft with an idle one")
        check_same_vocabulary(self.tokenizer, draft.tokenizer, repr(str(draft.model_path)))
        config = SpeculativeConfig(model=str(draft.model_path), num_speculative_tokens=num_speculative_tokens)
        return DraftModelProposer(config, draft.runner, draft.pool, draft.max_model_len,
                                  draft.config.max_num_batched_tokens, self.model.spec.vocab_size, self.device)

    @contextmanager
    def speculating(self, proposer: Proposer | None) -> Iterator[None]:
        """Draft with `proposer` (None: no speculation) instead of the configured one while the block runs: the
        drop-in generate's per-call prompt_lookup_num_tokens and assistant_model. Its requests must finish
        inside the block."""
        configured, self.proposer = self.proposer, proposer
        try:
            yield
        finally:
            self.proposer = configured

    def _graphed_decode(self) -> GraphedDecode | None:
        """Recorded graphs for the decode steps where the device has them (CUDA), unless asked not to or the
        model's rope frequencies depend on the context length or its experts are chosen per step (decided on the
        CPU, which a graph cannot replay), or it is split across ranks (each step is broadcast to them first)."""
        record = RECORDERS.get(self.device.type)
        spec = self.model.spec
        if (record is None or self.config.enforce_eager or spec.rope_computed_on_host or spec.routes_on_host
                or self.kv_cache.num_blocks < 2 or self.config.tensor_parallel_size > 1):
            return None
        block_size = self.config.block_size
        return GraphedDecode(set(self.model.spec.layer_windows), self.config.max_num_seqs,
                             -(-self.max_model_len // block_size), self.kv_cache.num_blocks - 1, block_size,
                             self.device, record(self.device))

    def close(self) -> None:
        """Release what outlives the engine's memory: its tensor-parallel workers (the next engine of this process
        takes them over). A closed engine takes no more steps."""
        if isinstance(self.model, TensorParallelLM):
            self.model.close()

    def _eos_token_ids(self) -> frozenset[int]:
        ids = _as_id_set(self.generation_config.get("eos_token_id"))
        ids = ids or _as_id_set(self.hf_config.get("eos_token_id"))
        if not ids and self.tokenizer.eos_token_id is not None:
            ids = frozenset([self.tokenizer.eos_token_id])
        return ids

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json sampling defaults, then `overrides`.

        Only settings the file writes down are taken (temperature, top_k, top_p, min_p, repetition_penalty;
        ``do_sample: false`` means greedy); the rest keep SamplingParams' defaults.
        """
        config = self.generation_config
        defaults = {name: config[name] for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
                    if config.get(name) is not None}
        if config.get("do_sample") is False:
            defaults["temperature"] = 0.0
        return SamplingParams(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises on bad input.

        With ``params.n > 1`` the request fans out into n sequences that share the prompt;
        their deltas come out under the one request id, told apart by ``index``.
        """
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._families:
            raise InvalidArgumentError(f"request id {request_id!r} is already in use")
        prompt_text, prompt_ids = self._tokenize(prompt)
        self._check_logit_bias(params)
        self._check_logprobs(params)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.default_max_tokens
        self._check_fits(len(prompt_ids), max_tokens)
        if params.num_beams > 1:
            self._add_beam_group(request_id, prompt_text, prompt_ids, params, max_tokens)
            return request_id
        grammar = self.grammar_backend.compile(params.structured) if params.structured else None
        family = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else self._rng.getrandbits(63)
            request = Request(f"{request_id}#{index}" if params.n > 1 else request_id, prompt_ids, params, max_tokens,
                              torch.Generator(self.device).manual_seed(seed), prompt_text, self.eos_token_ids,
                              parent_id=request_id, index=index)
            request.logits_processors = build_processors(params, len(prompt_ids), self.model.spec.vocab_size,
                                                         request.stop_token_ids, max_tokens)
            if grammar is not None:
                request.matcher = self.grammar_backend.new_matcher(grammar)
                self._append_forced_tokens(request)  # e.g. the '{"' that a JSON schema output must start with
            family.append(request)
        self._families[request_id] = family
        shares_prompt = params.n > 1 and grammar is None  # the others fork the first one's prompt blocks
        for request in family:
            self._outputs[request.request_id] = OutputState(request, self.tokenizer)
            if request.finished:  # the grammar forced the whole output
                self._ready.append(self._delta(request, None))
            elif not (shares_prompt and request.index > 0):
                self.scheduler.add(request)
        if shares_prompt:
            self._prompt_forks[family[0]] = family[1:]
        return request_id

    def _fork_prompts(self, sampled: list) -> None:
        """Once the first of n sequences has computed the prompt, the others share its KV blocks and compute
        only the prompt's last token again (for their own first-token logits), in a private block copy."""
        for request, _, _ in sampled:
            for sibling in self._prompt_forks.pop(request, ()):
                if sibling.finished:  # aborted meanwhile
                    continue
                sibling.block_ids = self.pool.fork(request.block_ids)
                sibling.block_hashes = list(request.block_hashes)
                sibling.num_cached_blocks = request.num_cached_blocks
                sibling.num_computed_tokens = request.num_computed_tokens - 1
                self.scheduler.add(sibling, front=True)

    def _add_beam_group(self, request_id: str, prompt_text: str | None, prompt_ids: list[int],
                        params: SamplingParams, max_tokens: int) -> None:
        """Queue a beam search: num_beams slots, of which only the first computes the prompt (the rest fork)."""
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = torch.Generator(self.device).manual_seed(seed)  # beam-sample draws from the group's own
        slots = [Request(f"{request_id}#beam{i}", prompt_ids, params, max_tokens, generator, prompt_text,
                         self.eos_token_ids, parent_id=request_id, index=i) for i in range(params.num_beams)]
        new_processors = partial(build_processors, params, len(prompt_ids), self.model.spec.vocab_size,
                                 slots[0].stop_token_ids, max_tokens)
        slots[0].logits_processors = new_processors()  # the others get theirs when they fork
        decode = partial(self.tokenizer.decode, skip_special_tokens=params.skip_special_tokens)
        group = BeamGroup(slots, self.pool, new_processors, self.max_model_len, generator, decode)
        for slot in slots:
            slot.beam = group
        self._families[request_id] = slots
        self._beam_groups[request_id] = group
        self.scheduler.add(slots[0])

    def _advance_beams(self) -> list[RequestOutput]:
        """Run the selection step of each beam group whose round is complete; returns the finished groups' outputs."""
        outputs = []
        for request_id, group in list(self._beam_groups.items()):
            if not group.round_complete:
                continue
            for joined in group.select():
                self.scheduler.add(joined, front=True)
            if group.done:
                outputs.append(self._finish_beams(request_id))
        return outputs

    def _finish_beams(self, request_id: str, reason: str | None = None) -> RequestOutput:
        """Free a beam group's slots; its one output holds the n best hypotheses (`reason` overrides theirs)."""
        group = self._beam_groups.pop(request_id)
        del self._families[request_id]
        for slot in group.slots:
            slot.finish(reason or "stop")
            self._finish(slot)
        leader = group.leader
        completions = group.completions(reason)
        for completion in completions:
            if completion.logprobs is not None:
                completion.logprobs = with_token_text(completion.logprobs, self.tokenizer)
        return RequestOutput(request_id, leader.prompt, leader.prompt_token_ids, completions, finished=True,
                             prompt_logprobs=self._take_prompt_logprobs(leader))

    @property
    def grammar_backend(self) -> GrammarBackend:
        """The structured-output engine (llguidance), set up for this tokenizer on first use."""
        if self._grammar_backend is None:
            self._grammar_backend = LLGuidanceBackend(self.tokenizer, self.model.spec.vocab_size,
                                                      self.eos_token_ids)
        return self._grammar_backend

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model.spec.vocab_size
        bad = [t for t in (params.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(f"logit_bias token ids must be in [0, {vocab}); got {bad[:5]}")

    def _check_logprobs(self, params: SamplingParams) -> None:
        most, vocab = self.config.max_logprobs, self.model.spec.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > most:
                raise InvalidArgumentError(f"{name} asks for the top {value} tokens, more than max_logprobs ({most}) "
                                           "allows: ask for fewer, or raise max_logprobs (--max-logprobs)")
            if value is not None and value > vocab:
                raise InvalidArgumentError(f"{name} must be at most the vocabulary's {vocab} tokens, got {value}")

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty: give at least one character or token id")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidArgumentError("the prompt is empty: give at least one character or token id")
        vocab = self.model.spec.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise InvalidArgumentError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return None, ids

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidArgumentError(
                f"the prompt has {num_prompt_tokens} tokens but the model's context is {self.max_model_len} "
                "tokens (prompt plus output): shorten the prompt or raise max_model_len")
        needed = min(num_prompt_tokens + max_tokens, self.max_model_len)
        capacity = self.pool.num_blocks * self.config.block_size
        if needed > capacity:
            raise InvalidArgumentError(
                f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {needed} tokens of KV "
                f"cache but it holds {capacity}: raise kv_cache_memory or lower max_tokens")

    def abort_request(self, request_id: str) -> None:
        """Stop a request (all n of its sequences) and free its blocks; its final delta comes out of the next step()."""
        family = self._families.get(request_id)
        if family is None:
            return
        if request_id in self._beam_groups:
            self._ready.append(self._finish_beams(request_id, "abort"))
            return
        self._prompt_forks.pop(family[0], None)
        for request in family:
            if not request.finished:
                request.finish("abort")
                self._finish(request)
                self._ready.append(self._delta(request, None))

    def has_unfinished_requests(self) -> bool:
        return bool(self._families) or bool(self._ready)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._families)

    def _delta(self, request: Request, logprobs: list | None) -> RequestOutput:
        """The request's new tokens as a completion delta in its parent's RequestOutput; forgets finished families."""
        completion = self._outputs[request.request_id].update(request, logprobs)
        if self.proposer is not None:
            completion.spec_decode = request.spec_decode
        family = self._families[request.parent_id]
        done = all(r.finished for r in family)
        if request.finished:
            del self._outputs[request.request_id]
        if done:
            del self._families[request.parent_id]
        return RequestOutput(request.parent_id, request.prompt, request.prompt_token_ids, [completion], finished=done,
                             prompt_logprobs=self._take_prompt_logprobs(request))

    def _take_prompt_logprobs(self, request: Request) -> list[dict[int, Logprob] | None] | None:
        """The request's prompt logprobs with their tokens' text, once all are scored; handed out once."""
        scored = request.prompt_logprobs
        if scored is None or len(scored) < request.num_prompt_tokens:
            return None
        request.prompt_logprobs = None
        return [None, *with_token_text(scored[1:], self.tokenizer)]

    def score(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Logits [len(prompt), vocab] (float32) at every position of each token-id prompt.

        Runs as one batch beside (not inside) the request stream; the prompts' KV
        blocks are freed before returning.
        """
        requests = [Request(f"score-{i}", self._tokenize(p)[1], SamplingParams(), 1, torch.Generator())
                    for i, p in enumerate(prompts)]
        for request in requests:
            self._check_fits(request.num_prompt_tokens, 1)
        blocks = [-(-r.num_prompt_tokens // self.config.block_size) for r in requests]
        if sum(blocks) > self.pool.num_free_blocks:
            raise InvalidArgumentError(f"scoring needs {sum(blocks)} KV blocks, {self.pool.num_free_blocks} are "
                                       "free: score fewer prompts at once")
        try:
            for request, count in zip(requests, blocks):
                request.block_ids = self.pool.allocate(count)
            logits = self.runner.all_logits(ScheduledBatch(requests, [r.num_prompt_tokens for r in requests]))
        finally:
            for request in requests:
                self.pool.free(request.block_ids)
        return list(logits.split([r.num_prompt_tokens for r in requests]))

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled request by one step; returns the deltas it produced."""
        outputs, self._ready = self._ready, []
        batch = self.scheduler.schedule()
        if not batch.requests:
            return outputs
        sampled = self.runner.execute(batch, self._grammar_backend)
        self.scheduler.commit(batch)
        outputs.extend(self._finish_scored(batch))
        if self._prompt_forks:
            self._fork_prompts(sampled)
        if self._beam_groups:
            outputs.extend(self._advance_beams())
        for request, tokens, logprobs in sampled:
            outputs.extend(self._append_tokens(request, tokens, logprobs))
        self._draft([request for request, _, _ in sampled if not request.finished])
        return outputs

    def _append_tokens(self, request: Request, tokens: list[int], logprobs: list | None) -> list[RequestOutput]:
        """Append a step's tokens (several when drafts were accepted), each checked for stops as if it came alone
        (one delta per token); then settle the request's drafts. The tokens after one that the grammar follows
        with forced tokens are dropped: they were chosen without those before them."""
        deltas, num_before = [], request.num_tokens
        for i, token in enumerate(tokens):
            request.append_token(token, self.max_model_len)
            if request.matcher is not None:
                self._advance_grammar(request, token)
            deltas.append(self._delta(request, None if logprobs is None else [logprobs[i]]))
            if request.finished or request.num_tokens > num_before + i + 1:  # the grammar forced tokens
                break
        accepted = min(i + 1, len(tokens) - 1)  # drafts now in the sequence
        if request.draft_token_ids:
            self._record_drafts(request, accepted)
            deltas[-1].outputs[0].spec_decode = request.spec_decode  # the step's last delta: the record after it
        if request.finished:
            self._finish(request)
        elif request.draft_token_ids:
            self._settle_drafts(request, num_before + accepted, accepted)
        return deltas

    def _record_drafts(self, request: Request, accepted: int) -> None:
        """Count a verifying step that kept `accepted` of the request's drafts, in its record and the engine's."""
        drafted = len(request.draft_token_ids)
        request.spec_decode = request.spec_decode.after_step(drafted, accepted)
        self.spec_decode = self.spec_decode.after_step(drafted, accepted)

    def _finish(self, request: Request) -> None:
        """Free a finished request's blocks, and what drafting for it holds."""
        self.scheduler.finish(request)
        if self.proposer is not None:
            self.proposer.release(request)

    def _finish_scored(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Requests with max_tokens=0 finish ("length") once their prompt is computed: its logprobs were all
        they asked for; the other n - 1 sequences, which would have shared it, finish with the first."""
        outputs = []
        for request in batch.requests:
            if request.max_tokens == 0 and request.num_computed_tokens == request.num_tokens:
                for sequence in (request, *self._prompt_forks.pop(request, ())):
                    sequence.finish("length")
                    self._finish(sequence)
                    outputs.append(self._delta(sequence, None))
        return outputs

    def _settle_drafts(self, request: Request, num_valid: int, accepted: int) -> None:
        """After a step that accepted `accepted` of the request's drafts: drop what it computed past its first
        `num_valid` tokens (their cache slots get written over), and set how many it may draft next."""
        speculative = self.proposer.config
        request.num_computed_tokens = min(request.num_computed_tokens, num_valid)
        request.draft_limit = speculative.next_limit(len(request.draft_token_ids), accepted)
        request.draft_pause = speculative.num_speculative_tokens if request.draft_limit == 0 else 0
        request.draft_token_ids, request.draft_probs = [], None

    def _draft(self, requests: list[Request]) -> None:
        """Draft the next tokens of those of `requests` that speculate, in one call of the proposer."""
        if self.proposer is None:
            return
        limits = [self._draft_limit(request) for request in requests]
        most = self.proposer.config.disable_by_batch_size
        if most is not None and len(self.scheduler.running) > most:  # a full batch: drafts would cost more
            return
        drafting = [(request, limit) for request, limit in zip(requests, limits) if limit > 0]
        if drafting:
            requests, limits = map(list, zip(*drafting))
            for request, (token_ids, probs) in zip(requests, self.proposer.propose(requests, limits)):
                request.draft_token_ids, request.draft_probs = token_ids, probs

    def _draft_limit(self, request: Request) -> int:
        """How many tokens the request may draft now (any request but a beam: a beam group chooses its tokens
        across its beams); as many as its drafts' record allows, its max_tokens and the context."""
        speculative = self.proposer.config
        if request.beam:
            return 0
        if request.draft_pause:  # its last drafts all failed
            request.draft_pause -= 1
            return 0
        limit = speculative.num_speculative_tokens if request.draft_limit is None else max(request.draft_limit, 1)
        room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
        switch = self.model.spec.rope_switch_length
        if switch is not None and request.num_tokens <= switch:  # no draft past it: the sequence is recomputed there
            room = min(room, switch - request.num_tokens)
        return max(min(room, limit), 0)

    def _advance_grammar(self, request: Request, token: int) -> None:
        """Feed the sampled token to the request's matcher, then append what the grammar forces next."""
        if self._consumed(request, token):
            self._append_forced_tokens(request)

    @staticmethod
    def _consumed(request: Request, token: int) -> bool:
        """Feed `token` to the request's matcher; a token the grammar refuses aborts the request, said in the log."""
        if request.matcher.consume_token(token):
            return True
        logger.error("request %s: grammar rejected token %d: %s", request.request_id, token, request.matcher.get_error())
        request.finish("abort")
        return False

    def _append_forced_tokens(self, request: Request) -> None:
        """Append the tokens the grammar leaves no choice about; finish the request when the grammar is complete.

        Forced tokens cost no model step of their own: the next step computes them with
        the request's next token, like a prompt chunk. They are skipped when logprobs are
        requested, since a forced token has no distribution to report.
        """
        matcher = request.matcher
        forced = matcher.compute_ff_tokens() if request.params.logprobs is None else []
        for token in forced:
            if request.finished or not self._consumed(request, token):
                break
            request.append_token(token, self.max_model_len)
        if matcher.is_stopped() and not request.finished:
            request.finish("stop")
