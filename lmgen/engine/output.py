"""Turns each request's new tokens into a CompletionOutput delta: text and stop strings."""

from __future__ import annotations

from lmgen.engine.request import Request
from lmgen.loader.tokenizer import IncrementalDetokenizer, Tokenizer
from lmgen.outputs import CompletionOutput, Logprob


class OutputState:
    """Per-request detokenizer plus stop-string search.

    Stop strings are matched on text, so they are found across token boundaries.
    While a request runs, the last ``len(longest stop) - 1`` characters are held back:
    they might turn out to begin a stop string, which is not part of the output.
    """

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        params = request.params
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        self.stop = params.stop
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_sent_chars = 0
        self.num_sent_tokens = 0

    def update(self, request: Request, new_logprobs: list[dict[int, Logprob]] | None) -> CompletionOutput:
        """The delta since the last update: the request's output tokens not yet reported, and their text."""
        new_token_ids = request.all_token_ids[request.num_prompt_tokens + self.num_sent_tokens:]
        self.num_sent_tokens += len(new_token_ids)
        new_text = self.detokenizer.add_tokens(new_token_ids)
        if request.finished:
            new_text += self.detokenizer.flush()
        searched_from = max(0, len(self.text) - self.holdback)
        self.text += new_text
        if self.stop and request.num_output_tokens >= request.params.min_tokens:
            self._find_stop(request, searched_from)
        end = len(self.text) if request.finished else max(self.num_sent_chars, len(self.text) - self.holdback)
        delta = self.text[self.num_sent_chars:end]
        self.num_sent_chars = end
        if new_logprobs is not None:
            new_logprobs = with_token_text(new_logprobs, self.tokenizer)
        return CompletionOutput(request.index, delta, new_token_ids, request.finish_reason, request.stop_reason,
                                new_logprobs)

    def _find_stop(self, request: Request, start: int) -> None:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return
        index, stop = min(hits)
        self.text = self.text[: index + (len(stop) if request.params.include_stop_str_in_output else 0)]
        request.finish("stop", stop)


def with_token_text(entries: list[dict[int, Logprob]], tokenizer: Tokenizer) -> list[dict[int, Logprob]]:
    """Logprob entries (one per generated token) with each token's text filled in."""
    return [{tid: Logprob(lp.logprob, lp.rank, tokenizer.decode([tid])) for tid, lp in entry.items()}
            for entry in entries]
