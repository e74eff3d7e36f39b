"""llama.cpp beside lmgen: the same model, the same token ids, one process run.

    python benchmarks/llamacpp.py --check          # proves the GGUF conversion (f32 logits, greedy tokens)
    python benchmarks/llamacpp.py                  # every figure, median of --repeats (default 3)
    python benchmarks/llamacpp.py --only decode-bf16 prefill-bf16 --repeats 5 --json out.json
    python benchmarks/llamacpp.py --model gemma3-125m --check    # another family's bench model
    python benchmarks/llamacpp.py --threads 1 --clock cpu        # CPU time of one thread: a shared machine

Needs llama-cpp-python and gguf (pip install llama-cpp-python gguf; pip builds llama.cpp
from source). The bench model (benchmarks/models.py: MODELS below)
is converted to GGUF in f32 and bf16 with the `gguf` package, following llama.cpp's
convert_hf_to_gguf.py for its architecture (LlamaForCausalLM, Qwen3ForCausalLM,
Gemma3ForCausalLM, Qwen3MoeForCausalLM: ARCHS below); q8_0 and q4_0
are made from the f32 file by llama.cpp's own quantizer (`llama_model_quantize`, what
`llama-quantize` runs), so they hold its default mix: the tied embedding, which is also
the LM head, at 6-8 bits (Q6_K in q4_0) as lmgen keeps it at int8. The files are cached
beside the model in benchmarks/models/ (rebuilt when the checkpoint is newer, or with
--reconvert).

Figures (../shared/BENCHMARKS.md): decode tokens/s at batch 1 (prompt 128, 128 new tokens,
greedy, no EOS stop) and prefill tokens/s of one 512-token prompt. Both systems get the
same random token-id prompts (fixed seed) and 2 threads (--threads); their runs alternate, so load
from other processes falls on both alike. The ratio is lmgen / llama.cpp. On a machine shared with
other busy processes, `--threads 1 --clock cpu` times each run's CPU time instead of the wall clock.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # run from a checkout without installing lmgen

from lmgen.bench import lmgen_run  # noqa: E402
from lmgen.llm import LLM  # noqa: E402
from lmgen.params import SamplingParams  # noqa: E402

if TYPE_CHECKING:
    import gguf
    import llama_cpp

MODELS = ("bench-125m", "qwen3-125m", "gemma3-125m", "qwen3-moe-1b-a150m", "qwen3-150m")  # benchmarks/models.py --shape NAME
THREADS = 2
GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_0")
# made by llama.cpp from the f32 file (q4_k_m: its recipe on float weights, for int4's quality)
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


# ---- conversion: HF checkpoint -> GGUF, as convert_hf_to_gguf.py writes it -----------------

def gguf_path(model: Path, qtype: str) -> Path:
    return model.parent / f"{model.name}-{qtype}.gguf"


def permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows rotate halves (i pairs with i + d/2); llama.cpp's LLAMA rope rotates
    adjacent pairs (2i, 2i+1). Within each head, row j*d/2 + i moves to row 2i + j."""
    rows, cols = weight.shape
    return weight.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_text_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """The keys every architecture gets (TextModel.set_gguf_parameters). transformers 5
    keeps rope_theta in rope_parameters, per layer type where the types differ (Gemma 3:
    the global layers' base, and the sliding layers' as the swa base)."""
    rope = config.get("rope_parameters") or {}
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    if (theta := rope.get("full_attention", rope).get("rope_theta", config.get("rope_theta"))) is not None:
        writer.add_rope_freq_base(float(theta))
    if (theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(float(theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def write_llama_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """LlamaModel.set_gguf_parameters adds these."""
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def write_gemma3_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """Gemma3Model.set_gguf_parameters adds these. No key holds query_pre_attn_scalar:
    llama.cpp scales queries by 1/sqrt(key_length), or 1/sqrt(hidden/heads) for the 27B
    (62 layers), so a checkpoint that says otherwise cannot be written; nor can an
    attention soft cap, which Gemma 3 dropped (the converter asserts it)."""
    if config.get("attn_logit_softcapping") is not None:
        raise ValueError("Gemma 3 has no attention logit soft cap")
    scalar = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 \
        else config["head_dim"]
    if config.get("query_pre_attn_scalar", scalar) != scalar:
        raise ValueError(f"llama.cpp's gemma3 scales queries by 1/sqrt({scalar}): query_pre_attn_scalar must be {scalar}")
    if softcap := config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(softcap)
    if config.get("sliding_window_pattern") != 1:  # llama.cpp puts a global layer every 6th
        writer.add_sliding_window(config["sliding_window"])


def write_qwen3moe_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """TextModel.set_gguf_parameters adds the expert counts and Qwen2MoeModel the experts' width. llama.cpp's
    qwen3moe always renormalises the chosen experts' weights: a checkpoint that does not cannot be written."""
    if not config.get("norm_topk_prob"):
        raise ValueError("llama.cpp's qwen3moe renormalises the top-k weights: norm_topk_prob must be true")
    writer.add_expert_count(config.get("num_experts") or config["num_local_experts"])  # transformers 5 writes the latter
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])


@dataclass(frozen=True)
class Arch:
    """What convert_hf_to_gguf.py does differently for one HF architecture; tensor names
    come from gguf's own table for `arch` (gguf.get_tensor_name_map, as the converter)."""
    arch: str  # a gguf.MODEL_ARCH member
    write_hparams: Callable[[gguf.GGUFWriter, dict], None]  # after write_text_hparams
    permute_qk: bool = False  # LlamaModel permutes q/k rows for llama.cpp's adjacent-pair rope
    norm_shift: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w): the file holds w + 1


