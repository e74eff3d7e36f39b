"""Reading Hugging Face checkpoints: files, weights, tokenizer."""
