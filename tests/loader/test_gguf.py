"""GGUF files: tiny ones written from tiny transformers checkpoints (tests/gguf_files.py) load into the
model transformers runs from the checkpoint, and into the model and tokenizer transformers makes of
the same GGUF file (``gguf_file=``); every tensor type dequantizes as the gguf package does; a
malformed file is a clear error."""

from __future__ import annotations

import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from checkpoints import build_checkpoint
from gguf_files import K_QUANTS, bpe_metadata, random_k_blocks, sentencepiece_metadata, write_gguf
from lmgen import LLM, AutoModelForCausalLM, AutoTokenizer, SamplingParams
from lmgen.errors import ModelNotFoundError, UnsupportedModelError
from lmgen.loader import gguf as lmgen_gguf
from lmgen.loader.checkpoint import resolve_model_path
from lmgen.loader.gguf import GGUFCheckpoint
from lmgen.loader.model import read_checkpoint
from tokenizer_fixtures import GEMMA_TEMPLATE, MISTRAL_TEMPLATE, Backends, build_gemma, build_mistral

PROMPTS = [[1, 17, 230, 45, 99], [1, 400, 3, 3, 72, 5, 9]]
TEXTS = ["Hello world! The quick brown fox, 12345 café 🙂.", "  two leading spaces\nand a newline\ttab",
         "Portugal is a country; Lisbon is its capital. <s> inside </s>"]
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2 + 2?"}]
# tiny variant -> llama.cpp architecture (config changes where llama.cpp fixes a value the checkpoint sets)
ARCHITECTURES = {
    "llama": ("llama", {}), "llama-untied-bias-headdim": ("llama", {}), "llama3-rope": ("llama", {}),
    "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16}), "gemma3": ("gemma3", {}), "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}), "granite": ("granite", {}), "smollm3": ("smollm3", {}), "gpt2": ("gpt2", {}),
    # mixtures of experts: experts in every layer, Mixtral as llama without its sliding window (llama.cpp's way)
    "qwen2-moe": ("qwen2moe", {}), "qwen3-moe": ("qwen3moe", {"mlp_only_layers": None}),
    "mixtral": ("llama", {"sliding_window": None}),
}


def greedy(llm_or_model, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    if isinstance(llm_or_model, LLM):
        outputs = llm_or_model.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outputs]
    rows = []
    for prompt in prompts:
        out = llm_or_model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                                    min_new_tokens=max_tokens)
        rows.append(out[0, len(prompt):].tolist())
    return rows


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """(checkpoint folder, GGUF file in a folder of its own) of a variant, written once."""
    cache = {}

    def make(variant: str, arch: str, **changes):
        key = (variant, arch, tuple(sorted(changes.items())))
        if key not in cache:
            folder = build_checkpoint(tmp_path_factory.mktemp(variant), variant, **changes)
            cache[key] = folder, write_gguf(folder, tmp_path_factory.mktemp(f"{variant}-gguf") / "model.gguf", arch)
        return cache[key]

    return make


@pytest.mark.parametrize("variant", list(ARCHITECTURES))
def test_gguf_runs_as_the_checkpoint_it_was_written_from(gguf_model, variant):
    """Every architecture lmgen maps: llama.cpp's names, layouts (q/k permutation, Gemma's 1 + w, GPT-2's
    transposes), config keys and rope factors (Llama 3's rope_freqs, Phi-3's longrope) undone exactly."""
    arch, changes = ARCHITECTURES[variant]
    folder, file = gguf_model(variant, arch, **changes)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    llm = LLM(str(file), dtype="float32", kv_cache_memory="16MiB")
    assert llm.engine.hf_config["architectures"] == [type(reference).__name__]
    assert greedy(llm, PROMPTS) == greedy(reference, PROMPTS)


def test_llama_gguf_matches_transformers_gguf_load(gguf_model):
    """The same file through transformers' GGUF loader: weights (q/k permutation undone), tokenizer
    ids, chat template, and the greedy continuation of a text prompt."""
    folder, file = gguf_model("llama-untied-bias-headdim", "llama")
    reference = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                                  dtype=torch.float32)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype="float32",
                                                 kv_cache_memory="16MiB")
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    assert [tokenizer(t)["input_ids"] for t in TEXTS] == [ref_tokenizer(t)["input_ids"] for t in TEXTS]
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        ref_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(TEXTS[0], return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours.tolist() == theirs.tolist()


SENTENCEPIECE = {  # llama.cpp architecture -> (tokenizer fixture, its template, special tokens, tiny variant)
    "llama": (build_mistral, MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, {}),
    "phi3": (build_mistral, MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, {}),
    "gemma2": (build_gemma, GEMMA_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                                             "pad_token": "<pad>"}, {"query_pre_attn_scalar": 16}),
}


