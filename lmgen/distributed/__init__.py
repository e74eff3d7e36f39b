"""Tensor parallelism on torch.distributed: each rank runs its share of the model (sharding.py); rank 0
runs the engine and drives the others (parallel.py)."""
