"""GPT-OSS's harmony format, as its replies are read.

A reply is a run of messages, ``<|start|>{header}<|message|>{text}<|end|>``. The generation prompt
ends with ``<|start|>assistant``, so the first message's header starts at its channel. A header names
the role, the channel after ``<|channel|>`` (``analysis``: reasoning; ``commentary``: calls and
preambles meant for the user; ``final``: the answer), and for a call its recipient as ``to=NAME``,
before or after the channel, with the content type after ``<|constrain|>``::

    <|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary
    to=functions.get_weather <|constrain|>json<|message|>{"city": "Lisbon"}<|call|>

``<|return|>`` and ``<|call|>`` end the reply (the model's stop tokens, absent from its text unless
asked for). The markers are special tokens: the reply's text holds them only when decoded with
``skip_special_tokens=False``.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END, MESSAGE, CHANNEL, CONSTRAIN = "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>"
CALL, RETURN = "<|call|>", "<|return|>"
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL, RETURN)
#: What ends a message's text: its end, a stop token, or (a marker the model left out) the next message's start.
_TEXT_ENDS = (END, CALL, RETURN, START)
#: The recipients that are the caller's functions (others are the model's built-in tools: python, browser.*).
FUNCTIONS = "functions."


@dataclass(frozen=True)
class HarmonyMessage:
    """One message of a reply: its channel and recipient (None where the header names none), its text so far,
    and whether it is complete (ended by a marker, or by the end of a finished reply)."""

    channel: str | None
    recipient: str | None
    text: str
    complete: bool

    @property
    def function(self) -> str | None:
        """The caller's function this message calls, or None."""
        if self.recipient is None or not self.recipient.startswith(FUNCTIONS):
            return None
        return self.recipient[len(FUNCTIONS):]


def next_message(text: str, pos: int, finished: bool) -> tuple[HarmonyMessage | None, int]:
    """The message whose header starts at text[pos] and the index where the next one's header starts; None
    while its header is unfinished. What a finished reply ends with that holds no marker is text the model
    wrote outside the format: a message of no channel (a header cut short is no message)."""
    if text.startswith(START, pos):
        pos += len(START)
    header_end = text.find(MESSAGE, pos)
    if header_end < 0:
        if finished and text[pos:].strip() and not any(marker in text[pos:] for marker in MARKERS):
            return HarmonyMessage(None, None, text[pos:], True), len(text)
        return None, pos
    channel, recipient = _read_header(text[pos:header_end])
    body = header_end + len(MESSAGE)
    ends = [(found, marker) for marker in _TEXT_ENDS if (found := text.find(marker, body)) >= 0]
    if not ends:
        if finished:
            return HarmonyMessage(channel, recipient, text[body:], True), len(text)
        return HarmonyMessage(channel, recipient, text[body:max(body, len(text) - _partial_marker(text))], False), pos
    end, marker = min(ends)
    return HarmonyMessage(channel, recipient, text[body:end], True), end if marker == START else end + len(marker)


def read_messages(text: str) -> list[HarmonyMessage]:
    """Every message of a finished reply."""
    messages, pos = [], 0
    while pos < len(text):
        message, pos = next_message(text, pos, finished=True)
        if message is None:  # only a <|start|> was left
            break
        messages.append(message)
    return messages


def _read_header(header: str) -> tuple[str | None, str | None]:
    """(channel, recipient) of a header such as ``assistant to=functions.f<|channel|>commentary json`` or
    ``<|channel|>commentary to=functions.f <|constrain|>json``."""
    role_part, _, channel_part = header.partition(CHANNEL)
    channel_words = channel_part.partition(CONSTRAIN)[0].split()
    recipient = next((word[3:] for word in [*role_part.split(), *channel_words] if word.startswith("to=")), None)
    channel = next((word for word in channel_words if not word.startswith("to=")), None)
    return channel, recipient


def _partial_marker(text: str) -> int:
    """How many characters at the end of `text` could begin a marker (held back from a stream)."""
    start = text.rfind("<", max(0, len(text) - max(map(len, MARKERS)) + 1))
    if start < 0 or not any(marker.startswith(text[start:]) for marker in MARKERS):
        return 0
    return len(text) - start
