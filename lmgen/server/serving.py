"""The OpenAI endpoints: request -> (prompt token ids, SamplingParams) -> engine -> response.

No generation logic lives here: fields map one to one onto SamplingParams (over the
model's generation_config defaults), every prompt becomes one engine request, and the
engine's deltas are reshaped into OpenAI's JSON or Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from lmgen.engine.async_engine import STREAM_ERRORS, AsyncEngine, EngineStoppedError, RequestStream
from lmgen.errors import InvalidArgumentError
from lmgen.outputs import CompletionOutput, Logprob, RequestOutput
from lmgen.params import SamplingParams
from lmgen.reasoning import reasoning_parser_for, reasoning_reader
from lmgen.reply import ReplyDelta, ReplyReader, ReplyStream
from lmgen.server.errors import APIError, bad_request, from_invalid_argument, sse_error
from lmgen.server.limits import DEFAULT_MAX_REQUEST_BYTES
from lmgen.server.metrics import Metrics
from lmgen.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatLogprobs, ChatMessage, ChatToolCall, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall, PromptLogprob,
    PromptLogprobs, SamplingFields, TokenLogprob, TopLogprob, Usage,
)
from lmgen.tool_calls import (
    HarmonyToolParser, ToolArgumentError, ToolCalling, reply_reader, template_tool_calls, tool_parser_for,
)

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServerSettings:
    """What `lmgen serve` adds on top of the engine's configuration."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    max_queued_requests: int | None = None  # None: no limit
    shutdown_timeout: float = 30.0  # seconds in-flight requests may run on after SIGTERM
    tool_call_parser: str | None = None  # None: the format the chat template shows (lmgen.tool_calls)
    reasoning_parser: str | None = None  # None: the one the chat template shows; "none": none (lmgen.reasoning)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies are a 413
    # A stream whose client leaves this many deltas unread (beyond what the sockets buffer)
    # and reads none for a while has stopped reading: its request is aborted rather than
    # queueing its output in memory (AsyncEngine.max_backlog).
    stream_backlog: int = 256


@dataclass
class _Prompt:
    text: str | None  # as the client wrote it, when it sent text
    token_ids: list[int]


def sse(payload: BaseModel) -> str:
    # pydantic writes non-finite floats (a -inf logprob) as null, keeping the JSON valid.
    return f"data: {payload.model_dump_json()}\n\n"


def json_response(payload: BaseModel) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")


