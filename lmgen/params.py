"""SamplingParams: the per-request settings, validated on creation."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from lmgen.errors import InvalidArgumentError

if TYPE_CHECKING:
    from lmgen.sampling.processors import LogitsProcessor
    from lmgen.sampling.sampler import ScoreRecorder

#: The length used when neither the caller nor generation_config.json sets one.
DEFAULT_MAX_TOKENS = 256


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(message)


@dataclass(frozen=True)
class StructuredOutputs:
    """A constraint on the output's shape: set exactly one field.

    ``json_schema`` (a dict or JSON text), ``json_object`` (any JSON object), ``regex``
    (the whole output matches it), ``choice`` (the output is one of these strings) or
    ``grammar`` (Lark, or llama.cpp's GBNF). Enforced token by token, so the output
    conforms unless it is cut short by ``max_tokens``.
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        chosen = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        _check(len(chosen) == 1, "structured output takes exactly one of json_schema, json_object, regex, choice, "
                                 f"grammar; got {', '.join(chosen) or 'none'}")
        if isinstance(self.json_schema, str):
            try:
                object.__setattr__(self, "json_schema", json.loads(self.json_schema))
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"structured output json_schema is not valid JSON: {exc}") from None
        _check(self.json_schema is None or isinstance(self.json_schema, dict),
               "structured output json_schema must be a JSON object (a dict), e.g. {\"type\": \"object\"}")
        if self.choice is not None:
            _check(not isinstance(self.choice, str) and len(self.choice) > 0,
                   "structured output choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            _check(all(isinstance(c, str) for c in self.choice), "structured output choice must be a list of strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value.strip() != ""),
                   f"structured output {name} must be a non-empty string")

    @property
    def kind(self) -> str:
        """The name of the field that is set: "json_schema", "regex", ..."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))

    @classmethod
    def coerce(cls, value: "StructuredOutputs | dict[str, Any]") -> "StructuredOutputs":
        """Accept the spec itself or a dict of its fields (as JSON front ends pass it)."""
        if isinstance(value, cls):
            return value
        _check(isinstance(value, dict),
               f"structured output must be a StructuredOutputs or a dict, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        _check(not unknown, f"unknown structured output field(s) {unknown}; use json_schema, json_object, regex, "
                            "choice or grammar")
        return cls(**value)


#: below this, temperature is 0 (greedy), as in vLLM: logits divided by 1e-183 are inf, then NaN
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    ``temperature=0`` means greedy decoding (as in vLLM and the OpenAI API), and so does
    any temperature below :data:`MIN_SAMPLING_TEMPERATURE`.
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
    # None: off; k >= 0: each prompt token's logprob and rank plus the top-k at its position (the first token's
    # entry is None), from the raw logits (no processors), in RequestOutput.prompt_logprobs as vLLM's
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the output
    repetition_penalty: float = 1.0  # transformers/CTRL: shrink logits of tokens in prompt or output
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    structured: StructuredOutputs | None = None  # JSON schema, regex, choice or grammar the output must follow
    # transformers' other processors and warpers, with its definitions (see lmgen.sampling)
    typical_p: float = 1.0  # 1: off
    epsilon_cutoff: float = 0.0  # 0: off
    eta_cutoff: float = 0.0  # 0: off
    top_h: float | None = None  # None: off (1 is not off: it keeps at most 100 tokens, as in transformers)
    no_repeat_ngram_size: int = 0  # n > 0: no n-gram of the sequence (prompt included) occurs twice
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that are never completed
    sequence_bias: dict[tuple[int, ...], float] | None = None  # token sequence -> bias on its last token
    suppress_tokens: tuple[int, ...] = ()  # never sampled
    begin_suppress_tokens: tuple[int, ...] = ()  # not sampled as the first output token
    forced_bos_token_id: int | None = None  # the first output token, when the prompt is one token long
    forced_eos_token_id: tuple[int, ...] = ()  # forced as the last token max_tokens allows
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start, factor): EOS likelier past start
    remove_invalid_values: bool = False  # NaN -> 0, +-inf -> the largest finite values
    # log-softmax after every processor and warper (transformers' LogitNormalization): sampling
    # is unchanged, but recorded scores and beam search's running scores are normalized rows
    renormalize_logits: bool = False
    max_time: float | None = None  # seconds after arrival; then the request finishes ("length")
    # Beam search (num_beams > 1): the n best of num_beams beams come back; temperature > 0 is beam-sample.
    num_beams: int = 1
    length_penalty: float = 1.0  # hypotheses rank by sum of logprobs / length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as transformers defines them
    # Per-request hooks for the transformers shim (callables, so no JSON front end sets them).
    logits_processors: tuple[LogitsProcessor, ...] = ()  # (token_ids, logits [vocab]) -> logits, after the above
    stopping_criteria: tuple[Callable[[Sequence[int]], bool], ...] = ()  # True: finish ("stop") after this token
    score_recorder: ScoreRecorder | None = None  # keeps each step's logits/scores (output_scores, output_logits)

    def __post_init__(self) -> None:
        # Accept a single string or any iterable for the tuple fields, like vLLM.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in self.logit_bias.items()})
        if self.structured is not None:
            object.__setattr__(self, "structured", StructuredOutputs.coerce(self.structured))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._normalize_processor_fields()
        self._validate()
        self._validate_processor_fields()
        if self.temperature < MIN_SAMPLING_TEMPERATURE:  # greedy but for ties; dividing by it overflows
            object.__setattr__(self, "temperature", 0.0)

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be a positive integer, got {self.n!r}")
        scores_only = self.max_tokens == 0 and self.prompt_logprobs is not None and self.num_beams == 1
        _check(self.max_tokens is None or self.max_tokens >= 1 or scores_only,
               f"max_tokens must be at least 1, got {self.max_tokens}; omit it to use the model's default (0, to "
               "score the prompt without generating, only with prompt_logprobs and without beam search)")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        # Infinite values pass the range checks below but make NaN of masked logits (-inf / inf).
        _check(0.0 <= self.temperature < math.inf,
               f"temperature must be >= 0 and finite, got {self.temperature}; use 0 for greedy decoding")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}; use 1 to disable it")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
                   f"{name} must be an integer >= 0 (or None: off), got {value!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(self.seed is None or isinstance(self.seed, int) and -2**63 <= self.seed < 2**64,
               f"seed must be an integer in [-2**63, 2**64) (a generator's seed), got {self.seed!r}")
        _check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        # Below the floor, dividing logits by the penalty overflows them to inf, as for temperature.
        _check(MIN_SAMPLING_TEMPERATURE <= self.repetition_penalty < math.inf,
               f"repetition_penalty must be >= {MIN_SAMPLING_TEMPERATURE:g} and finite, got {self.repetition_penalty}")
        _check(all(-100.0 <= v <= 100.0 for v in (self.logit_bias or {}).values()),
               "logit_bias values must be in [-100, 100]")

    def _normalize_processor_fields(self) -> None:
        """Token lists (as JSON and transformers give them) become tuples of ints."""
        def token_ids(value: Any, name: str) -> tuple[int, ...]:
            ids = tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else (value,)
            _check(all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids),
                   f"{name} must hold token ids (integers >= 0), got {value!r}")
            return tuple(int(t) for t in ids)

        for name in ("suppress_tokens", "begin_suppress_tokens", "forced_eos_token_id"):
            object.__setattr__(self, name, token_ids(getattr(self, name), name))
        object.__setattr__(self, "bad_words_ids", tuple(token_ids(w, "bad_words_ids") for w in self.bad_words_ids))
        if self.sequence_bias is not None:  # transformers: {(ids): bias} or [[ids, bias], ...]
            pairs = list(self.sequence_bias.items() if isinstance(self.sequence_bias, dict) else self.sequence_bias)
            _check(all(len(pair) == 2 and isinstance(pair[1], numbers.Real) for pair in pairs),
                   "sequence_bias maps token sequences to numbers: {(ids): bias} or [[ids, bias], ...]")
            object.__setattr__(self, "sequence_bias", {token_ids(s, "sequence_bias"): float(b) for s, b in pairs})
        if self.exponential_decay_length_penalty is not None:
            _check(len(self.exponential_decay_length_penalty) == 2,
                   "exponential_decay_length_penalty is (start_index, decay_factor)")
            start, factor = self.exponential_decay_length_penalty
            object.__setattr__(self, "exponential_decay_length_penalty", (int(start), float(factor)))
        object.__setattr__(self, "logits_processors", tuple(self.logits_processors))
        object.__setattr__(self, "stopping_criteria", tuple(self.stopping_criteria))

    def _validate_processor_fields(self) -> None:
        _check(0.0 < self.typical_p <= 1.0, f"typical_p must be in (0, 1], got {self.typical_p}; use 1 to disable it")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}; use 0 "
                                                      "to disable it")
        _check(self.top_h is None or 0.0 < self.top_h <= 1.0, f"top_h must be in (0, 1], got {self.top_h}")
        _check(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
               f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        _check(all(self.bad_words_ids) and all(self.sequence_bias or {}),
               "bad_words_ids and sequence_bias need non-empty token sequences")
        _check(self.forced_bos_token_id is None or self.forced_bos_token_id >= 0,
               f"forced_bos_token_id must be a token id, got {self.forced_bos_token_id}")
        for forced in ({self.forced_bos_token_id} - {None}, set(self.forced_eos_token_id)):
            _check(not forced or not forced <= set(self.suppress_tokens),
                   f"Every forced token ({sorted(forced)}) is also in `suppress_tokens`: all logits would be -inf at "
                   "the forcing step. Remove the overlap (to prevent an early EOS, use min_tokens instead).")
        _check(self.exponential_decay_length_penalty is None or self.exponential_decay_length_penalty[0] >= 0,
               "exponential_decay_length_penalty is (start_index >= 0, decay_factor)")
        _check(self.max_time is None or self.max_time > 0, f"max_time must be > 0 seconds, got {self.max_time}")
        self._validate_beams()
        _check(all(callable(f) for f in self.logits_processors + self.stopping_criteria),
               "logits_processors and stopping_criteria must be callables")

    def _validate_beams(self) -> None:
        _check(isinstance(self.num_beams, int) and self.num_beams >= 1,
               f"num_beams must be a positive integer, got {self.num_beams!r}")
        _check(math.isfinite(self.length_penalty), f"length_penalty must be a finite number, got {self.length_penalty}")
        _check(self.early_stopping in (True, False, "never"),
               f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}.")
        if self.num_beams == 1:
            return
        _check(self.n <= self.num_beams, f"`num_return_sequences` ({self.n}) has to be smaller or equal to "
                                         f"`num_beams` ({self.num_beams}).")
        # the message starts with the field, so the server names it
        _check(self.structured is None, "structured cannot be combined with beam search (num_beams > 1) yet: "
                                        "drop one of them")

    @property
    def greedy(self) -> bool:
        """True when the request takes the most likely token at every step."""
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam-search settings, for :meth:`lmgen.LLM.beam_search` (all ``beam_width`` beams come back)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0: beam-sample
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.beam_width, num_beams=self.beam_width, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, temperature=self.temperature,
                              length_penalty=self.length_penalty, early_stopping=self.early_stopping)
