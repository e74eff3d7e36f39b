"""POST /v1/responses: OpenAI's Responses API, text in and text out, served by the chat path.

A Responses request becomes a chat completion request — ``instructions`` a system
message, the ``input`` items the conversation, ``max_output_tokens`` the output limit,
``text.format`` the response format — and one engine request; its deltas come back as
a Response object or as the event stream OpenAI's SDK reads (response.created, ...,
response.output_text.delta, ..., response.completed). Nothing is stored, so
``previous_response_id`` is refused: send the whole conversation as ``input``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from lmgen.engine.async_engine import STREAM_ERRORS, RequestStream
from lmgen.outputs import CompletionOutput, RequestOutput
from lmgen.reply import ReplyReader
from lmgen.server.errors import bad_request
from lmgen.server.protocol import (
    ChatCompletionRequest, ChatMessage, CoreSamplingFields, JsonSchemaFormat, ResponseFormat, TokenLogprob,
)
from lmgen.server.serving import (
    SSE_HEADERS, OpenAIServing, _ChatFormatter, _collect, _Prompt, decoded_for, json_response,
)

#: the `include` value that asks for the output's logprobs (the only one with a meaning here)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TEXT_PART_TYPES = ("input_text", "output_text")


# ---- the request ----------------------------------------------------------------------------
class InputContentPart(BaseModel):
    """A part of an input message; text parts only (checked when converting)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """An input item: a message, or the reasoning that led to the assistant message after it. Keys that
    clients echo back from earlier responses' output items (id, status, phase, summary) are ignored."""

    model_config = ConfigDict(extra="ignore")
    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputContentPart] | None = None


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint for OpenAI's models; ignored


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # the template's reasoning_effort
    summary: Literal["auto", "concise", "detailed"] | None = None  # OpenAI's models summarize; none are made here


class ResponsesStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None  # OpenAI pads events against side channels; not done here


class ResponsesRequest(CoreSamplingFields):
    """POST /v1/responses."""

    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream_options: ResponsesStreamOptions | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (drop the input's start to fit) is not done
    parallel_tool_calls: bool | None = None  # meaningless without tools
    # Answered with a clear 400: nothing is stored, and no tools are called on this route.
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as a chat completion: what the server runs."""
        shared = {name: getattr(self, name) for name in CoreSamplingFields.model_fields
                  if name in self.model_fields_set}
        return ChatCompletionRequest(
            **shared, messages=self._messages(), max_completion_tokens=self.max_output_tokens,
            logprobs=LOGPROBS_INCLUDE in (self.include or ()), top_logprobs=self.top_logprobs,
            response_format=self._response_format(), reasoning_effort=self.reasoning and self.reasoning.effort)

    def _messages(self) -> list[ChatMessage]:
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        if isinstance(self.input, str):
            return messages + [ChatMessage(role="user", content=self.input)]
        if not self.input:
            raise bad_request("input is empty: give a string or at least one message", "input")
        reasoning: str | None = None  # of the assistant message to come
        for index, item in enumerate(self.input):
            if item.type == "reasoning":
                reasoning = _reasoning_text(index, item)
                continue
            message = ChatMessage(role=_role(index, item), content=_text(index, item), reasoning_content=reasoning)
            if reasoning is not None and message.role != "assistant":
                raise bad_request("a reasoning item goes right before the assistant message it led to",
                                  f"input.{index - 1}")
            messages.append(message)
            reasoning = None
        if reasoning is not None:
            raise bad_request("a reasoning item goes right before the assistant message it led to",
                              f"input.{len(self.input) - 1}")
        return messages

    def _response_format(self) -> ResponseFormat | None:
        spec = self.text.format if self.text is not None else None
        if spec is None or spec.type != "json_schema":
            return spec and ResponseFormat(type=spec.type)
        if spec.json_schema is None:
            raise bad_request("text.format of type json_schema needs schema, the JSON schema the reply must follow",
                              "text.format.schema")
        return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
            name=spec.name, description=spec.description, schema=spec.json_schema, strict=spec.strict))


def _role(index: int, item: InputItem) -> str:
    if item.type != "message":
        raise bad_request(f"input items of type {item.type!r} are not supported: lmgen's /v1/responses takes "
                          "messages (text in, text out)", f"input.{index}.type")
    if item.role is None:
        raise bad_request("input messages need a role (user, assistant, system or developer)", f"input.{index}.role")
    return item.role


def _text(index: int, item: InputItem) -> str:
    if item.content is None or isinstance(item.content, str):
        return item.content or ""
    for number, part in enumerate(item.content):
        if part.type not in _TEXT_PART_TYPES or part.text is None:
            raise bad_request(f"content parts of type {part.type!r} are not supported: send input_text parts "
                              "({'type': 'input_text', 'text': ...}) or a string", f"input.{index}.content.{number}")
    return "\n".join(part.text for part in item.content)


def _reasoning_text(index: int, item: InputItem) -> str:
    """An echoed reasoning item's text (its reasoning_text parts)."""
    parts = item.content if isinstance(item.content, list) else []
    for number, part in enumerate(parts):
        if part.type != "reasoning_text" or part.text is None:
            raise bad_request(f"a reasoning item's content parts are reasoning_text parts, not {part.type!r}",
                              f"input.{index}.content.{number}")
    return "\n".join(part.text for part in parts)


def _reject_unsupported(request: ResponsesRequest) -> None:
    if request.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server stores no responses; send the whole "
                          "conversation as input (earlier output messages included)", "previous_response_id")
    if request.tools:
        raise bad_request("tools are not supported on /v1/responses: remove the field (for tool calls, use "
                          "/v1/chat/completions)", "tools")
    if request.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice needs tools, which /v1/responses does not take: remove the field",
                          "tool_choice")
    unknown = sorted(set(request.include or ()) - {LOGPROBS_INCLUDE})
    if unknown:
        raise bad_request(f"include values {unknown} are not supported: only {LOGPROBS_INCLUDE!r}", "include")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")