class OpenAIServing:
    """Handlers for /v1/completions and /v1/chat/completions over one AsyncEngine."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.tool_parser = tool_parser_for(self.tokenizer, settings.tool_call_parser)
        self.reasoning_parser = reasoning_parser_for(self.tokenizer, settings.reasoning_parser)
        if self.reasoning_parser is not None and isinstance(self.tool_parser, HarmonyToolParser):
            raise InvalidArgumentError("harmony replies (GPT-OSS) mark their reasoning themselves: drop "
                                       f"reasoning_parser {self.reasoning_parser.name!r}")

    # ---- shared checks and conversions ----------------------------------------------------
    def check_model(self, name: str | None) -> str:
        """The model name to answer with; 404 for a name this server does not serve."""
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")
        return name

    def _sampling_params(self, request: SamplingFields, max_tokens: int | None, logprobs: int | None,
                         renames: dict[str, str], prompt_logprobs: int | None = None) -> SamplingParams:
        bias = None
        if request.logit_bias is not None:
            try:
                bias = {int(token): value for token, value in request.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids (integers written as strings)", "logit_bias")
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        fields = dict(
            n=request.n, max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=tuple(stop) if stop else None, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=bias, top_k=request.top_k, min_p=request.min_p,
            repetition_penalty=request.repetition_penalty, min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos, skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop_token_ids=tuple(request.stop_token_ids) if request.stop_token_ids else None,
            structured=structured_spec(request))
        fields.update(beam_fields(request))
        try:
            # Fields the client left out (None) take the checkpoint's generation_config defaults.
            return self.engine.engine.default_sampling_params(**fields)
        except InvalidArgumentError as exc:
            raise from_invalid_argument(exc, renames)

    def _check_fits(self, prompt: _Prompt, max_tokens: int | None, max_tokens_field: str, prompt_field: str) -> None:
        num_prompt, limit = len(prompt.token_ids), self.max_model_len
        if num_prompt >= limit:
            raise bad_request(f"the prompt has {num_prompt} tokens but the model's context is {limit} tokens "
                              "(prompt plus output): shorten the prompt", prompt_field, "context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise bad_request(f"the prompt ({num_prompt} tokens) plus {max_tokens_field} ({max_tokens}) is "
                              f"{num_prompt + max_tokens} tokens, more than the model's context of {limit} tokens: "
                              f"shorten the prompt or lower {max_tokens_field}", max_tokens_field,
                              "context_length_exceeded")

    def _check_queue(self, num_sequences: int) -> None:
        """429 when the queue beyond the running batch is full (--max-queued-requests)."""
        limit = self.settings.max_queued_requests
        in_flight = self.engine.num_unfinished_sequences
        capacity = self.engine.engine.config.max_num_seqs + (limit or 0)
        # With nothing in flight a request is always taken, so a large n is never refused forever.
        if limit is None or in_flight == 0 or in_flight + num_sequences <= capacity:
            return
        self.metrics.rejected.inc()
        raise APIError(429, f"the server is busy: {in_flight} sequences are in flight and at most {limit} may wait "
                            "beyond the running batch; retry shortly", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"})

    async def _start(self, prompts: list[_Prompt], params: SamplingParams, base_id: str,
                     renames: dict[str, str], prompt_field: str) -> list[RequestStream]:
        """Queue one engine request per prompt, all at once (so that they share the engine's next step); all or
        nothing."""
        self._check_queue(params.n * len(prompts))
        added = await asyncio.gather(*(self.engine.add_request(prompt.token_ids, params, f"{base_id}-{i}")
                                       for i, prompt in enumerate(prompts)), return_exceptions=True)
        streams = [item for item in added if isinstance(item, RequestStream)]
        exc = next((item for item in added if isinstance(item, BaseException)), None)
        if exc is None:
            return streams
        for stream in streams:
            stream.abort()
        if isinstance(exc, InvalidArgumentError):
            raise from_invalid_argument(exc, renames, prompt_field) from None
        if isinstance(exc, EngineStoppedError):
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
        raise exc

    # ---- /v1/completions ------------------------------------------------------------------
    def _completion_prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list[Any] = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            items = [raw]
        else:
            items = list(raw)
        if not items:
            raise bad_request("prompt is empty: give a string, a list of strings, or token ids", "prompt")
        prompts = []
        for item in items:
            if isinstance(item, str) and not item:
                raise bad_request("the prompt is empty: give at least one character or token id", "prompt")
            prompts.append(_Prompt(item, self.tokenizer.encode(item)) if isinstance(item, str)
                           else _Prompt(None, list(item)))
        return prompts

    async def completions(self, request: CompletionRequest, raw_request: Request) -> Response:
        model = self.check_model(request.model)
        if request.suffix is not None:
            raise bad_request("suffix is not supported: lmgen completes prompts left to right only", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported: ask for n completions and choose among them", "best_of")
        if request.max_tokens == 0 and not request.echo and request.prompt_logprobs is None:
            raise bad_request("max_tokens must be at least 1; 0 (nothing generated) only with echo or "
                              "prompt_logprobs, to score the prompt", "max_tokens")
        if request.stream_options is not None and not request.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        _check_prompt_logprobs(request)
        prompts = self._completion_prompts(request)
        for prompt in prompts:
            self._check_fits(prompt, request.max_tokens, "max_tokens", "prompt")
        renames = {"structured": "structured_outputs"}
        params = self._sampling_params(request, request.max_tokens, request.logprobs, renames,
                                       _echo_prompt_logprobs(request))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start(prompts, params, request_id, renames, "prompt")
        return await _respond(_CompletionFormatter(self, request, prompts, request_id, model), streams, raw_request)

    # ---- /v1/chat/completions -------------------------------------------------------------
    def _chat_prompt(self, request: ChatCompletionRequest, field: str = "messages") -> _Prompt:
        messages = [template_message(i, m) for i, m in enumerate(request.messages)]
        template_kwargs = dict(request.chat_template_kwargs or {})
        if request.reasoning_effort is not None:
            template_kwargs.setdefault("reasoning_effort", request.reasoning_effort)
        if request.tools is not None:  # as the client wrote them, as transformers' apply_chat_template passes dicts
            template_kwargs["tools"] = [tool.model_dump(exclude_unset=True) for tool in request.tools]
        try:
            ids = self.tokenizer.encode_chat(
                messages, add_generation_prompt=request.add_generation_prompt and not request.continue_final_message,
                continue_final_message=request.continue_final_message, chat_template=request.chat_template,
                **template_kwargs)
        except Exception as exc:  # the template (or its kwargs) rejected the client's conversation
            raise bad_request(f"the chat template could not render these messages: {exc}", field) from None
        return _Prompt(None, ids)

    async def chat_completions(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model = self.check_model(request.model)
        _reject_unsupported_chat_fields(request)
        max_tokens_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        renames = {"logprobs": "top_logprobs", "max_tokens": max_tokens_field,
                   "structured": "structured_outputs" if request.structured_outputs else "response_format"}
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        prompt = self._chat_prompt(request)
        self._check_fits(prompt, max_tokens, max_tokens_field, "messages")
        params = self._sampling_params(request, max_tokens, logprobs, renames, request.prompt_logprobs)
        tooling = self._tool_calling(request)
        if tooling is not None and tooling.forced:
            if params.structured is not None:
                raise bad_request(f"{renames['structured']} cannot be combined with a tool_choice that forces a call",
                                  "tool_choice")
            params = dataclasses.replace(params, structured=tooling.structured())
            renames["structured"] = "tools"  # a schema the grammar engine refuses is a function's parameters
        reader = self.reply_reader(request, tooling, params)
        params = decoded_for(params, reader)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start([prompt], params, request_id, renames, "messages")
        formatter = _ChatFormatter(self, request, [prompt], request_id, model, tooling=tooling, reader=reader)
        return await _respond(formatter, streams, raw_request)

    def reply_reader(self, request: ChatCompletionRequest, tooling: ToolCalling | None,
                     params: SamplingParams) -> ReplyReader:
        """How the request's replies are read: for calls as `tooling` says, after the model's reasoning (unless
        chat_template_kwargs' enable_thinking is false; `params` tell whether a grammar shapes the reply)."""
        thinking = (request.chat_template_kwargs or {}).get("enable_thinking") is not False
        return reasoning_reader(self.reasoning_parser, reply_reader(self.tool_parser, tooling), thinking=thinking,
                                constrained=params.structured is not None)

    def _tool_calling(self, request: ChatCompletionRequest) -> ToolCalling | None:
        """The request's tools and tool_choice, checked; None when it reads no calls and forces none."""
        choice = request.tool_choice
        if request.tools is None and choice in (None, "none", "auto"):
            return None
        if self.tool_parser is None and request.tools and choice != "none":
            raise bad_request("this model's chat template shows no tool-call format lmgen knows, so its calls cannot "
                              "be read: start the server with --tool-call-parser, or drop tools", "tools")
        if choice is None or not isinstance(choice, str):
            choice = "auto" if choice is None else choice.model_dump()
        try:
            calling = ToolCalling([tool.model_dump(exclude_unset=True) for tool in request.tools or []],
                                  self.tool_parser, choice, request.parallel_tool_calls is not False)
        except ToolArgumentError as exc:
            raise bad_request(str(exc), exc.field) from None
        return calling if calling.parses else None


def decoded_for(params: SamplingParams, reader: ReplyReader) -> SamplingParams:
    """`params` decoding replies for `reader`: with their special tokens where those mark the reply's parts."""
    return dataclasses.replace(params, skip_special_tokens=False) if reader.needs_special_tokens else params


def _echo_prompt_logprobs(request: CompletionRequest) -> int | None:
    """The prompt logprobs a completion computes: those asked for, and with echo those its logprobs show (or,
    echoing without generating, none shown: the engine takes max_tokens 0 only to score a prompt)."""
    if not request.echo or (request.logprobs is None and request.max_tokens != 0):
        return request.prompt_logprobs
    return max(request.logprobs or 0, request.prompt_logprobs or 0)


def _check_prompt_logprobs(request: SamplingFields) -> None:
    if request.prompt_logprobs is not None and request.stream:
        raise bad_request("prompt_logprobs are not available with stream: true (as in vLLM): drop one of them (a "
                          "streamed completion with echo and logprobs shows the prompt's logprobs)",
                          "prompt_logprobs")


def template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    """A chat message as the chat template expects it: role, plain-text content, tool calls and call id."""
    content = message.content
    if isinstance(content, list):
        for number, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"content parts of type {part.type!r} are not supported: send text parts "
                                  "({'type': 'text', 'text': ...}) or a string", f"messages.{index}.content.{number}")
        content = "\n".join(part.text for part in content)
    # "developer" is OpenAI's newer name for the system role; chat templates know "system".
    result = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
    if message.name:
        result["name"] = message.name
    if message.tool_calls:
        try:
            result["tool_calls"] = template_tool_calls([call.model_dump() for call in message.tool_calls])
        except ToolArgumentError as exc:
            raise bad_request(str(exc), f"messages.{index}.{exc.field}") from None
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:  # templates read it (or "thinking", which the tokenizer aliases)
        result["reasoning_content"] = message.reasoning_content
    return result


def beam_fields(request: SamplingFields) -> dict[str, Any]:
    """vLLM's `use_beam_search`: n beams, all returned; the beam settings only count with it."""
    if not request.use_beam_search:
        for field in ("length_penalty", "early_stopping"):
            if getattr(request, field) is not None:
                raise bad_request(f"{field} applies to beam search only: set use_beam_search, or drop {field}", field)
        return {}
    fields = dict(num_beams=request.n, length_penalty=request.length_penalty, early_stopping=request.early_stopping)
    if request.temperature is None:  # not the checkpoint's sampling temperature: beam search, not beam-sample
        fields["temperature"] = 0.0
    return {name: value for name, value in fields.items() if value is not None}


def structured_spec(request: SamplingFields) -> dict[str, Any] | None:
    """The StructuredOutputs fields asked for by vLLM's `structured_outputs` or OpenAI's `response_format`."""
    response_format = getattr(request, "response_format", None)  # chat only
    constrained_format = response_format is not None and response_format.type != "text"
    if request.structured_outputs is not None:
        if constrained_format:
            raise bad_request("set response_format or structured_outputs, not both", "structured_outputs")
        return request.structured_outputs.model_dump(exclude_none=True)
    if not constrained_format:
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    if response_format.json_schema is None or response_format.json_schema.json_schema is None:
        raise bad_request("response_format of type json_schema needs json_schema.schema, the JSON schema the reply "
                          "must follow", "response_format.json_schema")
    return {"json_schema": response_format.json_schema.json_schema}


def _reject_unsupported_chat_fields(request: ChatCompletionRequest) -> None:
    for field, replacement in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(request, field) not in (None, [], "none"):
            raise bad_request(f"{field} is OpenAI's deprecated form of {replacement}: send {replacement} instead",
                              field)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    _check_prompt_logprobs(request)


# ---- running the streams ------------------------------------------------------------------
async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The deltas of several requests as they come, each tagged with its prompt's index."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    # Bounded, so that deltas a slow reader has not taken wait in their requests' own queues,
    # where the engine sees the backlog (AsyncEngine.max_backlog).
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _wait_for_disconnect(raw_request: Request) -> None:
    # With the body already read, receive() only returns once the client has gone.
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


async def _collect(streams: list[RequestStream], raw_request: Request) -> list[RequestOutput] | None:
    """Run the requests to the end; None (and the requests aborted) if the client left first."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def run() -> None:
        async for index, delta in _merge(streams):
            if finals[index] is None:
                finals[index] = delta
            else:
                finals[index].merge(delta)

    work = asyncio.ensure_future(run())
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            return None
        try:
            work.result()
        except STREAM_ERRORS as exc:
            raise APIError(500, str(exc), type="server_error", code="generation_failed") from None
        return finals
    finally:
        watcher.cancel()
        work.cancel()
        for stream in streams:
            stream.abort()


async def _respond(formatter: _Formatter, streams: list[RequestStream], raw_request: Request) -> Response:
    """An SSE stream, or the whole JSON response once every request has finished."""
    request = formatter.request
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(_sse_stream(formatter, streams, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    finals = await _collect(streams, raw_request)
    if finals is None:
        return Response(status_code=499)  # nginx's "client closed request": nobody is left to read it
    return json_response(formatter.response(finals))


async def _sse_stream(formatter: _Formatter, streams: list[RequestStream], include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events: the chunks, a usage chunk if asked, then [DONE]; an error event if generation fails."""
    try:
        for chunk in formatter.opening_chunks():
            yield sse(chunk)
        async for index, delta in _merge(streams):
            for chunk in formatter.chunks(index, delta):
                yield sse(chunk)
        if include_usage:
            yield sse(formatter.usage_chunk())
    except STREAM_ERRORS as exc:
        yield sse_error(APIError(500, str(exc), type="server_error", code="generation_failed"))
    finally:
        # Runs on normal end, on error, and when the client disconnects (the task is cancelled).
        for stream in streams:
            stream.abort()
    yield SSE_DONE


# ---- shaping the output -------------------------------------------------------------------
def _top(entry: dict[int, Logprob], count: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= count), key=lambda item: item[1].rank)[:count]


