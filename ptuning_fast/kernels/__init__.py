"""Triton kernels and their launchers, one kernel family per file: prompt_mlp.py (P-tuning MLP
head), prefix_kv.py (deep-prompt prefix -> per-layer K/V); _common.py holds what they share.
The autograd Functions around them live in ptuning_fast.ops, which imports this package lazily so
that ptuning_fast imports without Triton."""