ARCHS = {
    "LlamaForCausalLM": Arch("LLAMA", write_llama_hparams, permute_qk=True),
    "Qwen2ForCausalLM": Arch("QWEN2", lambda writer, config: None),  # the real model (benchmarks/real_model.py)
    "Qwen3ForCausalLM": Arch("QWEN3", lambda writer, config: None),  # Qwen2Model: nothing more
    "Gemma3ForCausalLM": Arch("GEMMA3", write_gemma3_hparams, norm_shift=1.0),
    "Qwen3MoeForCausalLM": Arch("QWEN3MOE", write_qwen3moe_hparams),
}
#: One expert's projection in a checkpoint: the converter stacks a layer's experts into one tensor per projection.
EXPERT = re.compile(r"(?P<experts>.*\.mlp\.experts)\.(?P<index>\d+)\.(?P<projection>\w+)\.weight")


def model_arch(config: dict) -> Arch:
    name = config["architectures"][0]
    if name not in ARCHS:
        raise SystemExit(f"no GGUF conversion for {name} here (known: {', '.join(ARCHS)})")
    return ARCHS[name]


def hf_tensors(model: Path, config: dict, arch: Arch) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint's tensors as float32 numpy arrays, changed as the converter changes
    them; experts stacked [experts, out, in] per layer and projection, one stack in memory at a time.
    (Gemma3Model also cuts the embedding to the tokenizer's length; bench models
    pad their vocabulary to vocab_size instead, as for Llama, so the embedding stays whole.)"""
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        stacks: dict[str, dict[int, str]] = {}
        for name in f.keys():
            if expert := EXPERT.fullmatch(name):
                stacks.setdefault(f"{expert['experts']}.{expert['projection']}.weight", {})[int(expert['index'])] = name
                continue
            data = f.get_tensor(name).float().numpy()
            if arch.permute_qk and name.endswith("q_proj.weight"):
                data = permute_rope(data, config["num_attention_heads"])
            elif arch.permute_qk and name.endswith("k_proj.weight"):
                data = permute_rope(data, config["num_key_value_heads"])
            elif arch.norm_shift and name.endswith("norm.weight"):
                data = data + arch.norm_shift
            yield name, data
        for stacked, experts in stacks.items():
            yield stacked, np.stack([f.get_tensor(experts[i]).float().numpy() for i in sorted(experts)])


def write_vocab(writer: gguf.GGUFWriter, model: Path, config: dict) -> None:
    """A byte-level BPE ("gpt2") vocabulary from tokenizer.json, padded with unused
    [PADi] tokens up to the model's vocab_size as convert_hf_to_gguf.py does."""
    import gguf

    tok = json.loads((model / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(config["vocab_size"]):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id
                     else gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")  # our tokenizer matches none of llama.cpp's known hashes
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])


