"""Structured output: grammars compiled by llguidance, enforced as token masks.

Each constrained request owns a matcher that tracks where its output stands in the
grammar. Every step the runner asks for the allowed-token bitmask of each constrained
row (computed in parallel, off the GIL, while the model runs) and sets the other
logits to -inf before the request's processors and the sampler see them; the engine
then feeds the chosen token to the matcher and appends the tokens the grammar forces
next without running the model for them. A request that drafted tokens (speculative
decoding) gets a mask after each draft too, so a draft the grammar forbids has
probability 0 and is rejected; the matcher only ever consumes accepted tokens.

The engine needs only :class:`GrammarBackend` and :class:`Matcher`, so another grammar
engine (xgrammar, say) can be added beside llguidance.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.params import StructuredOutputs
from lmgen.sampling.sampler import row_starts

logger = logging.getLogger(__name__)

#: A newline and an indent, bounded: a weak model pads to the bound instead of closing the object,
#: and 16 columns hold JSON nested 4 deep at an indent of 4 (8 deep at 2).
_INDENT = r"\n[ \t]{0,16}"
#: Whitespace where JSON writers put it (json.dumps compact, default or indented, JSON.stringify):
#: a newline and an indent after `{`, `[` and `,` and before `}` and `]`, one space after `:` and
#: maybe after `,`, else none. A weak model given more pads its JSON where no writer would and runs
#: out of tokens before closing it. llguidance's JSON options allow one whitespace pattern between
#: any two tokens, so this layout is a grammar of its own that JSON output must also match.
#: After a value a newline can only lead to `}` or `]`, which the schema may not allow yet (a
#: required member is missing): the masks then forbid it (_AllOf.newline_leads_nowhere).
JSON_LAYOUT = rf"""
start: value
value: object | array | STRING | NUMBER | "true" | "false" | "null"
object: OPEN_OBJECT (member (COMMA member)*)? CLOSE_OBJECT
member: STRING COLON value
array: OPEN_ARRAY (value (COMMA value)*)? CLOSE_ARRAY
OPEN_OBJECT: /\{{({_INDENT})?/
CLOSE_OBJECT: /({_INDENT})?\}}/
OPEN_ARRAY: /\[({_INDENT})?/
CLOSE_ARRAY: /({_INDENT})?\]/
COMMA: /,( |{_INDENT})?/
COLON: /: ?/
STRING: /"(\\.|[^"\\])*"/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/
"""
#: The schema's grammar allows each gap of the layout's whitespace between any two tokens; the
#: layout grammar then says which gaps may hold it.
_JSON_OPTIONS = {"whitespace_pattern": rf"( |{_INDENT})"}

#: What compile() gives and new_matcher() takes: the grammars an output must match all of.
Grammar = tuple[str, ...]


class Matcher(Protocol):
    """One request's position in its grammar (llguidance's LLMatcher has this shape)."""

    def consume_token(self, token_id: int) -> bool: ...

    def compute_ff_tokens(self) -> list[int]: ...

    def is_stopped(self) -> bool: ...

    def is_error(self) -> bool: ...

    def get_error(self) -> str: ...


class GrammarBackend(Protocol):
    def compile(self, spec: StructuredOutputs) -> Grammar:
        """The validated grammar for `spec`; raises InvalidArgumentError with the engine's message."""

    def new_matcher(self, grammar: Grammar) -> Matcher: ...

    def fill_bitmask(self, matchers: list[Matcher], drafts: list[list[int]], bitmask: torch.Tensor) -> None:
        """Write the rows of `bitmask` [rows, ceil(vocab / 32)] int32, bit t set = token t allowed: for each
        matcher in turn, the row of its next token, then (speculative decoding) the row after each of its
        `drafts` as if it had consumed the drafts before (left as they are after a draft it refuses).
        The matchers end as they were."""


