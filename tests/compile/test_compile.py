"""``torch.compile(model, fullgraph=True)`` of the accelerated and the native model, v1 and deep
prompts: the training step (loss, logits, every prompt gradient) and the eval forward equal eager,
with no graph break (fullgraph raises on one), and sequence lengths do not recompile more than
plain PEFT does. CPU compiles are slow: a tiny Llama, the ``aot_eager`` backend, dynamo reset
between tests."""
import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model
from torch._dynamo.utils import counters

import ptuning_fast
from tests.compile.paths import (KINDS, MIXED_ROWS, ROUTES, batch, build, build_mixed, build_mixed_heads,
                                 prompt_parameters)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_step(model, input_ids, attention_mask, call=None, **kwargs):
    """(loss, logits, prompt gradients) of one training step of ``model`` run through ``call``
    (the model itself, or its compiled form)."""
    model.train()
    model.zero_grad(set_to_none=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # padding outputs mean nothing
    out = (model if call is None else call)(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                            **kwargs)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone() for n, p in prompt_parameters(model)}


def _eval_forward(model, input_ids, attention_mask, call=None, **kwargs):
    model.eval()
    with torch.no_grad():
        return (model if call is None else call)(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _assert_compiled_equals_eager(eager, model, tol=1e-5, **kwargs) -> dict:
    """The compiled training step and eval forward of ``model`` equal ``eager``'s (within
    ``tol``); returns the compiled step's prompt gradients."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    input_ids, attention_mask = batch()
    loss, logits, grads = _train_step(model, input_ids, attention_mask, compiled, **kwargs)
    expected_loss, expected_logits, expected_grads = _train_step(eager, input_ids, attention_mask, **kwargs)
    _close(loss, expected_loss, tol)
    _close(logits, expected_logits, tol)
    assert grads.keys() == expected_grads.keys() and grads
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        _close(grads[name], expected_grads[name], tol)
    _close(_eval_forward(model, input_ids, attention_mask, compiled, **kwargs),
           _eval_forward(eager, input_ids, attention_mask, **kwargs), tol)
    return grads


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_step_and_eval_forward_equal_eager(kind, route):
    _assert_compiled_equals_eager(build(kind, route), build(kind, route))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind, lengths", [("v1", "equal"), ("v1", "unequal"), ("deep", "unequal")])
def test_compiled_mixed_batch_training_step_and_eval_forward_equal_eager(kind, route, lengths):
    """Several adapters in one batch (``adapter_names``) of a causal LM: one graph, the eager
    numbers (every adapter's prompt gradients)."""
    _assert_compiled_equals_eager(build_mixed(kind, route, lengths), build_mixed(kind, route, lengths),
                                  adapter_names=MIXED_ROWS)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_mixed_batch_with_head_copies_equals_eager(kind):
    """A classifier whose adapters each have their own head copy (``modules_to_save``): a mixed
    call routes each row through its adapter's copy, compiled whole (the rows travel in the
    traced call, not in a context variable), with eager's loss, logits and every gradient."""
    eager, model = build_mixed_heads(kind), build_mixed_heads(kind)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    input_ids, attention_mask = batch()
    labels = torch.randint(0, 3, (input_ids.shape[0],), generator=torch.Generator().manual_seed(2))
    results = []
    for m, call in ((model, compiled), (eager, eager)):
        m.train()
        out = call(input_ids=input_ids, attention_mask=attention_mask, labels=labels, adapter_names=MIXED_ROWS)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in prompt_parameters(m) if p.grad is not None}
        m.eval()
        with torch.no_grad():
            logits = call(input_ids=input_ids, attention_mask=attention_mask, adapter_names=MIXED_ROWS).logits
        results.append((out.loss.detach(), logits, grads))
    (loss, logits, grads), (expected_loss, expected_logits, expected_grads) = results
    _close(loss, expected_loss)
    _close(logits, expected_logits)
    assert grads.keys() == expected_grads.keys()
    assert any("modules_to_save" in n for n in grads)  # the trainable (active adapter's) head copy
    for name in grads:
        _close(grads[name], expected_grads[name])


def _frames_over_lengths(model, lengths=(5, 7, 9, 12)) -> tuple:
    """(frames compiled, graph breaks) of training steps of ``model`` over several sequence lengths."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for seq_len in lengths:
        _train_step(model, *batch(3, seq_len), call=compiled)
    return counters["frames"]["ok"], sum(counters["graph_break"].values())


def _graph_outputs(model) -> list:
    """The tensors that leave the compiled training forward's graph (each is handed back or
    rebuilt on the host after every call), as (requires grad, is a view)."""
    outputs = []

    def backend(gm, example_inputs):
        node = next(n for n in gm.graph.nodes if n.op == "output")
        outputs.extend((v.requires_grad, v._base is not None) for v in
                       (a.meta["example_value"] for a in node.args[0]) if isinstance(v, torch.Tensor))
        return gm.forward

    model.train()
    input_ids, attention_mask = batch()
    torch.compile(model, fullgraph=True, backend=backend)(input_ids=input_ids, attention_mask=attention_mask,
                                                            labels=input_ids)
    return outputs


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_forward_hands_back_no_more_than_peft(kind):
    """No more graph outputs than PEFT's, and no view that needs gradients among them (autograd
    rebuilds each one on the host, ~15 us a call). The forward used to write the layout's tensors
    into the caller's kwargs (4 outputs) and keep each layer's prefix views on the cache (2L)."""
    peft_outputs = _graph_outputs(build(kind, "peft"))
    for route in ROUTES:
        torch._dynamo.reset()
        outputs = _graph_outputs(build(kind, route))
        assert len(outputs) <= len(peft_outputs), (route, outputs, peft_outputs)
        assert (True, True) not in outputs, (route, outputs)


@pytest.mark.parametrize("kind", KINDS)
def test_sequence_lengths_recompile_no_more_than_peft_and_nothing_breaks_the_graph(kind):
    peft_frames, peft_breaks = _frames_over_lengths(build(kind, "peft"))
    for route in ROUTES:
        frames, breaks = _frames_over_lengths(build(kind, route))
        assert frames <= peft_frames and breaks == 0, (route, frames, peft_frames, breaks)
    assert peft_breaks == 0 and peft_frames >= 1


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mixed", [False, True], ids=["one-adapter", "mixed"])
def test_compiled_bf16_deep_prompts_equal_eager(route, mixed):
    """A bf16 model's deep prompts: eager writes the prefix buffer and sums the rows' gradients in
    fp32; compiled, the prefix is broadcast (or gathered) through autograd, still summed in fp32."""
    def make():
        model = build_mixed("deep", route) if mixed else build("deep", route)
        return model.to(torch.bfloat16)

    kwargs = {"adapter_names": MIXED_ROWS} if mixed else {}
    grads = _assert_compiled_equals_eager(make(), make(), tol=2e-2, **kwargs)
    assert all(grad.dtype == torch.bfloat16 for grad in grads.values())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_model_follows_a_changed_attention_implementation(kind, route):
    """Structural facts of the config (geometry, architecture) are constants of the compiled
    graph; the attention implementation is read on each call: switched to ``eager`` after
    compiling, the compiled model gives the eager model's logits under eager attention."""
    model, reference = build(kind, route), build(kind, route)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    input_ids, attention_mask = batch()
    _close(_eval_forward(model, input_ids, attention_mask, compiled), _eval_forward(reference, input_ids, attention_mask))
    for m in (model, reference):
        m.get_base_model().set_attn_implementation("eager")
        assert m.get_base_model().config._attn_implementation == "eager"
    _close(_eval_forward(model, input_ids, attention_mask, compiled), _eval_forward(reference, input_ids, attention_mask))


