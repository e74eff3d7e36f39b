"""Tool calling: the model's calls read out of its text, and forced when the caller requires one.

Models write calls in their family's format, which their chat template teaches them:
Hermes / Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, Llama 3.x
``{"name": ..., "parameters": {...}}`` (after ``<|python_tag|>`` or alone, several joined by
``;``), Mistral ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``. A :class:`ToolParser` per
format reads them; :func:`tool_parser_for` picks one by name or from the chat template's text.

A format's replies are read (lmgen.reply) by a :class:`CallReader`: content, then calls, whole or
streamed (:class:`ToolCallStream`); :func:`reply_reader` gives the reader of a request's replies.
A call's ``arguments`` is the JSON text of the argument object exactly as the model wrote it,
so the argument deltas of a stream add up to the whole call's.
:class:`ToolCalling` holds one conversation's tools and ``tool_choice``: with "required" or a
named function it gives a grammar (structured output) that lets the model write nothing but
valid calls in its own format, whose arguments follow each function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmgen import harmony
from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.params import StructuredOutputs
from lmgen.reply import (
    ChatReply, ContentReader, ReplyDelta, ReplyReader, ReplyStream, ToolCall, ToolCallDelta, partial_suffix,
)

_WHITESPACE = " \t\r\n"
#: The layout forced calls are written in: json.dumps' default, as the families' templates show calls.
_CALL_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Where JSON schemas keep the definitions their "$ref"s name.
_DEFINITIONS = ("$defs", "definitions")
_SCALAR = re.compile(r"[^,\]}\s]*")


class ToolArgumentError(InvalidArgumentError):
    """Bad tools, tool_choice or tool calls in a conversation; `field` names the field (API path)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class PartialCall:
    """What the text shows of one call so far: the name once its string is closed, the arguments' text."""

    name: str | None = None
    arguments: str = ""
    arguments_open: bool = False  # the arguments run on to the end of the text
    complete: bool = False


class _Malformed(ValueError):
    """The text is not a call in the parser's format."""


# ---- reading JSON as far as it goes -------------------------------------------------------------
def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


class _OpenValue:
    """Where a JSON string, object or array ends, followed as its text arrives with each character read once
    (a stream reads a long argument that way rather than scanning its calls again at every delta)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

    def end(self, text: str) -> int | None:
        """Read `text`, the value's next characters: the index just past the value's end in it, or None."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:  # the value was this string
                        return i + 1
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


def _value_end(text: str, pos: int) -> int | None:
    """The index just past the JSON value that starts at text[pos]; None when the text ends first.

    Only the structure is followed (strings, nesting); json.loads judges the complete call.
    """
    if text[pos] not in '{["':
        end = _SCALAR.match(text, pos).end()
        return end if end < len(text) else None
    end = _OpenValue().end(text[pos:])
    return None if end is None else pos + end


def _scan_call(text: str, pos: int, argument_keys: tuple[str, ...]) -> tuple[PartialCall, int | None]:
    """The call object that starts at text[pos], as far as the text goes, and the index past it (None: unfinished)."""
    if text[pos] != "{":
        raise _Malformed(f"a call starts with '{{', not {text[pos]!r}")
    call, start = PartialCall(), pos
    pos += 1
    while True:
        pos = _skip_whitespace(text, pos)
        if pos == len(text):
            return call, None
        if text[pos] == "}":
            return _complete(call, text[start:pos + 1], argument_keys), pos + 1
        if text[pos] == ",":
            pos += 1
            continue
        key_end = _value_end(text, pos)
        if key_end is None:
            return call, None
        key = _string(text[pos:key_end])
        pos = _skip_whitespace(text, key_end)
        if pos == len(text):
            return call, None
        if text[pos] != ":" or key is None:
            raise _Malformed("a call's keys are strings followed by ':'")
        value_start = _skip_whitespace(text, pos + 1)
        value_end = _value_end(text, value_start) if value_start < len(text) else None
        if key in argument_keys:
            call.arguments, call.arguments_open = text[value_start:value_end], value_end is None
        elif key == "name" and value_end is not None:
            call.name = _string(text[value_start:value_end])
        if value_end is None:
            return call, None
        pos = value_end


def _string(source: str) -> str | None:
    """The JSON string `source` decoded; None if it is not one."""
    try:
        value = json.loads(source)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def _complete(call: PartialCall, source: str, argument_keys: tuple[str, ...]) -> PartialCall:
    try:
        parsed = json.loads(source)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"a call is not valid JSON: {exc}") from None
    arguments = next((parsed[key] for key in argument_keys if key in parsed), None)
    if not isinstance(parsed.get("name"), str) or not isinstance(arguments, dict):
        raise _Malformed("a call needs a string 'name' and an object of arguments")
    call.complete = True
    return call