def convert(model: Path, qtype: str, out: Path) -> None:
    """Write `model` as GGUF. Norms stay f32 (llama.cpp's converter keeps every 1-D tensor
    and *_norm in f32); every 2-D weight, the (tied) embedding included, takes `qtype`."""
    if qtype in LLAMA_FTYPES:
        quantize_with_llama_cpp(ensure_gguf(model, "f32"), qtype, out)
        return
    import gguf

    config = json.loads((model / "config.json").read_text())
    arch = model_arch(config)
    gguf_arch = gguf.MODEL_ARCH[arch.arch]
    names = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    Q = gguf.GGMLQuantizationType
    qt = {"f32": Q.F32, "bf16": Q.BF16}[qtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16}[qtype]
    writer = gguf.GGUFWriter(str(out) + ".part", gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.name)
    write_text_hparams(writer, config)
    arch.write_hparams(writer, config)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, model, config)
    for name, data in hf_tensors(model, config, arch):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{name}: no {arch.arch} tensor of that name in gguf's table")
        # the converter keeps vectors and the router (ffn_gate_inp) in f32
        target = Q.F32 if data.ndim == 1 or ".ffn_gate_inp." in gguf_name else qt
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".part").rename(out)


def quantize_with_llama_cpp(source: Path, qtype: str, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[qtype])
    params.nthread = THREADS
    part = Path(str(out) + ".part")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {qtype}")
    part.rename(out)


def ensure_gguf(model: Path, qtype: str, reconvert: bool = False) -> Path:
    """The cached GGUF file, converted again when missing, stale, or asked for."""
    out = gguf_path(model, qtype)
    stale = not out.is_file() or out.stat().st_mtime < (model / "model.safetensors").stat().st_mtime
    if stale or reconvert:
        print(f"converting {model.name} to {out.name} ...", flush=True)
        convert(model, qtype, out)
    return out


# ---- running the two systems ------------------------------------------------------------------

@dataclass
class Run:
    ttft_s: float  # prompt evaluated and the first token chosen
    decode_tok_s: float  # tokens/s after the first
    prompt_len: int

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.ttft_s


def load_llama(path: Path, n_ctx: int, logits_all: bool = False, f32_kv: bool = False,
               flash_attn: bool = False, threads: int = THREADS) -> llama_cpp.Llama:
    import llama_cpp

    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_kv else {}
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                           n_ubatch=512, logits_all=logits_all, flash_attn=flash_attn, verbose=False, **kv)


def llama_next(llm: llama_cpp.Llama) -> int:
    """Greedy pick from the last evaluated position's logits (what lmgen's temperature 0 does)."""
    import llama_cpp

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def llama_generate(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int,
                   clock: Callable[[], float] = time.perf_counter) -> tuple[Run, list[int]]:
    """Prompt evaluation timed apart from the one-token-at-a-time decode loop."""
    llm.reset()
    start = clock()
    llm.eval(prompt)
    tokens = [llama_next(llm)]
    first = clock()
    for _ in range(new_tokens - 1):
        llm.eval(tokens[-1:])
        tokens.append(llama_next(llm))
    end = clock()
    return Run(first - start, (new_tokens - 1) / (end - first), len(prompt)), tokens


