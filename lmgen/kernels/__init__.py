"""lmgen's own CPU kernels (cpu.cpp; ggml_blocks.cpp and ggml_quantize.cpp for GGUF's block formats):
products of activation rows with weight matrices (a few rows reading weights at DRAM speed, many in
register tiles at matrix-multiply speed), decode attention over the paged cache, the layers' small
elementwise steps, and llama.cpp's quantizers (float weights into GGUF blocks, byte for byte).

Batch-1 decode reads every weight once per token, and PyTorch's one-row CPU products
read them at about half the rate memory allows (``benchmarks/gemv.py``); around them, an
eager step's hundreds of small operator calls (norms, rotary, SiLU, dtype copies) cost
as much again in dispatch, so each of those is one call here. Products of many rows (batched
decode, prompt chunks) are bound by arithmetic instead; there the kernels' tiles match or beat
PyTorch's float32 GEMM without upcasting half-precision or dequantizing int8/int4 weights
first (``benchmarks/batched_products.py``), so every product runs on them. The kernels are
C++ (AVX2), compiled with the machine's C++ compiler the first time a model loads on a
CPU and cached per machine, like torch.compile's own C++; without a compiler, on another
CPU or with ``LMGEN_CPU_KERNELS=0``, PyTorch's kernels run instead, with the same results
up to float rounding (llama.cpp's recipes, ``quantization="q4_k_m"``, whose quantizers are here,
are refused). They register as PyTorch operators (``torch.ops.lmgen.*``), so a
compiled decode step calls them too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lmgen import disk_cache

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
#: compiled together into one library (ggml_blocks.cpp: products with GGUF's block formats; ggml_quantize.cpp:
#: float weights into them, as llama.cpp quantizes)
_SOURCES = [_HERE / "cpu.cpp", _HERE / "ggml_blocks.cpp", _HERE / "ggml_quantize.cpp"]
_HEADERS = [_HERE / "ggml_blocks.h"]
# -ffp-contract=off: a * b + c rounds the product as written (as PyTorch's elementwise ops
# do), never fused into one FMA behind the source's back; the kernels ask for FMAs explicitly.
_FLAGS = ["-O3", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC",
          "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
#: Products of this many rows per byte of a weight on (int8 16, half precision 32, float32 64) run in
#: register tiles (cpu.cpp: kTileMinRows); int8 weights then multiply x as it is rather than rounded
#: to int8 per group of columns (gemv_int8).
TILE_MIN_ROWS = 16
#: in_features must be a multiple of this (the kernels' unrolled step; every model's is).
COLUMN_MULTIPLE = 32

_lock = threading.Lock()
_tried = False
loaded = False  # read by the layers on every product, so a plain attribute
#: Why load() left the kernels off ("" while they run), for logs and test skips.
why_not = ""
#: Whether they are off because building them failed on a machine that can run them (a bug to
#: fix, which the tests report as a failure), rather than by design (no AVX2, no compiler, ...).
build_failed = False


def source_digest() -> str:
    """A digest of the kernels' source: compiled graphs that call them are cached under it (engine/compiled.py),
    since Inductor's cache keys know an op's name but not its signature."""
    return hashlib.sha256(b"\0".join(path.read_bytes() for path in _SOURCES + _HEADERS)).hexdigest()[:16]


def load() -> bool:
    """Build (once per machine) and load the kernels; whether they are in use."""
    global _tried, loaded
    with _lock:
        if not _tried:
            _tried = True
            loaded = _supported() and _load_library()
    return loaded


def serve(device: torch.device) -> bool:
    """Whether the kernels run tensors on `device` (they are loaded, and it is the CPU)."""
    return loaded and device.type == "cpu"


def fits(in_features: int, device: torch.device) -> bool:
    """Whether products with a weight of `in_features` columns on `device` run here (any number of rows)."""
    return serve(device) and in_features % COLUMN_MULTIPLE == 0


def _supported() -> bool:
    global why_not
    if os.environ.get("LMGEN_CPU_KERNELS", "1") == "0":
        why_not = "LMGEN_CPU_KERNELS=0 turns them off"
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability == "DEFAULT":
        why_not = f"they need an x86 CPU with AVX2 (this one: {platform.machine()}, PyTorch's capability {capability})"
        logger.info("lmgen's CPU kernels are off: %s; PyTorch's kernels run instead", why_not)
        return False
    if _compiler() is None:
        why_not = "no C++ compiler found (set CXX or install g++)"
        logger.warning("%s: lmgen's fast CPU decode kernels are off, PyTorch's run instead (about half as fast "
                       "at batch 1)", why_not)
        return False
    return True


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _load_library() -> bool:
    global why_not, build_failed
    try:
        torch.ops.load_library(str(_built_library()))
    except (OSError, subprocess.CalledProcessError) as error:
        details = getattr(error, "stderr", "") or error
        why_not, build_failed = f"building them failed:\n{details}", True
        logger.warning("building lmgen's CPU kernels failed, PyTorch's kernels run instead:\n%s", details)
        return False
    _register_shapes()
    return True


def _built_library() -> Path:
    """The compiled kernels, built now if this machine has not built this source yet."""
    compiler = _compiler()
    key = hashlib.sha256(b"\0".join([source_digest().encode(), torch.__version__.encode(), compiler.encode(),
                                     " ".join(_FLAGS).encode(), sys.version.encode()])).hexdigest()[:16]
    cache = disk_cache.directory("kernels")
    library = cache / f"cpu-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension  # only to build: it imports setuptools (4.5 MiB resident)

    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    started = time.perf_counter()
    # a warning so that the CLI, quiet by default, says why its first start pauses
    logger.warning("building lmgen's CPU kernels for this machine (once, about 30 s on 2 cores)")
    with tempfile.TemporaryDirectory(dir=cache) as scratch:  # then a rename: concurrent builds stay whole
        partial = Path(scratch) / library.name
        subprocess.run([compiler, *_FLAGS, *includes, *map(str, _SOURCES), "-o", str(partial), f"-L{torch_lib}",
                        f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"],
                       check=True, capture_output=True, text=True)
        partial.replace(library)
    logger.info("built lmgen's CPU kernels in %.0f s", time.perf_counter() - started)
    return library


def _register_shapes() -> None:
    """Output shapes for torch.compile, which traces the operators without running them."""
    def rows_by_outputs(x: torch.Tensor, w: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    for name in ("gemv", "gemv_int8", "gemv_int4", "gemv_blocks"):
        torch.library.register_fake(f"lmgen::{name}")(rows_by_outputs)
    for name in ("decode_attention", "norm", "rotary"):
        torch.library.register_fake(f"lmgen::{name}")(lambda x, *_: x.new_empty(x.shape))
    torch.library.register_fake("lmgen::add_norm")(lambda x, *_: (x.new_empty(x.shape), x.new_empty(x.shape)))
    torch.library.register_fake("lmgen::activation")(
        lambda x, kind, gated, *_: x.new_empty(*x.shape[:-1], x.shape[-1] // 2 if gated else x.shape[-1]))
    torch.library.register_fake("lmgen::dequantize_int8")(lambda w, _: w.new_empty(w.shape, dtype=torch.float32))
    torch.library.register_fake("lmgen::dequantize_int4")(
        lambda w, *_: w.new_empty(w.shape[0], 2 * w.shape[1], dtype=torch.float32))
    torch.library.register_fake("lmgen::dequantize_blocks")(
        lambda w, _, in_features: w.new_empty(w.shape[0], in_features, dtype=torch.float32))