class _Formatter:
    """Turns one API request's engine deltas into OpenAI responses and chunks."""

    def __init__(self, serving: OpenAIServing, request: CompletionRequest | ChatCompletionRequest,
                 prompts: list[_Prompt], request_id: str, model: str) -> None:
        self.tokenizer = serving.tokenizer
        self.request = request
        self.prompts = prompts
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.num_completion_tokens = 0

    def _token(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def usage(self, num_completion_tokens: int) -> Usage:
        num_prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens)

    def response(self, finals: list[RequestOutput]) -> BaseModel:
        """The whole response from each prompt's accumulated output."""
        raise NotImplementedError

    def opening_chunks(self) -> list[BaseModel]:
        """Chunks sent before any token (chat: the assistant role)."""
        return []

    def chunks(self, prompt_index: int, delta: RequestOutput) -> list[BaseModel]:
        """The chunks for one delta of the request of a prompt."""
        return [chunk for output in delta.outputs if (chunk := self.chunk(prompt_index, output)) is not None]

    def chunk(self, prompt_index: int, output: CompletionOutput) -> BaseModel | None:
        """The chunk for one completion's delta, or None when it carries nothing."""
        raise NotImplementedError

    def usage_chunk(self) -> BaseModel:
        raise NotImplementedError