def load_lmgen(model: Path, dtype: str, quantization: str | None = None, compile: bool = False) -> LLM:
    # a small KV budget: these runs hold one sequence of at most a few hundred tokens
    return LLM(str(model), dtype=dtype, quantization=quantization, kv_cache_memory="256MiB", compile=compile)


def lmgen_generate(llm: LLM, prompt: list[int], new_tokens: int,
                   clock: Callable[[], float] = time.perf_counter) -> Run:
    figures = lmgen_run(llm, [prompt], new_tokens, clock)  # lmgen bench latency's own measurement
    return Run(figures.ttft_s, figures.decode_tok_s, len(prompt))


def gguf_weight_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def lmgen_weight_bytes(llm: LLM) -> int:
    """Bytes of the model's tensors, a tied embedding / LM head counted once."""
    model = llm.engine.model
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


# ---- the check: the conversion is right when llama.cpp f32 computes what lmgen f32 does -------

def check(model: Path, prompt_len: int = 32, new_tokens: int = 32) -> bool:
    """Per-position logits of one prompt and greedy tokens, llama.cpp f32 vs lmgen float32.
    llama.cpp's KV cache is f32 here (its default is f16) so only summation order differs."""
    prompt = random_prompts(1, prompt_len, seed=1)[0]
    llama = load_llama(ensure_gguf(model, "f32"), n_ctx=256, logits_all=True, f32_kv=True)
    ours = load_lmgen(model, "float32")
    llama.reset()
    llama.eval(prompt)
    theirs = torch.from_numpy(np.array(llama.scores[:prompt_len], dtype=np.float32))
    mine = ours.engine.score([prompt])[0]
    diff = (theirs - mine).abs().max().item()
    scale = mine.abs().max().item()
    same_argmax = (theirs.argmax(-1) == mine.argmax(-1)).float().mean().item()
    print(f"logits at {prompt_len} positions: max |llama.cpp - lmgen| = {diff:.2e} "
          f"(largest |logit| {scale:.2f}, relative {diff / scale:.1e}); same argmax at {same_argmax:.0%}")

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    lmgen_tokens = ours.generate([prompt], params)[0].outputs[0].token_ids
    llama_tokens = llama_generate(llama, prompt, new_tokens)[1]
    agree = next((i for i, (a, b) in enumerate(zip(lmgen_tokens, llama_tokens)) if a != b), new_tokens)
    print(f"greedy tokens: {agree}/{new_tokens} identical" + ("" if agree == new_tokens else
          f"; first difference at {agree}: lmgen {lmgen_tokens[agree]}, llama.cpp {llama_tokens[agree]}"))
    ok = diff / scale < 1e-3 and same_argmax == 1.0 and agree == new_tokens
    print("check", "PASSED" if ok else "FAILED")
    return ok


# ---- the figures ----------------------------------------------------------------------------

@dataclass
class Pair:
    """One row: a llama.cpp GGUF type against an lmgen setting on the same workload."""
    name: str
    gguf: str
    dtype: str
    quantization: str | None
    prompt_len: int
    new_tokens: int
    figure: str  # "decode_tok_s" or "prefill_tok_s"


PAIRS = [
    Pair("decode-f32", "f32", "float32", None, 128, 128, "decode_tok_s"),
    Pair("decode-bf16", "bf16", "bfloat16", None, 128, 128, "decode_tok_s"),
    Pair("prefill-f32", "f32", "float32", None, 512, 2, "prefill_tok_s"),
    Pair("prefill-bf16", "bf16", "bfloat16", None, 512, 2, "prefill_tok_s"),
    # lmgen's quantized kernels take bfloat16 activations (layers/quant.py)
    Pair("decode-q8_0", "q8_0", "bfloat16", "int8", 128, 128, "decode_tok_s"),
    Pair("decode-q4_0", "q4_0", "bfloat16", "int4", 128, 128, "decode_tok_s"),
    Pair("prefill-q8_0", "q8_0", "bfloat16", "int8", 512, 2, "prefill_tok_s"),
    Pair("prefill-q4_0", "q4_0", "bfloat16", "int4", 512, 2, "prefill_tok_s"),
]


