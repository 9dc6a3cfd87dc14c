"""What this package reads off transformers models and configs (``introspection``), and what
differs between the transformers 5 releases it supports (``compat``). Imports transformers (and
PEFT's task names), nothing of this package above the compute layer."""
