"""Checks on the demo model shipped in lmgen/demo_model/ (made by
scripts/train_demo_model.py), using transformers as the reference loader."""

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MODEL_DIR = Path(__file__).parents[1] / "lmgen" / "demo_model"
MAX_BYTES = 20 * 1000 * 1000

EXPECTED_FILES = [
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "README.md",
]

COMMON_WORDS = set(
    """the and of to a in that he i it for his is was with they be not all him
    them unto shall as but which have you my me from by on this said their be
    will are were an or we there lord god so when then her she one what no
    if your at thou thy thee man men people who up out into had do upon""".split()
)


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    m.eval()
    return m


def test_files_present_and_small():
    for name in EXPECTED_FILES:
        assert (MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"demo model folder is {size} bytes"


def test_config(model):
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True
    assert model.config.vocab_size == 4096
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"]
    assert cfg["eos_token_id"] in gen["eos_token_id"]


def test_tokenizer_special_tokens(tok):
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    for t in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t


def test_roundtrip_multibyte_and_raw_tokenizer_agree(tok):
    text = "Grüße aus Köln — naïve café, 東京タワー, emoji 🙂🚀 ok!\n  indented"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    raw = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    enc = raw.encode(text)
    assert enc.ids == ids
    assert raw.decode(enc.ids) == text


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me a fortune."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nTell me a fortune.<|end|>\n<|assistant|>\n"
    )
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = list(out["input_ids"])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_greedy_generation_is_english(tok, model):
    x = tok("The", return_tensors="pt")
    with torch.no_grad():
        y = model.generate(**x, do_sample=False, max_new_tokens=20)
    assert y.shape[1] > x["input_ids"].shape[1]
    text = tok.decode(y[0], skip_special_tokens=True)
    words = [re.sub(r"[^\w']", "", w).lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 5, text
    alpha = sum(w.replace("'", "").isalpha() for w in words)
    common = sum(w in COMMON_WORDS for w in words)
    assert alpha >= 0.8 * len(words), text
    assert common >= 0.25 * len(words), text
