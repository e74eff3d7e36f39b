"""Tokenizer for a local checkpoint folder: `tokenizer.json` through the `tokenizers` library.

Loading follows what transformers' fast tokenizer does with the same folder, so that
token ids, special tokens, decoded text and rendered chat templates match it:

- `tokenizer.json` is used as-is (normalizer, pre-tokenizer, model, post-processor, decoder);
  the post-processor decides which BOS/EOS `encode` adds.
- `tokenizer_config.json` names the special tokens (strings or AddedToken dicts), may carry
  `added_tokens_decoder` and the chat template; `special_tokens_map.json` is only read when
  the config has no `added_tokens_decoder` (the legacy layout), and then overrides it.
- Chat templates: `chat_template.jinja` (+ `additional_chat_templates/*.jinja`) win over the
  config's `chat_template`; `chat_template.json` is the last fallback.

`IncrementalDetokenizer` turns generated ids into text deltas for streaming.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

# The named special tokens transformers knows about, in the order it registers them.
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_REPLACEMENT_CHAR = "\ufffd"

# transformers' `clean_up_tokenization`: applied in this order, each as a plain replace.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)
# Text ending in one of these may still be rewritten by the cleanup once more text follows.
_CLEANUP_OPEN_SUFFIXES = tuple(sorted(
    {pattern[:i] for pattern, _ in _CLEANUP_REPLACEMENTS for i in range(1, len(pattern))}, key=len, reverse=True
))

# Marker appended to the final message for `continue_final_message`; the render is cut there.
_CONTINUE_MARKER = "LMGEN_CONTINUE_FINAL_MESSAGE "

# Names a message's reasoning may arrive under; templates read `reasoning_content` or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (its `raise_exception(...)`) or failed to compile/render."""


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation and English contractions, as transformers does."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


