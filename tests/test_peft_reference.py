"""An accelerated ``PeftModel`` against plain PEFT's numbers recorded on the pinned versions
(``scripts/record_peft_reference.py``), on whatever transformers release is installed: deep-prompt
classification, token-classification and QA heads (logits and loss), and greedy ``generate()`` of
deep and v1 prompts, every case a mixed batch (``adapter_names=``) with left padding, each row
compared with PEFT running it alone. On transformers >= 5.24 PEFT 0.21.2 cannot compute these
itself, so this is where the release is checked against PEFT."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ptuning_fast
from tests.peft_reference_cases import CASES, build_case

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RECORDED = load_file(FIXTURES / "peft_reference.safetensors")
META = json.loads((FIXTURES / "peft_reference.json").read_text())


def recorded(name: str, key: str) -> dict:
    prefix = f"{name}/{key}/"
    return {k[len(prefix):]: v for k, v in RECORDED.items() if k.startswith(prefix)}


def test_the_fixture_covers_every_case():
    assert set(META["cases"]) == set(CASES) and META["recorded_with"]["peft"]
    for name, case in CASES.items():
        assert META["cases"][name] == case, f"{name}: the case changed; rerun scripts/record_peft_reference.py"


@pytest.mark.parametrize("name", sorted(CASES))
def test_accelerated_model_gives_the_recorded_peft_numbers(name):
    case = CASES[name]
    plain, _ = build_case(case, seed=1)  # other weights than recorded: the state dict below replaces them all
    assert not plain.load_state_dict(recorded(name, "state"), strict=True).unexpected_keys
    model = ptuning_fast.accelerate(copy.deepcopy(plain))
    inputs = recorded(name, "inputs")
    rows = case["rows"]
    with torch.no_grad():
        if case["check"] == "generate":
            tokens = model.generate(**inputs, adapter_names=rows, max_new_tokens=4, min_new_tokens=4,
                                    do_sample=False, pad_token_id=0)
            expected = recorded(name, "tokens")
            for row in range(len(rows)):
                assert torch.equal(tokens[row, -4:], expected[str(row)]), (row, rows[row])
            return
        out = model(**inputs, adapter_names=rows)
    mask = inputs["attention_mask"]
    for key in ("logits", "start_logits"):
        for row, want in recorded(name, key).items():
            got = out[key][int(row)]
            if want.dim() >= 1 and want.shape[0] == mask.shape[1]:  # per token: the real tokens
                real = mask[int(row)].bool()
                got, want = got[real], want[real]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{key} of row {row}")
    losses = recorded(name, "loss")
    assert losses, name
    # The mixed loss is the mean over all loss terms: each row's loss weighted by its terms.
    counts = (inputs["labels"] != -100).sum(1).float() if case["model"].endswith("_token") else torch.ones(len(rows))
    expected_loss = sum(losses[str(r)] * counts[r] for r in range(len(rows))) / counts.sum()
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-5, atol=1e-6)
