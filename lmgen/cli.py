"""The ``lmgen`` command: generate | chat | serve | bench | quantize | perplexity."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from lmgen import disk_cache
from lmgen.distributed.parallel import torchrun_world_size
from lmgen.errors import InvalidArgumentError, LmgenError
from lmgen.layers.quant import DEFAULT_GROUP_SIZE, QUANTIZATION_METHODS, SAVED_METHODS
from lmgen.reasoning import NO_PARSER as NO_REASONING_PARSER
from lmgen.reasoning import PARSERS as REASONING_PARSERS
from lmgen.tool_calls import PARSERS as TOOL_CALL_PARSERS

if TYPE_CHECKING:
    from lmgen.engine.config import EngineConfig
    from lmgen.server.ray_app import ReplicaOptions
    from lmgen.server.serving import ServerSettings

logger = logging.getLogger("lmgen")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The modules each optional extra of pyproject.toml brings, by import name.
EXTRAS = {"server": ("fastapi", "uvicorn", "pydantic", "prometheus_client"), "ray": ("ray",)}


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a usage error as every lmgen error is reported: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lmgen: error: {message} (see '{self.prog} --help')\n")


def add_global_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    """Flags that go before or after the command's name. A command's copy defaults to SUPPRESS so it
    never overwrites a value given before the name."""
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                        default=argparse.SUPPRESS if default is None else default,
                        help="DEBUG, INFO, WARNING (default) or ERROR")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags mirroring ``LLM(...)``'s arguments (EngineConfig)."""
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", "-m", default=None,
                       help="checkpoint folder, .gguf file or Hugging Face hub id (default: the embedded demo model)")
    group.add_argument("--gguf-file", default=None,
                       help="a GGUF file of the --model folder or hub repo, e.g. model-Q4_K_M.gguf")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    group.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    group.add_argument("--kv-cache-memory", default=None,
                       help="KV-cache budget, e.g. 512MiB or 4GiB (default: 1GiB on CPU, 85%% of free GPU memory)")
    group.add_argument("--kv-cache-dtype", default="auto",
                       help="what the KV cache stores keys and values in: auto (the model's dtype), float16, "
                            "bfloat16 or float32; half of float32 holds twice the tokens in --kv-cache-memory")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length in tokens (default: the model's)")
    group.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one batch")
    group.add_argument("--max-num-batched-tokens", type=int, default=512,
                       help="most tokens in one step; long prompts are prefilled in chunks of this size")
    group.add_argument("--max-num-partial-prefills", type=int, default=1, metavar="N",
                       help="while several prompts wait, each takes at most 1/N of a step's tokens, so a long "
                            "prompt does not hold back the short ones behind it (default 1: first come, first served)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--quantize", dest="quantization", choices=QUANTIZATION_METHODS, default=None,
                       help="weight-only quantization while loading (int8: per output channel; int4: per group; "
                            "q4_k_m, q6_k, q8_0: llama.cpp's recipes of GGUF blocks, run on lmgen's block kernels)")
    add_quantization_args(group)
    group.add_argument("--map-weights", action="store_true",
                       help="on a CPU, memory-map the weights from a file prepared (in ~/.cache/lmgen/weights, as "
                            "large as the weights) by the first such load: later loads are instant, and only the "
                            "pages read become resident (of a mixture of experts: the experts chosen)")
    group.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="recompute shared prompt beginnings instead of reusing their KV blocks")
    group.add_argument("--max-logprobs", type=int, default=20,
                       help="the most alternatives a request's logprobs or prompt_logprobs may ask for")
    group.add_argument("--compile", action="store_true",
                       help="compile the decode step with torch.compile (Inductor): decode runs faster after "
                            "a first start that takes a minute or more (cached on disk for later runs); on a CPU "
                            "it needs a C++ compiler; on a GPU it is ignored unless --enforce-eager (CUDA graphs "
                            "of the eager step replay faster)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="on a GPU, launch each decode step's kernels one by one instead of replaying "
                            "CUDA graphs (slower; for debugging)")
    group.add_argument("--engine-seed", type=int, default=None, help="seed for requests that bring none")
    group.add_argument("--tensor-parallel-size", "-tp", type=_at_least(1), default=None, metavar="N",
                       help="split the model across N processes (gloo on a CPU, NCCL on GPUs; lmgen starts "
                            "them); default 1, or under torchrun its number of processes")
    speculative = group.add_mutually_exclusive_group()
    speculative.add_argument("--speculative-ngram", type=int, default=None, metavar="K",
                             help="speculative decoding by prompt lookup: requests draft up to K tokens a step "
                                  "from earlier occurrences of their last tokens (faster where the output copies "
                                  "its input; greedy: the same tokens as without, sampled: the same distribution)")
    speculative.add_argument("--speculative-model", default=None, metavar="PATH",
                             help="speculative decoding with a draft model: a small checkpoint (folder or hub id) "
                                  "of the same tokenizer drafts the next tokens, the model checks them all in one "
                                  "step (greedy: the same tokens as without, sampled: the same distribution)")
    group.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                       help="with --speculative-model: most tokens drafted a step (default 5)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_partial_prefills=args.max_num_partial_prefills, block_size=args.block_size,
                enable_prefix_caching=args.enable_prefix_caching, max_logprobs=args.max_logprobs,
                quantization=args.quantization,
                quantization_group_size=args.group_size, quantize_lm_head=args.quantize_lm_head,
                compile=args.compile, enforce_eager=args.enforce_eager, seed=args.engine_seed,
                map_weights=args.map_weights,
                revision=args.revision, gguf_file=args.gguf_file, speculative_config=_speculative_config(args),
                tensor_parallel_size=torchrun_world_size() if args.tensor_parallel_size is None
                else args.tensor_parallel_size)


