"""`lmgen bench speculative`: decode speed with and without speculative decoding, on a task whose
output copies its input and on one whose output does not.

edit : rename an argument of a function from lmgen's own source and give the whole function back,
       so most of the output repeats the prompt (where drafts are accepted);
free : write a new short story, which repeats little (where drafts cost without paying).

For each task and batch size the same chat prompts run, greedy, through lmgen without
speculation, lmgen with the engine's speculative_config (``--speculative-ngram K`` or
``--speculative-model PATH``; prompt lookup with K = 5 when none is given), and with ``--compare
transformers`` (batch 1: its speculative generate takes one prompt) through transformers' own
prompt lookup, ``generate(prompt_lookup_num_tokens=K)``, or assisted generation with the same
draft, ``generate(assistant_model=...)``, on the same weights. Decode tokens/s counts each run's tokens after
the first over the time after the first; acceptance is accepted drafts over drafted tokens, and
the mean accepted length the tokens a verifying step gave (accepted drafts plus the model's own).
Prefix caching is off in both engines: a batch repeats the smaller batches' prompts.
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import torch

from lmgen.bench import load_transformers
from lmgen.errors import InvalidArgumentError
from lmgen.llm import LLM
from lmgen.loader.checkpoint import resolve_model_path
from lmgen.outputs import SpecDecodeStats
from lmgen.params import SamplingParams

#: the files whose first function with an argument the edit task asks to rewrite
SOURCES = ["engine/speculative.py", "models/transformer.py", "engine/scheduler.py", "layers/rotary.py",
           "cache/block_pool.py", "engine/request.py", "layers/norm.py", "models/contract.py"]
TOPICS = ["a lighthouse keeper", "a city under the sea", "the first day of spring", "a clockmaker's apprentice",
          "a journey by train", "an old library", "a mountain village", "a lost letter"]
#: num_speculative_tokens when the engine has no speculative_config of its own
DEFAULT_NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3}


def _function(path: Path, lines: int) -> tuple[str, str]:
    """The first function in `path` that takes an argument (its first `lines` lines), and that argument's name."""
    text = path.read_text()
    for match in re.finditer(r"\n *def \w+\(([^)]*)\)", text):
        names = [n for n in re.findall(r"(\w+)\s*(?:[:,=]|$)", match.group(1)) if n not in ("self", "cls")]
        if names:
            return textwrap.dedent("\n".join(text[match.start() + 1:].split("\n")[:lines])), names[0]
    raise ValueError(f"{path} has no function with an argument")


def edit_messages(count: int, lines: int) -> list[list[dict]]:
    root = Path(__file__).resolve().parent
    chats = []
    for source in (SOURCES * count)[:count]:
        body, name = _function(root / source, lines)
        chats.append([{"role": "user", "content": f"Rename `{name}` to `{name}_new` in this Python code and return "
                                                  f"all of it, changing nothing else:\n\n```python\n{body}\n```"}])
    return chats


def free_messages(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short original story about {topic}."}]
            for topic in (TOPICS * count)[:count]]


def task_prompts(llm: LLM, count: int, new_tokens: int) -> dict[str, list[list[int]]]:
    """Each task's `count` chat prompts as token ids; the edit task's functions cut shorter (25 lines, else 15
    or 8) where the model's context would not hold prompt and output."""
    def encode(chats: list[list[dict]]) -> list[list[int]]:
        return [llm.tokenizer.encode_chat(chat, add_generation_prompt=True) for chat in chats]

    context = llm.engine.max_model_len
    for lines in (25, 15, 8):
        edits = encode(edit_messages(count, lines))
        if max(map(len, edits)) + new_tokens <= context:
            return {"edit": edits, "free": encode(free_messages(count))}
    raise InvalidArgumentError(f"the edit task's prompts do not fit the model's context of {context} tokens with "
                               f"{new_tokens} new tokens: lower --new-tokens")


def lmgen_run(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy generation of the batch; decode tokens/s and, where the engine drafts, acceptance (from the requests'
    own records, ``CompletionOutput.spec_decode``)."""
    started, first, tokens, records = time.perf_counter(), None, 0, {}
    for delta in llm.stream(prompts, SamplingParams(max_tokens=new_tokens, temperature=0)):
        tokens += len(delta.outputs[0].token_ids)
        records[delta.request_id] = delta.outputs[0].spec_decode or SpecDecodeStats()
        if first is None and tokens:
            first = time.perf_counter()
    end = time.perf_counter()
    total = sum(records.values(), SpecDecodeStats())
    return {"decode_tok_s": (tokens - len(prompts)) / (end - first), "tokens": tokens,
            "acceptance": total.acceptance_rate, "accepted_length": total.mean_acceptance_length}


def transformers_run(model, prompt: list[int], new_tokens: int, speculative: dict) -> dict:
    """transformers' speculative generate for one prompt (`speculative`: its prompt_lookup_num_tokens or
    assistant_model); its prefill (a 1-token generate, timed first) taken off."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **speculative)
        end = time.perf_counter()
    tokens = out.shape[1] - len(prompt)
    return {"decode_tok_s": (tokens - 1) / (end - first - (first - started)), "tokens": tokens,
            "acceptance": None, "accepted_length": None}


def speculative_rows(model: str | None, engine_kwargs: dict, sizes: list[int], new_tokens: int,
                     compare: str | None) -> list[dict]:
    """Rows for lmgen.bench.report: each task and size, without and with speculation (and transformers')."""
    speculative = engine_kwargs.get("speculative_config") or DEFAULT_NGRAM
    kwargs = {**engine_kwargs, "enable_prefix_caching": False}
    plain = LLM(model, **{**kwargs, "speculative_config": None})
    fast = LLM(model, **{**kwargs, "speculative_config": speculative})
    config, engine = fast.engine.config.speculative_config, plain.engine
    hf, peer = None, {}
    if compare:
        hf = load_transformers(str(engine.model_path), engine.dtype, engine.device)
        peer = ({"assistant_model": load_transformers(str(resolve_model_path(config.model)), engine.dtype,
                                                      engine.device),
                 "num_assistant_tokens": config.num_speculative_tokens, "num_assistant_tokens_schedule": "constant"}
                if config.model else {"prompt_lookup_num_tokens": config.num_speculative_tokens})
    warm = [plain.tokenizer.encode("Warm up")]
    for llm in (plain, fast):
        lmgen_run(llm, warm, 4)  # the kernels' first calls and allocations, outside the timings
    rows = []
    for task, prompts_of_task in task_prompts(plain, max(sizes), new_tokens).items():
        for size in sizes:
            prompts = prompts_of_task[:size]
            runs = [("lmgen", lmgen_run(plain, prompts, new_tokens)),
                    (f"lmgen {config.method}", lmgen_run(fast, prompts, new_tokens))]
            if hf is not None and size == 1:
                runs.append((f"transformers {'assisted' if config.model else 'prompt lookup'}",
                             transformers_run(hf, prompts[0], new_tokens, peer)))
            for system, figures in runs:
                rows.append({"workload": f"{task} n={size}", "system": system, **figures,
                             "ratio": round(figures["decode_tok_s"] / runs[0][1]["decode_tok_s"], 2)})
    return rows
