"""A chat reply read into what the user is shown (content), the model's reasoning and its tool calls.

Every way lmgen reads a reply is a :class:`ReplyReader`: a tool-call format (lmgen.tool_calls), GPT-OSS's
harmony messages, and a thinking model's ``<think>`` section in front of either (lmgen.reasoning). ``read``
gives a finished reply's :class:`ChatReply`; ``stream`` gives a :class:`ReplyStream`, which turns the reply's
text deltas into :class:`ReplyDelta` pieces that add up to the same reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One function call: its id, the function's name and its arguments as JSON text (an object)."""

    id: str
    name: str
    arguments: str


@dataclass
class ToolCallDelta:
    """A piece of one call in a stream: the first carries its id and name, the next ones arguments' text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class ChatReply:
    """A finished reply read: content (None where there is none), reasoning (None where there is none), calls."""

    content: str | None
    reasoning: str | None
    calls: list[ToolCall]


@dataclass
class ReplyDelta:
    """What one text delta of a reply lets out: content, reasoning and call pieces (empty: nothing yet)."""

    content: str = ""
    reasoning: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


class ReplyStream:
    """One reply read as its text arrives."""

    @property
    def called(self) -> bool:
        """Whether a call has gone out."""
        raise NotImplementedError

    def feed(self, text: str, finished: bool) -> ReplyDelta:
        """What `text`, the reply's next delta (the last one if `finished`), lets out."""
        raise NotImplementedError


class ReplyReader:
    """How the replies to one request are read: finished (`read`) or as they stream (`stream`, one per reply)."""

    #: Whether replies are decoded with their special tokens, which mark their parts (harmony's markers).
    needs_special_tokens: bool = False

    def read(self, text: str) -> ChatReply:
        raise NotImplementedError

    def stream(self) -> ReplyStream:
        raise NotImplementedError


class ContentReader(ReplyReader):
    """A reply that is all content: no calls are read and no reasoning is marked."""

    def read(self, text: str) -> ChatReply:
        return ChatReply(text, None, [])

    def stream(self) -> ReplyStream:
        return _ContentStream()


class _ContentStream(ReplyStream):
    @property
    def called(self) -> bool:
        return False

    def feed(self, text: str, finished: bool) -> ReplyDelta:
        return ReplyDelta(content=text)


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (held back from a stream)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
