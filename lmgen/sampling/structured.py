"""Structured output: grammars compiled by llguidance, enforced as token masks.

Each constrained request owns a matcher that tracks where its output stands in the
grammar. Every step the runner asks for the allowed-token bitmask of each constrained
row (computed in parallel, off the GIL, while the model runs) and sets the other
logits to -inf before the request's processors and the sampler see them; the engine
then feeds the chosen token to the matcher and appends the tokens the grammar forces
next without running the model for them.

The engine needs only :class:`GrammarBackend` and :class:`Matcher`, so another grammar
engine (xgrammar, say) can be added beside llguidance.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.params import StructuredOutputs

logger = logging.getLogger(__name__)

#: JSON may be indented, but a run of whitespace is bounded: an unbounded one lets a weak
#: model pad forever at a structural position instead of closing the object.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"


class Matcher(Protocol):
    """One request's position in its grammar (llguidance's LLMatcher has this shape)."""

    def consume_token(self, token_id: int) -> bool: ...

    def compute_ff_tokens(self) -> list[int]: ...

    def is_stopped(self) -> bool: ...

    def is_error(self) -> bool: ...

    def get_error(self) -> str: ...


class GrammarBackend(Protocol):
    def compile(self, spec: StructuredOutputs) -> str:
        """The validated grammar for `spec`; raises InvalidArgumentError with the engine's message."""

    def new_matcher(self, grammar: str) -> Matcher: ...

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        """Write row i of `bitmask` [N, ceil(vocab / 32)] int32: bit t set = token t allowed for matchers[i]."""


class LLGuidanceBackend:
    """llguidance: grammars compile in about a millisecond, masks in tens of microseconds."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import llguidance

        self._llg = llguidance
        # The model's vocabulary may be padded beyond the tokenizer's: mask by the model's size.
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids) or None)
        self.executor = llguidance.LLExecutor()

    def compile(self, spec: StructuredOutputs) -> str:
        try:
            grammar = self._grammar(spec)
        except ValueError as exc:  # malformed input the converters refuse outright
            raise InvalidArgumentError(f"structured output: invalid {spec.kind}: {exc}") from None
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidArgumentError(f"structured output: invalid {spec.kind}: {messages[0].strip()}")
        for warning in messages:
            logger.warning("structured output %s: %s", spec.kind, warning)
        return grammar

    def _grammar(self, spec: StructuredOutputs) -> str:
        options = {"whitespace_pattern": JSON_WHITESPACE}
        if spec.json_schema is not None:
            return self._llg.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=options)
        if spec.json_object:
            return self._llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
        if spec.regex is not None:
            return self._llg.grammar_from("regex", spec.regex)
        if spec.choice is not None:
            return self._llg.grammar_from("choice", list(spec.choice))
        return self._llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark

    def new_matcher(self, grammar: str) -> Matcher:
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():  # compile() validated it, so this is an engine limit (size, fuel)
            raise InvalidArgumentError(f"structured output: {matcher.get_error()}")
        return matcher

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              row_bytes, bitmask.shape[0])


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((num_rows, -(-vocab_size // 32)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear (in place)."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
