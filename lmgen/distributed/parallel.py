"""Tensor parallelism's processes: rank 0 runs the engine, the other ranks run their shares of the model.

The scheduler, sampler and detokenizer live on rank 0 only. Its model is a ``TensorParallelLM``: rank
0's share of the model (lmgen/distributed/sharding.py) behind the model contract, which before each of
its calls broadcasts the command and its inputs to the other ranks, so that all ranks run the same
forward (with its all-reduces) in step. A command is a header ([command, ints, float rows]) and its
payload: a step's flat batch as one int64 tensor (the runner's tensors, concatenated), hidden rows for
logits (each rank computes its vocabulary slice's, gathered to rank 0), KV block copies, the cache's
size. Block tables are the same on every rank; each rank's cache holds its own key/value heads.

Workers are started by lmgen (``torch.multiprocessing``, spawned once per process and reused by the
next tensor-parallel engine of that process) or are the other ranks of a torchrun launch (whose ranks
above 0 serve as workers inside ``Engine(...)`` and exit when rank 0 does). gloo on a CPU, NCCL on CUDA.
A worker that dies fails rank 0's next command at once (its process is checked first, and gloo's
connection to it closes); an idle worker is pinged so that its wait stays inside the process group's
timeout, which bounds any hang.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lmgen.cache.kv_cache import KVCache
from lmgen.distributed.sharding import Shard
from lmgen.errors import InvalidArgumentError, LmgenError
from lmgen.layers.attention import AttentionMetadata
from lmgen.loader.model import LoadedModel, load_model, read_checkpoint
from lmgen.models import model_class

logger = logging.getLogger(__name__)

#: How long a rank waits in one collective before it fails (a worker that hangs rather than dies).
TIMEOUT = timedelta(minutes=10)
#: An idle rank 0 pings its workers this often, keeping their wait for the next command inside TIMEOUT.
PING_SECONDS = 60.0


class Command(enum.IntEnum):
    STOP = 0  # the worker process exits
    PING = 1  # nothing to do
    LOAD = 2  # load a model's share: (EngineConfig, checkpoint path) follow as objects
    UNLOAD = 3  # drop it
    CACHE = 4  # allocate the KV cache: [num_blocks, block_size]
    COPY = 5  # copy KV blocks: [source, destination] pairs, flat
    FORWARD = 6  # a step's flat batch (pack_step)
    LOGITS = 7  # hidden rows [N, hidden] follow; the ranks' logits are gathered to rank 0


class TensorParallelError(LmgenError, RuntimeError):
    """A tensor-parallel rank died or failed: the engine cannot go on."""


class Ranks:
    """Rank 0's side of the process group: sends commands to the workers, one at a time."""

    def __init__(self, world: int, device: torch.device, processes: list[mp.Process]) -> None:
        self.world, self.device, self.processes = world, device, processes
        self.failed: str | None = None
        self.holder: str | None = None  # the model whose shares the workers hold
        self._threads = torch.get_num_threads()  # rank 0's own, given back on release
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._stop_pings = threading.Event()
        threading.Thread(target=self._ping, name="lmgen-tp-ping", daemon=True).start()

    @contextmanager
    def issue(self, command: Command, ints: torch.Tensor | None = None, floats: torch.Tensor | None = None,
              objects: list | None = None) -> Iterator[None]:
        """Send `command` to every worker, then run the block (rank 0's part, collectives included) under the
        same lock; any failure leaves the ranks out of step, so it fails every later command too."""
        with self._lock:
            self._check()
            try:
                rows = 0 if floats is None else floats.shape[0]
                header = [int(command), 0 if ints is None else ints.numel(), rows]
                dist.broadcast(torch.tensor(header, device=self.device), 0)
                if objects is not None:
                    dist.broadcast_object_list(objects, 0, device=self.device)
                for payload in (ints, floats):
                    if payload is not None and payload.numel():
                        dist.broadcast(payload.to(self.device).contiguous(), 0)
                self._last_sent = time.monotonic()
                yield
            except Exception as exc:
                for process in self.processes:  # a worker that died is reaped in a moment: name it
                    process.join(timeout=1)
                self.failed = self._dead() or f"a tensor-parallel collective failed: {exc}"
                raise TensorParallelError(self.failed) from exc

    def _check(self) -> None:
        self.failed = self.failed or self._dead()
        if self.failed:
            raise TensorParallelError(self.failed)

    def _dead(self) -> str | None:
        """What went wrong, if a worker process that lmgen started has exited."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return (f"tensor-parallel worker rank {rank} exited (code {process.exitcode}): the engine cannot go "
                        "on; start a new one")
        return None

    def _ping(self) -> None:
        while not self._stop_pings.wait(PING_SECONDS / 4):
            if time.monotonic() - self._last_sent >= PING_SECONDS and not self.failed:
                try:
                    with self.issue(Command.PING):
                        pass
                except TensorParallelError:
                    logger.error("tensor parallelism: %s", self.failed)

    def hold(self, model_path: Path, config) -> None:
        """Have the workers load their shares of `model_path`; rank 0 runs on its share of the cores meanwhile."""
        with self.issue(Command.LOAD, objects=[config, str(model_path)]):
            self.holder = str(model_path)
        self._threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(_core_share(self.world))

    def release(self) -> None:
        """Have the workers drop the model they hold (its engine is closed or gone); rank 0 takes its threads back."""
        if self.holder is not None and not self.failed:
            with self.issue(Command.UNLOAD):
                self.holder = None
        torch.set_num_threads(self._threads)

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's vocabulary slice of the logits [N, vocab / world], side by side on rank 0."""
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def stop(self) -> None:
        """End the workers (at exit, or before starting afresh): told to stop, or killed if the ranks failed."""
        self._stop_pings.set()
        self.holder = None  # nothing is left to release
        if not self.failed:
            try:
                with self.issue(Command.STOP):
                    pass
            except TensorParallelError:
                pass  # stopping anyway
        for process in self.processes:
            process.join(timeout=0 if self.failed else 5)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def torchrun_world_size() -> int:
    """Under torchrun (which sets TORCHELASTIC_RUN_ID), its number of processes; else 1."""
    return int(os.environ["WORLD_SIZE"]) if _under_torchrun() else 1


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


