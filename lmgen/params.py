"""SamplingParams: the per-request settings, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass

from lmgen.errors import InvalidArgumentError

#: The length used when neither the caller nor generation_config.json sets one.
DEFAULT_MAX_TOKENS = 256


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(message)


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    ``temperature=0`` means greedy decoding (as in vLLM and the OpenAI API).
    ``max_tokens=None`` means "the model's generation_config max_new_tokens, else
    256" (see :data:`DEFAULT_MAX_TOKENS`); lmgen never cuts output at a silent 20.
    """

    n: int = 1  # completions per prompt, each with its own generator
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus top-k alternatives
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the output
    repetition_penalty: float = 1.0  # transformers/CTRL: shrink logits of tokens in prompt or output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit

    def __post_init__(self) -> None:
        # Accept a single string or any iterable for the tuple fields, like vLLM.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be a positive integer, got {self.n!r}")
        _check(self.max_tokens is None or self.max_tokens >= 1,
               f"max_tokens must be at least 1, got {self.max_tokens}; omit it to use the model's default")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.temperature >= 0.0,
               f"temperature must be >= 0, got {self.temperature}; use 0 for greedy decoding")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}; use 1 to disable it")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(all(-100.0 <= v <= 100.0 for v in (self.logit_bias or {}).values()),
               "logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return self.temperature == 0.0 or self.top_k == 1
