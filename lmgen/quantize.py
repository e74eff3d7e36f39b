"""Quantize a checkpoint once and save it (``lmgen quantize``).

The output folder is a complete model: the quantized weights in their storage form
(see ``lmgen.layers.quant``) under lmgen's own tensor names in model.safetensors, config.json with a
``quantization_config``, and the tokenizer and generation files copied over.
Loading it reads the integer weights directly, with no float detour.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmgen.errors import InvalidArgumentError
from lmgen.layers.quant import DEFAULT_GROUP_SIZE, SAVED_METHODS, QuantConfig, quantize_tensors
from lmgen.loader.checkpoint import MODEL_FILES, iter_tensors, read_json, resolve_model_path
from lmgen.models import model_class
from lmgen.progress import progress


def quantize_checkpoint(model: str | os.PathLike, out: str | os.PathLike, method: str = "int4",
                        group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool = True,
                        revision: str | None = None) -> Path:
    """Write `model` (folder or hub id), quantized with `method`, into the folder `out`; returns it.

    >>> quantize_checkpoint("path/to/model", "model-int4", method="int4", group_size=64)
    >>> LLM("model-int4")   # loads the int4 weights as they are
    """
    config = QuantConfig(method, group_size, lm_head)
    if method not in SAVED_METHODS:
        raise InvalidArgumentError(f"lmgen quantize writes int8 or int4 checkpoints; {method} is applied while loading "
                                   f"the float checkpoint (LLM(path, quantization={method!r}), --quantize {method})")
    source = resolve_model_path(model, revision)
    if not source.is_dir():
        raise InvalidArgumentError(f"{source} is a GGUF file: lmgen quantize writes checkpoint folders; load the file "
                                   "quantized instead (LLM(path, quantization=...), --quantize)")
    hf_config = read_json(source, "config.json", required=True)
    if QuantConfig.from_hf(hf_config) is not None:
        raise InvalidArgumentError(f"{source} is already quantized: quantize its full-precision checkpoint")
    family = model_class(hf_config)  # an architecture lmgen cannot run fails here, before any work
    family.spec_from_config(hf_config)
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # old weight shards there would load beside the new ones
        raise InvalidArgumentError(f"the output folder {out} is not empty: choose a new one")
    # Everything is quantized before anything is written, so a bad layer leaves no half-written folder.
    refs = list(iter_tensors(source))  # headers only (the bar's length); each tensor is read when its turn comes
    tensors = {name: tensor if isinstance(tensor, torch.Tensor) else tensor.load()
               for name, tensor in quantize_tensors(family.checkpoint_tensors(progress(refs, "quantizing", "tensor")),
                                                    config)}
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(tensors, out / "model.safetensors")
    for name in MODEL_FILES:
        if (source / name).is_file() and name != "config.json":
            shutil.copyfile(source / name, out / name)
    quantized_config = {**hf_config, "quantization_config": config.to_hf()}
    (out / "config.json").write_text(json.dumps(quantized_config, indent=2) + "\n", encoding="utf-8")
    return out


def _save_weights(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, file, metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the weights the mode
    # the umask gives every other file of the model, so whoever may read the folder may load it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)
