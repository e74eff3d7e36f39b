"""LLM: the library front end — generate, stream and chat over the engine."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from lmgen.engine.config import EngineConfig
from lmgen.engine.engine import Engine
from lmgen.errors import InvalidArgumentError
from lmgen.loader.tokenizer import Tokenizer
from lmgen.outputs import RequestOutput
from lmgen.params import BeamSearchParams, SamplingParams
from lmgen.tool_calls import ToolCalling, ToolParser, template_messages, tool_parser_for

Prompt = str | Sequence[int]
Message = dict[str, Any]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def collect(deltas: Iterable[RequestOutput], ids: list[str]) -> list[RequestOutput]:
    """Merge a stream of deltas into one whole RequestOutput per request id, in `ids` order."""
    final: dict[str, RequestOutput] = {}
    for delta in deltas:
        if delta.request_id in final:
            final[delta.request_id].merge(delta)
        else:
            final[delta.request_id] = delta
    return [final[i] for i in ids]


class LLM:
    """A model ready to generate.

    >>> llm = LLM()                                  # the embedded demo model
    >>> llm = LLM("path/or/hub-id", dtype="bfloat16", device="cpu")
    >>> llm.generate(["Portugal is"], SamplingParams(max_tokens=32))[0].outputs[0].text

    Keyword arguments are those of :class:`lmgen.engine.config.EngineConfig`. One LLM
    object serves one caller at a time; the HTTP server runs the engine for many.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_args))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @functools.cached_property
    def tool_parser(self) -> ToolParser | None:
        """The reader of the model's tool calls, chosen from its chat template (None: no known format).

        ``content, calls = llm.tool_parser.parse(output.text)`` reads a reply of :meth:`chat` with tools.
        """
        return tool_parser_for(self.tokenizer)

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """The model's generation_config.json sampling defaults, with `overrides` on top.

        Used whenever ``params`` is omitted; pass SamplingParams to take full control.
        """
        return self.engine.default_sampling_params(**overrides)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt in one continuous batch; outputs in the prompts' order."""
        ids = self._add(prompts, params)
        return collect(self._run(ids), ids)

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams) -> list[RequestOutput]:
        """Beam search, as vLLM's ``LLM.beam_search``: each output holds all ``beam_width`` beams, best first,
        with their text, token ids, ``cumulative_logprob`` and ``score`` (ranked by score)."""
        return self.generate(prompts, params.sampling_params())

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield RequestOutput deltas as tokens are generated (``delta.text`` is the new text)."""
        yield from self._run(self._add(prompts, params))

    def chat(self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None, *,
             tools: list[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] = "auto",
             parallel_tool_calls: bool = True, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template: str | None = None,
             **template_kwargs: Any) -> RequestOutput | list[RequestOutput]:
        """Reply to a conversation (a list of {"role", "content"} dicts) using the model's chat template.

        ``tools`` (OpenAI's: ``{"type": "function", "function": {"name", "parameters"}}``) are rendered
        by the template; ``tool_choice`` "required" or ``{"type": "function", "function": {"name": ...}}``
        makes the reply valid calls in the model's format (see :class:`lmgen.tool_calls.ToolCalling`),
        which ``self.tool_parser.parse`` reads. Assistant messages may carry OpenAI ``tool_calls``.
        Returns one RequestOutput for one conversation, a list for a list of conversations.
        """
        if not messages:
            raise InvalidArgumentError("messages is empty: give at least one {'role': ..., 'content': ...} dict")
        single = isinstance(messages[0], dict)
        conversations = [messages] if single else messages
        prompts = [self.tokenizer.encode_chat(
            template_messages(conversation), add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, chat_template=chat_template, tools=tools,
            **template_kwargs) for conversation in conversations]
        calling = ToolCalling(tools or [], self.tool_parser, tool_choice, parallel_tool_calls)
        if calling.forced:
            params = params or self.default_sampling_params()
            if params.structured is not None:
                raise InvalidArgumentError("params.structured cannot be combined with a tool_choice that forces a call")
            params = dataclasses.replace(params, structured=calling.structured())
        outputs = self.generate(prompts, params)
        return outputs[0] if single else outputs

    def _add(self, prompts: Prompt | Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        prompt_list = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or self.default_sampling_params()] * len(prompt_list)
        else:
            param_list = list(params)
            if len(param_list) != len(prompt_list):
                raise InvalidArgumentError(
                    f"got {len(param_list)} SamplingParams for {len(prompt_list)} prompts: give one, or one per prompt")
        ids: list[str] = []
        try:
            for prompt, p in zip(prompt_list, param_list):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt leaves no orphans behind
                self.engine.abort_request(request_id)
            raise
        return ids

    def _run(self, ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        try:
            while pending:
                for delta in self.engine.step():
                    if delta.request_id in pending:
                        yield delta
                        if delta.finished:
                            pending.discard(delta.request_id)
        finally:
            for request_id in pending:  # the caller stopped iterating early
                self.engine.abort_request(request_id)