_ranks: Ranks | None = None  # this process's workers: a process has one default process group


def start_ranks(world: int, device: torch.device) -> Ranks:
    """This process's workers for `world` ranks: those of a torchrun launch (where ranks above 0 become
    workers here and exit when rank 0 does), else lmgen's own, spawned or reused."""
    global _ranks
    if _ranks is not None and _ranks.holder is not None and not _ranks.failed:
        raise InvalidArgumentError(f"this process's tensor-parallel workers run {_ranks.holder}: close that "
                                   "engine first (engine.close())")
    if _ranks is not None and (_ranks.failed or _ranks.world != world or _ranks.device != device):
        _ranks.stop()
        _ranks = None
    if _ranks is None:
        _ranks = _join_torchrun(world, device) if _under_torchrun() else _spawn(world, device)
    return _ranks


@atexit.register
def _stop_ranks() -> None:
    if _ranks is not None:
        _ranks.stop()


def _spawn(world: int, device: torch.device) -> Ranks:
    rendezvous = f"file://{Path(tempfile.mkdtemp(prefix='lmgen-tp-')) / 'store'}"
    context = mp.get_context("spawn")
    processes = [context.Process(target=_worker_main, args=(rank, world, rendezvous, device.type),
                                 name=f"lmgen-tp-rank{rank}", daemon=True) for rank in range(1, world)]
    for process in processes:
        process.start()
    _init_group(0, world, rendezvous, device)
    return Ranks(world, device, processes)


def _join_torchrun(world: int, device: torch.device) -> Ranks:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise InvalidArgumentError(f"tensor_parallel_size is {world} but torchrun started {size} processes: "
                                   "make them equal (or leave --tensor-parallel-size out under torchrun)")
    if rank:
        _worker_main(rank, world, "env://", device.type)
        raise SystemExit(0)
    _init_group(0, world, "env://", device)
    return Ranks(world, device, [])