def random_prompts(count: int, length: int, seed: int, vocab: int = 32000) -> list[list[int]]:
    """Random token ids (3 and up: 0-2 are <unk>, <s>, </s>); distinct prompts, so no
    prefix-cache hit can shorten lmgen's prefill."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def alternate(runs: dict[str, Callable[[list[int]], Run]], prompts: list[list[int]]) -> dict[str, list[Run]]:
    """Each prompt through every system, the order flipped every repeat so that a burst of
    load from other processes does not always hit the same system."""
    results: dict[str, list[Run]] = {name: [] for name in runs}
    for i, prompt in enumerate(prompts):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            results[name].append(runs[name](prompt))
    return results


#: What a run's seconds are: the wall clock, or the process's CPU time (--clock cpu, with --threads 1:
#: the work itself even while other processes take the core away; with more threads, llama.cpp's
#: threads spin while they wait for each other, which CPU time would count as work).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_pair(model: Path, pair: Pair, repeats: int, flash_attn: bool, compile: bool = False,
                 threads: int = THREADS, clock: str = "wall") -> dict:
    """Both systems loaded side by side, warmed up, then `repeats` alternating runs each, on `threads`
    threads timed on `clock` (CLOCKS). With `compile`, lmgen runs its compiled decode step, and its eager
    path runs beside as a third system."""
    path = ensure_gguf(model, pair.gguf)
    row: dict = {"model": model.name, "name": pair.name, "figure": pair.figure, "prompt_len": pair.prompt_len,
                 "new_tokens": pair.new_tokens, "threads": threads, "clock": clock}
    try:
        ours = load_lmgen(model, pair.dtype, pair.quantization, compile)
        eager = load_lmgen(model, pair.dtype, pair.quantization) if compile else None
    except Exception as exc:  # e.g. a quantization method lmgen does not have yet
        row["note"] = f"lmgen {pair.dtype} {pair.quantization}: {type(exc).__name__}: {exc}"
        ours = None
    llama = load_llama(path, n_ctx=1024, flash_attn=flash_attn, threads=threads)
    timer = CLOCKS[clock]
    runs: dict[str, Callable[[list[int]], Run]] = {
        "llama.cpp": lambda p: llama_generate(llama, p, pair.new_tokens, timer)[0]}
    if ours is not None:
        runs["lmgen"] = lambda p: lmgen_generate(ours, p, pair.new_tokens, timer)
    if compile and ours is not None:
        runs["lmgen eager"] = lambda p: lmgen_generate(eager, p, pair.new_tokens, timer)
    alternate(runs, random_prompts(1, 16, seed=99))  # warm-up: first-call allocations, page faults
    results = alternate(runs, random_prompts(repeats, pair.prompt_len, seed=0))
    lmgen_setting = pair.dtype + (f" {pair.quantization}" if pair.quantization else "")
    setting = {"llama.cpp": pair.gguf, "lmgen": lmgen_setting + (" compiled" if compile else ""),
               "lmgen eager": lmgen_setting}
    for system, system_runs in results.items():
        values = [getattr(r, pair.figure) for r in system_runs]
        row[system] = {"setting": setting[system], "median": round(statistics.median(values), 2),
                       "best": round(max(values), 2),  # the run the other processes disturbed least
                       "runs": [round(v, 2) for v in values],
                       "weight_bytes": gguf_weight_bytes(path) if system == "llama.cpp" else lmgen_weight_bytes(ours)}
    row["load_average"] = round(os.getloadavg()[0], 2)  # > 2 here: other processes shared the 2 cores
    if "lmgen" in row:
        row["ratio"] = round(row["lmgen"]["median"] / row["llama.cpp"]["median"], 2)
        row["ratio_best"] = round(row["lmgen"]["best"] / row["llama.cpp"]["best"], 2)
    if "lmgen eager" in row:
        row["compiled_vs_eager"] = round(row["lmgen"]["median"] / row["lmgen eager"]["median"], 2)
    return row


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """GB/s of summing a float32 array far larger than the caches with torch's threads: the
    DRAM read rate a memory-bound batch-1 decode can reach at best."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()  # fault the pages in
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return round(data.numel() * 4 / min(seconds) / 1e9, 1)  # the fastest: the least disturbed


