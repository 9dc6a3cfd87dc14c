"""Benchmarks of ptuning_fast against PEFT eager and torch.compile (see benchmarks/README.md)."""
