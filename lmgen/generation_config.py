"""GenerationConfig: transformers' generation settings, and their mapping onto SamplingParams.

Resolution follows transformers exactly: call kwargs > the model's
generation_config.json > transformers' global defaults (including ``max_length=20``,
which means 20 new tokens, and ``top_k=50`` when sampling). Only lmgen's own
``LLM`` API has the no-silent-cut default; this one exists so ported code behaves
the same.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

from lmgen.errors import InvalidArgumentError
from lmgen.params import SamplingParams
from lmgen.sampling.sampler import ScoreRecorder

# transformers' global defaults for decoder-only text generation
DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "stop_strings": None,
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "use_cache": True, "early_stopping": False,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "sequence_bias": None, "renormalize_logits": False, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "length_penalty": 1.0, "max_time": None,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
    # speculative decoding: prompt lookup (drafts per step, longest n-gram looked up: None means 2) and an
    # assistant_model's drafts per step (lmgen adapts it per request from there)
    "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None, "num_assistant_tokens": 20,
}

# Warpers: transformers warns when they are set without do_sample (and ignores them).
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")


class GenerationConfig:
    """Attribute bag of generation settings; unset attributes are None until resolved."""

    def __init__(self, **kwargs: Any) -> None:
        for name in DEFAULTS:
            setattr(self, name, kwargs.pop(name, None))
        for name, value in kwargs.items():  # custom entries, as transformers allows
            setattr(self, name, value)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "GenerationConfig":
        file = Path(folder) / "generation_config.json"
        return cls.from_dict(json.loads(file.read_text()) if file.is_file() else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        """From generation_config.json's contents."""
        return cls(**{key: value for key, value in data.items() if key != "transformers_version"})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields; returns the kwargs that are not generation settings."""
        unused = {}
        for name, value in kwargs.items():
            if name in DEFAULTS or hasattr(self, name):
                setattr(self, name, value)
            else:
                unused[name] = value
        return unused

    def __repr__(self) -> str:
        return f"GenerationConfig({json.dumps(self.to_dict(), indent=2, default=str)})"

    def resolved(self, model_config: "GenerationConfig | None", **kwargs: Any) -> "GenerationConfig":
        """A copy with the call's kwargs, then the model's values, then global defaults filled in."""
        config = copy.deepcopy(self)
        model_length = model_config.max_length if model_config else None
        # transformers: a max_length nobody set means "20 new tokens", not 20 in all
        config.uses_default_length = self.max_length is None and model_length is None and "max_length" not in kwargs
        for source in (model_config.to_dict() if model_config else {}, DEFAULTS):
            for name, value in source.items():
                if getattr(config, name, None) is None:
                    setattr(config, name, value)
        unknown = config.update(**kwargs)
        if unknown:
            raise InvalidArgumentError(
                f"The following `model_kwargs` are not used by the model: {sorted(unknown)} "
                "(note: typos in the generate arguments will also show up in this list)")
        return config

    def validate(self) -> None:
        """transformers' warnings and errors for the tutorial's pitfalls."""
        self._warn_unused_flags()
        if self.bad_words_ids is not None and not (isinstance(self.bad_words_ids, list) and self.bad_words_ids):
            raise InvalidArgumentError(f"`bad_words_ids` has to be a non-empty list, but is {self.bad_words_ids}.")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidArgumentError(f"`early_stopping` must be a boolean or 'never', but is {self.early_stopping}.")
        if self.num_return_sequences > 1 and (self.num_beams or 1) == 1 and not self.do_sample:
            raise InvalidArgumentError(
                "Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                f"(got {self.num_return_sequences}).")
        if self.num_return_sequences > (self.num_beams or 1) > 1:
            raise InvalidArgumentError(f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or "
                                       f"equal to `num_beams` ({self.num_beams}).")
        if self.do_sample and self.temperature is not None and self.temperature <= 0:
            raise InvalidArgumentError(
                f"`temperature` (={self.temperature}) has to be a strictly positive float, otherwise your next "
                "token scores will be invalid. If you're looking for greedy decoding strategies, set `do_sample=False`.")

    def _warn_unused_flags(self) -> None:
        """transformers' warnings for flags the chosen mode ignores."""
        def changed(names: tuple[str, ...]) -> list[str]:
            return [name for name in names if getattr(self, name) not in (DEFAULTS[name], None)]

        unused = []
        if not self.do_sample:
            unused += [(name, "`do_sample` is not set to `True`", "do_sample=True", "sample-based")
                       for name in changed(SAMPLING_ONLY)]
        if (self.num_beams or 1) == 1:
            unused += [(name, f"`num_beams` is set to {self.num_beams}", "num_beams>1", "beam-based")
                       for name in changed(("early_stopping", "length_penalty"))]
        for name, state, fix, mode in unused:
            warnings.warn(f"{state}. However, `{name}` is set to `{getattr(self, name)}` -- this flag is only used in "
                          f"{mode} generation modes. You should set `{fix}` or unset `{name}`.", UserWarning,
                          stacklevel=4)
        if not self.return_dict_in_generate:
            for name in ("output_scores", "output_logits"):
                if getattr(self, name):
                    warnings.warn(f"`return_dict_in_generate` is NOT set to `True`, but `{name}` is. When "
                                  f"`return_dict_in_generate` is not `True`, `{name}` is ignored.", UserWarning,
                                  stacklevel=4)

    def score_recorder(self) -> ScoreRecorder | None:
        """A recorder for output_scores / output_logits, when they are asked for (with return_dict_in_generate)."""
        if not self.return_dict_in_generate or not (self.output_scores or self.output_logits):
            return None
        return ScoreRecorder(scores=bool(self.output_scores), logits=bool(self.output_logits))

    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_sampling_params(self, input_length: int, seed: int, **hooks: Any) -> SamplingParams:
        """SamplingParams for one row of input; lengths become counts of new tokens.

        `input_length` is the (padded) width of input_ids, from which transformers counts
        max_length and min_length. `hooks` are SamplingParams' per-request hooks
        (logits_processors, stopping_criteria, score_recorder).
        """
        return SamplingParams(
            n=self.num_return_sequences, seed=seed, num_beams=self.num_beams, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping, **self._length_settings(input_length), **self._warper_settings(),
            **self._processor_settings(input_length), **hooks,
            stop_token_ids=tuple(self.eos_ids()), ignore_eos=True,  # this config's EOS ids, not the engine's
            stop=tuple([self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings or ()),
            include_stop_str_in_output=True, skip_special_tokens=False)

    def _length_settings(self, input_length: int) -> dict[str, Any]:
        if self.max_new_tokens is not None:
            max_tokens = self.max_new_tokens
        elif getattr(self, "uses_default_length", False):
            max_tokens = self.max_length
        else:
            max_tokens = self.max_length - input_length
        if max_tokens < 1:
            raise InvalidArgumentError(
                f"Input length of input_ids is {input_length}, but `max_length` is set to {self.max_length}. "
                "This can lead to unexpected behavior. You should consider increasing `max_length` or, better yet, "
                "setting `max_new_tokens`.")
        # min_new_tokens, when set, wins over min_length (transformers recomputes min_length from it)
        min_tokens = self.min_new_tokens if self.min_new_tokens is not None else self.min_length - input_length
        return dict(max_tokens=max_tokens, min_tokens=max(0, min(min_tokens, max_tokens)), max_time=self.max_time)

    def _warper_settings(self) -> dict[str, Any]:
        """Warpers run only when sampling; values transformers would skip become lmgen's "off"."""
        if not self.do_sample:
            return dict(temperature=0.0)
        return dict(
            temperature=self.temperature, top_k=self.top_k or 0, top_h=self.top_h, min_p=self.min_p or 0.0,
            top_p=self.top_p if self.top_p is not None and self.top_p < 1.0 else 1.0,
            typical_p=self.typical_p if self.typical_p is not None and self.typical_p < 1.0 else 1.0,
            epsilon_cutoff=self.epsilon_cutoff if 0.0 < (self.epsilon_cutoff or 0.0) < 1.0 else 0.0,
            eta_cutoff=self.eta_cutoff if 0.0 < (self.eta_cutoff or 0.0) < 1.0 else 0.0)

    def _processor_settings(self, input_length: int) -> dict[str, Any]:
        return dict(
            repetition_penalty=self.repetition_penalty, no_repeat_ngram_size=self.no_repeat_ngram_size or 0,
            bad_words_ids=self.bad_words_ids or (), sequence_bias=self.sequence_bias or None,
            suppress_tokens=self.suppress_tokens or (), begin_suppress_tokens=self.begin_suppress_tokens or (),
            # transformers forces BOS at sequence length 1, so only when input_ids are one token wide
            forced_bos_token_id=self.forced_bos_token_id if input_length == 1 else None,
            forced_eos_token_id=self.forced_eos_token_id if self.forced_eos_token_id is not None else (),
            exponential_decay_length_penalty=self.exponential_decay_length_penalty,
            remove_invalid_values=bool(self.remove_invalid_values), renormalize_logits=bool(self.renormalize_logits))
