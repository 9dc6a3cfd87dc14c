"""Concurrent calls on one model: 8 threads, each making its own calls (mixed ``adapter_names``,
batch sizes from 1 to 5, some calls on the active adapter), must give exactly what the same calls
give one after another. An accelerated PeftModel whose adapters each have a classifier copy
(PEFT's ``modules_to_save``), and the native model, forward and ``generate()``."""
import sys
import threading

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig

import ptuning_fast
from tests.test_peft_route_mixed import NAMES, twins
from tests.tiny_models import PAD, VOCAB, build, randomize_

THREADS = 8


def random_calls(count, seed, width=6):
    """``count`` calls: (ids, mask, adapter_names or None), left-padded, 1 to 5 rows each."""
    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(count):
        batch = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (batch, width), generator=g)
        real = torch.randint(1, width + 1, (batch,), generator=g)
        mask = (torch.arange(width)[None, :] >= width - real[:, None]).long()
        names = [NAMES[int(i)] for i in torch.randint(0, len(NAMES), (batch,), generator=g)]
        calls.append((ids * mask + PAD * (1 - mask), mask, None if len(calls) % 7 == 3 else names))
    return calls


def run_concurrently(call, per_thread):
    """``call(item)`` for every item of each thread's list, the threads started together; the
    results, per thread, in order (an exception in a thread is raised here)."""
    results = [None] * len(per_thread)
    errors = []
    start = threading.Barrier(len(per_thread))

    def work(i):
        try:
            start.wait(timeout=30)
            results[i] = [call(item) for item in per_thread[i]]
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: every interleaving of the calls' steps
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(per_thread))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]
    return results


def assert_concurrent_equals_sequential(call, calls):
    per_thread = [calls[i::THREADS] for i in range(THREADS)]
    sequential = [[call(item) for item in items] for items in per_thread]
    concurrent = run_concurrently(call, per_thread)
    for thread, (got, expected) in enumerate(zip(concurrent, sequential)):
        for index, (a, b) in enumerate(zip(got, expected)):
            assert a.shape == b.shape and torch.equal(a, b), f"thread {thread}, call {index}"


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_accelerated_classifier_copies_under_threads(kind):
    _, fast, _ = twins("llama_cls", kind, "unequal", seed=5)
    fast.set_adapter("c")  # calls without adapter_names use c's prompt and classifier copy

    @torch.no_grad()
    def call(item):
        ids, mask, names = item
        return fast(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    assert_concurrent_equals_sequential(call, random_calls(THREADS * 50, seed=21))


def native_model(kind, seed):
    base, _ = build("llama", seed)
    model = None
    for index, name in enumerate(NAMES):
        tokens = (4, 1, 3)[index]
        config = (PromptEncoderConfig(num_virtual_tokens=tokens, encoder_hidden_size=12) if kind == "v1"
                  else PrefixTuningConfig(num_virtual_tokens=tokens, prefix_projection=index == 1,
                                          encoder_hidden_size=10))
        if model is None:
            model = ptuning_fast.get_ptuning_model(base.eval(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize_(model.prompt_encoder, seed + 50, scale=2.0)  # prompts strong enough to steer the tokens
    return model.eval()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_native_forward_and_generate_under_threads(kind):
    model = native_model(kind, seed=6)

    @torch.no_grad()
    def forward(item):
        ids, mask, names = item
        return model(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    def generate(item):
        ids, mask, names = item
        return model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=3,
                              min_new_tokens=3, do_sample=False, pad_token_id=PAD)

    assert_concurrent_equals_sequential(forward, random_calls(THREADS * 50, seed=22))
    assert_concurrent_equals_sequential(generate, random_calls(THREADS * 8, seed=23))


def test_accelerated_generate_under_threads():
    """Deep prompts (the prefix written at generate()'s first step) through an accelerated PeftModel."""
    _, fast, _ = twins("llama", "v2", "unequal", seed=7)
    randomize_(fast.prompt_encoder, 78, scale=2.0)

    def generate(item):
        ids, mask, names = item
        return fast.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, pad_token_id=PAD)

    assert_concurrent_equals_sequential(generate, random_calls(THREADS * 8, seed=24))
