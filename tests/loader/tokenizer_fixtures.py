"""Tiny tokenizer checkpoints for the tokenizer tests, built offline with `tokenizers`.

Each builder trains a small BPE on an inline corpus and writes a folder laid out like a
Hugging Face checkpoint (tokenizer.json, tokenizer_config.json, optional
special_tokens_map.json / chat_template.jinja), so that `lmgen` and transformers'
`AutoTokenizer` can both load the very same files and be compared.

Two pipelines are covered:
- byte-level BPE (GPT-2 / Llama-3 / Qwen2 style): Split regex + ByteLevel, ByteLevel decoder;
- SentencePiece-style BPE (Llama-2 / Mistral / Gemma style): ▁ for spaces, `<0xNN>` byte
  tokens with byte_fallback, and the Replace/ByteFallback/Fuse(/Strip) decoder chain.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Hello world! This is a small corpus used to train a tiny tokenizer for the tests.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Streaming text must not lose spaces, newlines\nor tabs\tbetween tokens.",
    "Café, naïve, résumé, déjà vu, über, Ålesund, São Paulo, crème brûlée.",
    "日本語のテキストも少し入れます。東京は大きい都市です。",
    "Numbers like 12345, 3.14159 and 2024-07-26 appear in text too.",
    "def add(a, b):\n    return a + b  # Python code also shows up\n",
    "I'm sure you're right: it's what we've said, isn't it? Yes , it is .",
    "Large language models generate one token at a time and stream the text back.",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
    "Bonjour tout le monde, comment allez-vous aujourd'hui ?",
    "An assistant answers questions about the weather in Paris and Tokyo.",
]

# GPT-4 / Llama-3 style pre-tokenization regex (splits words, numbers, punctuation, spaces).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's variant: digits are split one by one.
QWEN2_SPLIT_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _corpus(repeat: int = 3) -> list[str]:
    return CORPUS * repeat


def _byte_level_json(vocab_size: int = 700) -> dict:
    """Train a byte-level BPE (no special tokens yet) and return its JSON description."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return json.loads(tok.to_str())


