"""Structured output: every sampled output conforms, on random weights (which want to emit anything) and the demo model."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import pytest

from lmgen import LLM, SamplingParams
from lmgen.errors import InvalidArgumentError
from lmgen.params import StructuredOutputs
from lmgen.sampling.structured import allocate_bitmask

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"],
     "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {
        "type": "array", "items": NAME, "maxItems": 2}}, "required": ["id", "tags"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3},
    {"enum": ["red", "green", "blue", 7, None]},
    {"const": {"kind": "fixed", "version": 2}},
    {"type": "string", "pattern": "^[A-Z][a-z]{2,5}$"},
    {"type": "string", "minLength": 3, "maxLength": 5},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "integer", "exclusiveMinimum": 100, "maximum": 120},
    {"type": "number", "minimum": 0.5, "maximum": 2.5},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": NAME, "c": {"type": "boolean"}}, "required": ["a"],
     "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"], "additionalProperties": False},
    {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"error": NAME}, "required": ["error"],
                                     "additionalProperties": False}]},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "code": {"type": "integer", "minimum": 200,
                                                                          "maximum": 599}},
     "required": ["ok", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1,
                                                                            "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
    {"type": ["string", "null"], "maxLength": 4},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tuple": {"type": "array", "prefixItems": [{"type": "integer"}, NAME],
                                                "items": False}},
     "required": ["tuple"], "additionalProperties": False},
    {"type": "object", "properties": {"nested": {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}, "maxItems": 2}}, "required": ["nested"],
     "additionalProperties": False},
]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def random_llm(llama_path):
    return LLM(llama_path, seed=0)


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(seed=0)


def _sample(llm: LLM, spec: dict, seeds=SEEDS, **kwargs) -> list:
    """One completion per seed, all in one batch; each must end because the grammar finished."""
    params = [SamplingParams(structured=spec, seed=seed, max_tokens=kwargs.pop("max_tokens", 256), **kwargs)
              for seed in seeds]
    outputs = llm.generate(["Answer:"] * len(seeds), params)
    completions = [o.outputs[0] for o in outputs]
    assert all(c.finish_reason == "stop" for c in completions), [(c.text, c.finish_reason) for c in completions]
    return [c.text for c in completions]


@pytest.mark.parametrize("llm_name", ["random_llm", "demo_llm"])
def test_json_schema_outputs_validate(llm_name, request):
    llm = request.getfixturevalue(llm_name)
    params = [SamplingParams(structured={"json_schema": schema}, seed=seed, max_tokens=256)
              for schema in SCHEMAS for seed in SEEDS]
    outputs = llm.generate(["Answer:"] * len(params), params)
    for index, output in enumerate(outputs):
        schema, completion = SCHEMAS[index // len(SEEDS)], output.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_and_schema_as_text(random_llm):
    # Any object may hold unbounded strings, which random weights ramble through: outputs that
    # finish must parse; those cut by max_tokens have no chance to.
    params = [SamplingParams(structured={"json_object": True}, seed=seed, max_tokens=256) for seed in range(6)]
    finished = [o.outputs[0].text for o in random_llm.generate(["Answer:"] * 6, params)
                if o.outputs[0].finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(text), dict) for text in finished)
    schema = SCHEMAS[0]
    for text in _sample(random_llm, {"json_schema": json.dumps(schema)}):
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no), because [a-z ]{5,20}\.",
                                     r"[0-9]+(\.[0-9]{1,2})? (EUR|USD)", r"[A-Z][a-z]+( [A-Z][a-z]+){0,2}"])
@pytest.mark.parametrize("llm_name", ["random_llm", "demo_llm"])
def test_regex_outputs_fullmatch(pattern, llm_name, request):
    for text in _sample(request.getfixturevalue(llm_name), {"regex": pattern}):
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("llm_name", ["random_llm", "demo_llm"])
def test_choice_outputs_are_choices(llm_name, request):
    choices = ["positive", "negative", "neutral", "it depends"]
    texts = _sample(request.getfixturevalue(llm_name), {"choice": choices}, seeds=range(8))
    assert set(texts) <= set(choices)


ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""


@pytest.mark.parametrize("llm_name", ["random_llm", "demo_llm"])
def test_lark_arithmetic_grammar(llm_name, request):
    for text in _sample(request.getfixturevalue(llm_name), {"grammar": ARITHMETIC}, max_tokens=512):
        tree = ast.parse(text, mode="eval")  # a syntax error would raise here
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text


def test_gbnf_grammar_is_accepted(random_llm):
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    assert set(_sample(random_llm, {"grammar": gbnf})) <= {"The answer is yes.", "The answer is no."}


def test_forced_tokens_need_no_model_step(random_llm, monkeypatch):
    """What the grammar leaves no choice about is appended without running the model."""
    steps = []
    execute = random_llm.engine.runner.execute
    monkeypatch.setattr(random_llm.engine.runner, "execute", lambda *args: steps.append(1) or execute(*args))
    [output] = random_llm.generate("Answer:", SamplingParams(structured={"choice": ["the only answer"]}))
    assert (output.outputs[0].text, output.outputs[0].finish_reason, len(steps)) == ("the only answer", "stop", 0)
    schema = {"type": "object", "properties": {"constant_key_one": {"const": "a fixed value"}, "flag": {
        "type": "boolean"}}, "required": ["constant_key_one", "flag"], "additionalProperties": False}
    [output] = random_llm.generate("Answer:", SamplingParams(structured={"json_schema": schema}, seed=0))
    assert json.loads(output.outputs[0].text)["constant_key_one"] == "a fixed value"
    assert len(steps) + 6 <= len(output.outputs[0].token_ids)  # the key and the constant came for free


def test_constrained_and_free_requests_share_a_batch(random_llm):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    [alone] = random_llm.generate("Portugal is", free)
    constrained = SamplingParams(structured={"json_schema": SCHEMAS[0]}, seed=3, max_tokens=128)
    outputs = random_llm.generate(["Answer:", "Portugal is", "Answer:"], [constrained, free, constrained])
    assert outputs[1].outputs[0].token_ids == alone.outputs[0].token_ids
    assert outputs[0].outputs[0].text == outputs[2].outputs[0].text  # same seed, same output
    jsonschema.validate(json.loads(outputs[0].outputs[0].text), SCHEMAS[0])


def test_n_streaming_logprobs_and_stop_strings_compose(random_llm):
    schema = SCHEMAS[1]
    params = SamplingParams(n=3, structured={"json_schema": schema}, seed=5, max_tokens=256, logprobs=2)
    [output] = random_llm.generate("Answer:", params)
    for completion in output.outputs:
        jsonschema.validate(json.loads(completion.text), schema)
        assert len(completion.logprobs) == len(completion.token_ids)  # no forced tokens without logprobs
    streamed, bounded = {}, SCHEMAS[16]  # every field bounded: the output ends before the model's context does
    for delta in random_llm.stream("Answer:", SamplingParams(n=2, structured={"json_schema": bounded}, seed=5)):
        for completion in delta.outputs:
            streamed[completion.index] = streamed.get(completion.index, "") + completion.text
    for text in streamed.values():
        jsonschema.validate(json.loads(text), bounded)
    [stopped] = random_llm.generate("Answer:", SamplingParams(structured={"regex": "[a-z]{3} [a-z]{3} [a-z]{3}"},
                                                               stop=[" "], seed=1))
    assert re.fullmatch("[a-z]{3}", stopped.outputs[0].text)


@pytest.mark.parametrize("spec, message", [
    ({"json_schema": {"type": "strin"}}, "invalid json_schema"),
    ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),  # cannot be enforced: an error
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"regex": "[a-"}, "invalid regex"),
    ({"grammar": 'start: "a" | b'}, "invalid grammar"),
    ({"choice": []}, "non-empty list"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"schema": {}}, "unknown structured output field"),
])
def test_invalid_specs_are_rejected_before_generation(random_llm, spec, message):
    with pytest.raises(InvalidArgumentError, match=message):
        random_llm.generate("Answer:", SamplingParams(structured=spec))
    assert not random_llm.engine.has_unfinished_requests()
    [output] = random_llm.generate("Answer:", SamplingParams(structured={"choice": ["ok"]}))  # still serving
    assert output.outputs[0].text == "ok"


def test_structured_outputs_is_a_value_error():
    with pytest.raises(ValueError):
        StructuredOutputs()


def test_drop_in_generate_takes_structured(llama_path):
    from lmgen import AutoModelForCausalLM, AutoTokenizer, set_seed

    model = AutoModelForCausalLM.from_pretrained(llama_path)
    tokenizer = AutoTokenizer.from_pretrained(llama_path, padding_side="left")
    inputs = tokenizer(["Answer:", "A longer prompt here:"], return_tensors="pt", padding=True)
    bounded = SCHEMAS[15]  # every field bounded, so 128 tokens always complete it, whatever the weights want
    set_seed(0)
    ids = model.generate(**inputs, max_new_tokens=128, do_sample=True, structured={"json_schema": bounded})
    for text in tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
        jsonschema.validate(json.loads(text), bounded)


def test_chat_takes_structured(demo_llm):
    messages = [{"role": "user", "content": "Which colour is the sky?"}]
    output = demo_llm.chat(messages, SamplingParams(structured={"choice": ["blue", "grey", "black"]}, seed=0))
    assert output.outputs[0].text in ("blue", "grey", "black")


def _misplaced_whitespace(text: str) -> list[str]:
    """Whitespace in JSON `text` outside the forms JSON writers produce (strings' contents aside): a newline and
    an indent after `{`, `[` and `,` or before `}` and `]`, one space after `:` or `,`."""
    outside_strings = re.sub(r'"(\\.|[^"\\])*("|$)', '""', text)  # a string cut short runs to the end
    misplaced = []
    for run in re.finditer(r"\s+", outside_strings):
        before, after = outside_strings[run.start() - 1], outside_strings[run.end():run.end() + 1]
        space = run.group() == " " and before in ":,"
        indent = re.fullmatch(r"\n[ \t]*", run.group()) and (before in "{[," or after in ("}", "]"))
        if not (space or indent):
            misplaced.append(outside_strings[run.start() - 1:run.end() + 1])
    return misplaced


def test_json_output_puts_whitespace_only_where_json_writers_do(demo_llm):
    objects = [schema for schema in SCHEMAS if schema.get("type") in ("object", "array")]
    params = [SamplingParams(structured={"json_schema": schema}, seed=seed, max_tokens=256)
              for schema in objects for seed in SEEDS]
    params += [SamplingParams(structured={"json_object": True}, seed=seed, max_tokens=256) for seed in SEEDS]
    outputs = [output.outputs[0] for output in demo_llm.generate(["A person:"] * len(params), params)]
    for completion in outputs[:-len(SEEDS)]:  # every field bounded: each completes
        assert completion.finish_reason == "stop", completion.text
    for completion in outputs:  # any object may ramble on in a string; what was written is still laid out well
        if completion.finish_reason == "stop":
            json.loads(completion.text)
        assert _misplaced_whitespace(completion.text) == [], completion.text


def _accepts(llm: LLM, spec: dict, text: str) -> bool:
    """Whether the grammar of `spec` takes the tokens of `text` and then ends."""
    backend = llm.engine.grammar_backend
    matcher = backend.new_matcher(backend.compile(StructuredOutputs(**spec)))
    tokens = backend.tokenizer.tokenize_str(text) + [min(llm.engine.eos_token_ids)]
    return all(matcher.consume_token(token) for token in tokens)


def test_json_grammars_take_what_json_writers_write_and_refuse_padding(demo_llm):
    value = {"name": "Ada", "age": 36, "tags": ["a", "b"], "address": {"city": "London", "lines": []}, "x": None}
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array"}, "address": {"type": "object"}}}
    for spec in ({"json_object": True}, {"json_schema": schema}):
        for written in (json.dumps(value), json.dumps(value, separators=(",", ":")), json.dumps(value, indent=2),
                        json.dumps(value, indent=4), json.dumps(value, indent="\t")):
            assert _accepts(demo_llm, spec, written), (spec, written)
        for padded in ('{"name"\n\n:1}', '{"name"\n:1}', '{"name":\n1}', '{"name":  1}', '{"name" : 1}',
                       '{ "name": 1}', '{\n\n"name": 1}', '{"name": 1 }', '{"name": [1 ,2]}', ' {"name": 1}',
                       '{"name": [1\n,2]}', '{"name": 1\n  , "age": 2}'):
            assert not _accepts(demo_llm, spec, padded), (spec, padded)
    assert _accepts(demo_llm, {"json_schema": {"type": "integer"}}, "12")


def _mask_allows(llm: LLM, spec: dict, prefix: str, token_text: str, drafted: bool) -> bool:
    """Whether, after the tokens of `prefix`, the grammar's mask allows the token `token_text` (one token): the
    matcher having consumed them, or (`drafted`) their row after them as speculative drafts."""
    backend = llm.engine.grammar_backend
    matcher = backend.new_matcher(backend.compile(StructuredOutputs(**spec)))
    tokens = backend.tokenizer.tokenize_str(prefix)
    drafts = tokens if drafted else []
    assert drafted or all(matcher.consume_token(token) for token in tokens)
    (token,) = backend.tokenizer.tokenize_str(token_text)
    bitmask = allocate_bitmask(1 + len(drafts), llm.engine.model.spec.vocab_size)
    backend.fill_bitmask([matcher], [drafts], bitmask)
    return bool(bitmask[len(drafts), token // 32] >> (token % 32) & 1)


@pytest.mark.parametrize("drafted", [False, True])
def test_a_newline_after_a_value_is_allowed_only_where_the_schema_may_close(demo_llm, drafted):
    """A newline after a value leads only to `}` or `]`: masked where a required member or item must come first,
    so the two grammars never leave a token with no continuation (at a drafted position too)."""
    required = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"]}
    optional = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    items = {"type": "array", "items": {"type": "integer"}, "minItems": 2}
    assert not _mask_allows(demo_llm, {"json_schema": required}, '{"a": 1', "\n", drafted)
    assert _mask_allows(demo_llm, {"json_schema": required}, '{"a": 1', ",", drafted)
    assert _mask_allows(demo_llm, {"json_schema": optional}, '{"a": 1', "\n", drafted)
    assert _mask_allows(demo_llm, {"json_schema": required}, '{"a": 1, "b": 2', "\n", drafted)
    assert not _mask_allows(demo_llm, {"json_schema": items}, "[1", "\n", drafted)
    assert _mask_allows(demo_llm, {"json_schema": items}, "[1, 2", "\n", drafted)
    assert _mask_allows(demo_llm, {"json_schema": required}, "{", "\n", drafted)  # the indent after `{` is not after a value


@pytest.mark.parametrize("spec", [{"choice": ["say <tool_call> now"]}, {"regex": "say <tool_call> [a-z]{3}"},
                                  {"json_schema": {"const": "<tool_call>"}}])
def test_grammar_text_spelling_a_plain_added_token_comes_out_whole(qwen_tools_path, spec):
    """Qwen's `<tool_call>` is an added token that is not special: text to the tokenizer, so a grammar may write it
    as text (llguidance took it for a special token, forced it, refused it, and the output stopped short)."""
    llm = LLM(str(qwen_tools_path))
    output = llm.generate(["Pick:"], SamplingParams(max_tokens=24, structured=StructuredOutputs(**spec)))[0].outputs[0]
    assert re.fullmatch(r'say <tool_call> [a-z]{3}|"<tool_call>"', output.text), output.text
    assert output.finish_reason == "stop"
