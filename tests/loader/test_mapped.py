"""Weights memory-mapped from a prepared file (map_weights, lmgen/loader/mapped.py): the same tokens as
loaded into memory, parameters that are pages of the file (resident only once read), and the checks
before mapping: a truncated file, the memory a mapped mixture of experts keeps resident."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import transformers

from mappings import mapping_of
from lmgen import LLM, InvalidArgumentError, SamplingParams, UnsupportedModelError
from lmgen.errors import InsufficientMemoryError
from lmgen.loader import model as loader
from lmgen.models import model_class

PROMPTS = [[1, 5, 9, 200, 17], [1, 100, 7]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """Prepared files go to a folder of the test's (the kernels, loaded once per session, stay where they are)."""
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))
    return tmp_path / "weights"


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_mapped_weights_give_transformers_tokens_and_are_pages_of_the_file(checkpoint_factory, weights_dir):
    path = checkpoint_factory("qwen3-moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):]
                    .tolist() for p in PROMPTS]
    prepared = LLM(str(path), dtype="float32", map_weights=True)  # the first load prepares the file
    assert _tokens(prepared) == expected
    [file] = weights_dir.glob("*.weights")
    llm = LLM(str(path), dtype="float32", map_weights=True)  # later ones map it
    experts = llm.engine.model.model.layers[0].mlp.experts.gate_up_proj.weight
    name, before = mapping_of(experts.data_ptr())
    assert name == str(file)
    assert before.get("Rss", 0) * 1024 < experts.nbytes  # loading read none of it
    assert _tokens(llm) == expected
    _, after = mapping_of(experts.data_ptr())
    assert after["Rss"] > before.get("Rss", 0) and after["Anonymous"] == 0  # read, never written


@pytest.mark.usefixtures("cpu_kernels")
def test_int4_weights_are_mapped_in_their_kernel_layout(checkpoint_factory, weights_dir):
    path = checkpoint_factory("qwen2-moe")  # with a shared expert
    expected = _tokens(LLM(str(path), dtype="float32", quantization="int4"))
    assert _tokens(LLM(str(path), dtype="float32", quantization="int4", map_weights=True)) == expected
    assert _tokens(LLM(str(path), dtype="float32", quantization="int4", map_weights=True)) == expected
    assert len(list(weights_dir.glob("*.weights"))) == 1


def test_a_truncated_prepared_file_is_refused_naming_both_sizes(checkpoint_factory, weights_dir):
    path = checkpoint_factory("olmoe")
    LLM(str(path), dtype="float32", map_weights=True)
    [file] = weights_dir.glob("*.weights")
    size = file.stat().st_size
    os.truncate(file, size - 4096)
    with pytest.raises(UnsupportedModelError, match=rf"{re.escape(str(file))} cannot be mapped: it is truncated: it has "
                                                    rf"{size - 4096} bytes, its weights need {size}; delete it"):
        LLM(str(path), dtype="float32", map_weights=True)
    os.truncate(file, 100)
    with pytest.raises(UnsupportedModelError, match="truncated .* its header does not read"):
        LLM(str(path), dtype="float32", map_weights=True)


def test_the_memory_check_counts_what_a_mapped_mixture_of_experts_keeps_resident(checkpoint_factory, weights_dir,
                                                                               monkeypatch):
    path = checkpoint_factory("qwen3-moe")  # 8 experts, top 3, in 2 of its 3 layers
    config = json.loads((path / "config.json").read_text())
    cls = model_class(config)
    meta = loader._meta_model(cls, cls.spec_from_config(config), 256, torch.float32, None)
    total, resident = loader.weights_bytes(meta), loader.weights_bytes(meta, mapped_from_disk=True)
    experts = sum(p.nbytes for name, p in meta.named_parameters() if ".experts." in name)
    assert resident == total - experts * 5 // 8
    monkeypatch.setattr(loader, "free_memory", lambda device: resident)
    with pytest.raises(InsufficientMemoryError, match=rf"need {total / 2**20:.1f} MiB but only {resident / 2**20:.1f} "
                                                      r"MiB .* map them from disk \(map_weights=True: "):
        LLM(str(path), dtype="float32")
    assert LLM(str(path), dtype="float32", map_weights=True).generate(PROMPTS, GREEDY)
    monkeypatch.setattr(loader, "free_memory", lambda device: resident - 1)
    with pytest.raises(InsufficientMemoryError, match=rf"need {resident / 2**20:.1f} MiB resident \(of "
                                                      rf"{total / 2**20:.1f} MiB mapped from disk and paged in as read"):
        LLM(str(path), dtype="float32", map_weights=True)


def test_map_weights_is_refused_with_tensor_parallelism():
    with pytest.raises(InvalidArgumentError, match="map_weights=True does not apply with tensor_parallel_size > 1"):
        LLM(map_weights=True, tensor_parallel_size=2)
