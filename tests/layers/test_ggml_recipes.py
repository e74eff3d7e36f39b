"""llama.cpp's recipes quantized while loading (kernels/ggml_quantize.cpp, layers/ggml_recipes.py), against llama.cpp
itself: its ``llama_model_quantize``'s type for every matrix of tiny checkpoints (dense, and mixtures of experts)
and its blocks for a tensor of each type, recorded by data/record_llama_cpp_quants.py (llama-cpp-python builds
llama.cpp from source: too long for every test run), equal lmgen's recipe's types and quantizers' bytes;
loading a checkpoint with ``quantization="q4_k_m"`` gives the block layers (stacks of experts' too) of loading
the GGUF file of llama.cpp's types."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoints import RECIPE_MOE, build_checkpoint, recipe_moe_checkpoint, recipe_qwen2_checkpoint
from gguf_files import write_gguf
from lmgen import LLM, SamplingParams, kernels
from lmgen.errors import InvalidArgumentError
from lmgen.layers.ggml import GGMLLinear
from lmgen.layers.ggml_quant import Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, quantize_blocks
from lmgen.layers.ggml_recipes import quantize_to_blocks, recipe_types
from lmgen.loader.gguf import FAMILIES, lmgen_name
from lmgen.models.transformer import TransformerForCausalLM

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # the quantizers are C++ beside the block kernels
DATA = Path(__file__).resolve().parents[1] / "data"
LLAMA_TYPES = json.loads((DATA / "llama_cpp_quants.json").read_text())
PROMPTS = [[1, 17, 230, 45, 99], [1, 400, 3, 3, 72, 5, 9]]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return recipe_qwen2_checkpoint(tmp_path_factory.mktemp("recipes"))


def test_recipes_pick_llama_cpps_types(qwen):
    llm = LLM(str(qwen), kv_cache_memory="16MiB")
    for method, theirs in LLAMA_TYPES["qwen2"].items():
        ours = recipe_types(llm.engine.model, method, lm_head=True)
        assert ours == {lmgen_name(name, FAMILIES["qwen2"]): kind for name, kind in theirs.items()}, method


def test_fused_checkpoint_tensors_follow_llama_cpp(tmp_path):
    """Phi-3 stores q/k/v as one tensor (llama.cpp's attn_qkv, whose rules are attn_v's) and gate/up as one;
    its head is untied (the embedding takes the default type); rows of 64: every fallback."""
    folder = build_checkpoint(tmp_path / "phi3", "phi3", num_hidden_layers=8)
    ours = recipe_types(LLM(str(folder), kv_cache_memory="16MiB").engine.model, "q4_k_m", lm_head=True)
    assert ours == {lmgen_name(name, FAMILIES["phi3"]): kind for name, kind in LLAMA_TYPES["phi3"]["q4_k_m"].items()}


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory) -> Path:
    return recipe_moe_checkpoint(tmp_path_factory.mktemp("recipes"), "qwen2moe")


@pytest.mark.parametrize("name", RECIPE_MOE)
def test_moe_recipes_pick_llama_cpps_types(name, qwen2_moe, tmp_path):
    """A stack of experts takes one type (its rows of 320: the fallbacks); the experts' and the shared expert's
    down projections take a dense ffn_down's by their layer; 8 experts (Mixtral) raise attn_k, attn_v and (q4_k_m)
    attn_output; llama.cpp keeps the routers in float (F32 there, absent here)."""
    folder = qwen2_moe if name == "qwen2moe" else recipe_moe_checkpoint(tmp_path, name)
    model = LLM(str(folder), kv_cache_memory="16MiB").engine.model
    family = FAMILIES[RECIPE_MOE[name][1]]
    for method, theirs in LLAMA_TYPES[name].items():
        routers = {lmgen_name(n, family) for n, kind in theirs.items() if kind == gguf.GGMLQuantizationType.F32}
        assert routers and all(n.endswith(".mlp.router.weight") for n in routers)
        ours = recipe_types(model, method, lm_head=True)
        assert ours == {lmgen_name(n, family): kind for n, kind in theirs.items() if kind}, (name, method)


def test_quantizers_write_llama_cpps_bytes():
    """Layers 0 and 1 of a Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0; its up projection with an all-zero and a flat row),
    its tied embedding, and Q5_K and its fallback Q5_1 (a pure Q5_K_M); written into padded rows, whose padding
    stays."""
    recorded = np.load(DATA / "llama_cpp_quants.npz")
    keys = sorted({key.rsplit(":", 1)[0] for key in recorded.files})
    assert {key.split(":")[1] for key in keys} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K", "Q5_1"}
    for key in keys:
        theirs = torch.from_numpy(recorded[key + ":blocks"])
        out = torch.full((len(theirs), theirs[0].numel() + 8), 7, dtype=torch.uint8)
        quantize_blocks(torch.from_numpy(recorded[key + ":floats"]), gguf.GGMLQuantizationType[key.split(":")[1]], out)
        assert torch.equal(out[:, :-8].flatten(), theirs.flatten()) and (out[:, -8:] == 7).all(), key


def test_quantizers_write_llama_cpps_bytes_on_hard_rows():
    """Rows made to be hard (data/record_llama_cpp_quants.py's hard_rows: all-zero and flat groups, -0, ties of +a
    and -a, values on half steps, subnormal to 6e4, outliers), in each type, against llama.cpp's blocks of them."""
    recorded = np.load(DATA / "llama_cpp_hard_quants.npz")
    floats = torch.from_numpy(recorded["floats"])
    assert len(floats) == 15 and set(recorded.files) == {"floats", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    for name in recorded.files[1:]:
        ours = quantize_blocks(floats, gguf.GGMLQuantizationType[name])
        assert torch.equal(ours, torch.from_numpy(recorded[name])), name


@pytest.mark.parametrize("ggml_type", [Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0])
def test_round_trip_is_gguf_dequantize(ggml_type):
    """Blocks dequantized by the gguf package come close to the weights (each type's own error bound)."""
    weight = torch.randn(4, 512) * torch.linspace(0.01, 2, 4)[:, None]
    blocks = quantize_blocks(weight, ggml_type)
    values = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(ggml_type)))
    step = weight.abs().amax(1, keepdim=True)
    assert (values - weight).abs().max() < 0.1 * step.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_any_float_dtype_quantizes_as_its_float32_values(dtype):
    """Rows are widened (bfloat16, float16) or rounded (float64) to float32 one at a time, as a checkpoint's are."""
    weight = (torch.randn(3, 512) * torch.logspace(-3, 2, 3)[:, None]).to(dtype)
    for ggml_type in (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0):
        assert torch.equal(quantize_blocks(weight, ggml_type), quantize_blocks(weight.float(), ggml_type)), ggml_type


