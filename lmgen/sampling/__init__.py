"""Turning logits into tokens: processors, warpers and the batched sampler."""
