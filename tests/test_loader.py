"""Loading checkpoints: local folders, sharded weights, the hub cache, and every way it can fail."""

import json
import re
import shutil
import struct

import pytest
import torch
import transformers

from lmgen import LLM, InvalidArgumentError, ModelNotFoundError, SamplingParams, UnsupportedModelError
from lmgen.loader.checkpoint import iter_tensors, resolve_model_path


def copy_checkpoint(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_sharded_checkpoint_loads_like_the_single_file(llama_path, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_path / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    params = SamplingParams(max_tokens=8, temperature=0)
    single = LLM(str(llama_path), dtype="float32").generate("Lisbon", params)[0]
    assert LLM(str(sharded), dtype="float32").generate("Lisbon", params)[0].outputs[0].token_ids == \
        single.outputs[0].token_ids


def test_bfloat16_checkpoint_runs_in_float32_and_bfloat16(llama_path, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_path).to(torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_path / name, folder / name)
    from lmgen.layers.precision import native_on_cpu

    auto = LLM(str(folder))  # the checkpoint's dtype, unless this CPU computes it slower than float32
    assert auto.engine.dtype == (torch.bfloat16 if native_on_cpu(torch.bfloat16) else torch.float32)
    bf16 = LLM(str(folder), dtype="bfloat16")
    assert bf16.engine.model.model.norm.weight.dtype == torch.bfloat16
    assert LLM(str(folder), dtype="float32").engine.model.model.norm.weight.dtype == torch.float32
    prompts = ["Hi", "a prompt long enough that its prefill takes the float32 path for many rows at once"]
    for llm in (auto, bf16):  # short decode steps read bf16 weights directly; the long prefill upcasts
        outputs = llm.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
        assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5]


def test_missing_folder_names_the_path():
    with pytest.raises(ModelNotFoundError, match="no checkpoint folder at './nowhere'"):
        LLM("./nowhere")


def test_unknown_hub_id_offline_names_the_id_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match=r"'someone/no-such-model'.*HF_HUB_OFFLINE.*`hf download someone/no"):
        LLM("someone/no-such-model")


def test_the_download_command_is_the_installed_huggingface_hub_s(monkeypatch):
    """huggingface_hub 0.34 added `hf`; before it, `huggingface-cli` was the only command."""
    import importlib.metadata

    from lmgen.loader.checkpoint import _hub_download_command

    class OldHub:
        entry_points = [importlib.metadata.EntryPoint("huggingface-cli", "huggingface_hub.commands:main",
                                                      "console_scripts")]

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: OldHub())
    assert _hub_download_command("org/name") == "huggingface-cli download org/name"


def test_hub_id_is_read_from_the_cache_offline(monkeypatch, tmp_path, llama_path):
    """A model already in the Hugging Face cache loads by its id with no network."""
    cache = tmp_path / "cache"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    copy_checkpoint(llama_path, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("org/tiny") == snapshot


@pytest.mark.parametrize("missing, error, message", [
    ("config.json", ModelNotFoundError, "config.json is missing"),
    ("*.safetensors", ModelNotFoundError, "no \\*.safetensors"),
    ("tokenizer.json", FileNotFoundError, "tokenizer.json"),
])
def test_missing_files_are_named(llama_path, tmp_path, missing, error, message):
    folder = copy_checkpoint(llama_path, tmp_path / "broken", drop=[missing])
    with pytest.raises(error, match=message):
        LLM(str(folder))


def test_pickle_checkpoints_are_refused(llama_path, tmp_path):
    folder = copy_checkpoint(llama_path, tmp_path / "pickle", drop=["*.safetensors"])
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        LLM(str(folder))


def test_unsupported_architecture_lists_the_supported(llama_path, tmp_path):
    folder = copy_checkpoint(llama_path, tmp_path / "gpt", drop=[])
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTBigCodeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPTBigCodeForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        LLM(str(folder))


def test_missing_weight_is_reported(llama_path, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(llama_path, tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="gate_up_proj"):
        LLM(str(folder))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float8"), "dtype 'float8'"), (dict(device="tpu"), "device 'tpu'"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(kv_cache_memory="lots"), "size"),
    (dict(kv_cache_memory=10), "smaller than one KV block"),
])
def test_bad_engine_arguments(llama_path, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        LLM(str(llama_path), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given when no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(llama_path):
    with pytest.raises(InvalidArgumentError, match="no CUDA GPU"):
        LLM(str(llama_path), device="cuda")


def write_safetensors(path, header, data=b"\0" * 8, header_len=None):
    """A safetensors file with this header (a dict, or raw bytes) and data; header_len overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def good_entry(**changes):
    return {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **changes}}


def test_a_well_formed_header_reads_back(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, **good_entry()},
                      data=struct.pack("<2f", 1.5, -2.0))
    (name, ref), = iter_tensors(tmp_path)
    assert name == "w" and torch.equal(ref.load(), torch.tensor([1.5, -2.0]))


@pytest.mark.parametrize("header, header_len, data, fault", [
    ({}, 2**62, b"", r"header length \(4611686018427387904 bytes\) runs past the end of the file \(10 bytes\)"),
    (b"", None, None, "fewer than the 8 of its header length"),
    (b"{not json", None, b"", "its header is not valid JSON"),
    (b"\xff\xfe", None, b"", "its header is not valid JSON"),
    ([1, 2], None, b"", "its header is a JSON list, not an object"),
    ({"w": 3}, None, b"", "the header entry of tensor w is not a JSON object"),
    (good_entry(dtype="F4"), None, b"\0" * 8, "tensor w has unsupported dtype 'F4'"),
    (good_entry(dtype=["F32"]), None, b"\0" * 8, r"tensor w has unsupported dtype \['F32'\]"),
    (good_entry(shape=[-2]), None, b"\0" * 8, r"tensor w has shape \[-2\], not a list of sizes >= 0"),
    (good_entry(shape="2"), None, b"\0" * 8, "tensor w has shape '2'"),
    (good_entry(data_offsets=[0, 80]), None, b"\0" * 8, r"data_offsets \[0, 80\], not \[begin, end\] within the 8"),
    (good_entry(data_offsets=[8, 0]), None, b"\0" * 8, r"data_offsets \[8, 0\]"),
    (good_entry(data_offsets=[0]), None, b"\0" * 8, r"data_offsets \[0\]"),
    (good_entry(shape=[3]), None, b"\0" * 8, "tensor w spans 8 bytes, but its dtype F32 and shape \\[3\\] need 12"),
])
def test_malformed_weight_files_are_named_with_their_fault(tmp_path, header, header_len, data, fault):
    file = tmp_path / "model.safetensors"
    if data is None:
        file.write_bytes(b"\x01\x02")
    else:
        write_safetensors(file, header, data, header_len)
    with pytest.raises(UnsupportedModelError, match=f"{re.escape(str(file))} is not a valid safetensors file: .*{fault}"):
        list(iter_tensors(tmp_path))


def test_an_absurd_header_length_fails_loading_with_a_clear_error(llama_path, tmp_path):
    folder = copy_checkpoint(llama_path, tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**62) + weights.read_bytes()[8:])
    with pytest.raises(UnsupportedModelError, match="header length .* runs past the end of the file"):
        LLM(str(folder))