class Tokenizer:
    """Encode/decode text and render chat templates for one checkpoint.

    Build it with `Tokenizer.from_pretrained(folder)`. The constructor takes an already
    loaded `tokenizers.Tokenizer` and registers the named special tokens on it (mutating it),
    the way transformers does when it loads a folder.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | AddedToken | None] | None = None,
        extra_special_tokens: Sequence[str | AddedToken] = (),
        added_tokens: Sequence[AddedToken] = (),
        chat_templates: Mapping[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
    ) -> None:
        """
        Args:
            backend: the `tokenizers` pipeline (from tokenizer.json).
            special_tokens: attribute name (`bos_token`, `eos_token`, ..., or a model-specific
                `*_token`) -> token; these are also passed to chat templates.
            extra_special_tokens: further special tokens (`additional_special_tokens`).
            added_tokens: tokens from the config's `added_tokens_decoder`, re-registered first
                so that their flags (lstrip, normalized, special, ...) win over tokenizer.json's.
            chat_templates: template name -> Jinja source; "default" is the plain one.
            clean_up_tokenization_spaces: apply transformers' space cleanup after decoding.
            split_special_tokens: encode special tokens found in text as plain text.
        """
        self._backend = backend
        # Like transformers, encode never truncates or pads unless asked to.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = split_special_tokens

        named = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        _register_tokens(backend, list(added_tokens), list(named.values()), list(extra_special_tokens))
        self._special_tokens_map = {name: _content(token) for name, token in named.items()}
        self._chat_templates = dict(chat_templates or {})
        self._clean_up = clean_up_tokenization_spaces

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = self._special_tokens_map.get("bos_token")
        self.eos_token: str | None = self._special_tokens_map.get("eos_token")
        self.pad_token: str | None = self._special_tokens_map.get("pad_token")
        self.unk_token: str | None = self._special_tokens_map.get("unk_token")
        self.bos_token_id: int | None = self._id_or_none(self.bos_token)
        self.eos_token_id: int | None = self._id_or_none(self.eos_token)
        self.pad_token_id: int | None = self._id_or_none(self.pad_token)
        self.unk_token_id: int | None = self._id_or_none(self.unk_token)
        # What `decode(..., skip_special_tokens=True)` drops: every added token flagged special.
        self.all_special_ids: frozenset[int] = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        self._byte_fallback_ids: frozenset[int] | None = None

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load the tokenizer of a local checkpoint folder (the one holding tokenizer.json)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Tokenizer folder {str(folder)!r} does not exist. Pass the local folder of a checkpoint "
                "(the one that holds tokenizer.json); download it first if it is on the Hub."
            )
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"No tokenizer.json in {str(folder)!r}. lmgen needs the fast-tokenizer file; if the checkpoint "
                "only has a slow tokenizer (tokenizer.model / vocab files), convert it once with transformers: "
                f"AutoTokenizer.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r})."
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json") or {}

        named, extras = _special_tokens_from_config(config)
        added_tokens: list[AddedToken] = []
        if "added_tokens_decoder" in config:
            added_tokens = _added_tokens_from_config(config["added_tokens_decoder"], named)
        else:
            # Legacy layout: special_tokens_map.json overrides the config's entries.
            legacy_map = _read_json(folder / "special_tokens_map.json") or {}
            named, extras = _merge_legacy_special_tokens_map(named, extras, legacy_map)
        padding = backend.padding
        if "pad_token" not in named and padding is not None and padding.get("pad_token"):
            named["pad_token"] = padding["pad_token"]

        clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        if clean_up and type(backend.model).__name__ == "BPE":
            # transformers skips its cleanup for BPE models unless explicitly forced.
            clean_up = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        return cls(
            backend,
            special_tokens=named,
            extra_special_tokens=extras,
            added_tokens=added_tokens,
            chat_templates=_load_chat_templates(folder, config),
            clean_up_tokenization_spaces=clean_up,
            split_special_tokens=bool(config.get("split_special_tokens", False)),
        )

    # ------------------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (`bos_token`, `eos_token`, ...) as strings; chat templates see these."""
        return dict(self._special_tokens_map)

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None when the checkpoint has none."""
        return self._chat_templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """Every chat template of the checkpoint by name ("default", "tool_use", ...)."""
        return dict(self._chat_templates)

    @property
    def clean_up_tokenization_spaces(self) -> bool:
        """Whether `decode` applies transformers' space cleanup."""
        return self._clean_up

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs the post-processor (BOS/EOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for several texts at once (parallel in the Rust backend)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `token_ids`, identical to transformers' fast tokenizer `decode`."""
        ids = token_ids if isinstance(token_ids, list) else [int(i) for i in token_ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self._clean_up else text

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of `token_id` (added tokens included), None if out of range."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of the vocabulary string `token`, None if it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ------------------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's chat template, like transformers does.

        Args:
            messages: dicts with at least "role" and "content"; keys whose value is None are dropped.
            add_generation_prompt: append the header that opens the assistant's reply.
            continue_final_message: render, then cut right after the final message's content,
                so generation continues that message (a field name may be given instead of True).
            tools: JSON schemas of callable tools, for templates that support them.
            documents: dicts with "title" and "text", for RAG templates.
            chat_template: a template source, or the name of one of the checkpoint's templates.
            **template_kwargs: extra variables for the template (they override the special tokens).

        Raises:
            ChatTemplateError: the template rejected the conversation or could not be rendered.
            ValueError: no template is available, or the arguments conflict.
        """
        source = self._resolve_chat_template(chat_template, tools)
        if continue_final_message and add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot be combined: the first continues the "
                "last message, the second opens a new assistant message."
            )
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation.")
        chat = _normalize_messages(messages)
        tools = _plain_copy(_check_tools(tools))
        documents = _plain_copy(_check_documents(documents))
        variables = {**self._special_tokens_map, **_plain_copy(template_kwargs)}

        continued = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            continued = _mark_final_message(chat, field, source)

        rendered = _render(source, chat, tools, documents, add_generation_prompt, variables)
        if continued is not None:
            rendered = _cut_after_final_message(rendered, continued)
        return rendered

    def encode_chat(self, messages: list[dict], **kwargs: Any) -> list[int]:
        """Render with `apply_chat_template` (same keyword arguments) and encode the text.

        The template writes the special tokens itself, so nothing is added on top
        (`add_special_tokens=False`), as transformers does.
        """
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    def _resolve_chat_template(self, chat_template: str | None, tools: list[dict] | None) -> str:
        templates = self._chat_templates
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        if templates:
            raise ValueError(
                "This checkpoint has several chat templates and none is the default; pass "
                f"chat_template=<name> with one of {sorted(templates)}."
            )
        raise ValueError(
            "This tokenizer has no chat template (no chat_template.jinja and no 'chat_template' in "
            "tokenizer_config.json). Pass one explicitly: apply_chat_template(messages, chat_template='...')."
        )

    # ------------------------------------------------------------------------------ streaming helpers

    def _byte_fallback_token_ids(self) -> frozenset[int]:
        """Ids of `<0xNN>` tokens when the decoder joins them into bytes (ByteFallback), else empty."""
        if self._byte_fallback_ids is None:
            ids: set[int] = set()
            if _decoder_has(self._backend, "ByteFallback"):
                for byte in range(256):
                    for spelling in (f"<0x{byte:02X}>", f"<0x{byte:02x}>"):
                        token_id = self._backend.token_to_id(spelling)
                        if token_id is not None:
                            ids.add(token_id)
            self._byte_fallback_ids = frozenset(ids)
        return self._byte_fallback_ids


# ---------------------------------------------------------------------------------- config helpers


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _content(token: str | AddedToken) -> str:
    return token if isinstance(token, str) else token.content


def _added_token(value: str | dict | AddedToken, *, special: bool | None = None) -> AddedToken:
    """An AddedToken from a string or a config dict ({"content": ..., "lstrip": ..., ...})."""
    if isinstance(value, AddedToken):
        token = value
    elif isinstance(value, str):
        # A plain string special token matches text as written (not normalized), as in transformers.
        token = AddedToken(value, special=True, normalized=False)
    else:
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
        token = AddedToken(value["content"], **flags)
    if special is not None:
        token.special = special
    return token


def _token_value(value: Any) -> str | AddedToken | None:
    """A special-token entry of tokenizer_config.json: None, a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return _added_token({k: v for k, v in value.items() if k != "__type"}, special=True)
    raise ValueError(f"Unsupported special token entry in tokenizer_config.json: {value!r}")


def _special_tokens_from_config(config: dict) -> tuple[dict[str, Any], list[Any]]:
    """Named special tokens (standard and model-specific `*_token` keys) and the extra list."""
    named: dict[str, Any] = {}
    for name in SPECIAL_TOKEN_ATTRIBUTES:
        if name in config:
            named[name] = _token_value(config[name])
    # transformers also treats model-specific string entries ("image_token", ...) as named tokens.
    for key, value in config.items():
        if key.endswith("_token") and key not in SPECIAL_TOKEN_ATTRIBUTES and isinstance(value, str):
            named[key] = value
    extras_value = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extras_value, dict):
        named.update({k: _token_value(v) for k, v in extras_value.items()})
        extras_value = []
    extras = [_token_value(v) for v in extras_value]
    return named, [e for e in extras if e is not None]


def _merge_legacy_special_tokens_map(
    named: dict[str, Any], extras: list[Any], legacy_map: dict
) -> tuple[dict[str, Any], list[Any]]:
    named = dict(named)
    extras = list(extras)
    for key, value in legacy_map.items():
        if key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(value, dict):
                named.update({k: _token_value(v) for k, v in value.items()})
                continue
            for item in value or []:
                token = _token_value(item)
                if token is not None and _content(token) not in {_content(e) for e in extras}:
                    extras.append(token)
        else:
            named[key] = _token_value(value)
    return named, extras


def _added_tokens_from_config(entries: dict, named: dict[str, Any]) -> list[AddedToken]:
    """The config's added_tokens_decoder, sorted by id; a named special token is always special."""
    named_contents = {_content(v) for v in named.values() if v is not None}
    tokens = []
    for _, entry in sorted(entries.items(), key=lambda item: int(item[0])):
        token = _added_token({k: v for k, v in entry.items() if k != "__type"})
        if not token.special and token.content in named_contents:
            token.special = True
        tokens.append(token)
    return tokens


def _register_tokens(
    backend: BackendTokenizer, added: list[AddedToken], named: list[Any], extras: list[Any]
) -> None:
    """Register tokens on the backend the way transformers' fast tokenizer does at load time.

    The config's added tokens are re-added (their flags win); a named or extra special token
    is added only when no added token has its text yet, so an existing one keeps its flags.
    """
    known = {token.content for token in backend.get_added_tokens_decoder().values()}
    known.update(token.content for token in added)
    to_add = list(added)
    for value in [*named, *extras]:
        if value is None or _content(value) in known:
            continue
        to_add.append(_added_token(value, special=True))
        known.add(_content(value))
    if to_add:
        backend.add_tokens(to_add)


def _load_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Template name -> source; standalone .jinja files take priority over the config."""
    templates: dict[str, str] = {}
    default_file = folder / "chat_template.jinja"
    if default_file.is_file():
        templates["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for template_file in sorted(extra_dir.glob("*.jinja")):
            templates[template_file.name.removesuffix(".jinja")] = template_file.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if value is None:
        # Processor-style checkpoints keep the template in chat_template.json.
        value = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {entry["name"]: entry["template"] for entry in value}
    if isinstance(value, dict):
        return dict(value)
    return {}


def _decoder_has(backend: BackendTokenizer, decoder_type: str) -> bool:
    decoder = backend.decoder
    if decoder is None:
        return False
    state = json.loads(decoder.__getstate__())

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == decoder_type or any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(state)


# ---------------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` for templates; refuses underscore names so templates cannot reach internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same calling trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    """Compile a chat template once; the environment mirrors the one transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"The chat template does not compile: {error}") from error


