"""Record what plain PEFT computes, on the pinned versions, for the tests that run where PEFT cannot.

PEFT 0.21.2's PREFIX_TUNING forward of classification, token-classification and QA heads fails on
transformers >= 5.24 (it looks for a ``past_key_values`` parameter, renamed ``cache``), and its
``generate()`` gives other tokens there. ``tests/test_peft_reference.py`` checks this package's
accelerated models on any release against the numbers written here: tiny models built from
configs, their weights, fresh random prompts, left-padded inputs, and PEFT's outputs (logits,
loss, greedy tokens), each row alone with its adapter.

    python scripts/record_peft_reference.py        # on the versions of scripts/constraints.txt

writes ``tests/fixtures/peft_reference.safetensors`` (tensors) and ``peft_reference.json`` (cases).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peft_reference_cases import CASES, build_case, case_inputs  # noqa: E402

OUT = ROOT / "tests" / "fixtures"


@torch.no_grad()
def record() -> None:
    import peft
    import transformers
    from safetensors.torch import save_file

    tensors, cases = {}, {}
    for name, case in CASES.items():
        plain, _ = build_case(case)
        inputs = case_inputs(case)
        for key, value in plain.state_dict().items():  # base weights and every adapter: the whole model
            tensors[f"{name}/state/{key}"] = value.clone().contiguous()  # tied weights: one copy each
        for key, value in inputs.items():
            tensors[f"{name}/inputs/{key}"] = value
        for row, adapter in enumerate(case["rows"]):
            plain.set_adapter(adapter)
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            if case["check"] == "generate":
                tokens = plain.generate(**one, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
                tensors[f"{name}/tokens/{row}"] = tokens[0, -4:].contiguous()
            else:
                out = plain(**one)
                for key in ("logits", "start_logits", "loss"):
                    if out.get(key) is not None:
                        tensors[f"{name}/{key}/{row}"] = out[key][0].contiguous() if key != "loss" else out[key]
        cases[name] = {k: v for k, v in case.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT / "peft_reference.safetensors")
    meta = {"recorded_with": {"transformers": transformers.__version__, "peft": peft.__version__,
                              "torch": torch.__version__}, "cases": cases}
    (OUT / "peft_reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    record()
