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
from collections.abc import Sequence
from functools import partial

import torch

from lmgen.cache.block_pool import BlockPool
from lmgen.cache.kv_cache import KVCache, bytes_per_block
from lmgen.engine.beam import BeamGroup
from lmgen.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, DEFAULT_GPU_KV_CACHE_FRACTION, EngineConfig, parse_size
from lmgen.engine.cuda_graphs import RECORDERS, GraphedDecode
from lmgen.engine.output import OutputState, with_token_text
from lmgen.engine.request import Request
from lmgen.engine.runner import ModelRunner
from lmgen.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from lmgen.errors import InvalidArgumentError
from lmgen.loader.checkpoint import DEMO_MODEL_PATH, read_json, resolve_model_path
from lmgen.loader.model import load_model
from lmgen.loader.tokenizer import Tokenizer
from lmgen.outputs import RequestOutput
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
        self.model_path = resolve_model_path(config.model or DEMO_MODEL_PATH, config.revision)
        self.hf_config = read_json(self.model_path, "config.json", required=True)
        self.generation_config = read_json(self.model_path, "generation_config.json")
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.hf_config.get("dtype") or self.hf_config.get("torch_dtype"), self.device)
        loaded = load_model(self.model_path, self.hf_config, self.device, self.dtype, config.max_model_len,
                            config.quant_config(), config.quantization_group_size is not None)
        self.model, self.max_model_len, self.quantization = loaded.model, loaded.max_model_len, loaded.quantization
        self.kv_cache = self._allocate_kv_cache()
        graphs = self._graphed_decode()  # its padding rows write into the cache's last block, kept from the pool
        self.pool = BlockPool(self.kv_cache.num_blocks - (graphs is not None))
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.block_size, config.enable_prefix_caching,
                                                   self.model.spec.rope_switch_length), self.pool)
        if config.compile and graphs is not None:
            logger.warning("compile=True is ignored on a GPU, where decode steps replay CUDA graphs: compiled ones "
                           "replayed slower (6.8 vs 2.4 ms per batch-1 step of bench-125m on an H200); add "
                           "enforce_eager=True to compile without graphs")
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, config.compile and graphs is None, graphs)
        self.eos_token_ids = self._eos_token_ids()
        self.default_max_tokens = int(self.generation_config.get("max_new_tokens") or DEFAULT_MAX_TOKENS)
        self._rng = random.Random(config.seed)
        self._families: dict[str, list[Request]] = {}  # caller's request id -> its n sequences
        self._outputs: dict[str, OutputState] = {}
        self._beam_groups: dict[str, BeamGroup] = {}  # caller's request id -> its beams (num_beams > 1)
        self._prompt_forks: dict[Request, list[Request]] = {}  # first of n sequences -> the others, until it prefilled
        self._ready: list[RequestOutput] = []  # deltas made between steps (aborts), sent by the next step()
        self._grammar_backend: GrammarBackend | None = None  # built on the first structured request
        self.num_draft_tokens = self.num_accepted_draft_tokens = 0  # speculative decoding's acceptance
        logger.info("loaded %s (%s, %s) in %.1f s; KV cache %d blocks of %d tokens (%.0f MiB)",
                    self.model_path, self.dtype, self.device, time.perf_counter() - started,
                    self.kv_cache.num_blocks, config.block_size, self.kv_cache.nbytes / 2**20)

    # ---- loading -------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> KVCache:
        spec, block_size = self.model.spec, self.config.block_size
        per_block = bytes_per_block(spec.num_layers, block_size, spec.num_kv_heads, spec.head_dim, self.dtype)
        if self.config.kv_cache_memory is not None:
            budget = parse_size(self.config.kv_cache_memory)
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * DEFAULT_GPU_KV_CACHE_FRACTION)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        useful = self.config.max_num_seqs * -(-self.max_model_len // block_size)
        num_blocks = min(budget // per_block, useful)
        if num_blocks < 1:
            raise InvalidArgumentError(
                f"kv_cache_memory {budget} bytes is smaller than one KV block ({per_block} bytes); raise it")
        return KVCache(spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                       self.dtype, self.device)

    def _graphed_decode(self) -> GraphedDecode | None:
        """Recorded graphs for the decode steps where the device has them (CUDA), unless asked not to or the
        model's rope frequencies depend on the context length or its experts are chosen per step (decided on the
        CPU, which a graph cannot replay)."""
        record = RECORDERS.get(self.device.type)
        spec = self.model.spec
        if (record is None or self.config.enforce_eager or spec.rope_computed_on_host or spec.routes_on_host
                or self.kv_cache.num_blocks < 2):
            return None
        block_size = self.config.block_size
        return GraphedDecode(set(self.model.spec.layer_windows), self.config.max_num_seqs,
                             -(-self.max_model_len // block_size), self.kv_cache.num_blocks - 1, block_size,
                             self.device, record(self.device))

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
        max_tokens = params.max_tokens or self.default_max_tokens
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
            self.scheduler.finish(slot)
        leader = group.leader
        completions = group.completions(reason)
        for completion in completions:
            if completion.logprobs is not None:
                completion.logprobs = with_token_text(completion.logprobs, self.tokenizer)
        return RequestOutput(request_id, leader.prompt, leader.prompt_token_ids, completions, finished=True)

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
                self.scheduler.finish(request)
                self._ready.append(self._delta(request, None))

    def has_unfinished_requests(self) -> bool:
        return bool(self._families) or bool(self._ready)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._families)

    def _delta(self, request: Request, logprobs: list | None) -> RequestOutput:
        """The request's new tokens as a completion delta in its parent's RequestOutput; forgets finished families."""
        completion = self._outputs[request.request_id].update(request, logprobs)
        family = self._families[request.parent_id]
        done = all(r.finished for r in family)
        if request.finished:
            del self._outputs[request.request_id]
        if done:
            del self._families[request.parent_id]
        return RequestOutput(request.parent_id, request.prompt, request.prompt_token_ids, [completion], finished=done)

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
        if self._prompt_forks:
            self._fork_prompts(sampled)
        if self._beam_groups:
            outputs.extend(self._advance_beams())
        for request, tokens, logprobs in sampled:
            self.num_draft_tokens += len(request.draft_token_ids)
            self.num_accepted_draft_tokens += len(tokens) - 1
            for token in tokens:  # several when drafts were accepted: each checked for stops as if alone
                request.append_token(token, self.max_model_len)
                if request.matcher is not None:
                    self._advance_grammar(request, token)
                outputs.append(self._delta(request, None if logprobs is None else [logprobs]))
                if request.finished:
                    self.scheduler.finish(request)
                    break
            if not request.finished:
                if request.draft_token_ids:
                    self._settle_drafts(request, len(tokens) - 1)
                self._draft(request)
        return outputs

    def _settle_drafts(self, request: Request, accepted: int) -> None:
        """After a step that accepted `accepted` of the request's drafts: drop what it computed past them (their
        cache slots get written over), and set how many it may draft next."""
        speculative = self.config.speculative_config
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        request.draft_limit = speculative.next_limit(len(request.draft_token_ids), accepted)
        request.draft_pause = speculative.num_speculative_tokens if request.draft_limit == 0 else 0
        request.draft_token_ids = []

    def _draft(self, request: Request) -> None:
        """Draft the request's next tokens where it speculates: greedy, and nothing computed per position (see
        lmgen/engine/speculative.py); as many as its drafts' record allows, its max_tokens and the context."""
        speculative, params = self.config.speculative_config, request.params
        if (speculative is None or params.temperature != 0 or request.logits_processors or request.matcher
                or request.beam or params.logprobs is not None or params.score_recorder is not None):
            return
        if request.draft_pause:  # its last drafts all failed
            request.draft_pause -= 1
            return
        most = speculative.disable_by_batch_size
        if most is not None and len(self.scheduler.running) > most:  # a full batch: drafts would cost more
            return
        limit = speculative.num_speculative_tokens if request.draft_limit is None else max(request.draft_limit, 1)
        room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
        switch = self.model.spec.rope_switch_length
        if switch is not None and request.num_tokens <= switch:  # no draft past it: the sequence is recomputed there
            room = min(room, switch - request.num_tokens)
        request.draft_token_ids = speculative.propose(request.all_token_ids, min(room, limit))

    def _advance_grammar(self, request: Request, token: int) -> None:
        """Feed the sampled token to the request's matcher, then append what the grammar forces next."""
        if not request.matcher.consume_token(token):
            logger.error("request %s: grammar rejected token %d: %s", request.request_id, token,
                         request.matcher.get_error())
            request.finish("abort")
        if not request.finished:
            self._append_forced_tokens(request)

    def _append_forced_tokens(self, request: Request) -> None:
        """Append the tokens the grammar leaves no choice about; finish the request when the grammar is complete.

        Forced tokens cost no model step of their own: the next step computes them with
        the request's next token, like a prompt chunk. They are skipped when logprobs are
        requested, since a forced token has no distribution to report.
        """
        matcher = request.matcher
        forced = matcher.compute_ff_tokens() if request.params.logprobs is None else []
        for token in forced:
            if request.finished or not matcher.consume_token(token):
                break
            request.append_token(token, self.max_model_len)
        if matcher.is_stopped() and not request.finished:
            request.finish("stop")
