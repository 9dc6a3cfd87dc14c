"""Triton kernels and their launchers, one kernel family per file: prompt_mlp.py (P-tuning MLP
head), prefix_kv.py (deep-prompt prefix -> per-layer K/V); _common.py holds what they share and
aot.py compiles every launch the launchers can make for a GPU target without a GPU (the compile
check of tests/kernels and scripts/kernel_resources.py).
The autograd Functions around them live in ptuning_fast.ops, which imports this package lazily so
that ptuning_fast imports without Triton."""