def _sentencepiece_like_json(vocab_size: int = 600, num_leading_specials: int = 3) -> dict:
    """Train a ▁-style BPE and lay out its vocab like Llama-2: specials, 256 byte tokens, pieces.

    The first `num_leading_specials` ids are left free for the special tokens of the family.
    Merges never cross a ▁ boundary because training splits on it; encoding then runs
    without splitting, exactly like SentencePiece-converted tokenizers.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # A limited alphabet forces the rarer characters onto the <0xNN> byte fallback.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=90, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(tok.to_str())["model"]
    pieces = sorted(trained["vocab"].items(), key=lambda item: item[1])
    vocab: dict[str, int] = {f"<special_{i}>": i for i in range(num_leading_specials)}
    for byte_token in BYTE_TOKENS:
        vocab[byte_token] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": trained["merges"],
    }
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None, "model": model}


def _rename_leading_specials(tokenizer_json: dict, names: list[str]) -> dict:
    vocab = tokenizer_json["model"]["vocab"]
    for i, name in enumerate(names):
        del vocab[f"<special_{i}>"]
        vocab[name] = i
    return tokenizer_json


def _added_token_entry(token_id: int, content: str, special: bool = True, normalized: bool = False) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": special}


def _config_added_tokens_decoder(added: list[dict]) -> dict:
    return {str(entry["id"]): {k: v for k, v in entry.items() if k != "id"} for entry in added}


def _write(folder: Path, tokenizer: Tokenizer, config: dict | None,
           special_tokens_map: dict | None = None, chat_template_file: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))
    if chat_template_file is not None:
        (folder / "chat_template.jinja").write_text(chat_template_file)
    return folder


def _append_added_tokens(tok: Tokenizer, specs: list[tuple[str, bool]]) -> list[dict]:
    """Add tokens after the trained vocab (like Llama-3 / Qwen2 do) and describe them."""
    entries = []
    for content, special in specs:
        token = AddedToken(content, special=special, normalized=not special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        entries.append(_added_token_entry(tok.token_to_id(content), content, special, not special))
    return entries


# ---------------------------------------------------------------------------------------------
# Chat templates, written out as the families ship them.

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Checkpoint builders


class Backends:
    """Trains each base model once; every checkpoint starts from a fresh copy of its JSON."""

    def __init__(self) -> None:
        self._byte_level: dict | None = None
        self._sentencepiece: dict | None = None

    def byte_level(self) -> dict:
        if self._byte_level is None:
            self._byte_level = _byte_level_json()
        return copy.deepcopy(self._byte_level)

    def sentencepiece(self) -> dict:
        if self._sentencepiece is None:
            self._sentencepiece = _sentencepiece_like_json(num_leading_specials=4)
        return copy.deepcopy(self._sentencepiece)


def build_llama3(folder: Path, backends: Backends) -> Path:
    """Byte-level BPE with a BOS-adding post-processor and the Llama 3 chat template in the config."""
    tok = Tokenizer.from_str(json.dumps(backends.byte_level()))
    specs = [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|reserved_special_token_0|>", True),
             ("<|start_header_id|>", True), ("<|end_header_id|>", True), ("<|eom_id|>", True),
             ("<|eot_id|>", True), ("<|python_tag|>", True)]
    added = _append_added_tokens(tok, specs)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        ),
    ])
    config = {
        "added_tokens_decoder": _config_added_tokens_decoder(added),
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
        # Llama 3 ships this as true; transformers ignores it for BPE models.
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return _write(folder, tok, config)


def build_qwen2(folder: Path, backends: Backends, *, cleanup: bool = False) -> Path:
    """Byte-level BPE without BOS; ChatML template in chat_template.jinja; non-special <tool_call>."""
    tokenizer_json = backends.byte_level()
    tokenizer_json["normalizer"] = {"type": "NFC"}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    specs = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
             ("<tool_call>", False), ("</tool_call>", False)]
    added = _append_added_tokens(tok, specs)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _config_added_tokens_decoder(added),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": cleanup,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    if cleanup:
        # Forces transformers to apply its cleanup even on a BPE model (off by default).
        config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    return _write(folder, tok, config, chat_template_file=QWEN25_TEMPLATE)


def build_mistral(folder: Path, backends: Backends) -> Path:
    """Llama-2/Mistral layout: Metaspace, byte_fallback, Strip decoder, BOS post-processor.

    Uses the legacy config layout: no added_tokens_decoder, AddedToken dicts and a
    special_tokens_map.json.
    """
    tokenizer_json = _rename_leading_specials(backends.sentencepiece(), ["<unk>", "<s>", "</s>", "<pad_unused>"])
    tokenizer_json["model"]["unk_token"] = "<unk>"
    tokenizer_json["added_tokens"] = [_added_token_entry(0, "<unk>"), _added_token_entry(1, "<s>"),
                                      _added_token_entry(2, "</s>")]
    tokenizer_json["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                       "split": False}
    tokenizer_json["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )

    def legacy_token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": legacy_token("<s>"),
        "chat_template": MISTRAL_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": legacy_token("</s>"),
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": legacy_token("<unk>"),
    }
    special_tokens_map = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    return _write(folder, tok, config, special_tokens_map=special_tokens_map)


def build_gemma(folder: Path, backends: Backends) -> Path:
    """Gemma layout: spaces normalized to ▁ (no dummy prefix), no Strip, <bos> post-processor."""
    tokenizer_json = _rename_leading_specials(backends.sentencepiece(), ["<pad>", "<eos>", "<bos>", "<unk>"])
    tokenizer_json["model"]["unk_token"] = "<unk>"
    tokenizer_json["added_tokens"] = [_added_token_entry(i, t) for i, t in
                                      enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])]
    tokenizer_json["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    tokenizer_json["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    added = [_added_token_entry(i, t) for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])]
    added += _append_added_tokens(tok, [("<start_of_turn>", True), ("<end_of_turn>", True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
    )
    config = {
        "added_tokens_decoder": _config_added_tokens_decoder(added),
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "chat_template": GEMMA_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    return _write(folder, tok, config)


def build_all(root: Path) -> dict[str, Path]:
    """Build every test checkpoint under `root`; returns family name -> folder."""
    backends = Backends()
    return {
        "llama3": build_llama3(root / "llama3", backends),
        "qwen2": build_qwen2(root / "qwen2", backends),
        "qwen2_cleanup": build_qwen2(root / "qwen2_cleanup", backends, cleanup=True),
        "mistral": build_mistral(root / "mistral", backends),
        "gemma": build_gemma(root / "gemma", backends),
    }


# ---------------------------------------------------------------------------------------------
# Later families, with their chat templates verbatim in tests/loader/chat_templates/ (sources there
# and in test_family_chat_templates.py).

CHAT_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"


def family_chat_template(name: str) -> str:
    """The template file `name`.jinja, exactly as the model ships it."""
    return (CHAT_TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _extend(folder: Path, specs: list[tuple[str, bool]], config_updates: dict) -> Path:
    """Append added tokens to a built checkpoint and update its config.

    A family that keeps an earlier family's tokenizer (Qwen3 on Qwen2's, Gemma 3 on Gemma's)
    is that checkpoint plus its new tokens; the template moves into tokenizer_config.json,
    where these models ship it.
    """
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    added = _append_added_tokens(tok, specs)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update(_config_added_tokens_decoder(added))
    config.update(config_updates)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return _write(folder, tok, config)


def build_qwen3(folder: Path, backends: Backends) -> Path:
    """Qwen2's tokenizer plus Qwen3's non-special <tool_response> and <think> tokens (Qwen/Qwen3-0.6B)."""
    build_qwen2(folder, backends)
    specs = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]
    return _extend(folder, specs, {"chat_template": family_chat_template("qwen3")})


def build_gemma3(folder: Path, backends: Backends) -> Path:
    """Gemma's tokenizer plus Gemma 3's image markers, named as google/gemma-3-1b-it names them."""
    build_gemma(folder, backends)
    specs = [("<start_of_image>", True), ("<end_of_image>", True)]
    updates = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "chat_template": family_chat_template("gemma3")}
    return _extend(folder, specs, updates)


def build_gpt_oss(folder: Path, backends: Backends) -> Path:
    """Byte-level BPE without BOS (o200k_harmony-like) with the harmony format's special tokens; bos, eos and
    pad as openai/gpt-oss-20b names them, its template in chat_template.jinja, where it ships it."""
    tok = Tokenizer.from_str(json.dumps(backends.byte_level()))
    specs = [("<|startoftext|>", True), ("<|endoftext|>", True), ("<|return|>", True), ("<|constrain|>", True),
             ("<|channel|>", True), ("<|start|>", True), ("<|end|>", True), ("<|message|>", True), ("<|call|>", True)]
    added = _append_added_tokens(tok, specs)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "added_tokens_decoder": _config_added_tokens_decoder(added),
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|return|>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return _write(folder, tok, config, chat_template_file=family_chat_template("gpt-oss"))


def build_phi4_mini(folder: Path, backends: Backends) -> Path:
    """Byte-level BPE without BOS (o200k-like); <|endoftext|> is bos, eos, pad and unk, as in
    microsoft/Phi-4-mini-instruct, and the role tokens are special."""
    tok = Tokenizer.from_str(json.dumps(backends.byte_level()))
    specs = [("<|endoftext|>", True), ("<|endofprompt|>", True), ("<|assistant|>", True), ("<|end|>", True),
             ("<|user|>", True), ("<|system|>", True), ("<|tool|>", True), ("<|/tool|>", True),
             ("<|tool_call|>", True), ("<|/tool_call|>", True), ("<|tool_response|>", True)]
    added = _append_added_tokens(tok, specs)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": _config_added_tokens_decoder(added),
        "bos_token": "<|endoftext|>",
        "chat_template": family_chat_template("phi4-mini"),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }
    return _write(folder, tok, config)