class _CompletionFormatter(_Formatter):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # choice index -> the text_offset of its next token: the characters of its tokens' text so far, as the
        # whole response counts them (the prompt's BOS token, say, has text the echoed prompt lacks)
        self.text_offsets: dict[int, int] = {}
        self.prompt_logprobs: dict[int, list[dict[int, Logprob] | None]] = {}  # prompt index -> its scored prompt

    def _choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.request.n + output.index

    def _with_echo(self, prompt_index: int, output: CompletionOutput,
                   prompt_logprobs: list[dict[int, Logprob] | None] | None,
                   ) -> tuple[str, list[int], list[dict[int, Logprob] | None] | None]:
        """A choice's text, token ids and logprob entries so far: with echo, the prompt's lead (as OpenAI's and
        vLLM's legacy completions return them)."""
        if not self.request.echo:
            return output.text, output.token_ids, output.logprobs
        prompt = self.prompts[prompt_index]
        text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
        entries = None
        if self.request.logprobs is not None:  # a request ended before its prompt was scored shows no values
            entries = [*(prompt_logprobs or [None] * len(prompt.token_ids)), *(output.logprobs or [])]
        return text + output.text, [*prompt.token_ids, *output.token_ids], entries

    def _logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob] | None] | None,
                  offset: int) -> CompletionLogprobs | None:
        if self.request.logprobs is None or entries is None:
            return None
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries):
            chosen = None if entry is None else entry[token_id]
            token = self._token(token_id, chosen)
            result.tokens.append(token)
            result.token_logprobs.append(None if chosen is None else chosen.logprob)
            top: dict[str, float] | None = None
            if entry is not None:  # None: the prompt's first token, which nothing predicts
                top = {}
                for t, lp in [*_top(entry, self.request.logprobs), (token_id, chosen)]:  # OpenAI's: the top k and
                    top.setdefault(self._token(t, lp), lp.logprob)  # the chosen one; of ids alike, the likelier
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index, (final, prompt) in enumerate(zip(finals, self.prompts)):
            shown = _prompt_logprobs_field(self.request, prompt.token_ids, final.prompt_logprobs)
            for output in final.outputs:
                self.num_completion_tokens += len(output.token_ids)
                text, token_ids, entries = self._with_echo(prompt_index, output, final.prompt_logprobs)
                choices.append(CompletionChoice(
                    index=self._choice_index(prompt_index, output), text=text,
                    logprobs=self._logprobs(token_ids, entries, 0), finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason, prompt_logprobs=shown))
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage(self.num_completion_tokens))

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=usage)

    def chunks(self, prompt_index: int, delta: RequestOutput) -> list[BaseModel]:
        if delta.prompt_logprobs is not None:  # in the prompt's first delta; its other choices echo them too
            self.prompt_logprobs[prompt_index] = delta.prompt_logprobs
        return super().chunks(prompt_index, delta)

    def chunk(self, prompt_index: int, output: CompletionOutput) -> BaseModel | None:
        if not (output.text or output.token_ids or output.finish_reason):
            return None
        self.num_completion_tokens += len(output.token_ids)
        index = self._choice_index(prompt_index, output)
        if index in self.text_offsets:
            offset, text, token_ids, entries = self.text_offsets[index], output.text, output.token_ids, output.logprobs
        else:  # the choice's first chunk: the echoed prompt leads
            offset = 0
            text, token_ids, entries = self._with_echo(prompt_index, output, self.prompt_logprobs.get(prompt_index))
        logprobs = self._logprobs(token_ids, entries, offset)
        self.text_offsets[index] = offset + sum(map(len, logprobs.tokens)) if logprobs else 0
        return self._chunk([CompletionChoice(index=index, text=text, logprobs=logprobs,
                                             finish_reason=output.finish_reason, stop_reason=output.stop_reason)])

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.usage(self.num_completion_tokens))


