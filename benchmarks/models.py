"""Create the benchmark checkpoints of BENCHMARKS.md (random weights, real shapes).

    python benchmarks/models.py                 # bench-125m into benchmarks/models/
    python benchmarks/models.py --shape qwen2.5-0.5b
    python benchmarks/models.py --shape qwen3-125m       # other families at bench-125m's size
    python benchmarks/models.py --shape qwen3-moe-1b-a150m  # a mixture of experts, beside qwen3-150m

Speed does not depend on weight values, so random weights measure it faithfully.
The weights are never committed (benchmarks/models/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parent / "models"

# name -> (transformers config class, its arguments)
SHAPES = {
    # SmolLM2-135M's shape with a 32k vocabulary
    "bench-125m": ("LlamaConfig", dict(vocab_size=32000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=4096, rope_theta=10000.0)),
    "qwen2.5-0.5b": ("LlamaConfig", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0)),
    "tinyllama-1.1b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                           max_position_embeddings=2048, rope_theta=10000.0)),
    # Qwen3 at bench-125m's shape: its q/k norms are what differ
    "qwen3-125m": ("Qwen3Config", dict(vocab_size=32000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                       tie_word_embeddings=True, max_position_embeddings=4096)),
    # Gemma 3 270M's layer (4 heads of 256, 1 KV head, 5 sliding layers of 512 to 1 global) at ~125M
    # parameters: 18 layers, a 32k vocabulary
    "gemma3-125m": ("Gemma3TextConfig", dict(vocab_size=32000, hidden_size=640, intermediate_size=2048,
                                             num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
                                             max_position_embeddings=4096)),
    # Qwen3-30B-A3B scaled down: 64 experts of 320 (top 8) in 14 layers, ~0.95B parameters of which ~150M are
    # read per token besides the embedding (tied, 33M)
    "qwen3-moe-1b-a150m": ("Qwen3MoeConfig", dict(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=320, intermediate_size=2560,
        norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=4096)),
    # the dense model of its active parameters: an MLP as wide as its 8 chosen experts together
    "qwen3-150m": ("Qwen3Config", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2560, num_hidden_layers=14,
                                       num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                       tie_word_embeddings=True, max_position_embeddings=4096)),
}


def _tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer padded out to the model's vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(f"word{i} token{i % 97} sample text number {i}" for i in range(j, j + 50)) for j in range(0, 5000, 50)]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4000), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


def create(name: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Build the checkpoint once; later calls return the existing folder."""
    import transformers

    folder = MODELS_DIR / name
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    config_class, shape = SHAPES[name]
    config = getattr(transformers, config_class)(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                 rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    _tokenizer(folder, config.vocab_size)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-125m")
    print(create(parser.parse_args().shape))