def _render(source: str, messages: list[dict], tools: Any, documents: Any,
            add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    template = _compile(source)
    try:
        return template.render(
            **{**variables, "messages": messages, "tools": tools, "documents": documents,
               "add_generation_prompt": add_generation_prompt}
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as error:
        raise ChatTemplateError(f"Rendering the chat template failed: {error}") from error


def _plain_copy(value: Any) -> Any:
    """A deep copy made of plain JSON-like types (dataclasses and pydantic models become dicts)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_copy(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_copy(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_copy(value.model_dump())
    return copy.deepcopy(value)


def _normalize_messages(messages: Iterable[Any]) -> list[dict]:
    """Copy the messages, drop None-valued keys and alias the reasoning fields, as transformers does."""
    chat = []
    for message in messages:
        message = _plain_copy(message)
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages must be dicts, got {message!r}.")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _check_tools(tools: list[dict] | None) -> list[dict] | None:
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, Mapping):
                raise TypeError(f"Tools must be JSON schemas (dicts), got {tool!r}.")
    return tools


def _check_documents(documents: list[dict] | None) -> list[dict] | None:
    if documents is not None:
        for document in documents:
            if not isinstance(document, Mapping):
                raise TypeError("Documents must be a list of dicts with 'title' and 'text' keys.")
    return documents


def _mark_final_message(chat: list[dict], field: str, source: str) -> str:
    """Append the continue marker to the final message's `field`; returns the original text."""
    final = chat[-1]
    if final.get(field) is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue.")
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [name for name in _REASONING_FIELDS if final.get(name) == final[field]]
    if not any(name in source for name in fields):
        raise ValueError(f"continue_final_message: the chat template never reads the message field {field!r}.")
    value = final[field]
    if isinstance(value, (list, tuple)):
        # Content blocks: continue the last text block.
        for block in reversed(value):
            if isinstance(block, dict) and "text" in block:
                original = block["text"]
                block["text"] = original + _CONTINUE_MARKER
                return original
        raise ValueError("continue_final_message is set but the final message has no text block to continue.")
    for name in fields:
        final[name] = final[name] + _CONTINUE_MARKER
    return value


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    marker = _CONTINUE_MARKER.strip()
    if final_text.strip() not in rendered or marker not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered chat; the "
            "template changes or drops it, so it cannot be continued."
        )
    cut = rendered.rindex(marker)
    if rendered.startswith(_CONTINUE_MARKER, cut):
        return rendered[:cut]
    # The template trimmed the message, so the marker's trailing space is gone; trim likewise.
    return rendered[:cut].rstrip()


# ---------------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas for streaming.

    Invariant: `text` (all deltas so far) is a prefix of the final decode, and after `flush()`
    it equals `tokenizer.decode(generated_ids, skip_special_tokens=...)` -- except that the
    first generated token keeps its leading space when the prompt gives it context (a
    SentencePiece decoder would strip it at the start of a string).

    Each step decodes only a short window: the tokens of the last emitted chunk (whose text
    is known) plus the new ones, and emits the difference. Text is held back while it may
    still change: a trailing U+FFFD (incomplete UTF-8), an unfinished run of `<0xNN>`
    byte-fallback tokens, or an ending that transformers' space cleanup could rewrite.
    """

    # Prompt tokens decoded as context before the first generated token.
    _CONTEXT_TOKENS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._byte_ids = tokenizer._byte_fallback_token_ids()
        context = [int(i) for i in prompt_ids[-self._CONTEXT_TOKENS:]] if len(prompt_ids) else []
        # The context must end at a settled point, otherwise its tail would merge with the
        # first generated tokens and change text that decode(generated_ids) would not change.
        while context and not self._is_settled(context, self._decode(context)):
            context.pop()
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start: first token of the last emitted chunk
        self._read_offset = len(context)  # tokens before this are already emitted
        self._prefix_text = self._decode(context)  # decode(ids[prefix_offset:read_offset])
        self._pieces: list[str] = []
        self._text = ""

    @property
    def text(self) -> str:
        """All generated text so far: the concatenation of every returned delta."""
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        return self._text

    def add_tokens(self, new_ids: Sequence[int] | int) -> str:
        """Append generated ids; return only the newly completed text (possibly "")."""
        if isinstance(new_ids, int):
            new_ids = [new_ids]
        if len(new_ids) == 0:
            return ""
        self._ids.extend(int(i) for i in new_ids)
        if self._byte_run_open():
            return ""
        window_text = self._decode(self._ids[self._prefix_offset:])
        if not self._is_settled(None, window_text):
            return ""
        return self._emit(window_text)

    def flush(self) -> str:
        """Emit whatever is held back (even text ending in U+FFFD); call once generation ends."""
        if self._read_offset == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids[self._prefix_offset:]))

    # ------------------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _emit(self, window_text: str) -> str:
        delta = window_text[len(self._prefix_text):]
        chunk_text = self._decode(self._ids[self._read_offset:])
        if chunk_text:
            # The new chunk becomes the window's known prefix for the next step.
            self._prefix_offset = self._read_offset
            self._prefix_text = chunk_text
        else:
            # A chunk that decodes to nothing (skipped specials, a lone stripped ▁) cannot anchor
            # the window: the decoder would strip the next token's leading space. Keep the old start.
            self._prefix_text = window_text
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def _is_settled(self, ids: list[int] | None, text: str) -> bool:
        """True when `text` (the decode of a window ending at the last id) cannot change anymore."""
        if text.endswith(_REPLACEMENT_CHAR):
            return False
        if ids is not None and self._byte_ids and self._last_kept_is_byte(ids, 0):
            return False
        if self._tokenizer.clean_up_tokenization_spaces and text.endswith(_CLEANUP_OPEN_SUFFIXES):
            return False
        return True

    def _byte_run_open(self) -> bool:
        # ByteFallback decodes a whole run of <0xNN> tokens at once (all U+FFFD if invalid), so a
        # run may only be emitted once a regular token closes it.
        return bool(self._byte_ids) and self._last_kept_is_byte(self._ids, self._read_offset)

    def _last_kept_is_byte(self, ids: list[int], start: int) -> bool:
        special_ids = self._tokenizer.all_special_ids
        for index in range(len(ids) - 1, start - 1, -1):
            token_id = ids[index]
            if self._skip_special and token_id in special_ids:
                continue  # skipped tokens are invisible to the decoder
            return token_id in self._byte_ids
        return False
