"""A GGUF file's weights kept in their block formats (lmgen.layers.ggml) when it loads on lmgen's CPU
kernels with no dtype or quantization asked for, a mixture of experts' stacked experts too: the same
generation as the file dequantized, in one call for all layers as module by module, and mapped from a
prepared file."""

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from checkpoints import build_checkpoint
import gguf_files
from gguf_files import write_gguf
from mappings import mapping_of
from lmgen import LLM, AutoModelForCausalLM, SamplingParams
from lmgen.layers.ggml import LAID_OUT, GGMLEmbedding, GGMLLinear
from lmgen.layers.linear import FusedLinear, Linear
from lmgen.loader import model as loader_model
from lmgen.models.transformer import TransformerForCausalLM

pytestmark = pytest.mark.usefixtures("cpu_kernels")

PROMPTS = [[1, 17, 230, 45, 99], [1, 400, 3, 3, 72, 5, 9]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
# q, k and v in three types (one fused layer of three), every type lmgen's kernels read, and a head in
# F16, which they do not: it loads dequantized
TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q4_0, "ffn_gate": Q.Q5_0,
         "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0, "output": Q.F16}


# a mixture of experts: gate and up in two types (one fused stack of two), down in Q4_K (K-quants: rows of
# 256 values), the router in F32 as llama.cpp keeps it
MOE_TYPES = {"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q8_0, "ffn_down_exps": Q.Q4_K, "attn_q": Q.Q8_0,
             "attn_k": Q.Q8_0, "attn_v": Q.Q8_0, "attn_output": Q.Q8_0, "token_embd": Q.Q8_0, "output": Q.Q8_0}
EXPERT_SIZE = 256


def _held(kind: Q) -> int:
    """The type block layers hold rows of `kind` in once loaded: laid out 8 at a time where it has a layout."""
    return LAID_OUT.get(kind, (kind,))[0]


def _type(name: str, array: np.ndarray, types: dict[str, Q] = TYPES) -> Q:
    return next((kind for part, kind in types.items() if name.split(".")[-2] == part), Q.F32)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """A llama file (q/k rows permuted by llama.cpp's converter) of biased q/k/v in the types above; the
    K-quants' random blocks scaled to weights of the checkpoint's size (up to about 1, not 20-80, whose
    saturated attention would turn on the smallest rounding)."""
    folder = build_checkpoint(tmp_path_factory.mktemp("model"), "llama-untied-bias-headdim", hidden_size=256,
                              intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_files, "K_SCALES", (0.0002, 0.002))
        return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "mixed.gguf", "llama", tensor_type=_type)


@pytest.fixture(scope="module")
def moe_file(tmp_path_factory):
    """A Qwen3-MoE (8 experts, top 3, every layer) in the types above. The K-quants' random blocks are
    scaled to weights below the checkpoint's (whose products then move the router's logits little: the
    kernels' int8 activations, as llama.cpp's, must not turn a near tie to another expert)."""
    folder = build_checkpoint(tmp_path_factory.mktemp("model"), "qwen3-moe", hidden_size=256, head_dim=64,
                              num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=EXPERT_SIZE,
                              mlp_only_layers=[])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_files, "K_SCALES", (0.00002, 0.0002))
        return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "moe.gguf", "qwen3moe",
                          tensor_type=lambda name, array: _type(name, array, MOE_TYPES))


def _outputs(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS)]


def _assert_same_tokens_close_logprobs(native: LLM, dequantized: LLM) -> None:
    """The same greedy tokens; each chosen token's log-probability within 0.05 of the float32 product's."""
    for (tokens, logprobs), (tokens_f, logprobs_f) in zip(_outputs(native), _outputs(dequantized)):
        assert tokens == tokens_f
        for step, step_f in zip(logprobs, logprobs_f):
            chosen = next(iter(step_f))
            assert abs(step[chosen].logprob - step_f[chosen].logprob) < 0.05


def test_blocks_generate_what_the_dequantized_file_generates(mixed_file):
    """The kernels multiply the same weights with activations rounded to int8 per block (as llama.cpp):
    the same greedy tokens, and log-probabilities within 0.05 of the float32 product's."""
    native = LLM(str(mixed_file), kv_cache_memory="16MiB")
    layer = native.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, GGMLLinear) and layer.self_attn.qkv_proj.types == [_held(Q.Q4_K), Q.Q5_K, _held(Q.Q6_K)]
    assert isinstance(layer.mlp.down_proj, GGMLLinear)
    assert type(native.engine.model.lm_head) is Linear  # F16: dequantized
    assert isinstance(native.engine.model.model.embed_tokens, GGMLEmbedding)  # rows dequantized when looked up
    dequantized = LLM(str(mixed_file), dtype="float32", kv_cache_memory="16MiB")
    assert type(dequantized.engine.model.model.layers[0].self_attn.qkv_proj) is FusedLinear
    _assert_same_tokens_close_logprobs(native, dequantized)