def _init_group(rank: int, world: int, rendezvous: str, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    elif device.type == "cpu" and rank:  # rank 0 takes its share while its workers hold a model (Ranks.hold)
        torch.set_num_threads(_core_share(world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous, rank=rank,
                            world_size=world, timeout=TIMEOUT)


def _core_share(world: int) -> int:
    """Each rank's threads on a CPU: more threads than cores spin at every all-reduce."""
    return max(1, (os.cpu_count() or 1) // world)


def rank_device(device_type: str, rank: int) -> torch.device:
    """A worker's device: on CUDA, its machine's GPU of its local rank (torchrun's LOCAL_RANK, else its rank)."""
    if device_type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())


class TensorParallelLM(nn.Module):
    """Rank 0's model under tensor parallelism: its share, driving the other ranks' (the model contract)."""

    def __init__(self, model: nn.Module, vocab_size: int, ranks: Ranks) -> None:
        super().__init__()
        self.rank_model, self.ranks = model, ranks
        self.spec = replace(model.spec, vocab_size=vocab_size)  # the rank's heads; the whole vocabulary
        self.packed_modules, self.checkpoint_tensors = model.packed_modules, model.checkpoint_tensors
        self._release = weakref.finalize(self, ranks.release)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        with self._issue(Command.FORWARD, pack_step(input_ids, positions, token_seq_lens, meta)):
            return self.rank_model(input_ids, positions, token_seq_lens, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._issue(Command.LOGITS, floats=hidden):
            return self.ranks.gather_logits(self.rank_model.compute_logits(hidden), self.spec.vocab_size)

    def one_call_layers(self, meta: AttentionMetadata, kv_caches: list) -> None:
        return self.rank_model.one_call_layers(meta, kv_caches)  # None: see Shard.finish

    def share_cache(self, kv_cache: KVCache) -> None:
        """Have every worker allocate a cache of as many blocks, and mirror the engine's block copies there."""
        with self.ranks.issue(Command.CACHE, torch.tensor([kv_cache.num_blocks, kv_cache.block_size])):
            pass
        copy_blocks = kv_cache.copy_blocks

        def mirrored(copies: list[tuple[int, int]]) -> None:
            if copies:
                with self._issue(Command.COPY, torch.tensor(copies).flatten()):
                    copy_blocks(copies)
        kv_cache.copy_blocks = mirrored

    def _issue(self, command: Command, ints: torch.Tensor | None = None, floats: torch.Tensor | None = None):
        if not self._release.alive:
            raise TensorParallelError("this tensor-parallel engine is closed")
        return self.ranks.issue(command, ints, floats)

    def close(self) -> None:
        """Release the workers (for the next tensor-parallel engine of this process); also when collected."""
        self._release()


def load_tensor_parallel(config, model_path: Path, hf_config: dict, device: torch.device,
                         load: Callable[..., LoadedModel]) -> LoadedModel:
    """Rank 0's LoadedModel (a TensorParallelLM) for `config.tensor_parallel_size` ranks; `load` loads a
    share (load_model's arguments but the shard)."""
    world = config.tensor_parallel_size
    whole = model_class(hf_config).spec_from_config(hf_config)
    Shard(0, world).spec(whole)  # the sizes the ranks cannot share are refused before any process starts
    ranks = start_ranks(world, device)
    logger.info("tensor parallelism: %d ranks (%s)", world, dist.get_backend())
    ranks.hold(model_path, config)
    try:
        loaded = load(shard=Shard(0, world))
    except Exception:  # the workers fail alike (or wait for rank 0's next command): the next engine starts anew
        ranks.failed = f"loading {model_path} failed"
        raise
    return replace(loaded, model=TensorParallelLM(loaded.model, whole.vocab_size, ranks))


def pack_step(input_ids: torch.Tensor, positions: torch.Tensor, token_seq_lens: torch.Tensor,
              meta: AttentionMetadata) -> torch.Tensor:
    """A step's inputs as one int64 tensor (unpack_step reverses it)."""
    head = torch.tensor([meta.max_query_len, meta.prepared, *meta.block_tables.shape], device=input_ids.device)
    return torch.cat([head, input_ids, positions, token_seq_lens, meta.slot_mapping, meta.token_request,
                      meta.token_offset, meta.query_starts, meta.seq_lens, meta.block_tables.flatten()])


def unpack_step(ints: torch.Tensor, block_size: int, windows: set[int | None], head_dim: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    max_query_len, prepared, batch, width = ints[:4].tolist()
    num_tokens = (ints.numel() - 4 - batch * (2 + width)) // 6
    (input_ids, positions, token_seq_lens, slots, token_request, token_offset, query_starts, seq_lens,
     tables) = ints[4:].split([num_tokens] * 6 + [batch, batch, batch * width])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables.view(batch, width), query_starts=query_starts,
                             seq_lens=seq_lens, token_request=token_request, token_offset=token_offset,
                             max_query_len=max_query_len, block_size=block_size)
    if prepared:  # rank 0 prepared its attention (masks, a mixed step's split) this step: so do we
        meta.prepare(windows, head_dim, ints.device)
    return input_ids, positions, token_seq_lens, meta


def _worker_main(rank: int, world: int, rendezvous: str, device_type: str) -> None:
    """A worker process: join the group, then serve rank 0's commands until it says stop (or dies)."""
    device = rank_device(device_type, rank)
    _init_group(rank, world, rendezvous, device)
    worker = _Worker(Shard(rank, world), device)
    with torch.inference_mode():
        while worker.serve_one():
            pass
    dist.destroy_process_group()


class _Worker:
    """A rank above 0: its share of the current model and of the KV cache."""

    def __init__(self, shard: Shard, device: torch.device) -> None:
        self.shard, self.device = shard, device
        self.model: nn.Module | None = None
        self.cache: KVCache | None = None
        self.dtype = self.cache_dtype = torch.float32

    def serve_one(self) -> bool:
        """Receive and run one command; False after STOP."""
        header = torch.empty(3, dtype=torch.int64, device=self.device)
        dist.broadcast(header, 0)
        command, num_ints, rows = (int(v) for v in header.tolist())
        objects = [None, None]
        if command == Command.LOAD:
            dist.broadcast_object_list(objects, 0, device=self.device)
        ints = self._receive(torch.empty(num_ints, dtype=torch.int64, device=self.device))
        floats = self._receive(torch.empty(rows, self.model.spec.hidden_size, dtype=self.dtype, device=self.device)
                               if rows else None)
        match command:
            case Command.STOP:
                return False
            case Command.LOAD:
                self._load(*objects)
            case Command.UNLOAD:
                self.model = self.cache = None
            case Command.CACHE:
                spec = self.model.spec
                self.cache = KVCache(spec.num_layers, int(ints[0]), int(ints[1]), spec.num_kv_heads, spec.head_dim,
                                     self.cache_dtype, self.device)
            case Command.COPY:
                self.cache.copy_blocks(ints.view(-1, 2).tolist())
            case Command.FORWARD:
                spec = self.model.spec
                step = unpack_step(ints, self.cache.block_size, set(spec.layer_windows), spec.head_dim)
                self.model(*step, self.cache.layers)
            case Command.LOGITS:
                dist.gather(self.model.compute_logits(floats), None, dst=0)
        return True

    @staticmethod
    def _receive(payload: torch.Tensor | None) -> torch.Tensor | None:
        if payload is not None and payload.numel():
            dist.broadcast(payload, 0)
        return payload

    def _load(self, config, model_path: str) -> None:
        checkpoint = read_checkpoint(Path(model_path))
        hf_config = checkpoint.hf_config
        self.dtype = config.torch_dtype(hf_config.get("dtype") or hf_config.get("torch_dtype"), self.device)
        self.cache_dtype = config.kv_cache_torch_dtype(self.dtype)
        self.model = load_model(checkpoint, self.device, self.dtype, config.max_model_len, config.quant_config(),
                                config.quantization_group_size is not None, self.shard).model