def _plain_added_tokens_in_vocabulary(tokenizer_json: str) -> str:
    """The tokenizer with its added tokens that are not special (Qwen's `<tool_call>`, `<think>`) moved into the
    model's vocabulary, for llguidance.

    llguidance takes every added token for a special one, which only a grammar's `<[id]>` writes; yet it
    tokenizes forced text with the added tokens, so a grammar whose text holds `<tool_call>` forced that token
    and then refused it. As vocabulary they are text to it, as they are to the tokenizer. Only tokens of
    printable ASCII without spaces move: those are spelled the same in every vocabulary's alphabet."""
    spec = json.loads(tokenizer_json)
    vocabulary = spec["model"].get("vocab")
    if not isinstance(vocabulary, dict):  # Unigram: a list by id, spelled otherwise
        return tokenizer_json
    added = spec.get("added_tokens", [])
    plain = [t for t in added if not t["special"] and t["content"].isascii() and t["content"].isprintable()
             and " " not in t["content"] and vocabulary.get(t["content"], t["id"]) == t["id"]]
    if not plain:
        return tokenizer_json
    vocabulary.update((t["content"], t["id"]) for t in plain)
    spec["added_tokens"] = [t for t in added if t not in plain]
    return json.dumps(spec)


class LLGuidanceBackend:
    """llguidance: grammars compile in about a millisecond, masks in tens of microseconds."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        import llguidance

        self._llg = llguidance
        # The model's vocabulary may be padded beyond the tokenizer's: mask by the model's size.
        self.tokenizer = llguidance.LLTokenizer(_plain_added_tokens_in_vocabulary(tokenizer.backend.to_str()),
                                                n_vocab=vocab_size,
                                                eos_token=sorted(eos_token_ids) or None)
        self.executor = llguidance.LLExecutor()

    def compile(self, spec: StructuredOutputs) -> Grammar:
        try:
            grammar = self._grammar(spec)
        except ValueError as exc:  # malformed input the converters refuse outright
            raise InvalidArgumentError(f"structured output: invalid {spec.kind}: {exc}") from None
        is_error, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidArgumentError(f"structured output: invalid {spec.kind}: {messages[0].strip()}")
        for warning in messages:
            logger.warning("structured output %s: %s", spec.kind, warning)
        if spec.json_schema is not None or spec.json_object:
            return grammar, self._json_layout
        return (grammar,)

    @functools.cached_property
    def _json_layout(self) -> str:
        return self._llg.grammar_from("lark", JSON_LAYOUT)

    def _grammar(self, spec: StructuredOutputs) -> str:
        if spec.json_schema is not None:
            return self._llg.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=_JSON_OPTIONS)
        if spec.json_object:
            return self._llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return self._llg.grammar_from("regex", spec.regex)
        if spec.choice is not None:
            return self._llg.grammar_from("choice", list(spec.choice))
        return self._llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark

    def new_matcher(self, grammar: Grammar) -> Matcher:
        matchers = [self._llg.LLMatcher(self.tokenizer, g, log_level=0) for g in grammar]
        for matcher in matchers:
            if matcher.is_error():  # compile() validated it, so this is an engine limit (size, fuel)
                raise InvalidArgumentError(f"structured output: {matcher.get_error()}")
        return matchers[0] if len(matchers) == 1 else _AllOf(*matchers, self._probes)

    @functools.cached_property
    def _probes(self) -> "_Probes":
        return _Probes.of(self.tokenizer)

    def fill_bitmask(self, matchers: list[Matcher], drafts: list[list[int]], bitmask: torch.Tensor) -> None:
        rows = list(zip(matchers, row_starts(drafts), drafts))
        self._fill([(m.first if isinstance(m, _AllOf) else m, start, d) for m, start, d in rows], bitmask)
        seconds = [(m.second, start, d) for m, start, d in rows if isinstance(m, _AllOf)]
        if seconds:  # a token is allowed where both grammars allow it
            allowed = torch.full_like(bitmask, -1)
            self._fill(seconds, allowed)
            with torch.inference_mode():  # the engine's bitmask is an inference tensor; this is another thread
                bitmask &= allowed
                for matcher, start, draft in rows:
                    if isinstance(matcher, _AllOf):
                        for position in matcher.where_newlines_lead_nowhere(draft):
                            self._forbid_leading_newlines(bitmask[start + position])

    def _forbid_leading_newlines(self, row: torch.Tensor) -> None:
        """Clear the bits of the tokens that start with a newline among those `row` allows (a few where it is
        called: commas, whitespace, closing brackets)."""
        words, bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).nonzero(as_tuple=True)
        for word, bit in zip(words.tolist(), bits.tolist()):
            if self.tokenizer.decode_bytes([word * 32 + bit]).startswith(b"\n"):
                row[word] &= ~(torch.tensor(1, dtype=torch.int32) << bit)

    def _fill(self, rows: list[tuple[Matcher, int, list[int]]], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        plain = [(matcher, start) for matcher, start, drafts in rows if not drafts]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, bitmask.data_ptr(), row_bytes, bitmask.shape[0])
        drafted = [row for row in rows if row[2]]
        if drafted:  # llguidance consumes each matcher's drafts as it writes their rows, then rolls them back
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, bitmask.data_ptr(), row_bytes,
                                                                   bitmask.shape[0])


@dataclass(frozen=True)
class _Probes:
    """The token ids of `,`, `}` and `]`: what _AllOf asks its grammars about."""

    comma: list[int]
    closers: tuple[list[int], list[int]]

    @classmethod
    def of(cls, tokenizer) -> "_Probes":
        return cls(tokenizer.tokenize_str(","), (tokenizer.tokenize_str("}"), tokenizer.tokenize_str("]")))


class _AllOf:
    """Two matchers stepped together: the output is in both grammars' languages (a JSON schema's and the
    JSON layout's). Either completes a prefix the other accepts without whitespace, so no mask is empty."""

    def __init__(self, first: Matcher, second: Matcher, probes: _Probes) -> None:
        self.first, self.second, self.probes = first, second, probes

    def newline_leads_nowhere(self) -> bool:
        """Whether a newline here would leave no continuation: after a value, where the layout takes a newline
        only before `}` or `]`, and the schema takes neither yet (it needs a `,` and another member first)."""
        def takes(matcher, tokens: list[int]) -> bool:
            return matcher.validate_tokens(tokens) == len(tokens)

        return takes(self.second, self.probes.comma) and not any(takes(self.first, t) for t in self.probes.closers)

    def where_newlines_lead_nowhere(self, drafts: list[int]) -> list[int]:
        """The positions (0: the next token, j: after drafts[:j]) where newline_leads_nowhere, as far as both
        grammars take the drafts; the matchers end as they were."""
        taken = min(self.first.validate_tokens(drafts), self.second.validate_tokens(drafts))
        positions = [0] if self.newline_leads_nowhere() else []
        for position, token in enumerate(drafts[:taken], 1):
            self.consume_token(token)
            if self.newline_leads_nowhere():
                positions.append(position)
        if taken:
            self.first.rollback(taken)
            self.second.rollback(taken)
        return positions

    def consume_token(self, token_id: int) -> bool:
        return self.first.consume_token(token_id) and self.second.consume_token(token_id)

    def compute_ff_tokens(self) -> list[int]:
        forced = self.first.compute_ff_tokens()
        return forced[: self.second.validate_tokens(forced)]

    def is_stopped(self) -> bool:
        return self.first.is_stopped() or self.second.is_stopped()

    def is_error(self) -> bool:
        return self.first.is_error() or self.second.is_error()

    def get_error(self) -> str:
        return self.first.get_error() or self.second.get_error()


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((num_rows, -(-vocab_size // 32)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear (in place)."""
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