def _speculative_config(args: argparse.Namespace) -> dict | None:
    if args.num_speculative_tokens is not None and args.speculative_model is None:
        raise InvalidArgumentError("--num-speculative-tokens needs --speculative-model (--speculative-ngram K "
                                   "takes its own)")
    if args.speculative_ngram is not None:
        return {"method": "ngram", "num_speculative_tokens": args.speculative_ngram}
    if args.speculative_model is not None:
        k = args.num_speculative_tokens
        return {"model": args.speculative_model, **({} if k is None else {"num_speculative_tokens": k})}
    return None


def add_quantization_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--group-size", type=int, default=None,
                       help=f"int4: input columns sharing a scale, 32, 64, 128 or 256 (default {DEFAULT_GROUP_SIZE})")
    group.add_argument("--no-quantize-lm-head", dest="quantize_lm_head", action="store_false",
                       help="keep the LM head and embedding table in full precision (default: int8)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (SamplingParams)")
    group.add_argument("--max-tokens", "-n", type=int, default=None,
                       help="most tokens to generate (default: the model's generation_config, else 256)")
    group.add_argument("--min-tokens", type=int, default=0, help="generate at least this many before stopping")
    group.add_argument("--temperature", "-t", type=float, default=None,
                       help="0 for greedy; higher is more random (default: generation_config's, else 1.0)")
    group.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    group.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p times the best one")
    group.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    shape = parser.add_argument_group("structured output (at most one; TEXT may be @FILE)").add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="TEXT", help="the output is JSON that validates against this schema")
    shape.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole output matches this regular expression")
    shape.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these (repeatable)")
    shape.add_argument("--grammar", metavar="TEXT", help="the output follows this Lark (or GBNF) grammar")


def sampling_params(args: argparse.Namespace, llm):
    """The CLI's flags over the model's generation_config defaults."""
    return llm.default_sampling_params(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, seed=args.seed, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, structured=_structured(args))


