"""The main job's demo: ``python -m ptuning_fast.demo`` (or ``ptuning-fast demo``).

1. P-tuning encoder: PEFT's ``PromptEncoder`` and ours, built from the same seed, must hold the
   same weights and give the same prompts and gradients; then both are timed (forward+backward
   as ``PeftModel`` calls PEFT's, and the cached eval path) on the available device.
Runs on CUDA when there is a GPU, on CPU otherwise.
"""
from __future__ import annotations

import argparse

import torch

from ._timing import time_fn


def _encoder_pair(token_dim: int, hidden: int, tokens: int, device, dtype):
    from peft import PromptEncoderConfig as PeftConfig
    from peft.tuners.p_tuning import PromptEncoder as PeftPromptEncoder

    from .prompt_encoder import PromptEncoder

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptuning_fast.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"ptuning_fast demo on {name} (torch {torch.__version__})")
    encoder_section(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
