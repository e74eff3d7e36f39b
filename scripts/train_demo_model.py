#!/usr/bin/env python3
"""Train the small demo language model shipped in ``lmgen/demo_model/``.

The training text comes from two Debian packages. Install them first (as root):

    apt-get update && apt-get install -y bible-kjv fortunes

``bible-kjv`` pulls in ``bible-kjv-text`` (the King James Version, public
domain) and provides the ``bible`` command that decodes its compressed data
file; ``fortunes`` ships the BSD-licensed fortune-cookie files under
``/usr/share/games/fortunes``.

Reproduce the shipped model (one CPU thread, about 50 minutes):

    nice -n 10 python scripts/train_demo_model.py --steps 2600 --minutes 51 --layers 4

On a shared 2-core machine that run hit the time cap at step 2460: 5.0M
tokens (2.69 epochs), held-out perplexity 51.90, 1.640 bits/char. The model
it replaced (6 layers, 5.77M parameters, ``--steps 1000 --minutes 34``, 2.0M
tokens = 1.09 epochs) had 84.71 and 1.843 bits/char on the same split (the
split depends only on ``--seed`` and ``--heldout-frac``; the tokenizer is the
same). At this compute more tokens beat more parameters: 4 layers (4.2M
parameters) train at ~2,000 tokens/s on an idle thread against ~1,470 for 6
layers and ~1,050 for a 8.7M-parameter model.

The script

1. reads and cleans the text (verse numbers, ``%`` separators, hard line
   wraps and indentation are removed), holds out ~2% of the documents,
2. trains a byte-level BPE tokenizer (``tokenizers``) with a BOS-prepending
   post-processor and chat-role special tokens,
3. turns part of the training documents into chat dialogues (question/answer
   fortunes, "tell me a fortune", "quote John 3:16", ...),
4. trains a small ``LlamaForCausalLM`` with plain PyTorch (AdamW, cosine LR),
5. saves weights (bfloat16 safetensors), config, generation config, tokenizer
   files and chat template, then reloads everything with ``transformers`` to
   measure held-out perplexity and produce sample generations, which go into
   the model card ``README.md``. The model found in the output folder before
   the run (if any) is evaluated on the same held-out documents, with its own
   tokenizer, and the card compares the two (perplexity and bits per
   character, three greedy continuations each).

Everything is seeded and runs on a single thread, so a rerun with the same
arguments on the same software versions gives the same model (a run that is
cut short by ``--minutes`` is the exception: the step count then depends on
the machine's speed, and the learning-rate schedule follows the wall clock
instead of the step count once the clock is further along, so that a slow
run still ends with the learning rate decayed).
"""

from __future__ import annotations

import os

# One thread everywhere: torch, BLAS and the tokenizers library.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import math
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "lmgen" / "demo_model"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
APT_LINE = "apt-get update && apt-get install -y bible-kjv fortunes"

# Special tokens, in id order. Ids 0..6 are fixed by this list.
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]

# ChatML-like template. It starts with the BOS token itself, so a rendered
# conversation must be encoded with add_special_tokens=False (transformers'
# apply_chat_template(tokenize=True) already does that).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Fortune files left out: non-prose (ascii art, code, translation stubs) and
# the files most likely to contain ethnic or gender stereotypes.
FORTUNE_EXCLUDE = {"ascii-art", "perl", "translate-me", "ethnic", "men-women", "drugs"}

FORTUNE_TOPICS = {
    "computers": "computers", "education": "school", "food": "food",
    "kids": "children", "law": "the law", "linux": "Linux", "linuxcookie": "Linux",
    "literature": "books", "love": "love", "medicine": "medicine",
    "news": "the news", "people": "people", "pets": "pets",
    "politics": "politics", "science": "science", "sports": "sports",
    "startrek": "Star Trek", "wisdom": "wisdom", "work": "work",
    "debian": "Debian", "magic": "magic", "art": "art",
}
FORTUNE_PROMPTS = [
    "Tell me a fortune.",
    "Give me a fortune cookie.",
    "Say something wise.",
    "Tell me something funny.",
    "Share a quote with me.",
    "What is my fortune today?",
    "Can you cheer me up?",
    "Tell me something interesting.",
]
TOPIC_PROMPTS = [
    "Tell me something about {t}.",
    "Do you know a good quote about {t}?",
    "Say something funny about {t}.",
    "What do you think about {t}?",
]
POEM_PROMPTS = ["Recite a poem.", "Sing me a song.", "Tell me a poem."]
BIBLE_PROMPTS = [
    "Quote {ref}.",
    "What does {ref} say?",
    "Read me {ref}.",
    "Recite {ref} from the King James Bible.",
]
FORTUNE_SYSTEMS = [
    "You are a helpful assistant.",
    "You are a witty assistant who answers with fortune cookies.",
    "You are a friendly assistant. Keep answers short.",
]
BIBLE_SYSTEMS = [
    "You are a helpful assistant.",
    "You quote the King James Bible.",
]


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclass
class Doc:
    source: str  # "kjv" or "fortunes/<file>"
    text: str  # cleaned plain text
    meta: dict = field(default_factory=dict)