def _prompt_logprobs_field(request: SamplingFields, prompt_ids: list[int],
                           entries: list[dict[int, Logprob] | None] | None) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs field, where the request asked for it: per prompt token, its entry and the top k."""
    k = request.prompt_logprobs
    if k is None or entries is None:
        return None
    return [None if entry is None else
            {t: PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token)
             for t, lp in entry.items() if t == token or lp.rank <= k}
            for token, entry in zip(prompt_ids, entries)]


class _ChatFormatter(_Formatter):
    def __init__(self, serving: OpenAIServing, *args: Any, tooling: ToolCalling | None,
                 reader: ReplyReader) -> None:
        super().__init__(serving, *args)
        self.tooling = tooling
        self.reader = reader
        self.reply_streams: dict[int, ReplyStream] = {}  # choice index -> its reply so far

    def _logprobs(self, output: CompletionOutput) -> ChatLogprobs | None:
        if not self.request.logprobs or output.logprobs is None:
            return None
        count = self.request.top_logprobs or 0
        content = []
        for token_id, entry in zip(output.token_ids, output.logprobs):
            chosen = entry.get(token_id)
            token = self._token(token_id, chosen)
            top = [TopLogprob(token=(text := self._token(t, lp)), logprob=lp.logprob, bytes=list(text.encode()))
                   for t, lp in _top(entry, count)]
            content.append(TokenLogprob(token=token, logprob=chosen.logprob if chosen else float("-inf"),
                                        bytes=list(token.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)

    def response(self, finals: list[RequestOutput]) -> ChatCompletionResponse:
        choices = []
        for output in finals[0].outputs:
            self.num_completion_tokens += len(output.token_ids)
            reply = self.reader.read(output.text)
            message = AssistantMessage(content=reply.content, reasoning_content=reply.reasoning, tool_calls=[
                ChatToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                for call in reply.calls] or None)
            choices.append(ChatChoice(index=output.index, message=message, logprobs=self._logprobs(output),
                                      finish_reason=self._finish_reason(output, bool(reply.calls)),
                                      stop_reason=output.stop_reason))
        choices.sort(key=lambda c: c.index)
        prompt_logprobs = _prompt_logprobs_field(self.request, self.prompts[0].token_ids, finals[0].prompt_logprobs)
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                      usage=self.usage(self.num_completion_tokens), prompt_logprobs=prompt_logprobs)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model, choices=choices,
                                   usage=usage)

    def opening_chunks(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.request.n)]

    def chunk(self, prompt_index: int, output: CompletionOutput) -> BaseModel | None:
        if not (output.text or output.token_ids or output.finish_reason):
            return None
        self.num_completion_tokens += len(output.token_ids)
        reply = self.feed(output)
        delta = DeltaMessage(content=reply.content or None, reasoning_content=reply.reasoning or None, tool_calls=[
            DeltaToolCall(index=call.index, id=call.id, type="function" if call.id else None,
                          function=DeltaFunctionCall(name=call.name, arguments=call.arguments))
            for call in reply.calls] or None)
        called = self.reply_streams[output.index].called
        return self._chunk([ChatChunkChoice(index=output.index, delta=delta, logprobs=self._logprobs(output),
                                            finish_reason=self._finish_reason(output, called),
                                            stop_reason=output.stop_reason)])

    def feed(self, output: CompletionOutput) -> ReplyDelta:
        """The content, reasoning and call deltas of a choice's next delta, read by its reply's stream."""
        if output.index not in self.reply_streams:
            self.reply_streams[output.index] = self.reader.stream()
        return self.reply_streams[output.index].feed(output.text, output.finished)

    def _finish_reason(self, output: CompletionOutput, called: bool) -> str | None:
        """OpenAI's "tool_calls" for a reply that ended by itself with calls the model chose to make (a call to
        a function named in tool_choice ends with "stop", as in OpenAI's API and vLLM)."""
        chose = self.tooling is not None and isinstance(self.tooling.tool_choice, str)
        return "tool_calls" if called and chose and output.finish_reason == "stop" else output.finish_reason

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.usage(self.num_completion_tokens))
