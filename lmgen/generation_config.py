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

# transformers' global defaults for decoder-only text generation
DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "stop_strings": None,
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "use_cache": True, "early_stopping": False,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "sequence_bias": None, "renormalize_logits": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "length_penalty": 1.0, "max_time": None,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
}

# Fields lmgen accepts but whose non-default values it does not run yet (see issue 3).
NOT_YET = ("num_beams", "typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size", "bad_words_ids",
           "sequence_bias", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
           "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "max_time",
           "output_scores", "output_logits")


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
        data = json.loads(file.read_text()) if file.is_file() else {}
        data.pop("transformers_version", None)
        return cls(**data)

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
        """transformers' warnings and errors for the tutorial's pitfalls, plus what lmgen cannot run yet."""
        if not self.do_sample:
            for name in ("temperature", "top_p", "top_k", "min_p"):
                if getattr(self, name) not in (DEFAULTS[name], None):
                    warnings.warn(f"`do_sample` is set to `False`. However, `{name}` is set to `{getattr(self, name)}`"
                                  f" -- this flag is only used in sample-based generation modes. You should set "
                                  f"`do_sample=True` or unset `{name}`.", UserWarning, stacklevel=3)
            if self.num_return_sequences > 1:
                raise InvalidArgumentError(
                    "Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                    f"(got {self.num_return_sequences}).")
        elif self.temperature is not None and self.temperature <= 0:
            raise InvalidArgumentError(
                f"`temperature` (={self.temperature}) has to be a strictly positive float, otherwise your next "
                "token scores will be invalid. If you're looking for greedy decoding strategies, set `do_sample=False`.")
        for name in NOT_YET:
            if getattr(self, name) not in (DEFAULTS[name], None, False):
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r} is not supported by lmgen yet")

    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_sampling_params(self, num_prompt_tokens: int, seed: int) -> SamplingParams:
        """SamplingParams for one row of input; lengths become counts of new tokens."""
        if self.max_new_tokens is not None:
            max_tokens = self.max_new_tokens
        elif getattr(self, "uses_default_length", False):
            max_tokens = self.max_length
        else:
            max_tokens = self.max_length - num_prompt_tokens
        min_tokens = self.min_new_tokens if self.min_new_tokens is not None else self.min_length - num_prompt_tokens
        if max_tokens < 1:
            raise InvalidArgumentError(
                f"Input length of input_ids is {num_prompt_tokens}, but `max_length` is set to {self.max_length}. "
                "This can lead to unexpected behavior. You should consider increasing `max_length` or, better yet, "
                "setting `max_new_tokens`.")
        sampling = bool(self.do_sample)
        return SamplingParams(
            n=self.num_return_sequences, max_tokens=max_tokens, min_tokens=max(0, min(min_tokens, max_tokens)),
            temperature=self.temperature if sampling else 0.0, top_k=(self.top_k or 0) if sampling else 0,
            top_p=self.top_p if sampling else 1.0, min_p=(self.min_p or 0.0) if sampling else 0.0,
            repetition_penalty=self.repetition_penalty, seed=seed,
            stop_token_ids=tuple(self.eos_ids()), ignore_eos=True,  # this config's EOS ids, not the engine's
            stop=tuple([self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings or ()),
            include_stop_str_in_output=True, skip_special_tokens=False)