def _structured(args: argparse.Namespace) -> dict | None:
    """The structured-output flag given, if any, as StructuredOutputs fields; "@path" values are read from files."""
    for name in ("json_schema", "regex", "grammar"):
        value = getattr(args, name)
        if value is not None:
            return {name: _read_at_file(value, f"--{name.replace('_', '-')}")}
    if args.json_object:
        return {"json_object": True}
    return {"choice": args.choice} if args.choice else None


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _read_at_file(value: str, flag: str) -> str:
    if not value.startswith("@"):
        return value
    try:
        return open(value[1:], encoding="utf-8").read()
    except OSError as exc:
        raise InvalidArgumentError(f"{flag}: cannot read {value[1:]!r}: {exc.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmgen", description="Generate text with large language models (Hugging Face checkpoints).",
        epilog="Run 'lmgen COMMAND --help' for a command's flags. With no --model, the embedded demo model is used.")
    add_global_args(parser, default="WARNING")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser("generate", help="continue a prompt, streaming the text to stdout",
                              description="Continue a prompt (argument or stdin), streaming the text to stdout.")
    gen.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="talk to a chat model in the terminal",
                               description="Interactive chat with the model's chat template. "
                                           "/help lists the commands (/reset, /system TEXT, /exit); "
                                           "Ctrl-D leaves.")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(run=run_chat)

    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server and web chat page",
        description="Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                    "/v1/responses, /v1/models, /tokenize, /detokenize, /health, /metrics) with a web chat page at /. "
                    "All requests share one continuously batched engine.")
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                             "only; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="name(s) clients pass as 'model' (default: the --model value, or lmgen-demo)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 and /tokenize routes "
                             "(default: $LMGEN_API_KEY; unset: no key needed)")
    server.add_argument("--max-queued-requests", type=int, default=None, metavar="N",
                        help="most sequences that may wait beyond the running batch (--max-num-seqs); more get "
                             "429 with Retry-After (default: no limit)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long in-flight requests may finish before they are aborted (default: 30)")
    server.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                        help="the format the model writes tool calls in (default: the one its chat template shows)")
    server.add_argument("--reasoning-parser", choices=[*sorted(REASONING_PARSERS), NO_REASONING_PARSER], default=None,
                        help="how the model marks its reasoning, returned as reasoning_content: qwen3 (a reply that "
                             "opens <think>), deepseek_r1 (all before </think>) or none (default: the one its chat "
                             "template shows)")
    server.add_argument("--max-request-bytes", default=None, metavar="SIZE",
                        help="largest request body, e.g. 1048576 or 64MiB; larger ones get 413 before they are "
                             "read (default: 16MiB)")
    replicas = serve.add_argument_group("replicas on Ray Serve (pip install 'lmgen[ray]')")
    replicas.add_argument("--replicas", type=_at_least(1), default=None, metavar="N",
                          help="serve N engine replicas on Ray Serve behind this one endpoint, each request routed "
                               "to the replica holding its prompt's beginning, else to the least busy (the Ray "
                               "cluster $RAY_ADDRESS names, else a new local one; default: no Ray, one engine)")
    replicas.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                          help="CPU cores Ray reserves for each replica (default 1)")
    replicas.add_argument("--replica-gpus", type=float, default=0.0, metavar="N",
                          help="GPUs Ray reserves for each replica (default 0; 1 to give each replica a GPU)")
    add_engine_args(serve)
    serve.set_defaults(run=run_serve)

    bench = commands.add_parser(
        "bench", help="measure latency or throughput (optionally beside transformers)",
        description="Measure lmgen on synthetic prompts; --compare transformers runs the same workload "
                    "through transformers' generate in the same run and prints the ratio. `serve` measures "
                    "a running server (--url) instead of loading a model.")
    bench.add_argument("mode", choices=["latency", "throughput", "prefix", "serve", "speculative"],
                       help="latency: TTFT and decode tokens/s per batch size; throughput: N prompts at once; "
                            "prefix: TTFT of a repeated --prompt-len prefix with prefix caching on vs off; "
                            "serve: N concurrent streaming clients against --url; speculative: decode tokens/s "
                            "without and with speculative decoding (--speculative-ngram K, default 5) on an "
                            "editing task whose output copies the prompt and on free writing (chat prompts)")
    bench.add_argument("--sizes", type=int, nargs="+", default=None,
                       help="batch sizes (latency, default 1; speculative, default 1 8), prompt counts "
                            "(throughput, default 1 4 16 64) or concurrent clients (serve, default 1 4 16)")
    bench.add_argument("--url", default=None,
                       help="serve: the OpenAI-compatible server to load, e.g. http://127.0.0.1:8000")
    bench.add_argument("--api-key", default=None, help="serve: the server's API key (default: $LMGEN_API_KEY)")
    bench.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    bench.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt (default 128)")
    bench.add_argument("--repeats", type=int, default=3,
                       help="runs per figure, the median reported (serve: requests per client)")
    bench.add_argument("--compare", choices=["transformers"], default=None, help="run a peer side by side")
    bench.add_argument("--json", default=None, help="also write the figures to this file")
    bench.add_argument("--plot", default=None, metavar="OUT.png",
                       help="also draw the figures into this image (needs matplotlib: pip install 'lmgen[plot]')")
    add_engine_args(bench)
    bench.set_defaults(run=run_bench)

    quantize = commands.add_parser(
        "quantize", help="write an int8 or int4 copy of a checkpoint",
        description="Quantize a checkpoint once and save it (safetensors, config.json's quantization_config, the "
                    "tokenizer files): loading the copy reads its integer weights directly.")
    quantize.add_argument("--model", "-m", default=None, help="checkpoint folder or hub id (default: the demo model)")
    quantize.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    quantize.add_argument("--method", choices=SAVED_METHODS, default="int4", help="default int4")
    add_quantization_args(quantize)
    quantize.add_argument("--out", "-o", required=True, help="the new model's folder (must be new or empty)")
    quantize.set_defaults(run=run_quantize)

    ppl = commands.add_parser(
        "perplexity", help="the model's perplexity on a text file",
        description="Sliding-window perplexity, as in transformers' 'perplexity of fixed-length models': windows "
                    "of --context tokens, --stride apart, each scoring the tokens no earlier window scored.")
    ppl.add_argument("--file", "-f", required=True, help="UTF-8 text file, read as one sequence")
    ppl.add_argument("--context", type=_at_least(2), default=None,
                     help="tokens per window (default: 512, or the model's context if shorter)")
    ppl.add_argument("--stride", type=_at_least(1), default=None,
                     help="tokens between window starts, at most --context (default: context / 2)")
    add_engine_args(ppl)
    ppl.set_defaults(run=run_perplexity)
    cache = commands.add_parser(
        "cache", help="list or clear what lmgen keeps on disk",
        description="lmgen keeps its CPU kernels built for this machine and weights prepared for --map-weights "
                    "under $LMGEN_CACHE (default ~/.cache/lmgen). Both are made again when needed: clearing "
                    "costs a kernel build (about 30 s) or a model's first mapped load.")
    cache.add_argument("action", nargs="?", choices=["list", "clear"], default="list", help="default list")
    cache.add_argument("--kind", choices=disk_cache.KINDS, action="append", default=None,
                       help="only this kind of entry (repeatable; default: all)")
    cache.set_defaults(run=run_cache)
    for command in commands.choices.values():
        add_global_args(command, default=None)
    return parser


