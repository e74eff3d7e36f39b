"""Record llama.cpp's own choices and bytes for tests/layers/test_ggml_recipes.py, so that the tests check
lmgen's recipes against llama.cpp without building llama.cpp on every test machine.

    pip install llama-cpp-python   # builds llama.cpp from source
    cd tests && python data/record_llama_cpp_quants.py

Writes data/llama_cpp_quants.json: the type ``llama_model_quantize`` gives each matrix of a tiny Qwen2 (8
layers, rows of 256 and 320 values: every rule and fallback) for q4_k_m, q6_k and q8_0, of a tiny Phi-3
(fused q/k/v and gate/up) for q4_k_m, and of tiny mixtures of experts (checkpoints.RECIPE_MOE: a shared expert,
8 experts) for the three. Types depend on names and shapes only. And data/llama_cpp_quants.npz:
for a tensor of each block type, its first ROWS rows as float32 (from the f32 GGUF llama.cpp quantized)
and llama.cpp's blocks of those rows; block quantizers work row by row, block by block, so the rows' blocks
are those of the whole tensor. And data/llama_cpp_hard_quants.npz: rows made to be hard for the quantizers
(all-zero and flat groups, -0, ties of +a and -a, values on half steps, subnormal to 6e4, outliers) and
llama.cpp's blocks of them in each type, from its ``ggml_quantize_chunk`` (no importance matrix: the
reference quantizers ``llama-quantize`` runs).
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints import RECIPE_MOE, build_checkpoint, recipe_moe_checkpoint, recipe_qwen2_checkpoint  # noqa: E402
from gguf_files import write_gguf  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = 6  # the Qwen2 up projection of layer 0 has an all-zero row 3 and a flat row 4
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def llama_quantize(source: Path, out: Path, ftype: str, pure: bool = False) -> dict[str, gguf.ReaderTensor]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = getattr(llama_cpp, ftype), 1, pure
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return {t.name: t for t in gguf.GGUFReader(out).tensors if len(t.shape) > 1}


HARD_TYPES = ("Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def hard_rows(n: int = 512) -> np.ndarray:
    """One row of each kind that tries the quantizers' searches, roundings and ties."""
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(n)
    holes = normal.copy()
    holes[:32], holes[32:64], holes[64:80], holes[100:300] = 0, 3.0, 0, 0  # all-zero and flat groups
    rows = [normal, normal * 1e-30, normal * 1e-40, normal * 6e4, np.abs(normal) + 0.5, -np.abs(normal) - 0.5,
            rng.integers(-3, 4, n) * 0.125, rng.choice([-1.0, 1.0, 0.0, -0.0, 0.5, -0.5], n),
            np.where(rng.random(n) < 0.9, -0.0, normal), rng.integers(-254, 255, n) / 2.0 * 0.7,
            rng.standard_t(1.5, n), normal * (rng.random(n) < 0.05), normal * 0.02 + (np.arange(n) % 97 == 5) * 30,
            normal * 1e-3 + (np.arange(n) % 32 == 5), holes]
    return np.stack(rows).astype(np.float32)


def record_hard_rows() -> None:
    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rows = hard_rows()
    arrays = {"floats": rows}
    for name in HARD_TYPES:
        kind = gguf.GGMLQuantizationType[name]
        values, nbytes = gguf.GGML_QUANT_SIZES[kind]
        blocks = np.zeros((len(rows), rows.shape[1] // values * nbytes), np.uint8)
        ggml.ggml_quantize_chunk(kind.value, rows.ctypes.data, blocks.ctypes.data, 0, len(rows), rows.shape[1], None)
        arrays[name] = blocks
    np.savez_compressed(HERE / "llama_cpp_hard_quants.npz", **arrays)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    qwen2 = write_gguf(recipe_qwen2_checkpoint(root), root / "qwen2-f32.gguf", "qwen2")
    phi3 = write_gguf(build_checkpoint(root / "phi3", "phi3", num_hidden_layers=8), root / "phi3-f32.gguf", "phi3")
    quantized = {method: llama_quantize(qwen2, root / f"{method}.gguf", ftype) for method, ftype in FTYPES.items()}
    types = {"qwen2": {method: {name: t.tensor_type.value for name, t in tensors.items()}
                       for method, tensors in quantized.items()},
             "phi3": {"q4_k_m": {name: t.tensor_type.value for name, t in
                                 llama_quantize(phi3, root / "phi3-q4_k_m.gguf", FTYPES["q4_k_m"]).items()}}}
    for name, (_, arch, _) in RECIPE_MOE.items():
        moe = write_gguf(recipe_moe_checkpoint(root, name), root / f"{name}-f32.gguf", arch)
        types[name] = {method: {tensor: t.tensor_type.value for tensor, t in
                                llama_quantize(moe, root / f"{name}-{method}.gguf", ftype).items()}
                       for method, ftype in FTYPES.items()}
    (HERE / "llama_cpp_quants.json").write_text(json.dumps(types, indent=1, sort_keys=True) + "\n")

    floats = {t.name: np.array(t.data) for t in gguf.GGUFReader(qwen2).tensors}
    q5k = llama_quantize(qwen2, root / "q5_k.gguf", "LLAMA_FTYPE_MOSTLY_Q5_K_M", pure=True)
    chosen = [*(t for name, t in quantized["q4_k_m"].items() if name.startswith(("blk.0.", "blk.1.", "token_embd"))),
              q5k["blk.0.attn_q.weight"], q5k["blk.0.ffn_down.weight"]]
    assert {t.tensor_type.name for t in chosen} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K", "Q5_1"}
    arrays = {}
    for t in chosen:
        key = f"{t.name}:{t.tensor_type.name}"
        arrays[key + ":floats"] = floats[t.name][:ROWS].astype(np.float32)
        arrays[key + ":blocks"] = np.array(t.data)[:ROWS]
    np.savez_compressed(HERE / "llama_cpp_quants.npz", **arrays)
    record_hard_rows()
    print(f"recorded {len(chosen)} tensors and {sum(map(len, types['qwen2'].values()))} types in {HERE}")


if __name__ == "__main__":
    main()
