"""Reasoning parsers: a thinking model's ``<think>...</think>`` section read out of its reply.

Qwen3, QwQ and DeepSeek-R1's distills think before they answer, between ``<think>`` and ``</think>``, then
write their answer (and maybe tool calls) after it. A :class:`ThinkingReader` puts that section in front of
any other reader (lmgen.reply): the reasoning is what the section holds, and the rest of the reply goes to
the reader behind it. vLLM's names and meanings:

- ``qwen3``: the reply has reasoning only when it opens with ``<think>`` (Qwen3's template leaves the model
  to open it, or writes an empty one into the prompt when ``enable_thinking`` is false);
- ``deepseek_r1``: everything before ``</think>`` is reasoning, a ``<think>`` at the start or not (these
  templates open the section in the prompt).

A reply that stops before ``</think>`` (max_tokens) is all reasoning. The reasoning loses the blank lines
around it and the answer those it starts with, as the models' templates do when they render a reply again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import ChatTemplateError, Tokenizer
from lmgen.reply import ChatReply, ReplyDelta, ReplyReader, ReplyStream, partial_suffix

START, END = "<think>", "</think>"
#: --reasoning-parser's value that turns reasoning off (no parser, even for a template that shows one).
NO_PARSER = "none"


@dataclass(frozen=True)
class ReasoningParser:
    """Where a reply's reasoning is: after a ``<think>`` it opens with (`needs_start`) or from its start, to
    ``</think>`` or the reply's end. Where the tokenizer makes the markers special tokens (`special_markers`),
    replies are decoded with their special tokens, or the markers would vanish from the text."""

    name: str
    needs_start: bool
    special_markers: bool = False

    def split(self, text: str) -> tuple[str | None, str]:
        """A finished reply's reasoning (None: it has none) and the rest of it, the answer."""
        body = text.lstrip()
        if body.startswith(START):
            body = body[len(START):]
        elif self.needs_start:
            return None, text
        reasoning, _, answer = body.partition(END)
        return reasoning.strip() or None, answer.lstrip()


PARSERS = {parser.name: parser for parser in (ReasoningParser("qwen3", needs_start=True),
                                              ReasoningParser("deepseek_r1", needs_start=False))}


def reasoning_parser_for(tokenizer: Tokenizer, name: str | None = None) -> ReasoningParser | None:
    """The parser called `name` ("none": no parser), or the one the chat template shows: a template that writes
    ``</think>`` reasons, and one whose generation prompt already opens ``<think>`` is read as deepseek_r1."""
    if name is None:
        name = _template_parser(tokenizer)
    elif name != NO_PARSER and name not in PARSERS:
        raise InvalidArgumentError(f"reasoning_parser {name!r} is unknown: use one of "
                                   f"{', '.join([*sorted(PARSERS), NO_PARSER])}")
    if name not in PARSERS:
        return None
    added = tokenizer.backend.get_added_tokens_decoder().get(tokenizer.token_to_id(END))  # None: plain text
    return dataclasses.replace(PARSERS[name], special_markers=added is not None and added.special)


def _template_parser(tokenizer: Tokenizer) -> str:
    if END not in (tokenizer.chat_template or ""):
        return NO_PARSER
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except ChatTemplateError:  # a template that wants more than a lone user message: the model opens <think>
        return "qwen3"
    return "deepseek_r1" if prompt.rstrip().endswith(START) else "qwen3"


def reasoning_reader(parser: ReasoningParser | None, answer: ReplyReader, *, thinking: bool = True,
                     constrained: bool = False) -> ReplyReader:
    """`answer` behind `parser`'s reasoning section; `answer` alone without a parser or where the request turned
    thinking off. A reply a grammar shapes from its first token (structured output, a forced call) thinks only
    if the grammar opens ``<think>``, so a reply without one is all answer, whatever the parser."""
    if parser is None or not thinking:
        return answer
    return ThinkingReader(dataclasses.replace(parser, needs_start=True) if constrained else parser, answer)


class ThinkingReader(ReplyReader):
    """A thinking model's replies: the reasoning section `parser` finds, then the answer, which `answer` reads
    (for content and calls)."""

    def __init__(self, parser: ReasoningParser, answer: ReplyReader) -> None:
        self.parser = parser
        self.answer = answer
        self.needs_special_tokens = answer.needs_special_tokens or parser.special_markers

    def read(self, text: str) -> ChatReply:
        reasoning, rest = self.parser.split(text)
        reply = self.answer.read(rest)
        return ChatReply(reply.content if reasoning is None else reply.content or None, reasoning, reply.calls)

    def stream(self) -> ThinkingStream:
        return ThinkingStream(self.parser, self.answer.stream())


class ThinkingStream(ReplyStream):
    """A thinking model's reply as it arrives: reasoning until ``</think>`` (holding back what might begin it,
    and blank space that might end the reasoning), then the answer's deltas from the answer's own stream.

    The reply's start is held until it shows whether it opens with ``<think>``."""

    def __init__(self, parser: ReasoningParser, answer: ReplyStream) -> None:
        self.parser = parser
        self.answer = answer
        self.text = ""  # of the reply, up to the answer
        self.start: int | None = None  # where the reasoning starts, once known
        self.num_sent_chars = 0  # of the reasoning, counted from the reply's start
        self.answering = False
        self.answer_started = False  # the answer's leading blank space is dropped until it starts

    @property
    def called(self) -> bool:
        return self.answer.called

    def feed(self, text: str, finished: bool) -> ReplyDelta:
        if self.answering:
            return self._answer(text, finished)
        self.text += text
        if self.start is None:
            body = self.text.lstrip()
            if body.startswith(START):
                self.start = len(self.text) - len(body) + len(START)
            elif START.startswith(body) and not finished:
                return ReplyDelta()  # blank space, or part of <think>: undecided
            elif self.parser.needs_start:
                self.answering = self.answer_started = True
                return self.answer.feed(self.text, finished)
            else:
                self.start = 0
        # </think> ends after the reasoning sent so far (a long reasoning is not searched again at every delta)
        end = self.text.find(END, max(self.start, self.num_sent_chars - len(END)))
        if end < 0:
            held = 0 if finished else partial_suffix(self.text, END)
            return ReplyDelta(reasoning=self._reasoning(len(self.text) - held))
        reasoning = self._reasoning(end)
        self.answering = True
        delta = self._answer(self.text[end + len(END):], finished)
        return ReplyDelta(delta.content, reasoning + delta.reasoning, delta.calls)

    def _reasoning(self, end: int) -> str:
        """The reasoning up to `end` not sent yet, less the blank space around it."""
        begin = self.num_sent_chars or len(self.text) - len(self.text[self.start:].lstrip())  # 0: none sent
        while end > begin and self.text[end - 1].isspace():
            end -= 1
        if end <= begin:
            return ""
        self.num_sent_chars = end
        return self.text[begin:end]

    def _answer(self, text: str, finished: bool) -> ReplyDelta:
        if not self.answer_started:
            text = text.lstrip()
            self.answer_started = bool(text)
        return self.answer.feed(text, finished)