def test_an_untied_embedding_table_is_a_view_of_the_file_never_copied(mixed_file):
    """No anonymous copy of the table: pages of the file, which generating never writes; the matrices read
    whole every token are copied (into huge pages). None of the file's pages stays resident once loaded
    (its header, those mapped around the tensors read) nor after a lookup (the rows it read)."""
    llm = LLM(str(mixed_file), kv_cache_memory="16MiB")
    table = llm.engine.model.model.embed_tokens.weight
    assert mapping_of(table.data_ptr())[0] == str(mixed_file)
    assert mapping_of(table.data_ptr())[1]["Rss"] == 0
    _outputs(llm)
    assert mapping_of(table.data_ptr())[1]["Rss"] == 0
    assert mapping_of(llm.engine.model.model.layers[0].mlp.down_proj.weight.data_ptr())[0] != str(mixed_file)


@pytest.mark.parametrize("file", ["mixed_file", "moe_file"])
def test_one_call_for_all_layers_gives_the_modules_bits(file, request, monkeypatch):
    llm = LLM(str(request.getfixturevalue(file)), kv_cache_memory="16MiB", enable_prefix_caching=False)
    calls = []
    decode_layers = torch.ops.lmgen.decode_layers
    monkeypatch.setattr(torch.ops.lmgen, "decode_layers", lambda *args: calls.append(1) or decode_layers(*args),
                        raising=False)
    one_call = _outputs(llm)
    assert len(calls) == 8  # the prefill (prompts short enough to read the cache in place) and 7 decode steps
    monkeypatch.setattr(TransformerForCausalLM, "one_call_layers", lambda *_: None)
    assert _outputs(llm) == one_call


@pytest.mark.parametrize("file", ["mixed_file", "moe_file"])
def test_blocks_mapped_from_a_prepared_file_generate_the_same(file, request, tmp_path, monkeypatch):
    monkeypatch.setenv("LMGEN_CACHE", str(tmp_path))  # where the prepared file goes (lmgen/loader/mapped.py)
    file = request.getfixturevalue(file)
    in_memory = LLM(str(file), kv_cache_memory="16MiB")
    for _ in ("prepared", "mapped"):
        llm = LLM(str(file), kv_cache_memory="16MiB", map_weights=True)
        assert _parameters(llm) == _parameters(in_memory)  # the blocks, as uint8, not dequantized
        assert _outputs(llm) == _outputs(in_memory)


def _parameters(llm: LLM) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, p.dtype, tuple(p.shape)) for name, p in llm.engine.model.named_parameters()]


def test_without_the_kernels_or_with_a_quantization_the_file_is_dequantized(mixed_file, monkeypatch):
    quantized = LLM(str(mixed_file), quantization="int8", kv_cache_memory="16MiB")
    assert not any(isinstance(m, GGMLLinear) for m in quantized.engine.model.modules())
    monkeypatch.setattr(loader_model.kernels, "load", lambda: False)
    plain = LLM(str(mixed_file), kv_cache_memory="16MiB")
    assert not any(isinstance(m, GGMLLinear) for m in plain.engine.model.modules())


def test_experts_in_blocks_generate_what_the_dequantized_file_generates(moe_file):
    """Every layer's experts stay uint8 blocks stacked [experts, out, bytes per row] in the file's types (no
    float copy): the same greedy tokens as the file dequantized to float32, log-probabilities within 0.05."""
    native = LLM(str(moe_file), kv_cache_memory="16MiB")
    for layer in native.engine.model.model.layers:
        experts = layer.mlp.experts
        for stack, types in ((experts.gate_up_proj, [_held(Q.Q4_K), _held(Q.Q8_0)]), (experts.down_proj, [_held(Q.Q4_K)])):
            assert isinstance(stack, GGMLLinear) and stack.types == types
            assert stack.weight.dtype == torch.uint8 and stack.weight.shape[:2] == (8, stack.out_features)
        assert all(p.dtype == torch.uint8 for p in experts.parameters())
    dequantized = LLM(str(moe_file), dtype="float32", kv_cache_memory="16MiB")
    assert dequantized.engine.model.model.layers[0].mlp.experts.gate_up_proj.weight.dtype == torch.float32
    _assert_same_tokens_close_logprobs(native, dequantized)


def test_the_dequantized_file_generates_what_transformers_generates_from_it(moe_file):
    # transformers 5.25 does not read qwen3moe.expert_feed_forward_length (it keeps its default 768): given here
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        moe_file.parent, gguf_file=moe_file.name, dtype=torch.float32, moe_intermediate_size=EXPERT_SIZE)
    model = AutoModelForCausalLM.from_pretrained(str(moe_file.parent), gguf_file=moe_file.name, dtype="float32",
                                                 kv_cache_memory="16MiB")
    ids = torch.tensor(PROMPTS[:1])
    ours = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours.tolist() == reference.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8).tolist()


def test_the_memory_check_counts_the_experts_as_blocks(moe_file, monkeypatch):
    """The weights the memory check weighs against free memory are those that load: the blocks."""
    checked = []
    monkeypatch.setattr(loader_model, "check_weights_fit", lambda model, *_: checked.append(model))
    native = LLM(str(moe_file), kv_cache_memory="16MiB")
    LLM(str(moe_file), dtype="bfloat16", kv_cache_memory="16MiB")
    blocks, values = (loader_model.weights_bytes(model) for model in checked)
    assert blocks == sum(p.nbytes for p in native.engine.model.parameters()) < values
