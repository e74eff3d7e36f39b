"""Find a checkpoint (local folder or hub id) and stream its safetensors weights.

Weights are read straight from the file into the model's own parameter memory
(``TensorRef.load_into``), so loading never holds a second full copy of the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmgen.errors import ModelNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

# The files a model needs besides its weights.
MODEL_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
]
# All the files a model needs; a hub download fetches nothing else.
CHECKPOINT_FILES = [*MODEL_FILES, "*.safetensors", "model.safetensors.index.json"]

#: The small model shipped inside the package, used when no model is named.
DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "demo_model"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model_path(name_or_path: str | os.PathLike, revision: str | None = None,
                       gguf_file: str | None = None) -> Path:
    """A local checkpoint folder or GGUF file for a folder, a .gguf file or a Hugging Face hub id; with
    `gguf_file`, that file of the folder or hub repo (as transformers' ``from_pretrained(..., gguf_file=)``)."""
    path = Path(name_or_path).expanduser()
    text = str(name_or_path)
    if gguf_file is not None and path.is_dir():
        if not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"no GGUF file {gguf_file!r} in {text!r}")
        return path / gguf_file
    if gguf_file is None and (path.is_dir() or is_gguf_file(path)):
        return path
    if path.exists() or text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"no checkpoint folder at {text!r}: pass a folder holding config.json and *.safetensors, a .gguf file, "
            "or a hub id like 'org/name'")
    return _download(text, revision, gguf_file)