def _load(args: argparse.Namespace):
    from lmgen.llm import LLM

    return LLM(args.model, **engine_kwargs(args))


def _stream_to_stdout(llm, prompt, params, echo_prompt: bool = False) -> str:
    """Stream the continuation to stdout, after the prompt if `echo_prompt`; returns the continuation."""
    deltas = llm.stream(prompt, params)
    first = next(deltas)  # the engine checks the request here (grammar, length): a refusal prints nothing
    if echo_prompt:
        sys.stdout.write(prompt)
    text = []
    for delta in itertools.chain([first], deltas):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        text.append(delta.text)
    sys.stdout.write("\n")
    return "".join(text)


def _read_prompt_from_stdin() -> str:
    if sys.stdin.isatty():  # else the command would seem to hang
        print("lmgen: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    return sys.stdin.read().removesuffix("\n")  # the newline `echo` or the Enter key adds is no part of it


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else _read_prompt_from_stdin()
    llm = _load(args)
    _stream_to_stdout(llm, prompt, sampling_params(args, llm), echo_prompt=args.prompt is not None)
    return 0


CHAT_HELP = """commands:
  /help          this list
  /reset         clear the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone removes it); the conversation stays
  /exit          leave (Ctrl-D too)"""


@dataclass
class _Conversation:
    system: str | None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns


def run_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = sampling_params(args, llm)
    conversation = _Conversation(args.system)
    print("lmgen chat: type a message; /help lists the commands, Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.startswith("/"):
            if not _chat_command(line, conversation):
                return 0
        elif line:
            conversation.turns.append({"role": "user", "content": line})
            prompt = llm.tokenizer.encode_chat(conversation.messages(), add_generation_prompt=True)
            conversation.turns.append({"role": "assistant", "content": _stream_to_stdout(llm, prompt, params)})


def _chat_command(line: str, conversation: _Conversation) -> bool:
    """Run a /command typed in the chat (nothing goes to the model); False means leave."""
    command, _, text = line.partition(" ")
    if command == "/exit":
        return False
    if command == "/help":
        note = CHAT_HELP
    elif command == "/reset":
        conversation.turns.clear()
        note = "(history cleared)"
    elif command == "/system":
        conversation.system = text.strip() or None
        note = "(system prompt set)" if conversation.system else "(system prompt removed)"
    else:
        note = f"unknown command {command}: /help lists the commands"
    print(note, file=sys.stderr)
    return True


def require_extra(extra: str, command: str) -> None:
    """Fail at once, before any model loads, when an optional extra is not installed."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise LmgenError(f"{command} needs the {extra} extra ({', '.join(missing)} not installed): "
                         f'pip install "lmgen[{extra}]" (in a source checkout: pip install -e ".[{extra}]")')


def run_serve(args: argparse.Namespace) -> int:
    require_extra("server", "lmgen serve")
    if args.replicas is not None:
        require_extra("ray", "lmgen serve --replicas")
    engine_config, settings, replicas = serve_settings(args)  # bad flags fail here, before listening
    if replicas is not None:
        from lmgen.server.ray_app import serve_replicas

        return serve_replicas(engine_config, settings, replicas, host=args.host, port=args.port)
    from lmgen.server.launch import serve

    return serve(engine_config, settings, host=args.host, port=args.port)


def serve_settings(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings, ReplicaOptions | None]:
    """`lmgen serve`'s flags as (EngineConfig, ServerSettings, ReplicaOptions or None without --replicas)."""
    from lmgen.engine.config import EngineConfig, parse_size
    from lmgen.server.serving import ServerSettings

    config = EngineConfig(model=args.model, **engine_kwargs(args))
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise InvalidArgumentError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    limits = {}
    if args.max_request_bytes is not None:
        limits["max_request_bytes"] = parse_size(args.max_request_bytes)
        if limits["max_request_bytes"] < 1:
            raise InvalidArgumentError(f"--max-request-bytes must be at least 1 byte, got {args.max_request_bytes!r}")
    names = tuple(args.served_model_name or [args.model or "lmgen-demo"])
    settings = ServerSettings(served_model_names=names, api_key=args.api_key or os.environ.get("LMGEN_API_KEY"),
                              max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
                              tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                              **limits)
    replicas = None
    if args.replicas is not None:
        from lmgen.server.ray_app import ReplicaOptions

        replicas = ReplicaOptions(args.replicas, args.replica_cpus, args.replica_gpus)
    return config, settings, replicas


def run_bench(args: argparse.Namespace) -> int:
    from lmgen import bench

    sizes = args.sizes or {"latency": [1], "serve": [1, 4, 16], "speculative": [1, 8]}.get(args.mode, [1, 4, 16, 64])
    if args.plot:
        bench.pyplot()  # a missing matplotlib fails now, not after the run
    if args.mode == "serve":
        from lmgen.bench_serve import serve_rows

        print(f"{args.url}: prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} request(s) "
              f"per client; {bench.machine()}")
        rows = serve_rows(args.url, sizes, args.prompt_len, args.new_tokens, args.repeats, args.api_key)
    elif args.mode == "speculative":
        from lmgen.bench_speculative import speculative_rows

        if args.compare == "transformers":
            bench.require_transformers()
        print(f"{args.model or 'the demo model'}: chat prompts, greedy, {args.new_tokens} new tokens, one run each; "
              f"{bench.machine()}")
        rows = speculative_rows(args.model, engine_kwargs(args), sizes, args.new_tokens, args.compare)
    else:
        if args.compare == "transformers":
            bench.require_transformers()  # before lmgen's own model loads
        llm = _load(args)
        engine = llm.engine
        quantized = f" {engine.quantization.method}" if engine.quantization else ""
        cache_tokens = engine.kv_cache.num_blocks * engine.kv_cache.block_size
        print(f"{engine.model_path.name} {engine.dtype}{quantized}, KV cache {cache_tokens} tokens in "
              f"{engine.kv_cache_dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, median of "
              f"{args.repeats}; {bench.machine()}")
        rows = bench.run_bench(llm, args.mode, sizes, args.prompt_len, args.new_tokens, args.repeats, args.compare)
    bench.report(rows, args.json, args.mode)
    if args.plot:
        bench.plot(rows, args.mode, args.plot)
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from lmgen.loader.checkpoint import DEMO_MODEL_PATH
    from lmgen.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model or DEMO_MODEL_PATH, args.out, args.method,
                              args.group_size or DEFAULT_GROUP_SIZE, args.quantize_lm_head, args.revision)
    print(f"wrote {args.method} checkpoint to {out}")
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    from lmgen.perplexity import perplexity

    try:
        text = open(args.file, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read --file {args.file}: {exc}") from None
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise InvalidArgumentError(f"--stride ({args.stride}) must be at most --context ({args.context})")
    result = perplexity(_load(args), text, args.context, args.stride)
    windows = (f"1 window of {result.window_tokens} tokens" if result.num_windows == 1 else
               f"{result.num_windows} windows of {result.window_tokens} tokens, stride {result.stride}")
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats over {result.num_tokens} "
          f"scored tokens; {windows})")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    kinds = tuple(args.kind or disk_cache.KINDS)
    found = disk_cache.clear(kinds) if args.action == "clear" else disk_cache.entries(kinds)
    for entry in found:
        print(disk_cache.describe(entry))
    total = disk_cache.format_size(sum(entry.size for entry in found))
    where = ", ".join(str(disk_cache.directory(kind)) for kind in kinds)
    print(f"{'removed' if args.action == 'clear' else 'in'} {where}: {len(found)} file(s), {total}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except LmgenError as exc:
        print(f"lmgen: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(message: str) -> str:
    """A multi-line error message on one line. Such messages (llguidance's regex and grammar errors)
    indent excerpts of the input under a caret: those lines go, the others are joined."""
    first, *rest = message.splitlines() or [""]
    return " ".join([first, *(line.removeprefix("error: ") for line in rest if line and not line[0].isspace())])