def test_compiled_mixed_classifier_call_whose_model_breaks_the_graph_routes_its_rows():
    """A Llama classifier's own forward breaks the graph (a logging call): compiled without
    fullgraph, the head-copy rows pushed before the break reach the copies after it, for two
    different row orders in turn, and nothing is left behind after the call."""
    from transformers import LlamaForSequenceClassification

    from ptuning_fast import peft_route
    from tests.tiny_models import llama

    def make():
        torch.manual_seed(0)
        model = None
        for name, tokens in zip("abc", (4, 1, 3)):
            cfg = PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=tokens, encoder_hidden_size=24)
            if model is None:
                model = get_peft_model(llama(LlamaForSequenceClassification, num_labels=3), cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
        return ptuning_fast.accelerate(model).eval()

    eager, model = make(), make()
    compiled = torch.compile(model, backend="aot_eager")
    input_ids, attention_mask = batch()
    for rows in (MIXED_ROWS, ["a", "c", "b"], MIXED_ROWS):
        with torch.no_grad():
            got = compiled(input_ids=input_ids, attention_mask=attention_mask, adapter_names=rows).logits
            expected = eager(input_ids=input_ids, attention_mask=attention_mask, adapter_names=rows).logits
        _close(got, expected)
        assert peft_route._TRACED_HEAD_ROWS == []
    assert sum(counters["graph_break"].values()) > 0
