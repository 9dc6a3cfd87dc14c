"""No host read of device data of the package's own in a steady-state step (a training step, an
eval forward, the decode steps of generate()), for the accelerated and the native model, v1 and
deep prompts.

There is no GPU here: ``value_checks("never")`` makes the package treat CPU tensors as it treats
accelerator tensors (no check that reads values), which is what a CUDA run does by default. The
recorder (benchmarks/counting.py) patches every way the host reads tensor data and attributes each
read to the innermost frame outside torch, so a read inside transformers is not counted as ours.
"""
import pytest
import torch

import ptuning_fast
from benchmarks.counting import HostReads
from tests.compile.paths import KINDS, MIXED_LENGTHS, MIXED_ROWS, ROUTES, batch, build, build_mixed


def _train_step(model, input_ids, attention_mask, **kwargs):
    model.train()
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, **kwargs).loss.backward()


def _eval_forward(model, input_ids, attention_mask, **kwargs):
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def _decode(model, input_ids, attention_mask, **kwargs):
    model.eval()
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                   pad_token_id=0, **kwargs)


STEPS = {"train": _train_step, "eval": _eval_forward, "decode": _decode}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_no_host_read_of_the_package_in_a_steady_state_step(kind, route):
    model = build(kind, route)
    input_ids, attention_mask = batch()
    found = {}
    with ptuning_fast.value_checks("never"):  # what a device run does
        for name, step in STEPS.items():
            step(model, input_ids, attention_mask)  # first call: one-time set-up (extension, caches)
            with HostReads() as reads:
                step(model, input_ids, attention_mask)
            found[name] = [str(r) for r in reads.own()]
    assert found == {name: [] for name in STEPS}


def test_the_recorder_sees_the_package_reads_when_values_are_checked():
    """The same step with the checks that read values on: the recorder finds them (so the test
    above can fail), attributed to the package's files."""
    model = build("v1", "native")
    input_ids, attention_mask = batch()
    with ptuning_fast.value_checks("always"):
        _eval_forward(model, input_ids, attention_mask)
        with HostReads() as reads:
            _eval_forward(model, input_ids, attention_mask)
    own = reads.own()
    assert own and all("ptuning_fast" in r.filename for r in own)
    assert {r.function for r in own} >= {"check_index_range", "_front_is_packed"}
    assert any(not r.own for r in reads.reads) or True  # transformers' own reads are not ours


def test_the_recorder_attributes_reads_by_frame():
    with HostReads() as reads:
        torch.ones(3).sum().item()
        bool(torch.ones(1))
        torch.tensor([1, 2])
    assert [r.what for r in reads.reads if r.filename == __file__] == [
        "Tensor.item", "aten._local_scalar_dense", "Tensor.__bool__", "aten._local_scalar_dense",
        "torch.tensor(list)"]
    assert not reads.own()


@pytest.mark.parametrize("name, side", [("bert_token", "right"), ("bert_token", "left"), ("llama", "left"),
                                        ("llama", "right")])
@pytest.mark.parametrize("kind", KINDS)
def test_the_device_layout_computes_what_the_cpu_layout_computes(name, side, kind):
    """Without reading the mask (a device run) a padded batch is packed; on CPU the mask may pick
    the cheaper front layout: per-token outputs at the real tokens, the loss and the prompt
    gradients are the same."""
    from peft import PrefixTuningConfig, PromptEncoderConfig

    from tests.tiny_models import build as build_base, labels_for, padded_batch

    base, task = build_base(name, 0)
    config = (PromptEncoderConfig(task_type=task, num_virtual_tokens=3, encoder_hidden_size=20) if kind == "v1"
              else PrefixTuningConfig(task_type=task, num_virtual_tokens=3))
    model = ptuning_fast.get_ptuning_model(base, config)
    ids, mask = padded_batch([4, 6, 2], 6, seed=3, side=side)
    labels = labels_for(task, ids, 5)["labels"].masked_fill(mask == 0, -100)  # padding outputs mean nothing
    results = {}
    for mode in ("auto", "never"):
        model.zero_grad(set_to_none=True)
        with ptuning_fast.value_checks(mode):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            assert out.logits.shape[:2] == ids.shape  # outputs at the caller's columns
        out.loss.backward()
        results[mode] = (out.loss.detach(), out.logits.detach()[mask.bool()],
                         [p.grad.clone() for p in model.prompt_encoder.parameters() if p.grad is not None])
    (loss, logits, grads), (device_loss, device_logits, device_grads) = results["auto"], results["never"]
    torch.testing.assert_close(device_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(device_logits, logits, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(device_grads) > 0
    for got, expected in zip(device_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lengths", sorted(MIXED_LENGTHS))
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_no_host_read_of_the_package_in_a_mixed_batch_step(kind, route, lengths):
    """Several adapters in one batch (``adapter_names``): the rows' adapter index and prompt
    lengths are built once per set of names, the longest prompt comes from the configs."""
    model = build_mixed(kind, route, lengths)
    input_ids, attention_mask = batch()
    found = {}
    with ptuning_fast.value_checks("never"):
        for name, step in STEPS.items():
            step(model, input_ids, attention_mask, adapter_names=MIXED_ROWS)
            with HostReads() as reads:
                step(model, input_ids, attention_mask, adapter_names=MIXED_ROWS)
            found[name] = [str(r) for r in reads.own()]
    assert found == {name: [] for name in STEPS}
