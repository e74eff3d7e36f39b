"""GGUF files (llama.cpp, Ollama, LM Studio) as a checkpoint: header, config and weights.

A GGUF file is its own checkpoint folder: its metadata holds the config under llama.cpp's key
names and the tokenizer (lmgen/loader/gguf_tokenizer.py), its tensors are stored under llama.cpp's
names, most of them quantized in blocks. ``GGUFCheckpoint.open`` reads the header with a bound check
on every count and offset, so a truncated or malformed file is an error naming the fault, never a
crash or a huge allocation; ``hf_config`` maps the metadata onto the config.json keys of the family
lmgen runs it as; ``weights`` yields each tensor under lmgen's name as a ``GGUFTensor``, which
dequantizes (the ``gguf`` package's ``dequantize``, for every ggml type) a few rows at a time from
the memory-mapped file straight into its parameter, so loading holds no second copy of the model; an
embedding table stored as lmgen holds it is not copied at all but a view of the file (``in_file``): a
lookup reads a few rows, and only their pages become resident.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmgen.errors import ModelNotFoundError, UnsupportedModelError
from lmgen.layers.ggml import dequantize_blocks

try:  # an optional extra, as for transformers: pip install 'lmgen[gguf]'
    import gguf
except ImportError:  # pragma: no cover - depends on the environment
    gguf = None

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
#: metadata value types: fixed-size scalars (struct format), 8 a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
#: ggml types stored as plain values, read without dequantizing
_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
#: values dequantized per step while loading a tensor (16 MiB of float32): bounds the transient memory
_CHUNK_VALUES = 1 << 22
#: bytes copied per step from the file into a tensor stored as it is loaded (the file's pages then dropped)
_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file and how it is stored."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    start: int  # absolute byte offset
    nbytes: int


class _Cursor:
    """Reads the header from the mapped file; every read is checked against the file's end."""

    def __init__(self, path: Path, buffer: mmap.mmap) -> None:
        self.path, self.buffer, self.pos = path, buffer, 0

    def take(self, nbytes: int, what: str) -> int:
        if self.pos + nbytes > len(self.buffer):
            raise self.truncated(what)
        start, self.pos = self.pos, self.pos + nbytes
        return start

    def truncated(self, what: str) -> UnsupportedModelError:
        return malformed(self.path, f"{what} runs past the end of the file ({len(self.buffer)} bytes): "
                                    "the file is truncated")

    def scalar(self, kind: int, what: str) -> Any:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, self.buffer, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        size = self.scalar(10, what)
        start = self.take(size, what)
        try:
            return self.buffer[start:start + size].decode("utf-8")
        except UnicodeDecodeError:
            raise malformed(self.path, f"{what} is not UTF-8 text") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`string` `count` times, inlined: vocabularies hold 100k-250k tokens and as many merges. Each string
        is bound-checked before the list grows."""
        buffer, pos, end, out = self.buffer, self.pos, len(self.buffer), []
        length = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                size = length(buffer, pos)[0] if pos + 8 <= end else end
                if pos + 8 + size > end:
                    raise self.truncated(what)
                out.append(buffer[pos + 8:pos + 8 + size].decode("utf-8"))
                pos += 8 + size
        except UnicodeDecodeError:
            raise malformed(self.path, f"{what} is not UTF-8 text") from None
        self.pos = pos
        return out

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(kind, what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY:
            raise malformed(self.path, f"{what} has value type {kind}, which GGUF does not define")
        item_kind, count = self.scalar(4, what), self.scalar(10, what)
        if item_kind in _SCALARS:  # numbers: one view of the file, copied
            dtype = np.dtype(_SCALARS[item_kind].replace("?", "b1"))
            start = self.take(count * dtype.itemsize, what)
            return np.frombuffer(self.buffer, dtype, count, start).copy()
        if item_kind == _STRING:
            return self.strings(count, what)
        raise malformed(self.path, f"{what} is an array of value type {item_kind}, which lmgen does not read")


def malformed(path: Path, fault: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{path} is not a valid GGUF file: {fault}")


def _require_gguf_package() -> None:
    if gguf is None:
        raise UnsupportedModelError('reading GGUF files needs the gguf package (llama.cpp\'s): pip install "lmgen[gguf]" '
                                    '(in a source checkout: pip install -e ".[gguf]")')


class GGUFCheckpoint:
    """A GGUF file's metadata and tensors, over one memory mapping of the file (copy on write, never written)."""

    def __init__(self, path: Path, buffer: mmap.mmap, metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        self.path, self._buffer, self.metadata, self.tensors = path, buffer, metadata, tensors

    @classmethod
    def open(cls, path: Path) -> "GGUFCheckpoint":
        _require_gguf_package()
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        if path.stat().st_size == 0:
            raise malformed(path, "it is empty")
        with open(path, "rb") as f:  # copy on write: a parameter may be a view of the file (GGUFTensor.in_file)
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cursor = _Cursor(path, buffer)
        magic = buffer[:4]
        if magic != MAGIC:
            raise malformed(path, f"it starts with {bytes(magic)!r}, not the magic {MAGIC!r}")
        cursor.take(4, "the magic")
        version = cursor.scalar(4, "the version")
        if version not in (2, 3):
            raise malformed(path, f"its version is {version}; lmgen reads GGUF versions 2 and 3 (little-endian)")
        num_tensors, num_values = cursor.scalar(10, "the tensor count"), cursor.scalar(10, "the metadata count")
        metadata = {}
        for i in range(num_values):
            key = cursor.string(f"metadata key {i}")
            metadata[key] = cursor.value(cursor.scalar(4, f"the type of {key}"), f"metadata value {key}")
        infos = [_tensor_header(cursor, i) for i in range(num_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise malformed(path, f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors = {name: _tensor_info(path, name, dims, kind, data_start + offset, len(buffer))
                   for name, dims, kind, offset in infos}
        return cls(path, buffer, metadata, tensors)

    def drop_pages(self) -> None:
        """The file's pages leave the process's resident memory: the header's, read when the file was opened,
        and those the kernel mapped around the tensors' as they were read (a read fault maps up to 16 pages
        around the one read: its fault-around). A view of the file (``GGUFTensor.in_file``) pages in again
        what it reads. Nothing writes to the mapping, so nothing is lost."""
        self._buffer.madvise(mmap.MADV_DONTNEED)

    def drop_string_lists(self) -> None:
        """Forget the metadata's lists of strings: the tokenizer's vocabulary and merges, Python strings of
        tens of MiB that nothing reads once the tokenizer is built from them."""
        self.metadata = {key: value for key, value in self.metadata.items() if not isinstance(value, list)}

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def family(self) -> "Family":
        family = FAMILIES.get(self.architecture)
        if family is None:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; lmgen runs GGUF files of "
                f"{', '.join(FAMILIES)}")
        return family

    def hf_config(self) -> dict:
        """The config.json this file's model would have (the keys lmgen's family reads)."""
        family, meta = self.family(), _Metadata(self)
        architecture = family.experts_architecture if family.experts_architecture and meta("expert_count", 0) \
            else family.architecture
        return {"architectures": [architecture], **family.config(meta),
                "vocab_size": self._shape("token_embd.weight")[0],
                "tie_word_embeddings": "output.weight" not in self.tensors,
                "bos_token_id": meta.token_id("bos"), "eos_token_id": meta.token_id("eos"),
                "pad_token_id": meta.token_id("padding"), "torch_dtype": self._dtype_name()}

    def generation_config(self) -> dict:
        """generation_config.json's ids: generation ends at the end-of-sequence, -turn and -message tokens."""
        meta = _Metadata(self)
        ends = [i for i in (meta.token_id("eos"), meta.token_id("eot"), meta.token_id("eom")) if i is not None]
        return {"bos_token_id": meta.token_id("bos"), "eos_token_id": list(dict.fromkeys(ends)) or None}

    def weights(self, dtype: torch.dtype, blocks: dict[str, int] | None = None) -> Iterator[tuple[str, "GGUFTensor"]]:
        """Each weight under lmgen's name (llama.cpp's layouts undone), read as `dtype` when loaded; those
        named in `blocks` (lmgen name -> row stride in bytes) read as their blocks, not dequantized."""
        family, config, blocks = self.family(), self.hf_config(), blocks or {}
        for info in self.tensors.values():
            if info.name in CONFIG_TENSORS:
                continue
            name = lmgen_name(info.name, family)
            if info.name.endswith("ffn_gate_inp_shexp.weight") and len(info.shape) == 1:
                info = replace(info, shape=(1, *info.shape))  # Qwen2-MoE's shared expert gate: a linear of one output
            if len(info.shape) == 3:  # a stack of experts: each expert's matrix, read into its place in lmgen's stack
                yield from _experts(name, GGUFTensor(self._buffer, info, dtype, row_stride=blocks.get(name, 0)))
                continue
            shift = family.norm_shift if info.name.endswith("norm.weight") else 0.0
            yield name, GGUFTensor(self._buffer, info, dtype, *_permuted_rows(info, family, config), shift,
                                   blocks.get(name, 0))

    def matrix_types(self) -> dict[str, int]:
        """The ggml type of each matrix and each stack of experts' matrices, by lmgen's name."""
        family = self.family()
        return {lmgen_name(info.name, family): info.ggml_type for info in self.tensors.values() if len(info.shape) > 1}

    def read_floats(self, name: str) -> list[float]:
        """A small tensor's values (rope factors the config needs)."""
        return GGUFTensor(self._buffer, self.tensors[name], torch.float32).load().flatten().tolist()

    def _shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise malformed(self.path, f"it has no tensor {name}")
        return self.tensors[name].shape

    def _dtype_name(self) -> str:
        """The float type the model's matrices are stored in; bfloat16 for quantized ones."""
        types = {info.ggml_type for info in self.tensors.values() if len(info.shape) > 1}
        if types <= {0}:
            return "float32"
        return "float16" if types <= {0, 1} else "bfloat16"


def _tensor_header(cursor: _Cursor, index: int) -> tuple[str, list[int], int, int]:
    name = cursor.string(f"the name of tensor {index}")
    num_dims = cursor.scalar(4, f"the dimension count of tensor {name}")
    if not 1 <= num_dims <= _MAX_DIMS:
        raise malformed(cursor.path, f"tensor {name} has {num_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
    dims = [cursor.scalar(10, f"the dimensions of tensor {name}") for _ in range(num_dims)]
    return name, dims, cursor.scalar(4, f"the type of tensor {name}"), cursor.scalar(10, f"the offset of tensor {name}")


def _tensor_info(path: Path, name: str, dims: list[int], kind: int, start: int, file_size: int) -> TensorInfo:
    """One tensor, checked: a ggml type lmgen reads, whole blocks per row, data inside the file."""
    try:
        ggml_type = gguf.GGMLQuantizationType(kind)
    except ValueError:
        raise UnsupportedModelError(f"{path}: tensor {name} is stored as ggml type {kind}, which lmgen cannot read "
                                    "(the installed gguf package does not know it)") from None
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block_size:
        raise malformed(path, f"tensor {name} has rows of {dims[0]} values, not whole blocks of {block_size} "
                              f"({ggml_type.name})")
    nbytes = math.prod(dims[1:]) * (dims[0] // block_size) * block_bytes
    if start + nbytes > file_size:
        raise malformed(path, f"tensor {name} spans bytes {start}-{start + nbytes}, past the end of the file "
                              f"({file_size} bytes): the file is truncated")
    return TensorInfo(name, kind, tuple(reversed(dims)), start, nbytes)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, dequantized to `dtype` when read.

    `row_source[r]` is the stored row that row r is (llama.cpp's q/k permutation undone: it moves rows
    within a head, `head_rows` rows); `shift` is added to every value (Gemma's norms are stored as 1 + w).
    With a `row_stride`, a matrix is read as its blocks, each row's bytes as stored and zeros after them
    up to `row_stride` bytes (lmgen.layers.ggml.GGMLLinear), not dequantized.
    """

    buffer: mmap.mmap
    info: TensorInfo
    dtype: torch.dtype
    row_source: torch.Tensor | None = None
    head_rows: int = 1
    shift: float = 0.0
    row_stride: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.info.shape[0], self.row_stride) if self.row_stride else self.info.shape

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.uint8 if self.row_stride else self.dtype)
        self.load_into(out)
        return out

    def load_into(self, dest: torch.Tensor) -> None:
        """Fill `dest` (same shape) a few rows at a time; no copy of the whole tensor in another dtype."""
        if tuple(dest.shape) != self.shape:
            raise UnsupportedModelError(f"GGUF tensor {self.info.name} of shape {list(self.shape)} does not fit "
                                        f"parameter of shape {list(dest.shape)}")
        if dest.data_ptr() == self._address():  # a view of the file (in_file): its values are in place
            return
        rows = dest.view(self.shape[0], -1)  # a 1-D tensor: one value per row
        if self.row_stride:
            rows[:, self.info.nbytes // self.shape[0]:] = 0
        if self._as_stored(dest.dtype):
            self._copy_stored(rows.view(torch.uint8))
            return
        for first, values in self._rows(max(1, _CHUNK_VALUES // rows.shape[1])):
            rows[first:first + len(values), :values.shape[1]].copy_(values)

    def in_file(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor as loaded in `dtype`, as a view of the file's pages, where they hold exactly that (blocks
        with no padding after them, or values of `dtype`); else None."""
        if not self._as_stored(dtype) or self.row_stride not in (0, self.info.nbytes // self.shape[0]):
            return None
        stored = torch.frombuffer(self.buffer, dtype=torch.uint8, count=self.info.nbytes, offset=self.info.start)
        return stored.view(torch.uint8 if self.row_stride else dtype).view(self.shape)

    def _address(self) -> int:
        return torch.frombuffer(self.buffer, dtype=torch.uint8, count=1, offset=self.info.start).data_ptr()

    def _as_stored(self, dtype: torch.dtype) -> bool:
        """Whether the tensor's bytes are its values in `dtype` in place: blocks, or values of that dtype."""
        unchanged = self.row_source is None and not self.shift
        return unchanged and (self.row_stride > 0 or _FLOAT_TYPES.get(self.info.ggml_type) == dtype)

    def _copy_stored(self, dest: torch.Tensor) -> None:
        """Copy the stored rows straight from the mapping into `dest` (uint8 [rows, >= row bytes]), no buffer
        in between (a buffer of each chunk, freed, would leave the allocator holding memory after loading)."""
        row_bytes = self.info.nbytes // self.shape[0]
        step = max(1, _CHUNK_BYTES // row_bytes)
        for first in range(0, self.shape[0], step):
            count = min(step, self.shape[0] - first)
            start = self.info.start + first * row_bytes
            stored = np.frombuffer(self.buffer, np.uint8, count * row_bytes, start).reshape(count, row_bytes)
            np.copyto(dest[first:first + count, :row_bytes].numpy(), stored)
            del stored  # the mapping's pages are no longer viewed
            self._drop_pages(start, count * row_bytes)

    def _drop_pages(self, start: int, nbytes: int) -> None:
        """The file's pages of bytes [start, start + nbytes) leave the process's resident memory once read."""
        page = start - start % mmap.PAGESIZE
        self.buffer.madvise(mmap.MADV_DONTNEED, page, start + nbytes - page)

    def row_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        """The tensor about `rows` rows at a time, in `dtype` (quantizing while loading holds no whole copy)."""
        for _, values in self._rows(rows):
            yield values.to(self.dtype).view(-1, *self.shape[1:])

    def _rows(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, values of the rows from there [n, values per row]) in their places, the chunks cut at
        whole heads (a head's rows move only within it)."""
        rows = -(-rows // self.head_rows) * self.head_rows
        for first, values in self._stored_rows(rows):
            if self.shift:
                values = values.float() + self.shift
            if self.row_source is not None:
                values = values[self.row_source[first:first + len(values)] - first]
            yield first, values

    def _stored_rows(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The rows as stored, decoded; the file's pages are dropped once read (the values are copies)."""
        if len(self.shape) == 1:  # one row of values in the file
            yield 0, self._decode(self.info.start, self.info.nbytes, 1).view(-1, 1)
            return
        row_bytes = self.info.nbytes // self.shape[0]
        for first in range(0, self.shape[0], rows):
            count = min(rows, self.shape[0] - first)
            yield first, self._decode(self.info.start + first * row_bytes, count * row_bytes, count).view(count, -1)

    def _decode(self, start: int, nbytes: int, rows: int) -> torch.Tensor:
        """The values of the `rows` file rows stored at bytes [start, start + nbytes), flat."""
        raw = np.frombuffer(self.buffer, np.uint8, nbytes, start).reshape(rows, -1)
        float_type = _FLOAT_TYPES.get(self.info.ggml_type)
        if self.row_stride:  # the blocks as stored, copied out of the mapping
            values = torch.from_numpy(raw.copy())
        elif float_type is not None:  # stored as values: reinterpreted, copied out of the mapping
            values = torch.from_numpy(raw.copy()).view(float_type)
        else:
            values = dequantize_blocks(raw, self.info.ggml_type)
        del raw  # the mapping's pages are no longer viewed
        self._drop_pages(start, nbytes)
        return values.reshape(-1)


def _experts(name: str, stack: GGUFTensor) -> Iterator[tuple[str, GGUFTensor]]:
    """A stack of experts' matrices [experts, out, in] (``...experts.gate_proj.weight``) as each expert's
    (``...experts.N.gate_proj.weight``: lmgen/loader/checkpoint.py loads it at index N of its stack)."""
    info, (parent, _, leaf) = stack.info, name.rpartition(".experts.")
    count, nbytes = info.shape[0], info.nbytes // info.shape[0]
    for expert in range(count):
        one = replace(info, name=f"{info.name}[{expert}]", shape=info.shape[1:], start=info.start + expert * nbytes,
                      nbytes=nbytes)
        yield f"{parent}.experts.{expert}.{leaf}", replace(stack, info=one)


# ---- llama.cpp's names and layouts -> lmgen's --------------------------------------------------
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "position_embd": "model.embed_positions",
                 "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
    # a mixture of experts: the router, each projection's experts stacked [experts, out, in], a shared expert
    "ffn_gate_inp": "mlp.router", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
#: tensors that are config, not weights: rope frequency factors (read into the rope's settings)
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def lmgen_name(name: str, family: "Family") -> str:
    """lmgen's name for a GGUF tensor name; an unknown one stays as it is (loading then names it)."""
    if match := _BLOCK.match(name):
        layer, part, leaf = match.groups()
        part = family.renames.get(part) or _BLOCK_NAMES.get(part)
        return f"model.layers.{layer}.{part}.{leaf}" if part else name
    if (match := _GLOBAL.match(name)) and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    return name


def _permuted_rows(info: TensorInfo, family: "Family", config: dict) -> tuple[torch.Tensor | None, int]:
    """(the stored row of each row, the rows of a head) of q or k, whose rows llama.cpp's converter
    interleaves for llama-style models (its rope pairs neighbouring dimensions, transformers' halves)."""
    match = _BLOCK.match(info.name)
    if not (family.permuted_qk and match and match.group(2) in ("attn_q", "attn_k")):
        return None, 1
    heads = config["num_attention_heads"] if match.group(2) == "attn_q" else config["num_key_value_heads"]
    rows = info.shape[0]
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1), rows // heads


# ---- metadata -> config.json --------------------------------------------------------------------
class _Metadata:
    """The metadata of one architecture's keys (``{arch}.block_count``, ...), missing keys named."""

    def __init__(self, checkpoint: GGUFCheckpoint) -> None:
        self.checkpoint, self.arch = checkpoint, checkpoint.architecture

    def __call__(self, key: str, default: Any = ...) -> Any:
        value = self.checkpoint.metadata.get(f"{self.arch}.{key}", default)
        if value is ...:
            raise malformed(self.checkpoint.path, f"its metadata lacks {self.arch}.{key}")
        if isinstance(value, np.ndarray):  # per-layer values (head counts): lmgen runs uniform layers
            if len(set(value.tolist())) != 1:
                raise UnsupportedModelError(f"{self.checkpoint.path}: {self.arch}.{key} differs between layers "
                                            f"({value.tolist()}); lmgen runs models whose layers are alike")
            return value.tolist()[0]
        return value

    def token_id(self, kind: str) -> int | None:
        value = self.checkpoint.metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return None if value is None else int(value)

    def has(self, tensor: str) -> bool:
        return tensor in self.checkpoint.tensors

    def rope(self, head_dim: int) -> dict:
        """rope_parameters: the base, a partial rotary, linear scaling, and factors stored as tensors."""
        rope = {"rope_type": "default", "rope_theta": float(self("rope.freq_base", 10000.0))}
        rotary = self("rope.dimension_count", head_dim)
        if rotary != head_dim:
            rope["partial_rotary_factor"] = rotary / head_dim
        scaling = self("rope.scaling.type", "none")
        if scaling == "linear":
            rope.update(rope_type="linear", factor=float(self("rope.scaling.factor")))
        elif scaling not in ("none", ""):
            raise UnsupportedModelError(f"{self.checkpoint.path}: rope scaling {scaling!r} is not supported; "
                                        "lmgen reads linear scaling and rope factors from GGUF files")
        return rope | self._rope_factors()

    def _rope_factors(self) -> dict:
        """Rope factors stored as tensors, as longrope: each frequency divided by its factor. Llama 3's
        scaling is one table (rope_freqs) for every length; Phi-3's a short and a long one."""
        read = self.checkpoint.read_floats
        if self.has("rope_factors_long.weight"):
            factors = {"short_factor": read("rope_factors_short.weight"), "long_factor": read("rope_factors_long.weight"),
                       "original_max_position_embeddings": self("rope.scaling.original_context_length")}
            if (attention := self("rope.scaling.attn_factor", None)) is not None:
                factors["attention_factor"] = float(attention)
            return {"rope_type": "longrope", **factors}
        if self.has("rope_freqs.weight"):
            table = read("rope_freqs.weight")
            return {"rope_type": "longrope", "short_factor": table, "long_factor": table, "attention_factor": 1.0,
                    "original_max_position_embeddings": self("context_length")}
        return {}


def _llama_config(meta: _Metadata) -> dict:
    heads, hidden = meta("attention.head_count"), meta("embedding_length")
    head_dim = meta("attention.key_length", hidden // heads)
    config = {
        "hidden_size": hidden, "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads), "head_dim": head_dim,
        "max_position_embeddings": meta("context_length"), "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "rope_parameters": meta.rope(head_dim), "attention_bias": meta.has("blk.0.attn_q.bias"),
        "mlp_bias": meta.has("blk.0.ffn_up.bias"),
    }
    if (window := meta("attention.sliding_window", None)) is not None:
        config["sliding_window"] = window
    if experts := meta("expert_count", 0):  # a mixture of experts
        config |= {"num_local_experts": experts, "num_experts_per_tok": meta("expert_used_count")}
    return config


def _granite_config(meta: _Metadata) -> dict:
    return _llama_config(meta) | {
        "embedding_multiplier": meta("embedding_scale", 1.0), "residual_multiplier": meta("residual_scale", 1.0),
        "attention_multiplier": meta("attention.scale", 1.0), "logits_scaling": meta("logit_scale", 1.0)}


def _gemma_config(meta: _Metadata, every: int) -> dict:
    """llama.cpp scales Gemma's attention by 1/sqrt(head_dim), except in the 27B models (46 layers in
    Gemma 2, 62 in Gemma 3), by 1/sqrt(hidden / heads): their query_pre_attn_scalar."""
    config = _llama_config(meta)
    big = config["num_hidden_layers"] == (46 if every == 2 else 62)
    return config | {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"],
        "attn_logit_softcapping": meta("attn_logit_softcapping", None),
        "final_logit_softcapping": meta("final_logit_softcapping", None),
        "sliding_window_pattern": meta("attention.sliding_window_pattern", every)}


def _gemma3_config(meta: _Metadata) -> dict:
    config = _gemma_config(meta, every=6)
    local = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base_swa", 10000.0))}
    return config | {"rope_parameters": {"full_attention": config["rope_parameters"], "sliding_attention": local}}


def _qwen_moe_config(meta: _Metadata, norm_topk: bool) -> dict:
    """Qwen2-MoE and Qwen3-MoE: experts in every layer (as llama.cpp runs them; its qwen3moe renormalises the
    chosen experts' weights, its qwen2moe does not), Qwen2-MoE's shared expert where the file has one."""
    return _llama_config(meta) | {
        "moe_intermediate_size": meta("expert_feed_forward_length"), "norm_topk_prob": norm_topk,
        "shared_expert_intermediate_size": meta("expert_shared_feed_forward_length", 0),
        "qkv_bias": meta.has("blk.0.attn_q.bias")}


def _gpt2_config(meta: _Metadata) -> dict:
    return {"n_embd": meta("embedding_length"), "n_layer": meta("block_count"), "n_head": meta("attention.head_count"),
            "n_inner": meta("feed_forward_length"), "n_positions": meta("context_length"),
            "layer_norm_epsilon": meta("attention.layer_norm_epsilon")}


@dataclass(frozen=True)
class Family:
    """How one llama.cpp architecture maps onto an lmgen family."""

    architecture: str  # lmgen's registry name
    config: Callable[[_Metadata], dict]
    permuted_qk: bool = False  # llama.cpp's converter permuted q and k (LlamaModel and its subclasses)
    norm_shift: float = 0.0  # added to norm weights (Gemma's converter stores 1 + w)
    renames: dict[str, str] = field(default_factory=dict)  # block tensor names of this family's own
    experts_architecture: str | None = None  # lmgen's registry name for a file with experts (Mixtral is llama)


FAMILIES = {
    "llama": Family("LlamaForCausalLM", _llama_config, permuted_qk=True,  # Mistral's and Mixtral's files too
                    experts_architecture="MixtralForCausalLM"),
    "qwen2": Family("Qwen2ForCausalLM", _llama_config),
    "qwen3": Family("Qwen3ForCausalLM", _llama_config),
    "qwen2moe": Family("Qwen2MoeForCausalLM", lambda meta: _qwen_moe_config(meta, norm_topk=False)),
    "qwen3moe": Family("Qwen3MoeForCausalLM", lambda meta: _qwen_moe_config(meta, norm_topk=True)),
    "gemma2": Family("Gemma2ForCausalLM", lambda meta: _gemma_config(meta, every=2), norm_shift=-1.0),
    "gemma3": Family("Gemma3ForCausalLM", _gemma3_config, norm_shift=-1.0),
    "phi3": Family("Phi3ForCausalLM", _llama_config, renames={"ffn_up": "mlp.gate_up_proj"}),
    "olmo2": Family("Olmo2ForCausalLM", _llama_config),
    "granite": Family("GraniteForCausalLM", _granite_config, permuted_qk=True),
    "smollm3": Family("SmolLM3ForCausalLM", _llama_config, permuted_qk=True),  # every 4th layer without rope
    "gpt2": Family("GPT2LMHeadModel", _gpt2_config),
}
