"""transformers' quantization arguments of ``from_pretrained``, mapped onto lmgen's own.

``load_in_4bit=True``, ``load_in_8bit=True`` and ``quantization_config=`` (this
module's BitsAndBytesConfig, transformers' own, or a dict with the same keys) become
lmgen's weight-only int4 (per group of 64 columns, like bitsandbytes' blocks) or int8
(per output channel). bitsandbytes' formats differ (NF4/FP4 levels, LLM.int8's
full-precision outlier columns), so outputs are close to, not the same as,
transformers + bitsandbytes; a warning names each setting lmgen approximates or ignores.
"""

from __future__ import annotations

import warnings
from typing import Any

from lmgen.errors import InvalidArgumentError
from lmgen.layers.quant import DEFAULT_GROUP_SIZE, QuantConfig

# bitsandbytes option -> (its default, what lmgen does with another value)
_BNB_OPTIONS = {
    "bnb_4bit_quant_type": ("fp4", "approximated: lmgen's int4 has 16 evenly spaced levels per group (a scale "
                                   "and a zero), not bitsandbytes' NF4/FP4 levels"),
    "llm_int8_threshold": (6.0, "approximated: lmgen's int8 scales every column alike; it has no "
                                "full-precision path for outlier activations"),
    "bnb_4bit_use_double_quant": (False, "ignored: lmgen keeps its scales in bfloat16"),
    "bnb_4bit_compute_dtype": ("float32", "ignored: lmgen's kernels compute in bfloat16; pass dtype= to set "
                                          "the rest of the model's"),
    "bnb_4bit_quant_storage": ("uint8", "ignored"),
    "llm_int8_enable_fp32_cpu_offload": (False, "ignored"),
    "llm_int8_has_fp16_weight": (False, "ignored"),
}


class BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig, for ``from_pretrained(..., quantization_config=...)``.

    ``group_size`` is lmgen's own (int4 columns per scale: 32, 64, 128 or 256);
    other bitsandbytes options are accepted as keywords and mapped where they can be.
    """

    def __init__(self, load_in_8bit: bool = False, load_in_4bit: bool = False, group_size: int | None = None,
                 **options: Any) -> None:
        self.load_in_8bit, self.load_in_4bit, self.group_size = load_in_8bit, load_in_4bit, group_size
        self.options = options

    def to_dict(self) -> dict:
        return {"load_in_8bit": self.load_in_8bit, "load_in_4bit": self.load_in_4bit,
                "group_size": self.group_size, **self.options}


def quantization_engine_args(load_in_4bit: bool = False, load_in_8bit: bool = False,
                             quantization_config: Any = None) -> dict:
    """EngineConfig keyword arguments for from_pretrained's quantization arguments ({} for none)."""
    if isinstance(quantization_config, QuantConfig):
        return _engine_args(quantization_config)
    settings = _as_dict(quantization_config)
    method = settings.pop("quant_method", "bitsandbytes")
    if str(getattr(method, "value", method)) != "bitsandbytes":  # transformers gives an enum
        raise InvalidArgumentError(f"quantization_config for {method!r} is not supported: lmgen quantizes with "
                                   "load_in_4bit / load_in_8bit (BitsAndBytesConfig) or a QuantConfig")
    load_in_4bit = _pop_flag(settings, "load_in_4bit") or load_in_4bit
    load_in_8bit = _pop_flag(settings, "load_in_8bit") or load_in_8bit
    if load_in_4bit and load_in_8bit:
        raise InvalidArgumentError("load_in_4bit and load_in_8bit are both set: choose one")
    if not (load_in_4bit or load_in_8bit):
        if quantization_config is not None:
            raise InvalidArgumentError("quantization_config sets neither load_in_4bit nor load_in_8bit")
        return {}
    lm_head = _quantizes_lm_head(settings.pop("llm_int8_skip_modules", None))
    group_size = settings.pop("group_size", None) or DEFAULT_GROUP_SIZE
    _warn_about(settings)
    return _engine_args(QuantConfig("int4" if load_in_4bit else "int8", group_size, lm_head))


def _pop_flag(settings: dict, name: str) -> bool:
    """A boolean setting, under its name or the private one transformers' to_dict() also writes."""
    return bool(settings.pop(name, False)) | bool(settings.pop(f"_{name}", False))


def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):  # transformers' BitsAndBytesConfig
        return dict(config.to_dict())
    raise InvalidArgumentError(f"quantization_config must be a BitsAndBytesConfig, a QuantConfig or a dict, "
                               f"got {type(config).__name__}")


def _quantizes_lm_head(modules: list[str] | None) -> bool:
    """Whether the LM head is quantized: bitsandbytes' llm_int8_skip_modules can keep it in full precision."""
    others = [m for m in modules or [] if m != "lm_head"]
    if others:
        warnings.warn(f"llm_int8_skip_modules {others} ignored: lmgen quantizes every linear layer "
                      "(only 'lm_head' can be kept in full precision)", UserWarning, stacklevel=4)
    return "lm_head" not in (modules or [])


def _warn_about(settings: dict) -> None:
    """Warn about each setting that asks for something lmgen does differently."""
    for name, value in settings.items():
        default, what = _BNB_OPTIONS.get(name, (None, "ignored: not an option lmgen knows"))
        if value is not None and str(value).removeprefix("torch.") != str(default):
            warnings.warn(f"quantization_config {name}={value!r} is {what}", UserWarning, stacklevel=4)


def _engine_args(config: QuantConfig) -> dict:
    return {"quantization": config.method, "quantization_group_size": config.group_size,
            "quantize_lm_head": config.lm_head}