@pytest.mark.parametrize("arch", list(SENTENCEPIECE))
def test_sentencepiece_tokenizer_matches_transformers(tmp_path, arch):
    """A Llama 2 style vocabulary (scores and token types, no merges: they are derived from the scores;
    byte fallback; BOS added), Phi-3's (spaces by a normalizer) and Gemma's (merges in the file's order,
    no prefix space) give transformers' ids, decoded text and chat template rendering."""
    build, template, specials, changes = SENTENCEPIECE[arch]
    metadata = sentencepiece_metadata(build(tmp_path / "spm", Backends()), template, specials)
    folder = build_checkpoint(tmp_path / "model", arch, vocab_size=len(metadata["tokenizer.ggml.tokens"]), **changes)
    file = write_gguf(folder, tmp_path / "spm.gguf", arch, tokenizer=metadata)
    ours = read_checkpoint(file).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    texts = [*TEXTS, "日本語のテキスト Привет résumé", "I'm sure you're right: it's what we've said", "   spaced  out "]
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.apply_chat_template(MESSAGES[:1], add_generation_prompt=True) == \
        ref.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (ref.bos_token, ref.eos_token, ref.unk_token)


def test_bpe_tokenizer_with_a_split_pattern_matches_transformers(gguf_model, tmp_path):
    """A byte-level vocabulary whose pre-tokenizer name (qwen2) stands for a split pattern."""
    folder, _ = gguf_model("qwen2", "qwen2")
    file = write_gguf(folder, tmp_path / "qwen2.gguf", "qwen2", tokenizer=bpe_metadata(folder, pre="qwen2"))
    ours = read_checkpoint(file).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    for text in [*TEXTS, "numbers 1234567 and  spaces   here"]:
        assert ours.encode(text) == ref(text)["input_ids"], text


MIXED_TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0, "ffn_gate": Q.F16,
               "ffn_up": Q.BF16, "ffn_down": Q.Q5_0, "token_embd": Q.Q8_0, "output": Q.Q6_K}


def mixed_type(name: str, array: np.ndarray) -> Q:
    return next((kind for part, kind in MIXED_TYPES.items() if name.split(".")[-2] == part), Q.F32)


