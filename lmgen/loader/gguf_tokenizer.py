"""The tokenizer a GGUF file describes, as a `tokenizers` pipeline wrapped in lmgen's Tokenizer.

A GGUF file carries no tokenizer.json: its metadata lists the vocabulary (``tokenizer.ggml.tokens``,
with a type per token), the merges or the SentencePiece scores, the pre-tokenizer's name, the
special token ids, whether BOS/EOS are added, and the chat template. Two kinds are built, so that
ids match transformers' conversion of the same file (``AutoTokenizer.from_pretrained(..., gguf_file=)``):

- ``gpt2``: byte-level BPE; the text is split by the regular expression the model's pre-tokenizer
  name (``tokenizer.ggml.pre``) stands for, GPT-2's otherwise.
- ``llama``: SentencePiece BPE with byte fallback, "▁" for spaces and one prepended to the text;
  merges are the file's or, when it has none, every split of a token into two tokens, best score
  first. Gemma and Phi-3 files differ in small ways (see their builders).

Control tokens become special added tokens, user-defined ones plain added tokens.
"""

from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from lmgen.errors import UnsupportedModelError
from lmgen.loader.gguf import GGUFCheckpoint
from lmgen.loader.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# The splits of llama.cpp's pre-tokenizer names (the models' own tokenizer.json patterns).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = _WORDS + r"\p{N}{1,3}" + _REST
_QWEN2 = _WORDS + r"\p{N}" + _REST
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{suffix}"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{suffix}"
          r"|\p{N}{digits}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = _CASED.replace("{suffix}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?").replace("{digits}", "{1,3}")
_TEKKEN = _CASED.replace("{suffix}", "").replace("{digits}", "")
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), _GPT4O),
    "tekken": _TEKKEN,
}


def gguf_tokenizer(checkpoint: GGUFCheckpoint) -> Tokenizer:
    """lmgen's Tokenizer for the file's tokenizer metadata."""
    meta = checkpoint.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UnsupportedModelError(f"{checkpoint.path} holds no tokenizer (tokenizer.ggml.tokens); lmgen needs one")
    kind = meta.get("tokenizer.ggml.model")
    backend = _backend(kind, checkpoint.architecture, meta)
    types = meta.get("tokenizer.ggml.token_type")
    _add_typed_tokens(backend, tokens, np.zeros(len(tokens), int) if types is None else types, kind == "gpt2")
    named = {name: tokens[meta[key]] for name, key in _NAMED_IDS.items()
             if key in meta and 0 <= meta[key] < len(tokens)}
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos_token" in named
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in named
    backend.post_processor = _bos_eos_template(named, add_bos, add_eos, backend)
    return Tokenizer(backend, special_tokens=named, chat_templates=_chat_templates(meta))


def _backend(kind: str | None, architecture: str, meta: dict) -> BackendTokenizer:
    if kind == "gpt2":
        return _byte_level_bpe(meta)
    if kind != "llama":
        raise UnsupportedModelError(f"tokenizer.ggml.model {kind!r} is not supported; lmgen builds gpt2 (byte-level "
                                    "BPE) and llama (SentencePiece) tokenizers from GGUF files")
    if architecture in ("gemma", "gemma2", "gemma3"):
        return _gemma_bpe(meta)
    backend = _sentencepiece_bpe(meta)
    if architecture == "phi3":  # Phi-3 writes its leading "▁" and spaces with a normalizer (seen in text
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None  # that starts with spaces)
    return backend


def _chat_templates(meta: dict) -> dict[str, str]:
    """tokenizer.chat_template (the default) and tokenizer.chat_template.NAME (tool_use, ...)."""
    return {("default" if key == "tokenizer.chat_template" else key.removeprefix("tokenizer.chat_template.")): value
            for key, value in meta.items()
            if (key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")) and value}


_NAMED_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
              "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _byte_level_bpe(meta: dict) -> BackendTokenizer:
    """GPT-2's byte-level BPE; a token the file spells outside the byte alphabet is respelled in it."""
    if "tokenizer.ggml.merges" not in meta:
        raise UnsupportedModelError("a gpt2 (byte-level BPE) GGUF tokenizer needs tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    vocab = {token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    backend = BackendTokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
    split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
    backend.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict, tokens: list[str] | None = None, ranks: dict[str, float] | None = None
                       ) -> BackendTokenizer:
    """SentencePiece as BPE: byte fallback, "▁" for spaces, one "▁" prepended to the first word."""
    tokens = tokens or meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if ranks is None and scores is None:
            raise UnsupportedModelError("a llama (SentencePiece) GGUF tokenizer needs tokenizer.ggml.scores or merges")
        merges = _merges_from_scores(vocab, ranks or dict(zip(tokens, np.asarray(scores).tolist())))
    backend = BackendTokenizer(BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _gemma_bpe(meta: dict) -> BackendTokenizer:
    """Gemma's SentencePiece: spaces become "▁" in a normalizer and nothing is prepended; its files spell
    tokens of only spaces with spaces, and list tokens in their merge order, which the scores do not follow."""
    tokens = ["▁" * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]]
    backend = _sentencepiece_bpe(meta, tokens, {token: -index for index, token in enumerate(tokens)})
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, the merge of the best-scoring token first (ties: the
    longer left, then right piece first; a token's own splits by the pieces' ids)."""
    merges = []
    for token, score in scores.items():
        pairs = sorted(((token[:i], token[i:]) for i in range(1, len(token))
                        if token[:i] in vocab and token[i:] in vocab), key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_typed_tokens(backend: BackendTokenizer, tokens: list[str], types: np.ndarray, byte_level: bool) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens, so text never cuts
    them. A byte-level vocabulary spells every real token in the byte alphabet: a control token outside it
    is mislabelled and skipped (adding it would grow the vocabulary past the model's)."""
    letters = set(_byte_alphabet().values()) if byte_level else None
    control = [AddedToken(token, normalized=False, special=True) for token, kind in zip(tokens, types)
               if kind == CONTROL and (letters is None or set(token) <= letters)]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token, kind in zip(tokens, types)
                        if kind == USER_DEFINED and token in vocab])


def _bos_eos_template(named: dict[str, str], add_bos: bool, add_eos: bool,
                      backend: BackendTokenizer) -> processors.TemplateProcessing:
    bos, eos = named.get("bos_token"), named.get("eos_token")
    first = f"{bos}:0 " if add_bos else ""
    last = f" {eos}:0" if add_eos else ""
    pair = f"{first}$A:0{last}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    special = [(token, backend.token_to_id(token)) for token, used in ((bos, add_bos), (eos, add_eos)) if used]
    return processors.TemplateProcessing(single=f"{first}$A:0{last}", pair=pair, special_tokens=special)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes as themselves, the rest from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b], extra = chr(256 + extra), extra + 1
    return spelling
