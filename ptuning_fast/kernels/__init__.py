"""Triton kernels, one kernel family per file (kernels + launchers + autograd Function):
prompt_mlp.py (P-tuning MLP head), prefix_kv.py (deep-prompt prefix -> per-layer K/V).
Imported lazily by ptuning_fast.ops so that the package imports without Triton."""
