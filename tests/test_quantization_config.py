"""transformers' quantization arguments (load_in_4bit, load_in_8bit, BitsAndBytesConfig) as a drop-in."""

import warnings

import pytest

from lmgen import (LLM, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, InvalidArgumentError, QuantConfig,
                   SamplingParams)
from lmgen.quantization_config import quantization_engine_args


def test_load_in_4bit_runs_the_tutorial_code(llama_path):
    tokenizer = AutoTokenizer.from_pretrained(str(llama_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain flag asks for nothing lmgen approximates
        model = AutoModelForCausalLM.from_pretrained(str(llama_path), load_in_4bit=True)
    inputs = tokenizer("Portugal is", return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert model.llm.engine.quantization == QuantConfig("int4", group_size=64)
    text = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert text.startswith("Portugal is") and len(outputs[0]) == inputs["input_ids"].shape[1] + 10
    llm = LLM(str(llama_path), quantization="int4")
    expected = llm.generate([inputs["input_ids"][0].tolist()], SamplingParams(max_tokens=10, temperature=0,
                                                                             ignore_eos=True))
    assert outputs[0, inputs["input_ids"].shape[1]:].tolist() == expected[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs,expected", [
    (dict(load_in_8bit=True), QuantConfig("int8")),
    (dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, group_size=32)), QuantConfig("int4", 32)),
    (dict(quantization_config={"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]}),
     QuantConfig("int8", lm_head=False)),
    (dict(quantization_config=QuantConfig("int4", 32, lm_head=False)), QuantConfig("int4", 32, lm_head=False)),
])
def test_quantization_arguments_map_onto_lmgens_methods(llama_path, kwargs, expected):
    model = AutoModelForCausalLM.from_pretrained(str(llama_path), **kwargs)
    assert model.llm.engine.quantization == expected


def test_transformers_own_config_object_is_accepted():
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    with pytest.warns(UserWarning, match="bnb_4bit_quant_type='nf4' is approximated: lmgen's int4"):
        args = quantization_engine_args(quantization_config=config)
    assert args == {"quantization": "int4", "quantization_group_size": 64, "quantize_lm_head": True}


@pytest.mark.parametrize("options,message", [
    (dict(bnb_4bit_quant_type="nf4"), "bnb_4bit_quant_type='nf4' is approximated"),
    (dict(bnb_4bit_use_double_quant=True), "bnb_4bit_use_double_quant=True is ignored: lmgen keeps its scales"),
    (dict(llm_int8_threshold=4.0), "llm_int8_threshold=4.0 is approximated"),
    (dict(llm_int8_skip_modules=["mlp"]), r"llm_int8_skip_modules \['mlp'\] ignored"),
    (dict(bnb_8bit_magic=1), "bnb_8bit_magic=1 is ignored: not an option lmgen knows"),
])
def test_settings_lmgen_does_differently_warn(options, message):
    with pytest.warns(UserWarning, match=message):
        quantization_engine_args(quantization_config=BitsAndBytesConfig(load_in_4bit=True, **options))


@pytest.mark.parametrize("kwargs,message", [
    (dict(load_in_4bit=True, load_in_8bit=True), "both set"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "'gptq' is not supported"),
    (dict(quantization_config=BitsAndBytesConfig()), "sets neither load_in_4bit nor load_in_8bit"),
    (dict(quantization_config="int4"), "must be a BitsAndBytesConfig, a QuantConfig or a dict"),
    (dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, group_size=48)), "group size 48"),
])
def test_bad_quantization_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        quantization_engine_args(**kwargs)