def test_quantize_blocks_refuses_what_it_cannot_write():
    with pytest.raises(RuntimeError, match="rows of 96 values are no whole blocks of 256"):
        quantize_blocks(torch.randn(2, 96), Q4_K)
    with pytest.raises(RuntimeError, match="lmgen quantizes to ggml types .* not 2"):
        torch.ops.lmgen.quantize_blocks(torch.randn(2, 64), 2, torch.empty(2, 36, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match=r"out must be uint8 \[2, at least 68\]"):
        quantize_blocks(torch.randn(2, 64), Q8_0, torch.empty(2, 60, dtype=torch.uint8))


@pytest.mark.parametrize("checkpoint, name, num_block_layers", [
    ("qwen", "qwen2", 8 * 4 + 1),  # qkv, o, gate/up, down; the tied embedding
    ("qwen2_moe", "qwen2moe", 8 * 6 + 1),  # qkv, o, the experts' gate/up and down stacks, the shared expert's two
])
def test_q4_k_m_loads_as_llama_cpps_file(checkpoint, name, num_block_layers, request, tmp_path):
    """The GGUF file of llama.cpp's types and blocks (its quantizers' bytes are lmgen's: above): the same block
    layers, stacks of experts too, byte for byte, and greedy tokens; and the same scores of a prompt whose prefill
    of 240 tokens runs every product on more than 64 rows (each of the 4 experts is chosen some 120 times). The
    products against float ones: tests/layers/test_ggml_blocks.py."""
    folder, types = request.getfixturevalue(checkpoint), LLAMA_TYPES[name]["q4_k_m"]

    def blocks(name: str, array: np.ndarray) -> np.ndarray:
        rows = torch.from_numpy(array).flatten(0, -2)  # a stack of experts [experts, out, in]: all its rows
        return quantize_blocks(rows, types[name]).view(*array.shape[:-1], -1).numpy()

    file = write_gguf(folder, tmp_path / "q4_k_m.gguf", name, encode=blocks,  # F32: routers, the shared expert's gate
                      tensor_type=lambda name, array: gguf.GGMLQuantizationType(types.get(name, 0)))
    ours = LLM(str(folder), quantization="q4_k_m", kv_cache_memory="16MiB")
    theirs = LLM(str(file), kv_cache_memory="16MiB")
    mine = {n: m for n, m in ours.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    file_layers = {n: m for n, m in theirs.engine.model.named_modules() if isinstance(m, GGMLLinear)}
    assert mine.keys() == file_layers.keys() and len(mine) == num_block_layers
    for layer_name, layer in mine.items():
        assert layer.types == file_layers[layer_name].types, layer_name
        assert torch.equal(layer.weight, file_layers[layer_name].weight), layer_name
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in ours.generate(PROMPTS, params)] == \
        [o.outputs[0].token_ids for o in theirs.generate(PROMPTS, params)]
    prompt = torch.randint(3, 512, (240,), generator=torch.Generator().manual_seed(0)).tolist()
    scored = [llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
              for llm in (ours, theirs)]
    assert scored[0].outputs[0].token_ids == scored[1].outputs[0].token_ids
    assert [step[token].logprob for step, token in zip(scored[0].prompt_logprobs[1:], prompt[1:])] == \
        [step[token].logprob for step, token in zip(scored[1].prompt_logprobs[1:], prompt[1:])]


@pytest.mark.parametrize("variant", ["mixtral", "olmoe", "qwen3-moe", "gpt-oss"])
def test_every_mixture_of_experts_runs_its_stacks_as_blocks(variant, checkpoint_factory, monkeypatch):
    """Each family's experts held as blocks (rows of 64: Q5_0 and Q8_0, the fallbacks), GPT-OSS's with biases,
    Qwen3-MoE's beside a dense layer: the one call for all layers gives the module path's tokens."""
    llm = LLM(str(checkpoint_factory(variant)), quantization="q4_k_m", kv_cache_memory="16MiB",
              enable_prefix_caching=False)
    stacks = [m for name, m in llm.engine.model.named_modules()
              if name.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert stacks and all(isinstance(m, GGMLLinear) and m.weight.dtype == torch.uint8 for m in stacks)
    calls, decode_layers = [], torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: calls.append(1) or decode_layers(*args),
                        raising=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    one_call = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    assert len(calls) == 8  # the prefill (prompts short enough to read the cache in place) and 7 decode steps
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == one_call


def test_where_no_block_layer_holds_a_weight_its_values_load(llama_path):
    """A weight left to a float module (a GPU, tensor parallelism) loads as its blocks' values, in the model's dtype."""
    name = "model.layers.0.mlp.down_proj.weight"
    float_weight = load_file(llama_path / "model.safetensors")[name]
    [(_, weight)] = quantize_to_blocks([(name, float_weight)], {name: Q5_0}, {}, torch.bfloat16)
    blocks = quantize_blocks(float_weight, Q5_0)  # layer 0 of 2: Q4_K, on 128 columns Q5_0
    expected = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q5_0)
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, torch.from_numpy(expected).bfloat16())