# ---- the response ---------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    """The model's reasoning (a thinking model's <think> section, harmony's analysis), before its message."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Any] = Field(default_factory=list)  # OpenAI's models summarize their reasoning; none here
    content: list[ReasoningText]


OutputItem = OutputMessage | OutputReasoning


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """OpenAI's Response object (the fields that mean something here)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    parallel_tool_calls: bool = False
    tool_choice: str | dict[str, Any] = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: bool = False  # nothing is stored
    metadata: dict[str, str] | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None


@dataclass
class _Item:
    """An output item as it is built (streamed, or from a whole reply): its kind ("reasoning" or "message"), its
    text and logprobs so far."""

    kind: str
    id: str
    output_index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class _ResponsesFormatter(_ChatFormatter):
    """One engine request's deltas as a Response object or as Responses stream events.

    The reply's reasoning, if it has some, is a reasoning item before the message. A stream opens each item
    at its first text; in the rare reply whose reasoning resumes after its answer began (harmony), each run
    of reasoning or answer is an item of its own."""

    def __init__(self, serving: OpenAIServing, request: ResponsesRequest, chat: ChatCompletionRequest,
                 prompt: _Prompt, response_id: str, model: str, reader: ReplyReader) -> None:
        super().__init__(serving, chat, [prompt], response_id, model, tooling=None, reader=reader)
        self.responses_request = request
        self.sequence_number = 0
        self.items: list[OutputItem] = []  # streamed and done
        self.open_item: _Item | None = None
        self.pending_logprobs: list[TokenLogprob] = []  # of tokens whose text has not gone out in the message
        self.reasoning = ""  # streamed so far

    def _response(self, status: str, output: list[OutputItem], final: CompletionOutput | None,
                  reasoning: str | None = None) -> ResponseObject:
        request = self.responses_request
        fields = request.model_dump(include={"instructions", "max_output_tokens", "temperature", "top_p",
                                             "top_logprobs", "metadata", "reasoning"})
        if request.text is not None and request.text.format is not None:
            fields["text"] = request.text.model_dump(by_alias=True, exclude_none=True)
        response = ResponseObject(id=self.request_id, created_at=self.created, status=status, model=self.model,
                                  output=output, **fields)
        if final is not None:
            response.usage = self._usage(len(final.token_ids), reasoning)
            if final.finish_reason == "length":
                response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            elif final.finish_reason == "abort":
                response.error = ResponseError(code="server_error", message="generation was aborted before it "
                                                                            "finished (the server is shutting down)")
        return response

    def _usage(self, num_output_tokens: int, reasoning: str | None) -> ResponseUsage:
        usage = self.usage(num_output_tokens)
        # The reasoning's tokens as its text encodes (a reply's tokens are not split where its reasoning ends).
        num_reasoning_tokens = len(self.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens,
                             output_tokens_details=OutputTokensDetails(reasoning_tokens=num_reasoning_tokens))

    def _item(self, item: _Item, status: str, opening: bool = False) -> OutputItem:
        """The output item `item` is, just opened (no content part yet) or with its text so far."""
        if item.kind == "reasoning":
            content = [] if opening else [ReasoningText(text=item.text)]
            return OutputReasoning(id=item.id, status=status, content=content)
        logprobs = item.logprobs if self.request.logprobs else None
        return OutputMessage(id=item.id, status=status,
                             content=[] if opening else [OutputText(text=item.text, logprobs=logprobs)])

    def whole_response(self, final: RequestOutput) -> ResponseObject:
        output = final.outputs[0]
        reply = self.reader.read(output.text)
        logprobs = self._logprobs(output)
        message = _Item("message", _new_id("msg"), 0, reply.content or "", logprobs.content if logprobs else [])
        items = [self._item(message, _item_status(output))]
        if reply.reasoning is not None:
            items.insert(0, self._item(_Item("reasoning", _new_id("rs"), 0, reply.reasoning), "completed"))
        return self._response(_status(output), items, output, reply.reasoning)

    # ---- the event stream -------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {to_json(payload, inf_nan_mode='null').decode()}\n\n"

    def _part_event(self, item: _Item, kind: str, **fields: Any) -> str:
        return self._event(kind, item_id=item.id, output_index=item.output_index, content_index=0, **fields)

    def _switch(self, kind: str) -> list[str]:
        """The events that make an item of `kind` the open one (none if it is)."""
        if self.open_item is not None and self.open_item.kind == kind:
            return []
        events = self._close("completed") if self.open_item is not None else []
        item = self.open_item = _Item(kind, _new_id("rs" if kind == "reasoning" else "msg"), len(self.items))
        empty = ReasoningText(text="") if kind == "reasoning" else OutputText(text="")
        return [*events, self._event("response.output_item.added", output_index=item.output_index,
                                     item=self._item(item, "in_progress", opening=True)),
                self._part_event(item, "response.content_part.added", part=empty)]

    def _close(self, status: str) -> list[str]:
        """The events that end the open item."""
        item, self.open_item = self.open_item, None
        done = self._item(item, status)
        self.items.append(done)
        part = done.content[0]
        text_done = (self._part_event(item, "response.reasoning_text.done", text=item.text) if item.kind == "reasoning"
                     else self._part_event(item, "response.output_text.done", text=item.text, logprobs=item.logprobs))
        return [text_done, self._part_event(item, "response.content_part.done", part=part),
                self._event("response.output_item.done", output_index=item.output_index, item=done)]

    def _message_delta(self, text: str) -> list[str]:
        events = self._switch("message")
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        self.open_item.text += text
        self.open_item.logprobs += logprobs
        return [*events, self._part_event(self.open_item, "response.output_text.delta", delta=text, logprobs=logprobs)]

    def _delta_events(self, output: CompletionOutput) -> list[str]:
        """The events of one engine delta: reasoning text, then message text (with the logprobs so far)."""
        reply = self.feed(output)
        logprobs = self._logprobs(output)
        self.pending_logprobs += logprobs.content if logprobs else []
        events = []
        if reply.reasoning:
            events += self._switch("reasoning")
            self.open_item.text += reply.reasoning
            self.reasoning += reply.reasoning
            events.append(self._part_event(self.open_item, "response.reasoning_text.delta", delta=reply.reasoning))
        if reply.content:
            events += self._message_delta(reply.content)
        return events

    def _closing_events(self, output: CompletionOutput) -> list[str]:
        """The message (opened if the reply had no answer) with the logprobs left, and the open item's end."""
        events = self._message_delta("") if self.pending_logprobs else self._switch("message")
        return events + self._close(_item_status(output))

    async def events(self, stream: RequestStream) -> AsyncIterator[str]:
        """response.created ... the items' events ... response.completed (or .incomplete, .failed)."""
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress", response=self._response("in_progress", [], None))
        final: RequestOutput | None = None
        try:
            async for delta in stream:
                for event in self._delta_events(delta.outputs[0]):
                    yield event
                if final is None:
                    final = delta
                else:
                    final.merge(delta)
        except STREAM_ERRORS as exc:
            error = ResponseError(code="server_error", message=str(exc))
            response = self._response("failed", [], None)
            response.error = error
            yield self._event("response.failed", response=response)
            return
        finally:
            stream.abort()  # runs when the client disconnects, too (the task is cancelled)
        output = final.outputs[0]
        for event in self._closing_events(output):
            yield event
        status = _status(output)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        yield self._event(kind, response=self._response(status, self.items, output, self.reasoning or None))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _item_status(output: CompletionOutput) -> str:
    """The status of a reply's last item: complete when the model stopped by itself."""
    return "completed" if output.finish_reason == "stop" else "incomplete"


