"""The transformers-shaped front end: AutoTokenizer, AutoModelForCausalLM, set_seed.

Code written for transformers runs with one changed import line. ``generate`` turns
each row of ``input_ids`` (the attention mask says where its prompt is, so right
padding works too) into an engine request and lays the results out as transformers
does: prompt plus new tokens, finished rows padded with ``pad_token_id``.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lmgen.distributed.parallel import torchrun_world_size
from lmgen.engine.engine import Engine
from lmgen.engine.speculative import NgramProposer, Proposer, SpeculativeConfig
from lmgen.errors import InvalidArgumentError
from lmgen.generation_config import GenerationConfig
from lmgen.generation_outputs import (GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput,
                                      compute_transition_scores, stack_steps)
from lmgen.llm import LLM, collect
from lmgen.outputs import RequestOutput
from lmgen.params import StructuredOutputs
from lmgen.quantization_config import quantization_engine_args
from lmgen.loader.checkpoint import resolve_model_path
from lmgen.loader.model import read_tokenizer
from lmgen.loader.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

RIGHT_PADDING_WARNING = (
    "A decoder-only architecture is being used, but right-padding was detected! For correct generation results, "
    "please set `padding_side='left'` when initializing the tokenizer. (lmgen reads the prompt from the attention "
    "mask, so its output is correct either way.)")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, as transformers.set_seed does; generate draws request seeds from torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class BatchEncoding(dict):
    """A dict of tensors or lists with attribute access (``inputs.input_ids``) and ``.to(device)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def to(self, device: Any) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class AutoTokenizer:
    """transformers-style tokenizer over lmgen's Tokenizer."""

    def __init__(self, tokenizer: Tokenizer, padding_side: str = "left") -> None:
        self.tokenizer = tokenizer
        self.padding_side = padding_side
        self.pad_token = tokenizer.pad_token

    @classmethod
    def from_pretrained(cls, name_or_path: str, padding_side: str = "left", gguf_file: str | None = None,
                        revision: str | None = None, **_: Any) -> "AutoTokenizer":
        if padding_side not in ("left", "right"):
            raise InvalidArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        path = resolve_model_path(name_or_path, revision, gguf_file)
        return cls(read_tokenizer(path), padding_side)

    def __getattr__(self, name: str) -> Any:  # bos_token, eos_token_id, chat_template, ...
        return getattr(self.tokenizer, name)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.tokenizer.token_to_id(self.pad_token)

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None, add_special_tokens: bool = True,
                 return_attention_mask: bool = True, **_: Any) -> BatchEncoding:
        single = isinstance(text, str)
        rows = self.tokenizer.encode_batch([text] if single else list(text), add_special_tokens=add_special_tokens)
        if truncation and max_length is not None:
            rows = [r[:max_length] for r in rows]
        return self._pack(rows, padding, max_length, return_tensors, return_attention_mask, single)

    def _pack(self, rows: list[list[int]], padding: bool | str, max_length: int | None, return_tensors: str | None,
              return_attention_mask: bool, single: bool) -> BatchEncoding:
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max_length if padding == "max_length" and max_length else max(map(len, rows))
            if self.pad_token_id is None:
                raise InvalidArgumentError("Asking to pad but the tokenizer does not have a padding token: set "
                                           "`tokenizer.pad_token = tokenizer.eos_token`")
            for i, row in enumerate(rows):
                fill = width - len(row)
                pad, zeros = [self.pad_token_id] * fill, [0] * fill
                rows[i], masks[i] = (pad + row, zeros + masks[i]) if self.padding_side == "left" else \
                    (row + pad, masks[i] + zeros)
        if return_tensors == "pt":
            out = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
        else:
            out = {"input_ids": rows[0] if single else rows, "attention_mask": masks[0] if single else masks}
        if not return_attention_mask:
            del out["attention_mask"]
        return BatchEncoding(out)

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> Any:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]

    def apply_chat_template(self, conversation: list[dict], tokenize: bool = True, add_generation_prompt: bool = False,
                            return_tensors: str | None = None, return_dict: bool = False, **kwargs: Any) -> Any:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
        if not tokenize:
            return text
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if return_dict:
            return self._pack([ids], False, None, return_tensors, True, return_tensors != "pt")
        return torch.tensor([ids]) if return_tensors == "pt" else ids


