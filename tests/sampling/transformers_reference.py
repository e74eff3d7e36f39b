"""transformers' own logits processors for given generation settings: the reference lmgen's are checked against."""

from __future__ import annotations

import types

import torch
import transformers
from transformers.generation import GenerationMixin, LogitsProcessorList

EOS = 2


def transformers_processors(settings: dict, prompt_length: int) -> LogitsProcessorList:
    """The list transformers' generate builds for `settings` (a model-free call of its own builder)."""
    config = transformers.GenerationConfig(**settings)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    if config.max_new_tokens is not None:  # as generate's _prepare_generated_length does
        config.max_length = config.max_new_tokens + prompt_length
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + prompt_length
    config._eos_token_tensor = torch.tensor([EOS])
    model = types.SimpleNamespace(config=types.SimpleNamespace(is_encoder_decoder=False))
    model._merge_criteria_processor_list = types.MethodType(GenerationMixin._merge_criteria_processor_list, model)
    return GenerationMixin._get_logits_processor(model, config, input_ids_seq_length=prompt_length,
                                                 logits_processor=LogitsProcessorList(), device="cpu", model_kwargs={})