def _status(output: CompletionOutput) -> str:
    return {"stop": "completed", "length": "incomplete"}.get(output.finish_reason, "failed")


async def create_response(serving: OpenAIServing, request: ResponsesRequest, raw_request: Request) -> Response:
    """POST /v1/responses, streamed or not."""
    model = serving.check_model(request.model)
    _reject_unsupported(request)
    chat = request.chat_request()
    prompt = serving._chat_prompt(chat, "input")
    serving._check_fits(prompt, request.max_output_tokens, "max_output_tokens", "input")
    renames = {"max_tokens": "max_output_tokens", "logprobs": "top_logprobs",
               "structured": "structured_outputs" if request.structured_outputs else "text.format"}
    logprobs = (request.top_logprobs or 0) if chat.logprobs else None
    params = serving._sampling_params(chat, request.max_output_tokens, logprobs, renames)
    reader = serving.reply_reader(chat, None, params)
    params = decoded_for(params, reader)
    response_id = _new_id("resp")
    streams = await serving._start([prompt], params, response_id, renames, "input")
    formatter = _ResponsesFormatter(serving, request, chat, prompt, response_id, model, reader)
    if request.stream:
        return StreamingResponse(formatter.events(streams[0]), media_type="text/event-stream", headers=SSE_HEADERS)
    finals = await _collect(streams, raw_request)
    if finals is None:
        return Response(status_code=499)  # the client left
    return json_response(formatter.whole_response(finals[0]))