def test_recipes_refuse_what_they_cannot_do(checkpoint_factory, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:  # a machine without lmgen's kernels, which hold the quantizers
        patch.setattr(kernels, "load", lambda: False)
        patch.setattr(kernels, "why_not", "no C++ compiler found (set CXX or install g++)")
        with pytest.raises(InvalidArgumentError, match=r"quantization 'q6_k' needs lmgen's CPU kernels .* off here "
                                                       r"\(no C\+\+ compiler found"):
            LLM(str(checkpoint_factory("llama")), quantization="q6_k", kv_cache_memory="16MiB")
    from lmgen.quantize import quantize_checkpoint
    with pytest.raises(InvalidArgumentError, match="applied while loading"):
        quantize_checkpoint(checkpoint_factory("llama"), tmp_path / "out", method="q4_k_m")


def test_cli_and_drop_in_take_the_recipes(llama_path, capsys):
    from lmgen.cli import main
    from lmgen.layers.quant import QuantConfig
    from lmgen.quantization_config import quantization_engine_args

    assert main(["generate", "Lisbon", "--model", str(llama_path), "--quantize", "q4_k_m", "-n", "2", "-t", "0"]) == 0
    assert quantization_engine_args(quantization_config=QuantConfig("q4_k_m"))["quantization"] == "q4_k_m"
    with pytest.raises(SystemExit):  # lmgen quantize writes int8/int4 only
        main(["quantize", "--model", str(llama_path), "--method", "q4_k_m", "--out", "x"])
    assert "invalid choice: 'q4_k_m'" in capsys.readouterr().err