class AutoModelForCausalLM:
    """A causal LM with transformers' ``generate`` and ``__call__`` over lmgen's engine."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        engine = llm.engine
        self.config = SimpleNamespace(**engine.hf_config)
        self.generation_config = GenerationConfig.from_dict(engine.generation_config)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers fills these from config.json
            if getattr(self.generation_config, name) is None:
                setattr(self.generation_config, name, engine.hf_config.get(name))

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: Any = "auto", torch_dtype: Any = None,
                        device_map: Any = None, revision: str | None = None, load_in_4bit: bool = False,
                        load_in_8bit: bool = False, quantization_config: Any = None, tp_plan: str | None = None,
                        tp_size: int | None = None, **engine_args: Any) -> "AutoModelForCausalLM":
        """transformers' from_pretrained; load_in_4bit / load_in_8bit / quantization_config map onto
        lmgen's int4 / int8 weights (see lmgen.quantization_config); tp_plan="auto" splits the model over
        tp_size ranks, by default torchrun's processes (lmgen's tensor_parallel_size: docs/distributed.md)."""
        if tp_plan is not None:
            if tp_plan != "auto":
                raise InvalidArgumentError(f"tp_plan {tp_plan!r} is not supported: lmgen splits every model its own "
                                           "way, tp_plan='auto'")
            engine_args.setdefault("tensor_parallel_size", tp_size or torchrun_world_size())
        dtype = torch_dtype if torch_dtype is not None else dtype
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        device = "auto" if device_map in (None, "auto") else str(device_map)
        quantization = quantization_engine_args(load_in_4bit, load_in_8bit, quantization_config)
        return cls(LLM(name_or_path, dtype=dtype, device=device, revision=revision, **engine_args, **quantization))

    @property
    def device(self) -> torch.device:
        return self.llm.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.engine.dtype

    def eval(self) -> "AutoModelForCausalLM":
        return self

    def to(self, *_: Any, **__: Any) -> "AutoModelForCausalLM":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        """Logits [batch, seq, vocab] (float32); padded positions are zero."""
        rows = _prompt_rows(input_ids, attention_mask)
        logits = torch.zeros(*input_ids.shape, self.llm.engine.model.spec.vocab_size)
        for i, ((_, positions), scores) in enumerate(zip(rows, self.llm.engine.score([p for p, _ in rows]))):
            logits[i, positions] = scores.cpu()
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, streamer: Any = None, tokenizer: Any = None,
                 logits_processor: Iterable[Callable] | None = None,
                 stopping_criteria: Iterable[Callable] | None = None,
                 structured: StructuredOutputs | dict[str, Any] | None = None,
                 assistant_model: "AutoModelForCausalLM | None" = None,
                 **kwargs: Any) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """transformers' generate: returns prompt + new tokens per row (num_return_sequences rows per prompt).

        ``logits_processor`` and ``stopping_criteria`` take transformers' objects or plain
        callables of (input_ids [1, length], scores [1, vocab] or None); they run per row
        on its own unpadded ids, the processors after the built-in ones and before the
        warpers, as in transformers. ``return_dict_in_generate=True`` returns a
        GenerateDecoderOnlyOutput (with ``scores`` / ``logits`` when asked for).
        ``structured`` (lmgen's own) constrains every row's output: ``{"json_schema": {...}}``,
        ``{"regex": ...}``, ``{"choice": [...]}``, ``{"grammar": ...}`` or ``{"json_object": True}``.
        ``prompt_lookup_num_tokens`` (with ``max_matching_ngram_size``) and ``assistant_model`` (another
        lmgen AutoModelForCausalLM of the same tokenizer, drafting with its loaded weights and KV cache)
        speculate for this call, at any batch size (see lmgen/engine/speculative.py).
        """
        if input_ids is None:
            raise InvalidArgumentError("generate needs input_ids (e.g. tokenizer(text, return_tensors='pt'))")
        config = (generation_config or GenerationConfig()).resolved(self.generation_config, **kwargs)
        if config.max_new_tokens is None and config.uses_default_length:
            warnings.warn("Using the model-agnostic default `max_length` (=20) to control the generation length. "
                          "We recommend setting `max_new_tokens` to control the maximum length of the generation.",
                          UserWarning, stacklevel=2)
        config.validate()
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            logger.warning(RIGHT_PADDING_WARNING)
        if streamer is not None and input_ids.shape[0] > 1:
            raise InvalidArgumentError("`streamer` cannot be used with batch sizes > 1 (as in transformers)")
        rows = _prompt_rows(input_ids, attention_mask)
        hooks = _row_hooks(logits_processor, stopping_criteria, self.device)
        recorders = [config.score_recorder() for _ in rows]
        params = [config.to_sampling_params(input_ids.shape[-1], int(torch.randint(0, 2**62, ())),
                                            score_recorder=recorder, structured=structured, **hooks)
                  for recorder in recorders]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        proposer = _proposer(config, assistant_model, self.llm.engine)
        with nullcontext() if proposer is None else self.llm.engine.speculating(proposer):
            outputs = self._run([p for p, _ in rows], params, streamer)
        if streamer is not None:
            streamer.end()
        pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_ids() or [0])[0]
        if config.num_beams > 1:  # transformers pads beams with `pad_token_id or eos_token_id[0]`, else -1
            pad = (config.pad_token_id or config.eos_ids()[0]) if config.eos_ids() else -1
        n = config.num_return_sequences
        sequences = _sequences(input_ids, [o for out in outputs for o in out.outputs], n, pad)
        if not config.return_dict_in_generate:
            return sequences
        if config.num_beams > 1:
            return _beam_output(sequences, outputs, recorders, config, pad)
        num_steps = sequences.shape[-1] - input_ids.shape[-1]
        return GenerateDecoderOnlyOutput(sequences, scores=_recorded(recorders, "scores", n, num_steps, pad),
                                         logits=_recorded(recorders, "logits", n, num_steps, pad))

    def compute_transition_scores(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                                  beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """transformers' compute_transition_scores: each generated token's score, [batch, steps]."""
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)

    def _run(self, prompts: list[list[int]], params: list, streamer: Any) -> list:
        ids = self.llm._add(prompts, params)
        return collect(_streamed(self.llm._run(ids), streamer), ids)


def _proposer(config: GenerationConfig, assistant: AutoModelForCausalLM | None, engine: Engine) -> Proposer | None:
    """transformers' prompt lookup and assisted generation as the engine's proposers (None: neither asked for)."""
    lookup = config.prompt_lookup_num_tokens
    if assistant is not None and lookup is not None:
        raise InvalidArgumentError("pass prompt_lookup_num_tokens or assistant_model, not both")
    if config.num_beams > 1 and (assistant is not None or lookup is not None):  # transformers ignores them, warning
        raise InvalidArgumentError("prompt_lookup_num_tokens and assistant_model speculate for greedy or sampled "
                                   "generation; beam search (num_beams > 1) chooses one token a step: drop one")
    for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidArgumentError(f"`{name}` must be a positive integer, got {value!r}")
    if lookup is not None:
        return NgramProposer(SpeculativeConfig(num_speculative_tokens=lookup,
                                               prompt_lookup_max=config.max_matching_ngram_size or 2))
    if assistant is None:
        return None
    if not isinstance(assistant, AutoModelForCausalLM):
        raise InvalidArgumentError("assistant_model must be an lmgen AutoModelForCausalLM (from_pretrained), got "
                                   f"{type(assistant).__name__}")
    return engine.draft_proposer(assistant.llm.engine, config.num_assistant_tokens)


def _streamed(deltas: Iterable[RequestOutput], streamer: Any) -> Iterator[RequestOutput]:
    """Pass deltas through, feeding each one's new tokens to a transformers-style streamer."""
    for delta in deltas:
        if streamer is not None and delta.outputs[0].token_ids:
            streamer.put(torch.tensor(delta.outputs[0].token_ids))
        yield delta


def _sequences(input_ids: torch.Tensor, completions: list, n: int, pad: int) -> torch.Tensor:
    """Each prompt row (n times) followed by its completion's tokens, padded with `pad` to the longest."""
    width = max(len(c.token_ids) for c in completions)
    tail = torch.full((len(completions), width), pad, dtype=input_ids.dtype)
    for i, completion in enumerate(completions):
        tail[i, : len(completion.token_ids)] = torch.tensor(completion.token_ids)
    return torch.cat([input_ids.repeat_interleave(n, dim=0).cpu(), tail], dim=1)


def _beam_output(sequences: torch.Tensor, outputs: list[RequestOutput], recorders: list, config: GenerationConfig,
                 pad: int) -> GenerateBeamDecoderOnlyOutput:
    """transformers' beam-search output: sequences_scores (with output_scores), beam_indices, per-step rows."""
    completions = [(row, c) for row, out in enumerate(outputs) for c in out.outputs]
    width = max(len(c.beam_indices) for _, c in completions)
    beam_indices = torch.full((len(completions), width), -1, dtype=torch.int32)
    for i, (row, completion) in enumerate(completions):  # rows of scores: prompt row * num_beams + beam
        beam_indices[i, : len(completion.beam_indices)] = torch.tensor(completion.beam_indices) + row * config.num_beams
    recorded = recorders[0] is not None
    num_steps = max(len((r.scores or r.logits)[0]) for r in recorders) if recorded else 0
    return GenerateBeamDecoderOnlyOutput(
        sequences,
        sequences_scores=torch.tensor([c.score for _, c in completions]) if config.output_scores else None,
        scores=_recorded(recorders, "scores", config.num_beams, num_steps, pad),
        logits=_recorded(recorders, "logits", config.num_beams, num_steps, pad),
        beam_indices=beam_indices)


def _recorded(recorders: list, kind: str, n: int, num_steps: int, pad: int) -> tuple[torch.Tensor, ...] | None:
    """The recorded "scores" or "logits" as one [rows, vocab] tensor per step, rows in generate's order."""
    if recorders[0] is None or not getattr(recorders[0], f"keep_{kind}"):
        return None
    rows = [getattr(recorder, kind)[index] for recorder in recorders for index in range(n)]
    return stack_steps(rows, num_steps, pad, device="cpu")  # beside the sequences


def _row_hooks(logits_processor: Iterable[Callable] | None, stopping_criteria: Iterable[Callable] | None,
               device: torch.device) -> dict[str, tuple[Callable, ...]]:
    """transformers-style processors and criteria (on [batch, ...] tensors) as SamplingParams' per-row hooks."""
    return dict(logits_processors=tuple(_row_processor(p) for p in logits_processor or ()),
                stopping_criteria=tuple(_row_criterion(c, device) for c in stopping_criteria or ()))


def _row_processor(processor: Callable) -> Callable[[Sequence[int], torch.Tensor], torch.Tensor]:
    def process(token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        return processor(torch.tensor([token_ids], device=logits.device), logits[None])[0]

    return process


def _row_criterion(criterion: Callable, device: torch.device) -> Callable[[Sequence[int]], bool]:
    def stop(token_ids: Sequence[int]) -> bool:
        # transformers passes the scores kept so far, which are None unless output_scores; lmgen passes None
        return bool(torch.as_tensor(criterion(torch.tensor([token_ids], device=device), None)).any())

    return stop


def _prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[tuple[list[int], torch.Tensor]]:
    """Each row's prompt tokens (where the mask is 1) and their positions in the row."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = []
    for ids, keep in zip(input_ids.cpu(), mask.cpu().bool()):
        positions = keep.nonzero().flatten()
        if len(positions) == 0:
            raise InvalidArgumentError("a row of attention_mask is all zeros: every prompt needs a token")
        rows.append((ids[positions].tolist(), positions))
    return rows
