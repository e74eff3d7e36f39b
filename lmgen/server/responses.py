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
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from lmgen.engine.async_engine import STREAM_ERRORS, RequestStream
from lmgen.outputs import CompletionOutput, RequestOutput
from lmgen.server.errors import bad_request
from lmgen.server.protocol import (
    ChatCompletionRequest, ChatMessage, CoreSamplingFields, JsonSchemaFormat, ResponseFormat, TokenLogprob,
)
from lmgen.server.serving import SSE_HEADERS, OpenAIServing, _ChatFormatter, _collect, _Prompt, json_response

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
    """An input item; only messages are served. Keys that clients echo back from earlier
    responses' output messages (id, status, phase) are ignored."""

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
            response_format=self._response_format())

    def _messages(self) -> list[ChatMessage]:
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions is not None else []
        if isinstance(self.input, str):
            return messages + [ChatMessage(role="user", content=self.input)]
        if not self.input:
            raise bad_request("input is empty: give a string or at least one message", "input")
        for index, item in enumerate(self.input):
            messages.append(ChatMessage(role=_role(index, item), content=_text(index, item)))
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
    output: list[OutputMessage] = Field(default_factory=list)
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
    previous_response_id: None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None


class _ResponsesFormatter(_ChatFormatter):
    """One engine request's deltas as a Response object or as Responses stream events."""

    def __init__(self, serving: OpenAIServing, request: ResponsesRequest, chat: ChatCompletionRequest,
                 prompt: _Prompt, response_id: str, model: str) -> None:
        super().__init__(serving, chat, [prompt], response_id, model, tooling=None)
        self.responses_request = request
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence_number = 0

    def _response(self, status: str, output: list[OutputMessage], final: CompletionOutput | None) -> ResponseObject:
        request = self.responses_request
        fields = request.model_dump(include={"instructions", "max_output_tokens", "temperature", "top_p",
                                             "top_logprobs", "metadata"})
        if request.text is not None and request.text.format is not None:
            fields["text"] = request.text.model_dump(by_alias=True, exclude_none=True)
        response = ResponseObject(id=self.request_id, created_at=self.created, status=status, model=self.model,
                                  output=output, **fields)
        if final is not None:
            response.usage = self._usage(len(final.token_ids))
            if final.finish_reason == "length":
                response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            elif final.finish_reason == "abort":
                response.error = ResponseError(code="server_error", message="generation was aborted before it "
                                                                            "finished (the server is shutting down)")
        return response

    def _usage(self, num_output_tokens: int) -> ResponseUsage:
        usage = self.usage(num_output_tokens)
        return ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                             total_tokens=usage.total_tokens)

    def _message(self, final: CompletionOutput | None) -> OutputMessage:
        """The output message so far (`final` None: just opened) or at its end."""
        if final is None:
            return OutputMessage(id=self.message_id, status="in_progress", content=[])
        status = "completed" if final.finish_reason == "stop" else "incomplete"
        return OutputMessage(id=self.message_id, status=status, content=[self._text_part(final)])

    def _text_part(self, output: CompletionOutput) -> OutputText:
        logprobs = self._logprobs(output)
        return OutputText(text=output.text, logprobs=logprobs.content if logprobs else None)

    def whole_response(self, final: RequestOutput) -> ResponseObject:
        output = final.outputs[0]
        return self._response(_status(output), [self._message(output)], output)

    # ---- the event stream -------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {to_json(payload, inf_nan_mode='null').decode()}\n\n"

    def _part_event(self, kind: str, **fields: Any) -> str:
        return self._event(kind, item_id=self.message_id, output_index=0, content_index=0, **fields)

    async def events(self, stream: RequestStream) -> AsyncIterator[str]:
        """response.created ... the text deltas ... response.completed (or .incomplete, .failed)."""
        yield self._event("response.created", response=self._response("in_progress", [], None))
        yield self._event("response.in_progress", response=self._response("in_progress", [], None))
        yield self._event("response.output_item.added", output_index=0, item=self._message(None))
        yield self._part_event("response.content_part.added", part=OutputText(text=""))
        final: RequestOutput | None = None
        try:
            async for delta in stream:
                output = delta.outputs[0]
                logprobs = self._logprobs(output)
                if output.text or logprobs:
                    yield self._part_event("response.output_text.delta", delta=output.text,
                                           logprobs=logprobs.content if logprobs else [])
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
        part = self._text_part(output)
        yield self._part_event("response.output_text.done", text=output.text, logprobs=part.logprobs or [])
        yield self._part_event("response.content_part.done", part=part)
        message = self._message(output)
        yield self._event("response.output_item.done", output_index=0, item=message)
        status = _status(output)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        yield self._event(kind, response=self._response(status, [message], output))


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
    response_id = f"resp_{uuid.uuid4().hex}"
    streams = await serving._start([prompt], params, response_id, renames, "input")
    formatter = _ResponsesFormatter(serving, request, chat, prompt, response_id, model)
    if request.stream:
        return StreamingResponse(formatter.events(streams[0]), media_type="text/event-stream", headers=SSE_HEADERS)
    finals = await _collect(streams, raw_request)
    if finals is None:
        return Response(status_code=499)  # the client left
    return json_response(formatter.whole_response(finals[0]))