def read_kjv() -> list[Doc]:
    """Passages of 3-8 consecutive verses of the KJV, verse numbers removed."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit(f"the `bible` command is missing; run: {APT_LINE}")
    out = subprocess.run(
        [exe, "-l100000", "gen1:1-rev22:21"],
        check=True, capture_output=True, text=True, encoding="utf-8",
    ).stdout
    heading = re.compile(r"^(\S.*) (\d+)$")
    verse = re.compile(r"^\s*(\d+) (.*)$")
    chapters: list[tuple[str, int, list[tuple[int, str]]]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = verse.match(line)
        if m and chapters:
            chapters[-1][2].append((int(m.group(1)), m.group(2).strip()))
            continue
        m = heading.match(line)
        if m:
            chapters.append((m.group(1), int(m.group(2)), []))
            continue
        raise ValueError(f"unexpected line in bible output: {line!r}")
    rng = random.Random(1611)
    docs = []
    for book, chap, verses in chapters:
        i = 0
        while i < len(verses):
            n = rng.randint(3, 8)
            part = verses[i : i + n]
            i += n
            text = " ".join(v for _, v in part)
            text = re.sub(r"\s+", " ", text).strip()
            first, last = part[0][0], part[-1][0]
            ref = f"{book} {chap}:{first}" + (f"-{last}" if last != first else "")
            docs.append(Doc("kjv", text, {"ref": ref}))
    return docs


_SPEAKER = re.compile(r"^[A-Z][\w .'-]{0,24}:\s")


def _join_wrapped(lines: list[str]) -> list[str]:
    """Undo hard line wrapping: a long line followed by a continuation line is
    one paragraph. Short lines (verse, dialogue, lists) stay as they are."""
    out: list[str] = []
    for ln in lines:
        if (
            out
            and len(out[-1]) >= 48
            and not ln.startswith(("--", "Q:", "A:", "(", "*", "-"))
            and not _SPEAKER.match(ln)
        ):
            out[-1] = out[-1] + " " + ln
        else:
            out.append(ln)
    return out


def clean_fortune(raw: str) -> str | None:
    lines = [re.sub(r"\s+", " ", ln.expandtabs(8)).strip() for ln in raw.split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines:
        return None
    text = "\n".join(_join_wrapped(lines))
    if len(text) < 12:
        return None
    ok = sum(c.isalpha() or c.isspace() or c in ".,;:'\"!?-()" for c in text)
    if ok / len(text) < 0.9:  # ascii art, code, tables
        return None
    return text


def parse_qa(raw: str) -> list[tuple[str, str]] | None:
    """A fortune written as ``Q: ... A: ...`` (possibly several rounds) as
    (role, content) turns, or None if it is not such a dialogue."""
    turns: list[list[str]] = []
    for ln in raw.split("\n"):
        ln = re.sub(r"\s+", " ", ln.expandtabs(8)).strip()
        if not ln:
            continue
        m = re.match(r"^(Q|A):\s*(.*)$", ln)
        if m:
            turns.append(["user" if m.group(1) == "Q" else "assistant", m.group(2)])
        elif ln.startswith("--"):
            break  # attribution ends the dialogue
        elif turns:
            turns[-1][1] += " " + ln
        # lines before the first Q: (titles) are dropped
    if len(turns) < 2 or turns[0][0] != "user" or turns[-1][0] != "assistant":
        return None
    for a, b in zip(turns, turns[1:]):
        if a[0] == b[0]:
            return None
    out = []
    for role, content in turns:
        content = content.strip()
        if len(content) >= 2 and content[0] == content[-1] == '"':
            content = content[1:-1].strip()
        if not content:
            return None
        out.append((role, content))
    return out


def read_fortunes() -> list[Doc]:
    if not FORTUNE_DIR.is_dir():
        sys.exit(f"{FORTUNE_DIR} is missing; run: {APT_LINE}")
    docs = []
    files = sorted(
        p for p in FORTUNE_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in FORTUNE_EXCLUDE
    )
    for path in files:
        raw_text = path.read_text(encoding="utf-8", errors="replace")
        for raw in re.split(r"^%[ \t]*$", raw_text, flags=re.M):
            text = clean_fortune(raw)
            if text is None:
                continue
            docs.append(Doc(f"fortunes/{path.name}", text, {"qa": parse_qa(raw)}))
    return docs


def chat_messages(doc: Doc, rng: random.Random) -> list[dict] | None:
    """Turn a training document into a chat conversation, or None to keep it
    as plain text."""
    msgs: list[dict] = []
    if doc.source == "kjv":
        if rng.random() >= 0.10:
            return None
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(BIBLE_SYSTEMS)})
        msgs.append({"role": "user", "content": rng.choice(BIBLE_PROMPTS).format(ref=doc.meta["ref"])})
        msgs.append({"role": "assistant", "content": doc.text})
        return msgs
    qa = doc.meta.get("qa")
    if qa:  # question/answer fortunes always become dialogues
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(FORTUNE_SYSTEMS)})
        msgs += [{"role": r, "content": c} for r, c in qa]
        return msgs
    if rng.random() >= 0.30:
        return None
    name = doc.source.split("/", 1)[1]
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(FORTUNE_SYSTEMS)})
    if name == "songs-poems":
        prompt = rng.choice(POEM_PROMPTS)
    elif name in FORTUNE_TOPICS and rng.random() < 0.6:
        prompt = rng.choice(TOPIC_PROMPTS).format(t=FORTUNE_TOPICS[name])
    else:
        prompt = rng.choice(FORTUNE_PROMPTS)
    msgs.append({"role": "user", "content": prompt})
    msgs.append({"role": "assistant", "content": doc.text})
    return msgs


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    bos_id = tok.token_to_id(BOS)
    # Same layout transformers builds for add_bos_token=True, so the raw
    # tokenizer and AutoTokenizer produce identical ids.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        model_max_length=max_len,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)

    # Make the saved config explicit and stable across transformers versions.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
        }
    )
    cfg.pop("chat_template", None)  # lives in chat_template.jinja
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
                "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
            },
            indent=2,
        )
        + "\n"
    )
    # Write tokenizer.json from the raw tokenizer so the post-processor is the
    # one defined above.
    tok.save(str(out / "tokenizer.json"))
    return tok


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to ``floor * peak``. ``time_frac`` is the
    fraction of the wall-time cap used so far: progress is the larger of the step
    and time fractions, so a run slowed down by a busy machine still decays."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * progress))


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        initializer_range=0.02,
    )


@torch.no_grad()
def stream_nll(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """Summed next-token NLL over non-overlapping windows of ``ids``."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start : start + seq_len + 1]
        if len(chunk) < 2:
            break
        x = torch.tensor(chunk[:-1]).unsqueeze(0)
        y = torch.tensor(chunk[1:])
        logits = model(input_ids=x).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        count += y.numel()
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=2600, help="optimizer steps (sets the LR schedule)")
    p.add_argument("--minutes", type=float, default=51.0, help="hard cap on training wall time")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--heldout-frac", type=float, default=0.02)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args()

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out: Path = args.out

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()

    # -- data ---------------------------------------------------------------
    kjv, fortunes = read_kjv(), read_fortunes()
    docs = kjv + fortunes
    split_rng = random.Random(args.seed)
    train_docs, held_docs = [], []
    for d in docs:
        (held_docs if split_rng.random() < args.heldout_frac else train_docs).append(d)
    chars = {
        "kjv": sum(len(d.text) for d in kjv),
        "fortunes": sum(len(d.text) for d in fortunes),
    }
    print(
        f"data: {len(kjv)} KJV passages ({chars['kjv']/1e6:.2f}M chars), "
        f"{len(fortunes)} fortunes ({chars['fortunes']/1e6:.2f}M chars); "
        f"train {len(train_docs)} docs, held out {len(held_docs)} docs",
        flush=True,
    )

    # -- previous model (for the before/after comparison) ---------------------
    prev_dir = None
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        import tempfile

        prev_dir = Path(tempfile.mkdtemp(prefix="demo_model_prev_"))
        for f in out.iterdir():
            if f.is_file():
                shutil.copy2(f, prev_dir / f.name)

    # -- tokenizer ----------------------------------------------------------
    if out.exists():
        for name in [
            "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md",
        ]:
            (out / name).unlink(missing_ok=True)
    tok = train_tokenizer([d.text for d in train_docs], args.vocab_size, args.max_positions, out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    vocab_size = tok.get_vocab_size()
    eos_id, end_id = tok.token_to_id(EOS), tok.token_to_id(END)
    print(f"tokenizer: vocab {vocab_size} ({time.time() - t_start:.0f}s elapsed)", flush=True)

    # -- token streams ------------------------------------------------------
    chat_rng = random.Random(args.seed + 1)
    texts, n_chat = [], 0
    for d in train_docs:
        msgs = chat_messages(d, chat_rng)
        if msgs is None:
            texts.append((d.text, True))
        else:
            rendered = hf_tok.apply_chat_template(msgs, tokenize=False)
            texts.append((rendered, False))
            n_chat += 1
    order = list(range(len(texts)))
    random.Random(args.seed + 2).shuffle(order)
    plain = [texts[i][0] for i in order if texts[i][1]]
    chat = [texts[i][0] for i in order if not texts[i][1]]
    enc_plain = iter(tok.encode_batch(plain, add_special_tokens=True))
    enc_chat = iter(tok.encode_batch(chat, add_special_tokens=False))
    train_ids: list[int] = []
    for i in order:
        enc = next(enc_plain) if texts[i][1] else next(enc_chat)
        train_ids.extend(enc.ids)
        train_ids.append(eos_id)
    held_ids: dict[str, list[int]] = {"kjv": [], "fortunes": []}
    for d in held_docs:
        key = "kjv" if d.source == "kjv" else "fortunes"
        held_ids[key].extend(tok.encode(d.text).ids + [eos_id])
    held_chars = sum(len(d.text) for d in held_docs)
    held_tokens = sum(len(v) for v in held_ids.values())
    print(
        f"tokens: train {len(train_ids):,} ({n_chat} chat docs), held out {held_tokens:,} "
        f"({held_chars / held_tokens:.2f} chars/token)",
        flush=True,
    )

    # -- model --------------------------------------------------------------
    config = build_config(args, vocab_size)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    T, B = args.seq_len, args.batch_size
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    epoch, batches, cursor = -1, None, 0

    def next_batch():
        nonlocal epoch, batches, cursor
        if batches is None or cursor + B > batches.shape[0]:
            epoch += 1
            offset = (epoch * T // 3) % T  # shift block boundaries each epoch
            n = (len(data) - offset) // T
            blocks = data[offset : offset + n * T].view(n, T)
            batches = blocks[torch.randperm(n, generator=gen)]
            cursor = 0
        x = batches[cursor : cursor + B]
        cursor += B
        return x

    held_probe = held_ids["kjv"][: 4 * T] + held_ids["fortunes"][: 4 * T]
    t_train = time.time()
    step, loss_ema, losses = 0, None, []
    stopped_early = False
    for step in range(args.steps):
        time_frac = (time.time() - t_train) / (args.minutes * 60)
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio, time_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next_batch()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        li = loss.item()
        losses.append(li)
        loss_ema = li if loss_ema is None else 0.95 * loss_ema + 0.05 * li
        elapsed = time.time() - t_train
        if (step + 1) % args.log_every == 0 or step == 0:
            tps = (step + 1) * B * T / elapsed
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            msg = (
                f"step {step + 1}/{args.steps} loss {li:.3f} (ema {loss_ema:.3f}) lr {lr:.2e} "
                f"| {tps:.0f} tok/s | {elapsed / 60:.1f} min, eta {eta / 60:.1f} min"
            )
            if (step + 1) % (args.log_every * 10) == 0:
                model.eval()
                s, c = stream_nll(model, held_probe, T)
                model.train()
                msg += f" | held-out probe ppl {math.exp(s / c):.1f}"
            print(msg, flush=True)
        if elapsed > args.minutes * 60 and step + 1 < args.steps:
            print(f"time cap of {args.minutes} min reached at step {step + 1}; stopping", flush=True)
            stopped_early = True
            break
    steps_done = step + 1
    train_seconds = time.time() - t_train
    tokens_seen = steps_done * B * T
    print(f"training done: {steps_done} steps, {tokens_seen:,} tokens, {train_seconds / 60:.1f} min", flush=True)

    # -- save ---------------------------------------------------------------
    model.eval()
    model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    gen_cfg = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[eos_id, end_id],
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=128,
    )
    gen_cfg.save_pretrained(out)
    del model

    # -- evaluate with transformers ----------------------------------------
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lm.eval()
    tk = AutoTokenizer.from_pretrained(out)
    check = "Naïve café — 東京 🙂 test"
    assert tk.decode(tk(check)["input_ids"], skip_special_tokens=True) == check
    assert tk(check)["input_ids"] == tok.encode(check).ids

    def evaluate(model_, ids_by_key):
        ppl_, tot_s, tot_c = {}, 0.0, 0
        for key, ids in ids_by_key.items():
            s, c = stream_nll(model_, ids, T)
            ppl_[key] = math.exp(s / c)
            tot_s, tot_c = tot_s + s, tot_c + c
        ppl_["all"] = math.exp(tot_s / tot_c)
        return ppl_, tot_s / math.log(2) / held_chars, tot_c

    def greedy(model_, tk_, prompt):
        x = torch.tensor([tk_(prompt)["input_ids"]])
        with torch.no_grad():
            y = model_.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)
        return tk_.decode(y[0, x.shape[1] :], skip_special_tokens=True)

    greedy_prompts = ["Once upon a time", "The LORD said", "A wise man"]
    ppl, bits_per_char, _ = evaluate(lm, held_ids)
    print(
        f"held-out perplexity: {ppl['all']:.2f} (KJV {ppl['kjv']:.2f}, fortunes {ppl['fortunes']:.2f}); "
        f"{bits_per_char:.3f} bits/char",
        flush=True,
    )
    greedy_new = [greedy(lm, tk, pr) for pr in greedy_prompts]

    prev = None  # the model this run replaced, on the same held-out documents
    if prev_dir is not None:
        try:
            lm_prev = AutoModelForCausalLM.from_pretrained(prev_dir, dtype=torch.float32).eval()
            tk_prev = AutoTokenizer.from_pretrained(prev_dir)
            prev_eos = lm_prev.config.eos_token_id
            prev_ids: dict[str, list[int]] = {"kjv": [], "fortunes": []}
            for d in held_docs:
                key = "kjv" if d.source == "kjv" else "fortunes"
                prev_ids[key].extend(tk_prev(d.text)["input_ids"] + [prev_eos])
            prev_ppl, prev_bpc, prev_tokens = evaluate(lm_prev, prev_ids)
            prev_cfg = lm_prev.config
            prev = {
                "ppl": prev_ppl, "bpc": prev_bpc, "tokens": prev_tokens,
                "same_tokenizer": (prev_dir / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes(),
                "params": sum(p_.numel() for p_ in lm_prev.parameters()),
                "layers": prev_cfg.num_hidden_layers, "hidden": prev_cfg.hidden_size,
                "greedy": [greedy(lm_prev, tk_prev, pr) for pr in greedy_prompts],
            }
            print(
                f"previous model: perplexity {prev_ppl['all']:.2f} (KJV {prev_ppl['kjv']:.2f}, "
                f"fortunes {prev_ppl['fortunes']:.2f}); {prev_bpc:.3f} bits/char",
                flush=True,
            )
            del lm_prev
        finally:
            shutil.rmtree(prev_dir, ignore_errors=True)

    samples = []

    def sample(label, prompt_ids, **kw):
        x = torch.tensor([prompt_ids])
        with torch.no_grad():
            y = lm.generate(x, attention_mask=torch.ones_like(x), **kw)
        text = tk.decode(y[0, x.shape[1] :], skip_special_tokens=True)
        samples.append((label, tk.decode(prompt_ids, skip_special_tokens=False), text.strip()))
        print(f"--- {label}\n{samples[-1][1]!r} -> {text.strip()!r}", flush=True)

    for pr, text in zip(greedy_prompts, greedy_new):
        samples.append(("greedy, 40 new tokens", tk.decode(tk(pr)["input_ids"]), text.strip()))
        print(f"--- greedy\n{pr!r} -> {text.strip()!r}", flush=True)
    torch.manual_seed(0)
    sample("sampled (generation_config defaults, seed 0), 60 new tokens", tk("The")["input_ids"], max_new_tokens=60)
    torch.manual_seed(1)
    sample("sampled (generation_config defaults, seed 1), 60 new tokens", tk("Computers are")["input_ids"], max_new_tokens=60)
    for seed, msgs in [
        (0, [{"role": "user", "content": "Tell me a fortune."}]),
        (0, [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": "What does John 3:16 say?"}]),
    ]:
        torch.manual_seed(seed)
        ids = tk.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        sample(f"chat via apply_chat_template, sampled (seed {seed})", list(ids), max_new_tokens=80)

    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    total_minutes = (time.time() - t_start) / 60

    # -- model card ---------------------------------------------------------
    cmd = "nice -n 10 python scripts/train_demo_model.py " + " ".join(sys.argv[1:])
    compare_md = ""
    if prev is not None:
        pp = prev["ppl"]
        tok_note = (
            "the same tokenizer, so perplexities compare directly"
            if prev["same_tokenizer"]
            else "its own tokenizer (different from this one, so compare bits per character)"
        )
        rows = "\n".join(
            f"| {name} | {pp[k]:.2f} | {ppl[k]:.2f} | {100 * (ppl[k] / pp[k] - 1):+.1f}% |"
            for name, k in [("all held-out text", "all"), ("KJV passages", "kjv"), ("fortunes", "fortunes")]
        )
        greedy_md = "\n\n".join(
            f"`{pr}`\n\n```text\nbefore: {pr}{b}\nafter:  {pr}{a}\n```"
            for pr, b, a in zip(greedy_prompts, prev["greedy"], greedy_new)
        )
        compare_md = f"""
### Before and after

The model this run replaced ({prev['layers']} layers, hidden size {prev['hidden']},
{prev['params']:,} parameters), evaluated by the same script on the same held-out
documents with {tok_note}:

| split | before | after | change |
| --- | --- | --- | --- |
{rows}
| bits per character | {prev['bpc']:.3f} | {bits_per_char:.3f} | {100 * (bits_per_char / prev['bpc'] - 1):+.1f}% |

Greedy continuations (40 new tokens, `transformers` `generate`):

{greedy_md}
"""
    sample_md = "\n\n".join(
        f"**{label}**\n\n```text\n{prompt}\n→ {text}\n```" for label, prompt, text in samples
    )
    card = f"""# lmgen demo model

A tiny Llama-architecture language model that the lmgen project trains
itself, so that the engine, its tests and `lmgen chat` have a real model to
run without downloading anything. It writes English words and phrases in
the style of the King James Bible and of Unix fortune cookies. It knows
nothing useful: treat its output as a smoke test, not as information.

Everything in this folder (weights, tokenizer, chat template, this card) is
produced by `scripts/train_demo_model.py`.

## Files

| file | content |
| --- | --- |
| `config.json` | `LlamaConfig` (`model_type: llama`, dtype bfloat16) |
| `model.safetensors` | weights, bfloat16, tied input/output embeddings |
| `generation_config.json` | BOS/EOS/PAD ids and sampling defaults |
| `tokenizer.json` | byte-level BPE (`tokenizers`), BOS added by a `TemplateProcessing` post-processor |
| `tokenizer_config.json`, `special_tokens_map.json` | `PreTrainedTokenizerFast` settings |
| `chat_template.jinja` | chat template (read by transformers 5) |

## Training data

Read from Debian packages installed with

```sh
{APT_LINE}
```

* **King James Version of the Bible**, package `bible-kjv-text` (decoded with
  the `bible` command from `bible-kjv`). The 1611 translation is in the
  public domain (in the United Kingdom the Crown's letters patent still
  govern printing); the Debian copyright file of the data says it "is
  provided for unrestricted use". Verse numbers and chapter headings are
  removed; consecutive verses are joined into passages of 3 to 8 verses.
  {chars['kjv'] / 1e6:.2f}M characters in {len(kjv):,} passages.
* **Fortune cookies**, package `fortunes` (files in
  `/usr/share/games/fortunes`), distributed under the BSD license stated in
  `/usr/share/doc/fortunes/copyright`. They are short quotations and jokes by
  many authors. Left out: the files {", ".join(sorted(FORTUNE_EXCLUDE))}
  (ascii art, code, or stereotype-heavy humour). `%` separators, indentation
  and hard line wraps are removed, and entries that are mostly symbols are
  dropped.
  {chars['fortunes'] / 1e6:.2f}M characters in {len(fortunes):,} entries.

{args.heldout_frac:.0%} of the documents (picked with a seeded RNG) are held out
for the perplexity below ({len(held_docs)} documents, {held_tokens:,} tokens).
Of the training documents, {n_chat:,} are formatted as chat conversations with
the template below: fortunes written as `Q: ... A: ...` become user/assistant
turns, some other fortunes answer prompts such as "Tell me a fortune." or
"Tell me something about science.", and some Bible passages answer "Quote
John 3:16." style prompts; part of them have a system message.

## Tokenizer

Byte-level BPE trained on the training split, vocabulary {vocab_size}
including these special tokens:

| id | token | use |
| --- | --- | --- |
""" + "\n".join(
        "| " + str(i) + " | `" + t.replace("|", "\\|") + "` | " + u + " |"
        for i, (t, u) in enumerate(
            zip(
                SPECIAL_TOKENS,
                ["padding", "BOS, prepended by the tokenizer on encode", "EOS, ends every training document",
                 "system turn", "user turn", "assistant turn", "end of a turn"],
            )
        )
    ) + f"""

Encoding text adds `<s>` in front (both with raw `tokenizers` and with
`transformers.AutoTokenizer`); decoding is byte-level, so any UTF-8 text
round-trips. On the held-out text one token is {held_chars / held_tokens:.2f} characters on average.

## Chat template

```jinja
{CHAT_TEMPLATE}
```

which renders a conversation as

```text
<s><|system|>
You are a helpful assistant.<|end|>
<|user|>
Tell me a fortune.<|end|>
<|assistant|>
```

The template emits `<s>` itself, so encode a rendered conversation with
`add_special_tokens=False` (as `apply_chat_template(..., tokenize=True)`
does). Generation stops at `<|end|>` or `</s>`: `generation_config.json`
lists both ids ({end_id} and {eos_id}) as `eos_token_id`.

## Architecture

`LlamaForCausalLM`: vocabulary {vocab_size}, hidden size {args.hidden},
intermediate size {args.intermediate}, {args.layers} layers, {args.heads} attention heads,
{args.kv_heads} key/value heads (head size {args.hidden // args.heads}), RMSNorm eps 1e-5, RoPE theta
10000, max positions {args.max_positions}, tied embeddings, SiLU MLP.
**{n_params:,} parameters**; {size / 1e6:.1f} MB on disk for this folder.

## Training

Plain PyTorch on one CPU thread ({cpu_name()}, torch
{torch.__version__}, transformers {transformers.__version__}): AdamW
(betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR {args.lr:g}
with {args.warmup} warmup steps and cosine decay to {args.min_lr_ratio:g}x, gradient
clipping 1.0, batch {B} x {T} tokens, float32. {steps_done} steps{" (stopped early by the time cap)" if stopped_early else ""},
{tokens_seen:,} tokens ({tokens_seen / len(train_ids):.2f} epochs of {len(train_ids):,} training tokens),
{train_seconds / 60:.1f} minutes of training, {total_minutes:.1f} minutes for the whole script
including data preparation, evaluation and this card. Final training loss (mean of the
last 50 steps): {sum(losses[-50:]) / len(losses[-50:]):.3f}.

Reproduce (from the repository root, after the `apt-get install` above):

```sh
{cmd}
```

## Evaluation

Held-out perplexity, computed by the training script with
`transformers.AutoModelForCausalLM` on the saved bfloat16 weights (upcast to
float32), non-overlapping windows of {T} tokens, every document as
`<s> text </s>`:

| split | perplexity |
| --- | --- |
| all held-out text | **{ppl['all']:.2f}** |
| KJV passages | {ppl['kjv']:.2f} |
| fortunes | {ppl['fortunes']:.2f} |

({bits_per_char:.3f} bits per character.)
{compare_md}
## Samples

Produced by the training script with `transformers` `generate` on the saved model:

{sample_md}

## Limitations

A model of this size trained for {train_seconds / 60:.0f} minutes on one CPU thread repeats itself, mixes up
facts, and misquotes scripture. The fortune files contain dated, sometimes
crude humour, which the model may echo. Use it for testing inference code.
"""
    (out / "README.md").write_text(card)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {total_minutes:.1f} min", flush=True)
    if size > 20 * 1000 * 1000:
        sys.exit("model folder is larger than 20 MB")


if __name__ == "__main__":
    main()