def is_gguf_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def _download(repo_id: str, revision: str | None, gguf_file: str | None) -> Path:
    """The repo's checkpoint files (or only its file `gguf_file`) from the Hub, or from the cache."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        if gguf_file is not None:
            return Path(hf_hub_download(repo_id, gguf_file, revision=revision, local_files_only=offline))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                      local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        how = ("HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached")
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache and {how}: download it where there is network "
            f"(`{_hub_download_command(repo_id)}{'' if gguf_file is None else ' ' + gguf_file}`) or pass a local "
            "folder") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not fetch model {repo_id!r} from the Hugging Face Hub: {exc}") from exc


def _hub_download_command(repo_id: str) -> str:
    """The download command of the installed huggingface_hub: `hf` since 0.34; 1.0 removed `huggingface-cli`."""
    from importlib.metadata import distribution

    scripts = {entry.name for entry in distribution("huggingface_hub").entry_points
               if entry.group == "console_scripts"}
    return f"hf download {repo_id}" if "hf" in scripts else f"huggingface-cli download {repo_id}"


def read_json(folder: Path, name: str, required: bool = False) -> dict:
    file = folder / name
    if not file.is_file():
        if required:
            raise ModelNotFoundError(f"{name} is missing from {folder}: a Hugging Face checkpoint folder needs it")
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{file} is not valid JSON: {exc}") from exc


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a safetensors file; read on demand."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self._read_into(out)
        return out

    def load_into(self, dest: torch.Tensor) -> None:
        """Copy into `dest` (same shape), converting dtype/device as needed."""
        if tuple(dest.shape) != self.shape:
            raise UnsupportedModelError(
                f"{self.file.name}: tensor of shape {list(self.shape)} does not fit parameter of shape {list(dest.shape)}")
        if dest.dtype == self.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            self._read_into(dest)  # no intermediate copy
        else:
            dest.copy_(self.load())

    def row_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        """The tensor `rows` rows at a time (quantizing while loading then holds no whole float copy)."""
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        for first in range(0, self.shape[0], rows):
            out = torch.empty((min(rows, self.shape[0] - first), *self.shape[1:]), dtype=self.dtype)
            self._read_into(out, self.start + first * row_bytes)
            yield out

    def _read_into(self, dest: torch.Tensor, start: int | None = None) -> None:
        """Fill `dest` with the file's bytes from `start` (default: the tensor's first)."""
        nbytes = dest.numel() * dest.element_size()
        buffer = memoryview(dest.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        with open(self.file, "rb") as f:
            f.seek(self.start if start is None else start)
            done = 0
            while done < nbytes:
                n = f.readinto(buffer[done:])
                if not n:
                    raise UnsupportedModelError(f"{self.file} is truncated")
                done += n


def _read_header(file: Path) -> Iterator[tuple[str, TensorRef]]:
    """The tensors a safetensors file holds. The header is checked against the file before any
    tensor is yielded, so a corrupt file fails here naming the fault, not as a MemoryError or a short read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _malformed(file, f"it has {size} bytes, fewer than the 8 of its header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise _malformed(file, f"its header length ({header_len} bytes) runs past the end of the file "
                                   f"({size} bytes)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
        raise _malformed(file, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _malformed(file, f"its header is a JSON {type(header).__name__}, not an object")
    base = 8 + header_len
    yield from [(name, _tensor_ref(file, name, info, base, size))
                for name, info in header.items() if name != "__metadata__"]


def _tensor_ref(file: Path, name: str, info: object, base: int, size: int) -> TensorRef:
    """One header entry, checked: a known dtype, a shape of sizes >= 0, and data offsets inside the
    file that span exactly dtype size * shape bytes."""
    if not isinstance(info, dict):
        raise _malformed(file, f"the header entry of tensor {name} is not a JSON object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise _malformed(file, f"tensor {name} has unsupported dtype {dtype_name!r} "
                               f"(lmgen reads {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _malformed(file, f"tensor {name} has shape {shape!r}, not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
            and offsets[0] <= offsets[1] <= size - base):
        raise _malformed(file, f"tensor {name} has data_offsets {offsets!r}, not [begin, end] within the "
                               f"{size - base} data bytes of the file")
    dtype = _DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _malformed(file, f"tensor {name} spans {offsets[1] - offsets[0]} bytes, but its dtype {dtype_name} "
                               f"and shape {shape} need {nbytes}")
    return TensorRef(file, dtype, tuple(shape), base + offsets[0], nbytes)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(file: Path, fault: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{file} is not a valid safetensors file: {fault}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single or sharded (via the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(folder, index.name)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelNotFoundError(f"{folder} lacks shard(s) listed in its index: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise UnsupportedModelError(
            f"{folder} holds only pickle weights (*.bin/*.pt), which can run arbitrary code when loaded; "
            "lmgen loads safetensors only: convert with transformers' save_pretrained(..., safe_serialization=True)")
    raise ModelNotFoundError(f"no *.safetensors weights in {folder}")


def iter_tensors(folder: Path) -> Iterator[tuple[str, TensorRef]]:
    for file in weight_files(folder):
        yield from _read_header(file)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, TensorRef | torch.Tensor]]) -> None:
    """Fill the model's parameters by name, fused modules included; every tensor and parameter must meet.

    Tensors come from a file (TensorRef, or a GGUF file's GGUFTensor) or from memory (quantized or transposed while loading),
    under lmgen's names (the family's ``checkpoint_tensors``). ``model.packed_modules`` maps a
    checkpoint module name (``q_proj``) to the fused module and shard that hold it
    (``("qkv_proj", 0)``); shard ``i`` fills rows ``sum(shard_sizes[:i])`` on, of each of the fused
    module's parameters. One expert's tensor (``...experts.N.gate_proj.weight``) fills index N of its
    layer's stacked experts (``...experts.gate_up_proj.weight[N]``, lmgen/layers/moe.py).
    """
    params = dict(model.named_parameters())
    expected = {name: {(None, 0)} for name in params}  # the (expert, shard) pieces each parameter needs
    loaded: dict[str, set[tuple[int | None, int]]] = {}
    for name, source in tensors:
        if "rotary_emb." in name or (name.startswith("lm_head.") and getattr(model, "lm_head", None) is None):
            continue  # recomputed, or tied to the embedding
        target, expert, shard, shard_sizes = checkpoint_target(model, name)
        if target not in params:
            raise UnsupportedModelError(
                f"checkpoint tensor {name} has no parameter to load into (lmgen looked for {target}): the checkpoint "
                f"does not match its config.json's architecture, or lmgen's {type(model).__name__} lacks a piece")
        dest = params[target].data
        experts = (None,) if expert is None else range(dest.shape[0])
        if expert is not None:
            if expert >= dest.shape[0]:
                raise UnsupportedModelError(f"checkpoint tensor {name} is of expert {expert}, but {target} holds "
                                            f"{dest.shape[0]} experts")
            dest = dest[expert]
        shards = range(len(shard_sizes)) if shard_sizes is not None else (0,)
        expected[target] = {(e, s) for e in experts for s in shards}
        if shard_sizes is not None:
            dest = dest.narrow(0, sum(shard_sizes[:shard]), shard_sizes[shard])
        if tuple(source.shape) != tuple(dest.shape):
            raise UnsupportedModelError(f"checkpoint tensor {name} has shape {list(source.shape)}, but the model "
                                        f"loads it into {target} of shape {list(dest.shape)}")
        if isinstance(source, torch.Tensor):
            dest.copy_(source)
        else:  # a file's tensor (TensorRef, GGUFTensor) reads itself into place
            source.load_into(dest)
        loaded.setdefault(target, set()).add((expert, shard))
    missing = [n for n, shards in expected.items() if loaded.get(n, set()) != shards]
    if missing:
        raise UnsupportedModelError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {', '.join(missing[:3])} "
            "(lmgen's names, after the family's renames of checkpoint names)")


_EXPERT_MODULE = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)")  # a stacked layer's experts, expert, its projection


def checkpoint_target(model: nn.Module, name: str) -> tuple[str, int | None, int, list[int] | None]:
    """The parameter a checkpoint tensor loads into, its expert index (None: not an expert's), its shard
    index and the fused module's shard sizes (None: not fused)."""
    module_path, _, leaf = name.rpartition(".")
    expert_module = _EXPERT_MODULE.fullmatch(module_path)
    if expert_module:
        parent, expert, module_name = expert_module[1], int(expert_module[2]), expert_module[3]
        name = f"{parent}.{module_name}.{leaf}"
    else:
        (parent, _, module_name), expert = module_path.rpartition("."), None
    packed = getattr(model, "packed_modules", {})
    if module_name not in packed:
        return name, expert, 0, None
    fused, shard = packed[module_name]
    return f"{parent}.{fused}.{leaf}", expert, shard, model.get_submodule(f"{parent}.{fused}").shard_sizes
