"""Parity tests for lmgen.loader.tokenizer against transformers' AutoTokenizer on the same folders."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from lmgen.loader.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer
from tokenizer_fixtures import build_all

transformers = pytest.importorskip("transformers")

FAMILIES = ["llama3", "qwen2", "qwen2_cleanup", "mistral", "gemma"]
CHAT_FAMILIES = ["llama3", "qwen2", "mistral", "gemma"]
# Tokenizers whose decoder strips the leading space of a decoded string (Llama-2/Mistral `Strip`).
STRIPS_LEADING_SPACE = {"mistral"}

TEXTS = [
    "Hello world",
    " leading space",
    "   several leading spaces and trailing ones   ",
    "Café naïve crème brûlée — déjà vu",
    "你好，世界！日本語のテキスト",
    "emoji 🦙🔥👍🏽 and flags 🇫🇷",
    "line one\nline two\n\n\tindented",
    "Numbers 12345 and 3.14159, dates 2024-07-26",
    "it 's a dog , isn 't it ? I 'm sure you 're right .",
    "special tokens in text: <s> </s> <|im_start|> <|eot_id|> <bos> <start_of_turn>",
    "",
]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="session")
def lm(checkpoints: dict[str, Path]) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_pretrained(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def hf(checkpoints: dict[str, Path]) -> dict:
    return {name: transformers.AutoTokenizer.from_pretrained(str(path)) for name, path in checkpoints.items()}


# ---------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_match_transformers(family: str, lm: dict, hf: dict) -> None:
    tok, ref = lm[family], hf[family]
    assert tok.vocab_size == len(ref) == len(tok)
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(ref, name), name
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, name) == getattr(ref, name), name
    special_added = {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert tok.all_special_ids == special_added
    assert set(ref.all_special_ids) <= tok.all_special_ids
    assert tok.special_tokens_map == ref.special_tokens_map
    assert tok.chat_template == ref.chat_template


def test_post_processor_decides_bos(lm: dict) -> None:
    assert lm["llama3"].encode("Hi")[0] == lm["llama3"].bos_token_id
    assert lm["mistral"].encode("Hi")[0] == lm["mistral"].bos_token_id
    assert lm["gemma"].encode("Hi")[0] == lm["gemma"].bos_token_id
    assert lm["qwen2"].encode("Hi") == lm["qwen2"].encode("Hi", add_special_tokens=False)
    assert lm["mistral"].encode("Hi", add_special_tokens=False)[0] != lm["mistral"].bos_token_id


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    edit(config)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def _named_tokens_edit(config: dict) -> None:
    config["pad_token"] = "<tool_call>"  # a non-special added token: becomes special
    config["mask_token"] = "<mask_new>"  # not in the vocabulary: appended
    config["image_token"] = "<image>"  # model-specific named token
    config["unk_token"] = {"__type": "AddedToken", "content": "<unk_new>", "lstrip": True, "normalized": False,
                           "rstrip": False, "single_word": False}


def _legacy_overrides_edit(config: dict) -> None:
    config["pad_token"] = "▁the"  # a model-vocabulary piece used as pad
    config["additional_special_tokens"] = ["<extra_1>", "<s>"]
    config["split_special_tokens"] = True


@pytest.mark.parametrize("family,edit", [("qwen2", _named_tokens_edit), ("mistral", _legacy_overrides_edit)])
def test_config_special_token_variants(family: str, edit, checkpoints: dict, tmp_path: Path) -> None:
    folder = _edited_copy(checkpoints[family], tmp_path / family, edit)
    tok = Tokenizer.from_pretrained(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.vocab_size == len(ref)
    assert tok.special_tokens_map == ref.special_tokens_map
    assert tok.all_special_ids == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert tok.pad_token_id == ref.pad_token_id
    text = "a <tool_call> b <mask_new> <image> <unk_new>x <s> hi <extra_1> ▁the the <|im_start|>"
    assert tok.encode(text) == ref.encode(text)
    ids = tok.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("family,tokenizer_class", [
    ("mistral", "LlamaTokenizer"), ("qwen2", "Qwen2Tokenizer"), ("gemma", "GemmaTokenizer"),
])
def test_model_specific_tokenizer_class(family: str, tokenizer_class: str, checkpoints: dict, lm: dict,
                                        tmp_path: Path) -> None:
    # Real checkpoints name their class; transformers then rebuilds the pipeline in code, while
    # lmgen always reads tokenizer.json. Both must agree for a checkpoint laid out like the real one.
    folder = _edited_copy(checkpoints[family], tmp_path / family,
                          lambda config: config.update(tokenizer_class=tokenizer_class))
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert type(ref).__name__ == tokenizer_class
    tok = lm[family]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_missing_folder_raises(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Tokenizer.from_pretrained(missing)


def test_missing_tokenizer_json_raises(tmp_path: Path) -> None:
    folder = tmp_path / "only-config"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="only-config") as info:
        Tokenizer.from_pretrained(str(folder))
    assert "tokenizer.json" in str(info.value)
    assert "save_pretrained" in str(info.value)


# ---------------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_transformers(family: str, lm: dict, hf: dict) -> None:
    tok, ref = lm[family], hf[family]
    for text in TEXTS:
        for add_special in (True, False):
            assert tok.encode(text, add_special) == ref.encode(text, add_special_tokens=add_special), text
    assert tok.encode_batch(TEXTS) == [ref.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS, add_special_tokens=False) == ref(TEXTS, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_matches_transformers(family: str, lm: dict, hf: dict) -> None:
    tok, ref = lm[family], hf[family]
    rng = random.Random(family)
    id_lists = [tok.encode(text) for text in TEXTS]
    id_lists += [[rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in id_lists:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    assert tok.decode(tuple(id_lists[0])) == ref.decode(id_lists[0])


def test_cleanup_follows_transformers(lm: dict, hf: dict) -> None:
    # Llama 3 asks for the cleanup, but transformers ignores it on BPE models unless forced.
    assert not lm["llama3"].clean_up_tokenization_spaces
    assert lm["qwen2_cleanup"].clean_up_tokenization_spaces
    ids = lm["qwen2_cleanup"].encode("it 's a dog , is n't it ?")
    assert lm["qwen2_cleanup"].decode(ids) == hf["qwen2_cleanup"].decode(ids) == "it's a dog, isn't it?"


@pytest.mark.parametrize("family", FAMILIES)
def test_id_token_conversions(family: str, lm: dict, hf: dict) -> None:
    tok, ref = lm[family], hf[family]
    for token_id in range(0, tok.vocab_size, 37):
        token = tok.id_to_token(token_id)
        assert token == ref.convert_ids_to_tokens(token_id)
        assert tok.token_to_id(token) == token_id
    assert tok.id_to_token(tok.vocab_size + 10) is None
    assert tok.token_to_id("definitely-not-a-token-\u2603\u2603") is None


# ---------------------------------------------------------------------------------- chat templates

CONVERSATION = [
    {"role": "user", "content": "Bonjour ! Quel temps fait-il à Paris ? 🌦"},
    {"role": "assistant", "content": "  Il pleut, désolé.  "},
    {"role": "user", "content": "Et à Tokyo 東京 ?"},
]
WITH_SYSTEM = [{"role": "system", "content": "Tu es un assistant concis."}, *CONVERSATION]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Nom de la ville, p. ex. « Paris »"}},
            "required": ["city"],
        },
    },
}]
TOOL_CALL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 12, "sky": "pluie"}'},
]

CHAT_CASES = {
    "single_turn": dict(messages=CONVERSATION[:1]),
    "single_turn_prompt": dict(messages=CONVERSATION[:1], add_generation_prompt=True),
    "multi_turn": dict(messages=CONVERSATION),
    "multi_turn_prompt": dict(messages=CONVERSATION, add_generation_prompt=True),
    "continue_final": dict(messages=CONVERSATION[:2], continue_final_message=True),
}
FAMILY_CASES = {
    "llama3": {
        "system": dict(messages=WITH_SYSTEM, add_generation_prompt=True),
        "tools": dict(messages=WITH_SYSTEM, tools=TOOLS, add_generation_prompt=True),
        "tools_in_system": dict(messages=WITH_SYSTEM, tools=TOOLS, tools_in_user_message=False,
                                date_string="01 Jan 2025"),
        "tool_calls": dict(messages=TOOL_CALL_CONVERSATION, add_generation_prompt=True),
    },
    "qwen2": {
        "system": dict(messages=WITH_SYSTEM, add_generation_prompt=True),
        "tools": dict(messages=CONVERSATION, tools=TOOLS, add_generation_prompt=True),
        "tool_calls": dict(messages=TOOL_CALL_CONVERSATION, tools=TOOLS, add_generation_prompt=True),
    },
    "mistral": {},
    "gemma": {},
}


def _chat_params():
    for family in CHAT_FAMILIES:
        for name in [*CHAT_CASES, *FAMILY_CASES[family]]:
            yield pytest.param(family, name, id=f"{family}-{name}")


@pytest.mark.parametrize("family,case", list(_chat_params()))
def test_chat_template_matches_transformers(family: str, case: str, lm: dict, hf: dict) -> None:
    kwargs = dict({**CHAT_CASES, **FAMILY_CASES[family]}[case])
    messages = kwargs.pop("messages")
    expected_text = hf[family].apply_chat_template(messages, tokenize=False, **kwargs)
    expected_ids = hf[family].apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert lm[family].apply_chat_template(messages, **kwargs) == expected_text
    assert lm[family].encode_chat(messages, **kwargs) == expected_ids


def test_continue_final_message_cuts_after_content(lm: dict) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]
    for family in CHAT_FAMILIES:
        assert lm[family].apply_chat_template(messages, continue_final_message=True).endswith("The answer is")
    with pytest.raises(ValueError, match="cannot be combined"):
        lm["qwen2"].apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)


def test_messages_are_not_mutated(lm: dict) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    snapshot = json.dumps(messages)
    lm["qwen2"].apply_chat_template(messages, continue_final_message=True)
    assert json.dumps(messages) == snapshot


@pytest.mark.parametrize("family,messages,message", [
    ("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    ("mistral", [{"role": "system", "content": "be nice"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate"),
    ("gemma", [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
     "System role not supported"),
    ("gemma", [{"role": "assistant", "content": "hi"}], "Conversation roles must alternate"),
])
def test_raise_exception_becomes_chat_template_error(family, messages, message, lm: dict, hf: dict) -> None:
    with pytest.raises(ChatTemplateError, match=message.replace(".", r"\.")) as info:
        lm[family].apply_chat_template(messages)
    assert isinstance(info.value, ValueError)
    with pytest.raises(Exception, match=message.replace(".", r"\.")):
        hf[family].apply_chat_template(messages, tokenize=False)


def test_missing_chat_template_explains_the_fix(checkpoints: dict, tmp_path: Path, hf: dict) -> None:
    folder = tmp_path / "no-template"
    folder.mkdir()
    shutil.copy(checkpoints["qwen2"] / "tokenizer.json", folder / "tokenizer.json")
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat_template="):
        tok.apply_chat_template(CONVERSATION)
    from tokenizer_fixtures import QWEN25_TEMPLATE

    rendered = tok.apply_chat_template(CONVERSATION, chat_template=QWEN25_TEMPLATE, add_generation_prompt=True)
    assert rendered == hf["qwen2"].apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_chat_template_sources(checkpoints: dict, tmp_path: Path) -> None:
    from tokenizer_fixtures import GEMMA_TEMPLATE, MISTRAL_TEMPLATE

    folder = tmp_path / "json-template"
    shutil.copytree(checkpoints["gemma"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": GEMMA_TEMPLATE}))
    assert Tokenizer.from_pretrained(folder).chat_template == GEMMA_TEMPLATE

    # Named templates: the .jinja files win over the config, "tool_use" is picked when tools are given.
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS{{ tools | length }}")
    (folder / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    tok = Tokenizer.from_pretrained(folder)
    assert tok.chat_template == MISTRAL_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION[:1], tools=TOOLS) == "TOOLS1"
    assert tok.apply_chat_template(CONVERSATION[:1], chat_template="tool_use", tools=[]) == "TOOLS0"


def test_template_helpers(lm: dict) -> None:
    tok = lm["qwen2"]
    template = (
        "{{ messages[0].content | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2) }}|"
        "{{ {'x': 1} | tojson(separators=(',', ':')) }}|{{ strftime_now('%Y') | length }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.n }}|{{ eos_token }}|{{ custom }}"
    )
    messages = [{"role": "user", "content": "é <b>\"q\"</b>"}, {"role": "assistant", "content": "x"}]
    rendered = tok.apply_chat_template(messages, chat_template=template, custom="kw")
    expected = '"é <b>\\"q\\"</b>"|{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}|{"x":1}|4|user|2|<|im_end|>|kw'
    assert rendered == expected
    # Sandboxed: no reaching into Python internals, not even through a namespace.
    with pytest.raises(ChatTemplateError, match="unsafe"):
        tok.apply_chat_template(messages, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="namespace"):
        tok.apply_chat_template(messages, chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    documents = [{"title": "Doc", "text": "Texte"}]
    rag = "{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}{{ tools is none }}"
    assert tok.apply_chat_template(messages, chat_template=rag, documents=documents) == "[Doc: Texte]True"
    # {% generation %} (assistant-mask markers) renders its body.
    generation = "{% for m in messages %}{% generation %}{{ m.role }};{% endgeneration %}{% endfor %}"
    assert tok.apply_chat_template(messages, chat_template=generation) == "user;assistant;"
    with pytest.raises(ChatTemplateError, match="compile"):
        tok.apply_chat_template(messages, chat_template="{% if %}")


# ---------------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool, rng: random.Random) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(ids):
        step = rng.choice((1, 1, 1, 2, 3))
        deltas.append(detok.add_tokens(ids[i:i + step]))
        i += step
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return detok.text, deltas


def _assert_stream_text(family: str, tok: Tokenizer, text: str, ids: list[int], skip: bool, has_context: bool) -> None:
    expected = tok.decode(ids, skip_special_tokens=skip)
    if text == expected:
        return
    # A Strip decoder drops the first token's leading space in decode(ids); with prompt context
    # the stream keeps it, which is what the text continuing the prompt really looks like.
    kept = [i for i in ids if not (skip and i in tok.all_special_ids)]
    first = tok.id_to_token(kept[0]) if kept else ""
    assert family in STRIPS_LEADING_SPACE and has_context, (text, expected, ids)
    assert text == " " + expected and first.startswith(("▁", "<0x20>")), (text, expected, ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_random_ids(family: str, skip: bool, lm: dict, hf: dict) -> None:
    tok = lm[family]
    rng = random.Random(f"{family}-{skip}")
    # Half the draws come from a pool rich in byte tokens, specials and cleanup-prone pieces.
    pool_text = "it 's a dog , isn 't it ? ' quoted ' Café 你好 🦙 ñ  \n"
    pool = sorted(set(tok.encode(pool_text, add_special_tokens=False)) | tok.all_special_ids)
    pool += [i for i in (tok.token_to_id(f"<0x{b:02X}>") for b in (0x20, 0x27, 0x80, 0xE4, 0xBD, 0xF0)) if i]
    for trial in range(250):
        draw = (lambda: rng.choice(pool)) if trial % 2 else (lambda: rng.randrange(tok.vocab_size))
        ids = [draw() for _ in range(rng.randrange(1, 25))]
        prompt = [draw() for _ in range(rng.choice((0, 1, 5, 9)))]
        text, _ = _stream(tok, prompt, ids, skip, rng)
        _assert_stream_text(family, tok, text, ids, skip, has_context=bool(prompt))
        if not prompt:
            assert text == tok.decode(ids, skip_special_tokens=skip)
        if trial % 25 == 0:
            assert tok.decode(ids, skip_special_tokens=skip) == hf[family].decode(ids, skip_special_tokens=skip)


STREAM_TEXTS = [
    " Hello there, how are you?",
    "Café naïve 🦙🦙 crème — 你好，世界！ 日本語 ñandú",
    "  two leading spaces\n\nthen 👍🏽 emoji with skin tone and 🇫🇷 flag",
    "Привет мир 東京 αβγ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "it 's done , isn 't it ? 'quoted' ",
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_texts(family: str, skip: bool, lm: dict, hf: dict) -> None:
    tok = lm[family]
    rng = random.Random(0)
    prompt = tok.encode("User: write something\nAssistant:")
    for body in STREAM_TEXTS:
        ids = tok.encode(body, add_special_tokens=False)
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        for context in (prompt, []):
            text, deltas = _stream(tok, context, ids, skip, rng)
            _assert_stream_text(family, tok, text, ids, skip, has_context=bool(context))
            # Valid text never shows a broken character, not even transiently.
            assert not any("\ufffd" in delta for delta in deltas)
        assert tok.decode(ids, skip_special_tokens=skip) == hf[family].decode(ids, skip_special_tokens=skip)


def test_stream_keeps_leading_space_of_first_token(lm: dict) -> None:
    tok = lm["mistral"]
    prompt = tok.encode("[INST] Say hello [/INST]")
    ids = tok.encode("[INST] Say hello [/INST] Hello world", add_special_tokens=True)[len(prompt):]
    assert tok.id_to_token(ids[0]).startswith("▁")
    detok = IncrementalDetokenizer(tok, prompt)
    first = detok.add_tokens(ids[:1])
    assert first.startswith(" ")
    for token_id in ids[1:]:
        detok.add_tokens([token_id])
    detok.flush()
    assert detok.text == " Hello world"
    assert tok.decode(ids) == "Hello world"  # what a bare decode gives


def test_stream_holds_incomplete_characters(lm: dict) -> None:
    for family in ("qwen2", "mistral"):
        tok = lm[family]
        ids = tok.encode("a🦙b", add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, [])
        deltas = [detok.add_tokens([i]) for i in ids]
        assert "".join(deltas) == "a🦙b"
        assert all("\ufffd" not in d for d in deltas)
        if family == "qwen2":
            # Byte-level: the character is emitted as soon as its last byte arrives.
            assert deltas[-2].endswith("🦙")
        else:
            # ByteFallback decodes a run of <0xNN> tokens as a whole (all U+FFFD if any byte is
            # invalid), so the run is released when a regular token closes it.
            assert deltas[-1] == "🦙b"
        # A character cut off at the end comes out on flush, as decode would render it.
        detok = IncrementalDetokenizer(tok, [])
        partial = tok.encode("b🦙", add_special_tokens=False)[:-1]
        assert "".join(detok.add_tokens([i]) for i in partial) == "b"
        assert detok.flush() == tok.decode(partial)[1:]
        assert detok.flush() == ""


def test_stream_work_is_windowed(lm: dict) -> None:
    tok = lm["llama3"]
    ids = tok.encode(" ".join(STREAM_TEXTS * 40), add_special_tokens=False)
    decoded_lengths: list[int] = []
    original = tok.decode

    def counting_decode(token_ids, skip_special_tokens=False):
        decoded_lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens=skip_special_tokens)

    tok.decode = counting_decode
    try:
        detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
        for token_id in ids:
            detok.add_tokens([token_id])
        detok.flush()
    finally:
        del tok.decode
    assert detok.text == tok.decode(ids)
    assert len(ids) > 1000
    assert max(decoded_lengths) <= 16
    assert sum(decoded_lengths) <= 8 * len(ids)