# ---- the formats -------------------------------------------------------------------------------
class ToolParser:
    """One family's call format: where calls begin, how they are read, and a grammar that forces them."""

    name: ClassVar[str]
    #: Text that shows, in a chat template, that the model writes calls in this format.
    template_markers: ClassVar[tuple[str, ...]]
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments",)

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def section_start(self, text: str) -> int | None:
        """Where the calls begin in `text`, or None while it shows none."""
        raise NotImplementedError

    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` (without calls so far) might begin them."""
        raise NotImplementedError

    def scan(self, section: str) -> list[PartialCall]:
        """The calls in `section` (from section_start on), the last maybe unfinished; raises _Malformed."""
        raise NotImplementedError

    def call_grammar(self, call_schema: dict[str, Any], parallel: bool) -> str:
        """A Lark grammar for one call (or several, if `parallel`) whose object follows `call_schema` (whose
        root may hold the definitions its references name)."""
        raise NotImplementedError

    def forced_grammar(self, functions: list[tuple[str, dict[str, Any]]], definitions: dict[str, Any],
                       parallel: bool) -> str:
        """A Lark grammar that lets the model write nothing but calls (several if `parallel`) to `functions`,
        (name, parameters schema) pairs whose references name `definitions` (a schema root's "$defs")."""
        schemas = [self.call_schema(name, parameters) for name, parameters in functions]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return self.call_grammar({**schema, **definitions}, parallel)

    def call_schema(self, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """The JSON schema of one call object in this format, to the function `name` taking `parameters`."""
        arguments_key = self.argument_keys[0]
        return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters},
                "required": ["name", arguments_key], "additionalProperties": False}

    def new_call_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    def reader(self, tooling: ToolCalling | None) -> ReplyReader:
        """How replies are read: content, then calls in this format when `tooling` reads calls; else all content."""
        if tooling is None or not tooling.parses:
            return ContentReader()
        return CallReader(self, tooling.max_calls)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content before the calls (None if blank) and the calls; all of `text` is content when it holds
        none, or when they are malformed or unfinished."""
        start = self.section_start(text)
        if start is None:
            return text, []
        try:
            calls = self.scan(text[start:])
        except _Malformed:
            return text, []
        if not calls or not all(call.complete for call in calls):
            return text, []
        content = text[:start] if text[:start].strip() else None
        return content, [ToolCall(self.new_call_id(), call.name, call.arguments) for call in calls]

    def _marker(self, marker: str) -> str:
        """A grammar literal for `marker`: its token where the vocabulary has it as one (llguidance matches an
        added token, special or not, only by id), else its text."""
        token_id = self.tokenizer.token_to_id(marker)
        return json.dumps(marker) if token_id is None else f"<[{token_id}]>"


class HermesToolParser(ToolParser):
    """Hermes and Qwen 2.5 / 3: each call a JSON object between <tool_call> and </tool_call>."""

    name = "hermes"
    template_markers = ("<tool_call>",)
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def section_start(self, text: str) -> int | None:
        start = text.find(self.OPEN)
        return None if start < 0 else start

    def holdback(self, text: str) -> int:
        return partial_suffix(text, self.OPEN)

    def scan(self, section: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        pos = 0
        while section.startswith(self.OPEN, pos):
            pos = _skip_whitespace(section, pos + len(self.OPEN))
            if pos == len(section):
                break
            call, end = _scan_call(section, pos, self.argument_keys)
            calls.append(call)
            if end is None:
                break
            pos = _skip_whitespace(section, end)
            if section.startswith(self.CLOSE, pos):  # the last call may end at the end of the text unclosed
                pos = _skip_whitespace(section, pos + len(self.CLOSE))
        return calls

    def call_grammar(self, call_schema: dict[str, Any], parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f'call: {self._marker(self.OPEN)} "\\n" {_json_rule(call_schema)} "\\n" {self._marker(self.CLOSE)}\n')


class _MarkerOrBareJsonParser(ToolParser):
    """A format whose calls follow a marker token, or stand alone as the reply's JSON (a reply whose first
    non-blank character is `opening`): the marker may be a special token that decoding leaves out."""

    MARKER: str
    opening: str  # "{" or "["

    def section_start(self, text: str) -> int | None:
        start = text.find(self.MARKER)
        if start >= 0:
            return start
        begin = _skip_whitespace(text, 0)
        return begin if text.startswith(self.opening, begin) else None

    def holdback(self, text: str) -> int:
        return len(text) if not text.strip() else partial_suffix(text, self.MARKER)


class Llama3JsonToolParser(_MarkerOrBareJsonParser):
    """Llama 3.1-3.3: the reply is a call object (after <|python_tag|>, or alone), several joined by ';'."""

    name = "llama3_json"
    MARKER = "<|python_tag|>"
    opening = "{"
    template_markers = (MARKER, '{"name": function name, "parameters"')
    argument_keys = ("parameters", "arguments")

    def scan(self, section: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        pos = len(self.MARKER) if section.startswith(self.MARKER) else 0
        while (pos := _skip_whitespace(section, pos)) < len(section):
            call, end = _scan_call(section, pos, self.argument_keys)
            calls.append(call)
            if end is None:
                break
            pos = _skip_whitespace(section, end)
            if not section.startswith(";", pos):
                break
            pos += 1
        return calls

    def call_grammar(self, call_schema: dict[str, Any], parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: {_json_rule(call_schema)}\n"


class MistralToolParser(_MarkerOrBareJsonParser):
    """Mistral (v3 tokenizers): [TOOL_CALLS] and a JSON list of call objects.

    [TOOL_CALLS] is a special token, left out of the text unless skip_special_tokens is false, so a
    reply that begins with '[' is read as the list too.
    """

    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    opening = "["
    template_markers = (MARKER,)

    def scan(self, section: str) -> list[PartialCall]:
        calls: list[PartialCall] = []
        if self.MARKER.startswith(section):  # the marker itself is still arriving
            return calls
        pos = _skip_whitespace(section, len(self.MARKER) if section.startswith(self.MARKER) else 0)
        if pos == len(section):
            return calls
        if section[pos] != "[":
            raise _Malformed("Mistral's calls are a JSON list")
        pos += 1
        while (pos := _skip_whitespace(section, pos)) < len(section) and section[pos] != "]":
            if section[pos] == ",":
                pos += 1
                continue
            call, end = _scan_call(section, pos, self.argument_keys)
            calls.append(call)
            if end is None:
                break
            pos = end
        return calls

    def new_call_id(self) -> str:
        # Mistral's chat templates refuse any other id than 9 letters and digits.
        return uuid.uuid4().hex[:9]

    def call_grammar(self, call_schema: dict[str, Any], parallel: bool) -> str:
        items = {key: value for key, value in call_schema.items() if key not in _DEFINITIONS}
        definitions = {key: call_schema[key] for key in _DEFINITIONS if key in call_schema}  # to the root
        calls = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1}),
                 **definitions}
        return f"start: {self._marker(self.MARKER)} {_json_rule(calls)}\n"


class HarmonyToolParser(ToolParser):
    """GPT-OSS (harmony, lmgen.harmony): each call is a message of its own to ``functions.NAME``, its text the
    arguments' JSON. The reply's other messages are its answer and its reasoning, which its reader
    (HarmonyReader) tells apart too; parse gives the answer as content."""

    name = "harmony"
    template_markers = (f"{harmony.CHANNEL}commentary",)

    def reader(self, tooling: ToolCalling | None) -> HarmonyReader:
        """Harmony replies are read by channel whether calls are read or not."""
        reads = tooling is not None and tooling.parses
        return HarmonyReader(self if reads else None, tooling.max_calls if reads else None)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        reply = _read_harmony(text, self, None)
        return reply.content, reply.calls

    def forced_grammar(self, functions: list[tuple[str, dict[str, Any]]], definitions: dict[str, Any],
                       parallel: bool) -> str:
        """One call (<|call|> ends the reply, so there is never a second), after the model's reasoning if it
        writes some first."""
        channel, message = self._marker(harmony.CHANNEL), self._marker(harmony.MESSAGE)
        calls = " | ".join(f"{channel} {json.dumps(f'commentary to={harmony.FUNCTIONS}{name} ')} "
                           f'{self._marker(harmony.CONSTRAIN)} "json" {message} '
                           f"{_json_rule({**parameters, **definitions})}" for name, parameters in functions)
        return (f"start: analysis? call\ncall: {calls}\n"
                f'analysis: {channel} "analysis" {message} REASONING {self._marker(harmony.END)} '
                f'{self._marker(harmony.START)} "assistant"\n'
                "REASONING: /(.|\\n)*/\n")


PARSERS: dict[str, type[ToolParser]] = {parser.name: parser for parser in (
    HermesToolParser, Llama3JsonToolParser, MistralToolParser, HarmonyToolParser)}


def tool_parser_for(tokenizer: Tokenizer, name: str | None = None) -> ToolParser | None:
    """The parser called `name`, or the one whose format the chat template shows (None if none does)."""
    if name is not None:
        if name not in PARSERS:
            raise InvalidArgumentError(f"tool_call_parser {name!r} is unknown: use one of {', '.join(sorted(PARSERS))}")
        return PARSERS[name](tokenizer)
    templates = tokenizer.chat_templates
    template = templates.get("tool_use") or templates.get("default") or ""
    for parser in PARSERS.values():
        if any(marker in template for marker in parser.template_markers):
            return parser(tokenizer)
    return None


def _json_rule(schema: dict[str, Any]) -> str:
    """A Lark grammar's JSON (llguidance's %json) following `schema`, in the layout forced calls are written in."""
    return f"%json {json.dumps({**schema, 'x-guidance': _CALL_LAYOUT})}"


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    # OpenAI: a function without `parameters` takes none.
    return function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


# ---- one conversation's tools -----------------------------------------------------------------
@dataclass
class ToolCalling:
    """One conversation's tools, `tool_choice` and `parallel_tool_calls`, as OpenAI defines them.

    tool_choice: "auto" (the model decides; its calls are parsed), "none" (the tools are still
    rendered, as vLLM does, but nothing is parsed: the reply is content), "required" (at least one
    call, forced) or {"type": "function", "function": {"name": ...}} (one call to that function,
    forced). `tools` are OpenAI's: [{"type": "function", "function": {"name", "parameters", ...}}].
    """

    tools: list[dict[str, Any]]
    parser: ToolParser | None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    forced: list[dict[str, Any]] = field(init=False)  # the functions a forced call may name (empty: none forced)

    def __post_init__(self) -> None:
        functions = _check_tools(self.tools)
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not isinstance(name, str):
                raise ToolArgumentError('tool_choice must be "none", "auto", "required" or '
                                        '{"type": "function", "function": {"name": ...}}', "tool_choice")
            self.forced = [f for f in functions if f["name"] == name]
            if not self.forced:
                raise ToolArgumentError(f"tool_choice names the function {name!r}, which is not among tools (they "
                                        f"are {', '.join(repr(f['name']) for f in functions) or 'none'})",
                                        "tool_choice.function.name")
        elif choice in ("auto", "none", "required"):
            self.forced = functions if choice == "required" else []
            if choice == "required" and not functions:
                raise ToolArgumentError('tool_choice "required" needs at least one tool in tools', "tool_choice")
        else:
            raise ToolArgumentError(f'tool_choice must be "none", "auto", "required" or a named function, '
                                    f"got {choice!r}", "tool_choice")
        if self.parser is None and self.forced:
            raise ToolArgumentError("a call cannot be forced: the model's chat template shows no tool-call format "
                                    f"lmgen knows; name one ({', '.join(sorted(PARSERS))})", "tool_choice")

    @property
    def parses(self) -> bool:
        """Whether replies are read for calls (tools given and tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel_tool_calls else 1

    def structured(self) -> StructuredOutputs | None:
        """The grammar that forces a call, for "required" and a named function; None otherwise."""
        if not self.forced:
            return None
        functions, definitions = [], {}
        for function in self.forced:
            # References (pydantic writes "#/$defs/Model") name the schema's root, which the call object becomes.
            parameters = dict(_parameters(function))
            for key in _DEFINITIONS:
                for name, definition in (parameters.pop(key, None) or {}).items():
                    if definitions.setdefault(key, {}).setdefault(name, definition) != definition:
                        raise ToolArgumentError(f"two functions define {key}/{name} differently, which one forced "
                                                "call cannot hold: rename one", "tools")
            functions.append((function["name"], parameters))
        parallel = self.parallel_tool_calls and isinstance(self.tool_choice, str)  # a named function: one call
        return StructuredOutputs(grammar=self.parser.forced_grammar(functions, definitions, parallel))


def _check_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """The `function` of each tool, checked: OpenAI's {"type": "function", "function": {"name": ...}}."""
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolArgumentError('each tool must be {"type": "function", "function": {"name": ..., '
                                    '"parameters": {...}}}', f"tools.{index}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolArgumentError("a function needs a name", f"tools.{index}.function.name")
        if not isinstance(function.get("parameters", {}), (dict, type(None))):
            raise ToolArgumentError("a function's parameters must be a JSON schema (an object)",
                                    f"tools.{index}.function.parameters")
        functions.append(function)
    return functions


def template_tool_calls(tool_calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's OpenAI tool calls as chat templates read them: arguments as an object.

    OpenAI sends arguments as JSON text; templates write them with `tojson`, which would quote the text
    (transformers expects a dict there; vLLM converts the same way). Field paths in errors start at the call.
    """
    calls = []
    for index, call in enumerate(tool_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ToolArgumentError('a tool call must be {"id": ..., "type": "function", "function": {"name": ..., '
                                    '"arguments": ...}}', f"tool_calls.{index}")
        function = dict(call["function"])
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise ToolArgumentError(f"a tool call's arguments must be JSON text: {exc}",
                                        f"tool_calls.{index}.function.arguments") from None
        calls.append({**call, "function": function})
    return calls


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with each assistant message's tool calls as templates read them (template_tool_calls)."""
    return [{**message, "tool_calls": template_tool_calls(message["tool_calls"])}
            if isinstance(message, dict) and message.get("tool_calls") else message for message in messages]


def reply_reader(parser: ToolParser | None, tooling: ToolCalling | None) -> ReplyReader:
    """How a reply is read: its content and, when `tooling` reads calls, its calls in `parser`'s format (harmony
    replies: their messages by channel, calls or not); all content where no format is known."""
    return ContentReader() if parser is None else parser.reader(tooling)


# ---- reading replies: finished and streamed -------------------------------------------------------
class CallReader(ReplyReader):
    """Content, then calls in one ToolParser's format (the first `max_calls` of them; None: all)."""

    def __init__(self, parser: ToolParser, max_calls: int | None) -> None:
        self.parser = parser
        self.max_calls = max_calls

    def read(self, text: str) -> ChatReply:
        """All of `text` is content when it holds no valid calls; the calls get new ids."""
        content, calls = self.parser.parse(text)
        return ChatReply(content, None, calls[:self.max_calls])

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.parser, self.max_calls)


class ToolCallStream(ReplyStream):
    """Turns a reply's text deltas into content deltas and call deltas, as OpenAI streams them.

    Content is passed on until the calls begin (holding back what might be their start); then each
    call's id and name go out once its name is read, and its arguments' text as it grows. If the reply
    ends without valid calls and none went out, the held text goes out as content. While a call's
    arguments run on, new text is only checked for their end (a long argument is not scanned again
    at every delta); the calls are read again from the start once they close.
    """

    def __init__(self, parser: ToolParser, max_calls: int | None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self.num_sent_chars = 0  # of content
        self.sent: list[int] = []  # per call sent: characters of its arguments sent
        self.broken_at: int | None = None  # where calls seemed to begin that turned out malformed
        self.open_arguments: _OpenValue | None = None  # the last sent call's arguments, while they run on

    @property
    def called(self) -> bool:
        return bool(self.sent)

    def feed(self, text: str, finished: bool) -> ReplyDelta:
        self.text += text
        if self.open_arguments is not None and self.open_arguments.end(text) is None:
            self.sent[-1] += len(text)
            return ReplyDelta(calls=[ToolCallDelta(len(self.sent) - 1, text)] if text else [])
        self.open_arguments = None
        start = self.parser.section_start(self.text)
        if start is None:
            end = len(self.text) if finished else len(self.text) - self.parser.holdback(self.text)
            return ReplyDelta(self._content(end))
        content = self._content(start)
        deltas = [] if start == self.broken_at else self._call_deltas(start)
        if finished and not self.sent:  # no calls after all: what was held is content
            content += self._content(len(self.text))
        return ReplyDelta(content, calls=deltas)

    def _content(self, end: int) -> str:
        piece = self.text[self.num_sent_chars:end] if end > self.num_sent_chars else ""
        self.num_sent_chars = max(self.num_sent_chars, end)
        return piece

    def _call_deltas(self, start: int) -> list[ToolCallDelta]:
        try:
            calls = self.parser.scan(self.text[start:])
        except _Malformed:  # nothing more goes out as calls, unless they turn out to begin elsewhere
            self.broken_at = start
            return []
        deltas = []
        for index, call in enumerate(calls[:self.max_calls]):
            if call.name is None:
                break
            if index == len(self.sent):
                deltas.append(ToolCallDelta(index, "", self.parser.new_call_id(), call.name))
                self.sent.append(0)
            if len(call.arguments) > self.sent[index]:
                deltas.append(ToolCallDelta(index, call.arguments[self.sent[index]:]))
                self.sent[index] = len(call.arguments)
        last = calls[len(self.sent) - 1] if self.sent else None
        if last is not None and last.arguments_open and last.arguments[:1] in ("{", "["):
            self.open_arguments = _OpenValue()
            self.open_arguments.end(last.arguments)  # catch up with the arguments so far
        return deltas


# ---- harmony replies: content, reasoning and calls ------------------------------------------------
class HarmonyReader(ReplyReader):
    """Harmony replies (their text with its markers) as vLLM answers for GPT-OSS: content from the final channel
    and from commentary without a recipient (preambles), reasoning from analysis, a call from each message to one
    of the caller's functions when `parser` is given (the first `max_calls`). Messages of a kind are joined by a
    newline. A call whose text is no JSON object is read by its channel instead, like any other message."""

    needs_special_tokens = True  # the markers are special tokens

    def __init__(self, parser: HarmonyToolParser | None, max_calls: int | None) -> None:
        self.parser = parser
        self.max_calls = max_calls

    def read(self, text: str) -> ChatReply:
        return _read_harmony(text, self.parser, self.max_calls)

    def stream(self) -> HarmonyReplyStream:
        return HarmonyReplyStream(self.parser, self.max_calls)


def _read_harmony(text: str, parser: ToolParser | None, max_calls: int | None) -> ChatReply:
    texts: dict[str, list[str]] = {"content": [], "reasoning": []}
    calls: list[ToolCall] = []
    for message in harmony.read_messages(text):
        kind = _harmony_kind(message, parser is not None, len(calls), max_calls)
        if kind == "call" and _is_json_object(message.text):
            calls.append(ToolCall(parser.new_call_id(), message.function, message.text))
        elif kind != "dropped":
            texts[_channel_kind(message)].append(message.text)
    content, reasoning = ("\n".join(parts) if parts else None for parts in texts.values())
    return ChatReply(content, reasoning, calls)


def _harmony_kind(message: harmony.HarmonyMessage, reads_calls: bool, num_calls: int, max_calls: int | None) -> str:
    """"call", "dropped" (a call past max_calls), "content" or "reasoning"."""
    if reads_calls and message.function is not None:
        return "call" if max_calls is None or num_calls < max_calls else "dropped"
    return _channel_kind(message)


def _channel_kind(message: harmony.HarmonyMessage) -> str:
    # no channel: text a finished reply held that never became a message (nothing is lost)
    return "reasoning" if message.channel not in ("final", "commentary", None) else "content"


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


class HarmonyReplyStream(ReplyStream):
    """A harmony reply's text deltas as content, reasoning and call deltas, adding up to HarmonyReader.read's
    answer (but for a call whose arguments turn out malformed: they went out as they came).

    Each message goes out as its text arrives (less a tail that may begin a marker); a call's id and name
    once its header is read, then its arguments' text. Only the message still open is read again at each
    delta."""

    def __init__(self, parser: ToolParser | None, max_calls: int | None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self.pos = 0  # where the open message's header starts
        self.kind: str | None = None  # the open message's kind, once its header is read
        self.num_sent_chars = 0  # of the open message's text
        self.kinds_sent: set[str] = set()
        self.num_calls = 0

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    def feed(self, text: str, finished: bool) -> ReplyDelta:
        self.text += text
        out, deltas = {"content": "", "reasoning": "", "dropped": ""}, []
        while True:
            message, next_pos = harmony.next_message(self.text, self.pos, finished)
            if message is None:
                break
            if self.kind is None:  # the message begins
                self.kind = _harmony_kind(message, self.parser is not None, self.num_calls, self.max_calls)
                if self.kind == "call":
                    deltas.append(ToolCallDelta(self.num_calls, "", self.parser.new_call_id(), message.function))
                    self.num_calls += 1
                elif self.kind in self.kinds_sent:
                    out[self.kind] += "\n"
                self.kinds_sent.add(self.kind)
            piece = message.text[self.num_sent_chars:]
            self.num_sent_chars += len(piece)
            if self.kind == "call" and piece:
                deltas.append(ToolCallDelta(self.num_calls - 1, piece))
            elif self.kind != "call":
                out[self.kind] += piece
            if not message.complete:
                break
            self.pos, self.kind, self.num_sent_chars = next_pos, None, 0
        return ReplyDelta(out["content"], out["reasoning"], deltas)
