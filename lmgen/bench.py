"""`lmgen bench`: latency and throughput, optionally beside transformers in the same run.

latency    : TTFT, decode tokens/s and prefill tokens/s of a batch of equal prompts.
throughput : N prompts at once (one continuous batch), generated tokens/s overall.
prefix     : TTFT of a prompt whose first --prompt-len tokens an earlier request had,
             with prefix caching on and off.
serve      : N concurrent streaming clients against a running server (lmgen.bench_serve).
speculative: decode tokens/s with and without speculative decoding, on a task that copies its
             input and one that does not (lmgen.bench_speculative).
With ``--compare transformers`` the same workload runs through transformers'
``generate`` (static batches, the same weights and dtype) and the ratio is printed.
Every figure is the median of ``--repeats`` runs after one warm-up; ``--plot`` draws
each mode's headline figure (HEADLINE) as bars per workload and system. Every prompt
sent, warm-ups included, comes from PROMPTS and is new to the engine (see PromptSource).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from lmgen.errors import InvalidArgumentError, LmgenError
from lmgen.llm import LLM
from lmgen.params import SamplingParams

#: mode -> (the figure its ratio and plot are about, its label)
HEADLINE = {"latency": ("decode_tok_s", "decode tokens/s"), "throughput": ("total_tok_s", "generated tokens/s"),
            "prefix": ("ttft_s", "time to first token (s)"), "serve": ("total_tok_s", "output tokens/s"),
            "speculative": ("decode_tok_s", "decode tokens/s")}


@dataclass
class Figures:
    system: str
    ttft_s: float | None = None  # time to first token (whole batch prefilled)
    decode_tok_s: float | None = None  # generated tokens/s after the first, whole batch
    prefill_tok_s: float | None = None  # prompt tokens/s during the first step
    total_tok_s: float | None = None  # generated tokens over the whole run


def synthetic_prompt(number: int, length: int, vocab_size: int) -> list[int]:
    """Prompt `number`: `length` token ids whose first three spell `number` in base B = min(vocab_size, 32000) - 4,
    lowest digit first. Prompts fewer than B numbers apart differ in their first token, any two less than B**3
    apart within their first three, so they share no KV block. Ids stay in 3 .. B + 2: clear of the usual
    pad/bos/eos ids 0-2 and of the special tokens large vocabularies keep at their end."""
    base = max(1, min(vocab_size, 32000) - 4)
    digits = [number // base**d % base + 3 for d in range(3)]
    return (digits + [(7 * i + 13 * number + 11) % base + 3 for i in range(3, length)])[:length]


class PromptSource:
    """Synthetic prompts with a running offset that never goes back.

    A prompt an engine has seen is a prefix-cache hit: its prefill is skipped, so timing it
    measures work that was never done (and that transformers, with no cache across calls,
    cannot skip). Every benchmark mode therefore draws every prompt it sends, warm-ups
    included, from one source: restarting at prompt 0 for each batch size, concurrency level
    or run would send the warm engine prompts it already computed.
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def take(self, count: int, length: int, vocab_size: int) -> list[list[int]]:
        """The next `count` prompts, none of them sent before by this source."""
        numbers = range(self.offset, self.offset + count)
        self.offset += count
        return [synthetic_prompt(n, length, vocab_size) for n in numbers]

    def jump(self) -> None:
        """Move to a random offset, for a server that outlives this process: its cache may hold an earlier
        run's prompts, which two runs of N prompts then share with odds of about 2N / base**3."""
        self.offset += random.randrange(2**48)


#: the one source of every benchmark mode in this process (library modes, serve, benchmarks/)
PROMPTS = PromptSource()


def _median(runs: list[Figures], system: str) -> Figures:
    def med(name: str) -> float | None:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return round(statistics.median(values), 4) if values else None

    return Figures(system, med("ttft_s"), med("decode_tok_s"), med("prefill_tok_s"), med("total_tok_s"))


def lmgen_run(llm: LLM, prompts: list[list[int]], new_tokens: int,
              clock: Callable[[], float] = time.perf_counter) -> Figures:
    """Stream the batch, timing the first token of every request and the end (on `clock`: the wall
    clock, or time.process_time for the process's CPU time)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = clock()
    first_token: dict[str, float] = {}
    for delta in llm.stream(prompts, params):
        first_token.setdefault(delta.request_id, clock())
    end = clock()
    ttft = max(first_token.values()) - start
    generated = len(prompts) * new_tokens
    return Figures("lmgen", ttft, len(prompts) * (new_tokens - 1) / max(end - start - ttft, 1e-9),
                   len(prompts) * len(prompts[0]) / ttft, generated / (end - start))


def transformers_run(model, prompts: list[list[int]], new_tokens: int) -> Figures:
    """One static batch through transformers' generate: TTFT from a 1-token run, then the whole run."""
    ids = torch.tensor(prompts, device=model.device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs).cpu()  # .cpu(): waits for a GPU to finish
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs).cpu()
        total = time.perf_counter() - start
    generated = len(prompts) * new_tokens
    return Figures("transformers", ttft, len(prompts) * (new_tokens - 1) / max(total - ttft, 1e-9),
                   len(prompts) * len(prompts[0]) / ttft, generated / total)


def require_transformers() -> None:
    """--compare transformers without transformers installed: one clear line (exit 2), before anything loads."""
    if importlib.util.find_spec("transformers") is None:
        raise LmgenError('--compare transformers needs transformers, which is not installed: '
                         'install it with pip install -e ".[bench]"')