def test_quantized_gguf_matches_transformers_gguf_load(tmp_path):
    """A file of every tensor type (K-quants as random blocks with valid scales) dequantized as transformers
    dequantizes it (the gguf package), in float32: the same greedy tokens."""
    folder = build_checkpoint(tmp_path / "model", "llama", hidden_size=256, intermediate_size=512, head_dim=64,
                              tie_word_embeddings=False)
    file = write_gguf(folder, tmp_path / "mixed.gguf", "llama", tensor_type=mixed_type)
    assert {Q(info.ggml_type) for info in GGUFCheckpoint.open(file).tensors.values()} == {*MIXED_TYPES.values(), Q.F32}
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32)
    llm = LLM(str(file), dtype="float32", kv_cache_memory="16MiB")
    assert greedy(llm, PROMPTS) == greedy(reference, PROMPTS)


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q6_K], ids=lambda kind: kind.name)
def test_dequantization_equals_the_gguf_package(tmp_path, monkeypatch, kind):
    """Read a few rows at a time, and converted to the requested dtype, every type gives gguf's values."""
    monkeypatch.setattr(lmgen_gguf, "_CHUNK_VALUES", 700)  # several rows per step, and a last short step
    rng = np.random.default_rng(0)
    values = rng.standard_normal((9, 512)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    data = (random_k_blocks(values.shape, kind, rng) if kind in K_QUANTS else
            values.astype(np.float16) if kind == Q.F16 else values if kind == Q.F32 else gguf.quants.quantize(values, kind))
    writer.add_tensor("t.weight", data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    expected = torch.from_numpy(np.array(gguf.quants.dequantize(gguf.GGUFReader(tmp_path / "t.gguf").tensors[0].data, kind)))
    checkpoint = GGUFCheckpoint.open(tmp_path / "t.gguf")
    tensor = checkpoint.tensors["t.weight"]
    assert tensor.shape == (9, 512)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = lmgen_gguf.GGUFTensor(checkpoint._buffer, tensor, dtype).load()
        assert torch.equal(loaded, expected.to(dtype))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_requantized_while_loading_as_from_the_checkpoint(gguf_model, monkeypatch, method):
    """quantization= quantizes the dequantized tensors a few rows at a time as they load (here: a row or
    one head's rows, q/k rows put back in place first): the same weights, the same tokens, as quantizing
    the float checkpoint."""
    import lmgen.layers.quant

    monkeypatch.setattr(lmgen.layers.quant, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(lmgen_gguf, "_CHUNK_VALUES", 64)
    folder, file = gguf_model("llama", "llama")
    from_gguf = LLM(str(file), dtype="float32", quantization=method, quantization_group_size=32,
                    kv_cache_memory="16MiB")
    from_folder = LLM(str(folder), dtype="float32", quantization=method, quantization_group_size=32,
                      kv_cache_memory="16MiB")
    assert greedy(from_gguf, PROMPTS) == greedy(from_folder, PROMPTS)


def test_generation_stops_at_the_files_end_ids(gguf_model):
    folder, file = gguf_model("llama", "llama")
    llm = LLM(str(file), kv_cache_memory="16MiB")
    assert llm.engine.eos_token_ids == {2}
    assert llm.tokenizer.chat_template == read_checkpoint(folder).tokenizer.chat_template


def test_running_a_file_imports_neither_transformers_nor_torch_dynamo(gguf_model):
    """Each costs tens of MiB of resident memory (torch._dynamo 70 MiB) and a second or more of start-up, and
    lmgen needs neither unless asked to compile: loaded and run in a fresh process, they stay unimported."""
    _, file = gguf_model("llama", "llama")
    script = (f"import sys; from lmgen import LLM; LLM({str(file)!r}).generate([[1, 17, 230]]); "
              "print(sorted({'transformers', 'torch._dynamo'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"


def test_cli_generates_from_a_gguf_file(gguf_model):
    from lmgen.cli import main

    _, file = gguf_model("llama", "llama")
    assert main(["generate", "--model", str(file), "--max-tokens", "3", "--temperature", "0", "Hello"]) == 0


# ---- malformed files ---------------------------------------------------------------------------
def test_malformed_files_are_clear_errors(gguf_model, tmp_path):
    _, file = gguf_model("llama", "llama")
    data = file.read_bytes()
    cases = {
        "truncated.gguf": (data[: len(data) - 100], "truncated"),
        "header-cut.gguf": (data[:300], "truncated"),
        "vocabulary-cut.gguf": (data[:data.index(b"tokenizer.ggml.token_type") - 11], "tokenizer.ggml.tokens runs past"),
        "magic.gguf": (b"GGML" + data[4:], "not the magic b'GGUF'"),
        "empty.gguf": (b"", "empty"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UnsupportedModelError, match=message):
            GGUFCheckpoint.open(tmp_path / name)


def test_unknown_tensor_type_and_architecture_are_named(gguf_model, tmp_path):
    _, file = gguf_model("llama", "llama")
    data = bytearray(file.read_bytes())
    info = GGUFCheckpoint.open(file)
    # the type of the first tensor: its u32 sits after its name, dimension count and dimensions
    name = next(iter(info.tensors))
    at = data.index(name.encode()) + len(name) + 4 + 8 * len(info.tensors[name].shape)
    data[at:at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "type.gguf").write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match=f"tensor {name} is stored as ggml type 250"):
        GGUFCheckpoint.open(tmp_path / "type.gguf")
    data = file.read_bytes().replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00mamba", 1)
    (tmp_path / "arch.gguf").write_bytes(data)
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'mamba' is not supported"):
        LLM(str(tmp_path / "arch.gguf"))


def test_hub_repo_gguf_file_is_read_from_the_cache_offline(monkeypatch, tmp_path, gguf_model):
    """LLM("org/repo", gguf_file=...) fetches that one file (here: from the cache, offline)."""
    import huggingface_hub.constants as hub_constants

    _, file = gguf_model("llama", "llama")
    repo = tmp_path / "cache" / "models--org--tiny-gguf"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(file, snapshot / "tiny-Q8_0.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model_path("org/tiny-gguf", gguf_file="tiny-Q8_0.gguf") == snapshot / "tiny-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="download org/tiny-gguf tiny-Q4_K_M.gguf"):
        resolve_model_path("org/tiny-gguf", gguf_file="tiny-Q4_K_M.gguf")
    with pytest.raises(ModelNotFoundError, match="no GGUF file 'other.gguf' in"):
        resolve_model_path(str(file.parent), gguf_file="other.gguf")


def test_without_the_gguf_package_the_error_names_the_install(monkeypatch, gguf_model):
    _, file = gguf_model("llama", "llama")
    monkeypatch.setattr(lmgen_gguf, "gguf", None)
    with pytest.raises(UnsupportedModelError, match=r'pip install "lmgen\[gguf\]"'):
        LLM(str(file))


def test_lmgen_quantize_refuses_a_gguf_file(gguf_model, tmp_path):
    from lmgen.errors import InvalidArgumentError
    from lmgen.quantize import quantize_checkpoint

    _, file = gguf_model("llama", "llama")
    with pytest.raises(InvalidArgumentError, match="is a GGUF file"):
        quantize_checkpoint(str(file), tmp_path / "out")
