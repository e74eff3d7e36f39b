"""What the engine hands back: RequestOutput, CompletionOutput, Logprob."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    """The log-probability of one token, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass(frozen=True)
class SpecDecodeStats:
    """Speculative decoding's record (vLLM's names): of one sequence (``CompletionOutput.spec_decode``) or of the
    engine so far (``Engine.spec_decode``; /metrics' ``lmgen_spec_decode_*``, ``lmgen bench speculative``)."""

    num_drafts: int = 0  # verifying steps: steps that checked drafts
    num_draft_tokens: int = 0  # tokens drafted (and checked)
    num_accepted_tokens: int = 0  # of those, the ones the model agreed with (kept in the output)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafts over drafted tokens; None before any draft."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens a verifying step gave on average: its accepted drafts and the model's own token after them."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None

    def after_step(self, num_draft_tokens: int, num_accepted_tokens: int) -> SpecDecodeStats:
        """The record after one more verifying step."""
        return self + SpecDecodeStats(1, num_draft_tokens, num_accepted_tokens)

    def __add__(self, other: SpecDecodeStats) -> SpecDecodeStats:
        """Both records together (e.g. a batch's requests')."""
        return SpecDecodeStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                               self.num_accepted_tokens + other.num_accepted_tokens)


@dataclass
class CompletionOutput:
    """One generated sequence.

    In the stream of deltas the engine produces, ``text``, ``token_ids`` and
    ``logprobs`` hold only what is new since the previous delta; in the outputs of
    :meth:`lmgen.LLM.generate` they hold the whole completion.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    # beam search only: the sum of the chosen tokens' processed log-probabilities, that sum divided by
    # len ** length_penalty (what the beams are ranked by; transformers' sequences_scores), and the
    # beam each token was chosen from (transformers' beam_indices, within this prompt's beams)
    cumulative_logprob: float | None = None
    score: float | None = None
    beam_indices: list[int] | None = None
    # with speculative_config: this sequence's drafts so far (in every delta, the whole record up to it)
    spec_decode: SpecDecodeStats | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one request (a delta while streaming, the whole when done)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # with SamplingParams.prompt_logprobs: per prompt token, its entry and the top k at its position (None for the
    # first token, which nothing predicts); shared by the n completions, in the first delta after the prompt is computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def text(self) -> str:
        """The text of the first completion (the only one unless n > 1)."""
        return self.outputs[0].text

    def merge(self, delta: RequestOutput) -> None:
        """Append a later delta of the same request to this accumulated output."""
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        by_index = {o.index: o for o in self.outputs}
        for new in delta.outputs:
            mine = by_index.get(new.index)
            if mine is None:
                self.outputs.append(CompletionOutput(new.index, new.text, list(new.token_ids), new.finish_reason,
                                                     new.stop_reason, new.logprobs, spec_decode=new.spec_decode))
                self.outputs.sort(key=lambda o: o.index)
                continue
            mine.text += new.text
            mine.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                mine.logprobs = (mine.logprobs or []) + new.logprobs
            mine.finish_reason = new.finish_reason
            mine.stop_reason = new.stop_reason
            mine.spec_decode = new.spec_decode
        self.finished = delta.finished