@contextlib.contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' progress bars ("Loading weights") and load report, off for the block: they would
    land in the middle of the benchmark's table."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers(path: str, dtype: torch.dtype, device: torch.device):
    """The reference model: the same checkpoint through transformers, loaded quietly."""
    require_transformers()
    import transformers

    with transformers_quiet():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def measure(run: Callable[[list[list[int]], int], Figures], system: str, batches: list[list[list[int]]],
            new_tokens: int) -> Figures:
    """Warm up on the first batch (at its size, so a compiled step has its graph), then the median over the
    others. Every batch has prompts of its own (PROMPTS): a repeated prompt would be a prefix-cache hit and
    time no prefill at all."""
    run(batches[0], 4)
    return _median([run(batch, new_tokens) for batch in batches[1:]], system)


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def report(rows: list[dict], json_path: str | None, mode: str) -> None:
    columns = ["workload", "system", "ttft_s", "prefill_tok_s", "decode_tok_s", "total_tok_s", "ratio"]
    if mode == "serve":  # latencies as the clients see them
        columns = ["workload", "system", "req_per_s", "total_tok_s", "ttft_s", "ttft_p90_s", "itl_s", "itl_p90_s"]
    if mode == "speculative":
        columns = ["workload", "system", "decode_tok_s", "ratio", "acceptance", "accepted_length"]
    print("\n".join(table([columns] + [[_fmt(row.get(c)) for c in columns] for row in rows])), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"machine": machine(), "results": rows}, f, indent=2)


def table(cells: list[list[str]]) -> list[str]:
    """Lines of right-aligned columns, each as wide as its widest cell, two spaces apart."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def first_token_seconds(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    next(iter(llm.stream([prompt], SamplingParams(max_tokens=1, temperature=0))))
    return time.perf_counter() - start


def prefix_rows(llm: LLM, prefix_len: int, repeats: int) -> list[dict]:
    """TTFT of `prefix + new suffix` after `prefix + other suffix` ran, cache on vs off.

    Each run has a prefix of its own (PROMPTS): the earlier request computes it cold, and the timed
    one can reuse exactly that prefix and nothing more; with the cache off every run is cold."""
    engine = llm.engine
    uncached = LLM(str(engine.model_path), dtype=str(engine.dtype).removeprefix("torch."),
                   kv_cache_dtype=engine.config.kv_cache_dtype, enable_prefix_caching=False,
                   max_num_batched_tokens=engine.config.max_num_batched_tokens)
    vocab_size = engine.model.spec.vocab_size
    rows = []
    for system, model in (("lmgen prefix cache on", llm), ("lmgen prefix cache off", uncached)):
        times = []
        for _ in range(repeats + 1):
            prefix = PROMPTS.take(1, prefix_len, vocab_size)[0]
            first_token_seconds(model, prefix + [5, 6, 7, 8])  # an earlier request with the same prefix
            times.append(first_token_seconds(model, prefix + [9, 8, 7, 6]))
        rows.append({"workload": f"prefix {prefix_len}", "system": system,
                     "ttft_s": round(statistics.median(times[1:]), 4)})
    for row in rows:
        row["ratio"] = round(row["ttft_s"] / rows[1]["ttft_s"], 3)
    return rows


def run_bench(llm: LLM, mode: str, sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
              compare: str | None) -> list[dict]:
    """Measure each batch size (latency) or prompt count (throughput); rows for report()."""
    if compare == "transformers":
        require_transformers()
    if mode == "prefix":
        return prefix_rows(llm, prompt_len, repeats)
    engine = llm.engine
    hf = load_transformers(str(engine.model_path), engine.dtype, engine.device) if compare == "transformers" else None
    rows = []
    for size in sizes:
        batches = [PROMPTS.take(size, prompt_len, engine.model.spec.vocab_size) for _ in range(repeats + 1)]
        pair = [measure(lambda p, n: lmgen_run(llm, p, n), "lmgen", batches, new_tokens)]
        if hf is not None:  # the same prompts: transformers keeps no cache from one generate call to the next
            pair.append(measure(lambda p, n: transformers_run(hf, p, n), "transformers", batches, new_tokens))
        key = HEADLINE[mode][0]
        for figures in pair:
            row = {"workload": f"{mode} n={size}", **asdict(figures)}
            if hf is not None:
                row["ratio"] = round(getattr(figures, key) / getattr(pair[1], key), 2)
            rows.append(row)
    return rows


def pyplot():
    """matplotlib's pyplot, drawing to files only; a clear error when the optional extra is missing."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install 'lmgen[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def plot(rows: list[dict], mode: str, path: str) -> None:
    """Grouped bars of the mode's headline figure: one group per workload, one bar per system."""
    plt = pyplot()
    key, label = HEADLINE[mode]
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    width = 0.8 / len(systems)
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(workloads)), 3.5))
    for i, system in enumerate(systems):
        values = {row["workload"]: row.get(key) or 0.0 for row in rows if row["system"] == system}
        axes.bar([x + i * width for x in range(len(workloads))], [values.get(w, 0.0) for w in workloads], width,
                 label=system)
    axes.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(workloads))], workloads)
    axes.set_ylabel(label)
    axes.set_title(f"lmgen bench {mode}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
