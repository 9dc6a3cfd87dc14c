"""The training job: :class:`Job` sets up a run (data, model, optimizer, processes), loops over
the steps, evaluates, saves checkpoints and sums up. :class:`~ptuning_fast.train.multitask.MultiTaskJob`
changes only its hooks."""
from __future__ import annotations

import json
import time
import weakref
from pathlib import Path
from typing import Optional

import torch

from .._files import write_text
from ..backend import resolve_backend
from ..hf.introspection import is_decoder_only
from .checkpoint import (SUMMARY_FILE, check_output_dir, checkpoint_folder, earlier_run_files,
                         find_latest_checkpoint, load_checkpoint, lock_output_dir, remove_earlier_run, save_checkpoint)
from .config import TrainConfig, check_config
from .data import (Encoded, count_targets, encode_examples, global_batch, label_names, label_token_ids, load_examples,
                   make_batch, pool)
from .loss import row_losses
from .model import build_model, check_prompt_fits, init_prompts, is_prompt_parameter, load_tokenizer, \
    trainable_parameters
from .optim import learning_rate_at, make_optimizer
from .processes import all_reduce_gradients, autocast, peak_memory, setup_distributed, shard_frozen_blocks, uses_bf16


class Job:
    """One run of the single-task job: everything is set up in ``__init__``; ``train()`` loops.

    ``peft_model`` is the model being trained (a PeftModel); ``model`` is what runs the
    forward (``peft_model``, or its DDP wrapper).
    """

    training_set = "the training set"  # how errors name the training data

    def __init__(self, config: TrainConfig):
        self.config = check_config(config)
        if config.output_dir is not None:  # before any loading: a bad folder fails in a second, not after training
            check_output_dir(config.output_dir)
        self.dist = setup_distributed(config)
        self.device = self.dist.device
        self.close = lambda: None
        if config.output_dir is not None and self.dist.is_main:
            self.close = lock_output_dir(config.output_dir)  # one job per output folder
            weakref.finalize(self, self.close)
        self.resume_from = self.checkpoint_to_resume()
        self.check_processes()
        if config.baseline == "none":
            try:
                resolve_backend(self.device)  # fail now, not inside the first forward
            except RuntimeError as err:
                raise ValueError(f"`backend` {config.backend!r}: {err}") from None

        splits = self.load_splits()
        self.labels = label_names([e for train, _ in splits.values() for e in train],
                                  [e for _, held in splits.values() for e in held])
        tokenizer = load_tokenizer(config)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = pool({n: encode_examples(s[0], self.labels, tokenizer, config) for n, s in splits.items()})
        self.eval_data = pool({n: encode_examples(s[1], self.labels, tokenizer, config) for n, s in splits.items()})
        self.label_words = label_token_ids(self.labels, tokenizer) if config.task == "causal-lm" else None
        if len(self.train_data) < config.batch_size:
            raise ValueError(f"`batch_size` ({config.batch_size}) is larger than {self.training_set} "
                             f"({len(self.train_data)})")
        steps_per_epoch = len(self.train_data) // config.batch_size
        self.total_steps = config.steps or max(1, int(round(config.epochs * steps_per_epoch)))
        if config.head_steps >= self.total_steps:
            raise ValueError(f"`head_steps` ({config.head_steps}) must be fewer than the job's {self.total_steps} "
                             "steps, or the prompts would never train")

        torch.manual_seed(config.seed)
        num_labels = len(self.labels) if config.task == "classification" else None
        self.peft_model, self.implementation = self.build_model(tokenizer, num_labels)
        check_prompt_fits(self.peft_model, config)
        self.left_pad = self.uses_left_padding()
        self.peft_model.to(self.device).train()
        self.text_init = None
        if config.init_text is not None and self.resume_from is None:  # resumed: the checkpoint's prompts win
            self.init_prompts_from_text(tokenizer)
        self.groups = self.parameter_groups()
        self.params = [p for group in self.groups.values() for p in group]
        self.prompt_params = [p for n, p in trainable_parameters(self.peft_model).items() if is_prompt_parameter(n)]
        self.optimizer = make_optimizer(self.params, config)

        self.start_step = 0
        if self.resume_from is not None:
            folder = self.resume_from
            self.start_step = load_checkpoint(folder, self.peft_model, self.optimizer, config, self.labels)
            if self.start_step >= self.total_steps:
                raise ValueError(f"`resume`: the checkpoint is at step {self.start_step}, the job has only "
                                 f"{self.total_steps} steps")
            self.log(f"resumed from {folder} at step {self.start_step}")
        self.wrap_for_processes()

        self.history, self.losses = [], []
        self.train_seconds, self.tokens_seen, self.samples_seen = 0.0, 0, 0

    # --------------------------------------------------------------------------------------------
    # Hooks of the set-up
    # --------------------------------------------------------------------------------------------
    def checkpoint_to_resume(self) -> Optional[Path]:
        """The checkpoint ``--resume`` continues from (None: start at step 0). A new run into a
        folder holding an earlier run's checkpoints is refused, unless ``--overwrite`` (which
        removes them first): the two runs would mix at the next ``--resume``."""
        config = self.config
        if config.resume is not None and str(config.resume) != "latest":
            return Path(config.resume)
        if config.output_dir is None:
            return None
        if config.resume is not None:  # "latest"
            found = find_latest_checkpoint(config.output_dir)
            if found is None:  # a preempted job restarts with the same command line at any moment
                self.log(f"--resume: no checkpoint in {config.output_dir} yet: starting from step 0")
            return found
        earlier = earlier_run_files(config.output_dir)
        if earlier and not config.overwrite:
            raise ValueError(f"`output_dir` {str(config.output_dir)!r} holds an earlier run's "
                             f"{', '.join(p.name for p in earlier[:4])}{' ...' if len(earlier) > 4 else ''}: pass "
                             "--overwrite to replace them, --resume to continue that run, or another --output-dir")
        if earlier and self.dist.is_main:
            remove_earlier_run(config.output_dir)
        return None

    def check_processes(self) -> None:
        """Refuse a process layout the job cannot run (any is fine here)."""

    def load_splits(self) -> dict:
        """Task name (None: the only task) -> (train examples, eval examples)."""
        return {None: load_examples(self.config)}

    def build_model(self, tokenizer, num_labels: Optional[int]):
        """(the model to train, what implements its prompts); the RNG is seeded."""
        return build_model(self.config, tokenizer, num_labels)

    def uses_left_padding(self) -> bool:
        # v1 prompts on a decoder-only classifier: PEFT's head reads the last column, so pad left.
        return (self.config.task == "classification" and self.config.prompt == "v1"
                and is_decoder_only(self.peft_model))

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trained parameters, in groups that gradient clipping treats as one."""
        return {"trainable": list(trainable_parameters(self.peft_model).values())}

    def init_prompts_from_text(self, tokenizer) -> None:
        """Start every prompt adapter as ``--init-text``'s words, and log how well each matches them."""
        self.text_init = init_prompts(self.peft_model, self.config.init_text, tokenizer)
        for name, result in self.text_init.items():
            self.log(f"prompts of adapter {name!r} initialised from {self.config.init_text!r}: {result.method}, "
                     f"max relative error {result.max_relative_error:.1e}")

    def wrap_for_processes(self) -> None:
        """DDP, or FSDP on the frozen blocks plus our own gradient all-reduce; nothing on one process."""
        self.strategy = "single"
        self.model, self.manual_grad_sync, self.sharded_blocks = self.peft_model, False, 0
        if not self.dist.enabled:
            return
        self.strategy = "fsdp" if self.config.strategy == "fsdp" else "ddp"
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.peft_model, device_ids=device_ids)
        else:
            self.sharded_blocks = shard_frozen_blocks(self.peft_model, self.dist)
            self.manual_grad_sync = True

    def log(self, message: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm
            tqdm.write(message)

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The first line the job prints."""
        config = self.config
        n_trainable = sum(p.numel() for p in self.params)
        n_total = sum(p.numel() for p in self.peft_model.parameters())
        return (f"model {config.model} | task {config.task} | prompts {config.prompt} | {self.implementation} | "
                f"backend {config.backend} | device {self.device} x{self.dist.world_size} ({self.strategy}) | "
                f"trainable {n_trainable:,} of {n_total:,} | {self.total_steps} steps of {config.batch_size}")

    def train(self) -> None:
        config = self.config
        self.log(self.describe())
        if config.head_steps > self.start_step:
            self.log(f"steps {self.start_step + 1}-{config.head_steps}: the task head only, prompts frozen")
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True,
                   mininterval=0.5, disable=not (config.progress and self.dist.is_main))
        for step in range(self.start_step, self.total_steps):
            self.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{self.running_loss():.4f}", tok_s=f"{self.tokens_seen / self.train_seconds:,.0f}")
            done = step + 1
            if done < self.total_steps and config.eval_every and done % config.eval_every == 0:
                self.evaluate(done)
            if done < self.total_steps and config.save_every and done % config.save_every == 0:
                self.save(done)
        bar.close()
        self.evaluate(self.total_steps)
        if config.output_dir is not None:
            self.save_final()

    def batch(self, data: Encoded, indices: list[int], pad_to: Optional[int] = None) -> tuple[dict, Optional[list]]:
        """(the padded batch of ``data``'s examples at ``indices``, their tasks' adapter names or None)."""
        pad_to = pad_to or max(len(data.ids[i]) for i in indices)
        batch = make_batch(data, indices, self.pad_id, self.device, pad_to=pad_to, left_pad=self.left_pad)
        return batch, ([data.tasks[i] for i in indices] if data.tasks is not None else None)

    def rows(self, batch: dict, adapter_names: Optional[list] = None):
        """Per row of ``batch``: (summed loss, loss terms, correct), see :func:`~ptuning_fast.train.loss.row_losses`."""
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}
        with autocast(self.config, self.device):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
            return row_losses(out.logits, batch, self.config.task, self.label_words)

    def objective(self, batch: dict, adapter_names: Optional[list], indices: list[int]):
        """(what this rank backpropagates, the step's training loss as a 0-d tensor) for global
        batch ``indices``: the summed loss over the global count of loss terms, so that N ranks
        compute the update of one process (DDP averages over ranks, hence ``world_size``)."""
        losses, _, _ = self.rows(batch, adapter_names)
        global_terms = count_targets(self.train_data, indices, self.config.task)
        loss_sum = losses.sum()
        # The global batch's loss, not this rank's part (a copy: reduced in place before the backward).
        step_loss = self.dist.all_reduce(loss_sum.detach().float().clone())
        return loss_sum * (self.dist.world_size / global_terms), step_loss.double() / global_terms

    def train_step(self, step: int) -> None:
        """One optimizer step on global batch ``step``; this rank computes its slice of it."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.total_steps:
            raise ValueError(f"`step` must be an int in [0, {self.total_steps}), got {step!r}")
        config, dist_info = self.config, self.dist
        t0 = time.perf_counter()
        indices = global_batch(len(self.train_data), config.batch_size, step, config.seed)
        per_rank = config.batch_size // dist_info.world_size
        mine = indices[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
        # Every rank pads to the global batch's longest example: the shapes one process would see.
        batch, names = self.batch(self.train_data, mine, pad_to=max(len(self.train_data.ids[i]) for i in indices))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(step, self.total_steps, config)
        loss, step_loss = self.objective(batch, names, indices)
        loss.backward()
        if self.manual_grad_sync:
            all_reduce_gradients(self.params, dist_info.world_size)
        if step < config.head_steps:  # no gradient: the optimizer leaves them, and their state, untouched
            for p in self.prompt_params:
                p.grad = None
        if config.max_grad_norm > 0:
            for params in self.groups.values():
                with_grad = [p for p in params if p.grad is not None]
                if with_grad:
                    torch.nn.utils.clip_grad_norm_(with_grad, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses = (self.losses + [step_loss.item()])[-20:]  # .item() waits for the device
        self.train_seconds += time.perf_counter() - t0
        self.tokens_seen += sum(len(self.train_data.ids[i]) for i in indices)
        self.samples_seen += len(indices)

    def running_loss(self) -> Optional[float]:
        """Mean training loss over the last 20 steps."""
        return sum(self.losses) / len(self.losses) if self.losses else None

    # --------------------------------------------------------------------------------------------
    # Evaluation
    # --------------------------------------------------------------------------------------------
    def eval_groups(self) -> list[Optional[str]]:
        """The names evaluation reports on separately (None: the only task)."""
        return [None]

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Accuracy and loss over the eval set (sharded over the ranks), per eval group."""
        was_training = self.model.training
        self.model.eval()
        data, groups = self.eval_data, self.eval_groups()
        mine = list(range(self.dist.rank, len(data), self.dist.world_size))
        totals = torch.zeros(len(groups), 4, dtype=torch.float64, device=self.device)  # loss, terms, correct, rows
        for start in range(0, len(mine), self.config.eval_batch_size):
            indices = mine[start:start + self.config.eval_batch_size]
            batch, names = self.batch(data, indices)
            losses, terms, correct = self.rows(batch, names)
            group = torch.tensor([groups.index(data.tasks[i] if data.tasks else None) for i in indices],
                                 device=self.device)
            totals.index_add_(0, group, torch.stack([losses, terms, correct.float(), torch.ones_like(losses)], 1)
                              .double())
        self.dist.all_reduce(totals)
        self.model.train(was_training)
        per_group = {name: {"eval_accuracy": t[2] / max(t[3], 1), "eval_loss": t[0] / max(t[1], 1)}
                     for name, t in zip(groups, totals.tolist())}
        result = self.eval_result(per_group)
        self.history.append({"step": step, **result})
        self.log(f"step {step}: {self.format_eval(result)}")
        return result

    def eval_result(self, per_group: dict) -> dict:
        """The history entry of one evaluation, from each group's accuracy and loss."""
        return per_group[None]

    def format_eval(self, result: dict) -> str:
        return f"eval accuracy {result['eval_accuracy']:.4f} loss {result['eval_loss']:.4f}"

    # --------------------------------------------------------------------------------------------
    # Saving and the summary
    # --------------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """``OUTPUT_DIR/checkpoint-STEP/``, written by the main process while the others wait."""
        if self.dist.is_main:
            self.write_checkpoint(checkpoint_folder(self.config.output_dir, step), step)
        self.dist.barrier()

    def write_checkpoint(self, folder: Path, step: int) -> None:
        save_checkpoint(folder, self.peft_model, self.optimizer, step, self.config, self.labels)

    def save_final(self) -> None:
        """What the job leaves in ``OUTPUT_DIR`` once trained."""
        self.save(self.total_steps)

    def summary(self) -> dict:
        """The final numbers (also written to ``OUTPUT_DIR/summary.json`` and printed)."""
        config = self.config
        peak_bytes, peak_kind = peak_memory(self.device)
        if self.dist.enabled:  # the largest over the ranks
            peak = torch.tensor([peak_bytes], dtype=torch.float64, device=self.device)
            peak_bytes, peak_kind = int(self.dist.all_reduce(peak, op="max").item()), peak_kind + ", max over ranks"
        seconds = self.train_seconds or float("nan")
        targets = self.eval_data.targets
        summary = {
            "model": config.model, "task": config.task, "prompt": config.prompt,
            "implementation": self.implementation, "backend": config.backend, "device": str(self.device),
            "world_size": self.dist.world_size, "strategy": self.strategy, "sharded_blocks": self.sharded_blocks,
            "precision": "bf16" if uses_bf16(config, self.device) else "fp32",
            **self.summary_fields(),
            "init_text": config.init_text,
            "text_init": None if self.text_init is None else {
                name: {"method": r.method, "max_relative_error": r.max_relative_error, "token_ids": list(r.token_ids)}
                for name, r in self.text_init.items()},
            "steps": self.total_steps, "head_steps": config.head_steps, "resumed_from_step": self.start_step,
            "batch_size": config.batch_size,
            "trainable_parameters": sum(p.numel() for p in self.params), "train_seconds": self.train_seconds,
            "samples_per_second": self.samples_seen / seconds, "tokens_per_second": self.tokens_seen / seconds,
            "final_train_loss": self.running_loss(),
            "eval_accuracy": self.history[-1]["eval_accuracy"], "eval_loss": self.history[-1]["eval_loss"],
            "chance_accuracy": max(targets.count(c) for c in range(len(self.labels))) / len(targets),
            "peak_memory_bytes": peak_bytes, "peak_memory_kind": peak_kind, "history": self.history,
        }
        if config.output_dir is not None and self.dist.is_main:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            write_text(json.dumps(summary, indent=2), str(Path(config.output_dir) / SUMMARY_FILE))
        self.log(format_summary(summary))
        return summary

    def summary_fields(self) -> dict:
        """What the summary adds for this kind of job."""
        return {}


def format_summary(summary: dict) -> str:
    """The human-readable final summary."""
    if not isinstance(summary, dict):
        raise TypeError(f"`summary` must be a dict, got {type(summary).__name__}")
    mib = summary["peak_memory_bytes"] / 2**20
    steps = f"steps {summary['resumed_from_step']}-{summary['steps']}" if summary["resumed_from_step"] else \
        f"{summary['steps']} steps"
    tasks = summary.get("tasks")
    accuracy = (f"eval accuracy {summary['eval_accuracy']:.4f} (chance {summary['chance_accuracy']:.4f})"
                if tasks is None else "eval accuracy " + ", ".join(f"{n} {r['eval_accuracy']:.4f}"
                                                                   for n, r in tasks.items()))
    return (f"done: {steps} in {summary['train_seconds']:.1f} s | "
            f"{summary['tokens_per_second']:,.0f} tokens/s, {summary['samples_per_second']:,.1f} samples/s | "
            f"{accuracy} | peak memory {mib:,.0f} MiB ({summary['peak_memory_kind']})")


__all__ = ["Job", "SUMMARY_FILE", "format_summary"]