def _cells(fig: dict | None, figure: str) -> list[str]:
    if fig is None:
        return ["-", "-", "-"]
    rate = f"{fig['median'] * fig['weight_bytes'] / 1e9:.1f}" if figure == "decode_tok_s" else "-"
    return [f"{fig['setting']} ({fig['weight_bytes'] / 2**20:.0f} MiB)", f"{fig['median']:.1f} ({fig['best']:.1f})",
            rate]


def print_table(rows: list[dict]) -> None:
    """Markdown, ready for docs/performance.md: tok/s as median (best run). GB/s = median
    decode tok/s x weight bytes, the read rate a system sustains if it reads every weight
    once per token."""
    print("\n| figure | llama.cpp | tok/s | GB/s | lmgen | tok/s | GB/s | lmgen / llama.cpp | same, best runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratios = [f"{row['ratio']:.2f}×", f"{row['ratio_best']:.2f}×"] if "ratio" in row else ["-", "-"]
        cells = [f"{row['model']} {row['name']}", *_cells(row.get("llama.cpp"), row["figure"]), *_cells(row.get("lmgen"), row["figure"]),
                 *ratios]
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        if "compiled_vs_eager" in row:
            print(f"{row['name']}: lmgen compiled {row['lmgen']['median']:.1f} vs eager "
                  f"{row['lmgen eager']['median']:.1f} tok/s ({row['compiled_vs_eager']:.2f}×)")
    for row in rows:
        if "note" in row:
            print(f"note: {row['name']}: {row['note']}")


def machine(threads: int) -> dict:
    import llama_cpp

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return {"platform": platform.platform(), "cpu_flags": sorted(f for f in flags if f.startswith("avx")),
            "threads": threads, "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="bench-125m", help="the bench model (benchmarks/models/)")
    parser.add_argument("--check", action="store_true", help="check the conversion against lmgen, then stop")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PAIRS], help="measure these rows only")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system and row (median)")
    parser.add_argument("--json", help="write the figures and every run here")
    parser.add_argument("--reconvert", action="store_true", help="convert to GGUF again even if cached")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention")
    parser.add_argument("--compile", action="store_true",
                        help="lmgen with its compiled decode step, and its eager path beside it")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads for each system")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="time runs by the wall clock, or by the process's CPU time (with --threads 1 on a "
                             "shared machine: the work each run costs, whatever the other processes take)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    missing = [name for name in ("llama_cpp", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: pip install llama-cpp-python gguf")
    torch.set_num_threads(args.threads)
    model = ROOT / "models" / args.model
    if not (model / "model.safetensors").is_file():
        raise SystemExit(f"{model} is missing: python benchmarks/models.py --shape {args.model}")
    pairs = [p for p in PAIRS if args.only is None or p.name in args.only]
    if args.reconvert:
        for qtype in dict.fromkeys(["f32"] if args.check else [p.gguf for p in pairs]):
            ensure_gguf(model, qtype, reconvert=True)
    if args.check:
        raise SystemExit(0 if check(model) else 1)
    bandwidth = read_bandwidth()
    print(f"DRAM read bandwidth, {args.threads} threads: {bandwidth} GB/s", flush=True)
    rows = []
    for pair in pairs:
        rows.append(measure_pair(model, pair, args.repeats, args.flash_attn, args.compile, args.threads, args.clock))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(args.threads),
                                               "read_bandwidth_gb_s": bandwidth,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
