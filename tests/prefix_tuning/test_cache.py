"""PrefixKVCache: layout, in-place appends, autograd through the shared buffer, the Cache API that
models and generate() use, errors, and memory (the prefix is written once, never per row).

Models are not needed here: each test drives ``cache.update`` as an attention layer does (and
runs SDPA on what it returns, so autograd's saved-tensor checks are exercised).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from ptuning_fast import PrefixKVCache, use_backend
from ptuning_fast.ops import PrefixGeometry, PrefixKVBuffer, PrefixWeights
from ptuning_fast.reference import encode_prefix_reference, prefix_kv_reference

L, HKV, DH, D, HH = 3, 2, 5, 6, 9
J = L * 2 * HKV * DH
BACKENDS = ["reference", "triton"]


def make_weights(T, projected, *, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_(requires_grad)

    if not projected:
        return PrefixWeights(rnd(T, J))
    return PrefixWeights(rnd(T, D), rnd(HH, D, scale=D ** -0.5), rnd(HH, scale=0.5), rnd(J, HH, scale=HH ** -0.5),
                         rnd(J, scale=0.5))


def params(weights):
    return [t for w in weights for t in w if t is not None]


def make_cache(weights, batch=None, index=None, capacity=4, dtype=None):
    buffer = PrefixKVBuffer(weights, PrefixGeometry(L, HKV, DH), batch, adapter_index=index, capacity=capacity,
                            dtype=dtype)
    return PrefixKVCache(buffer)


def reference_prefix(weights, index, batch):
    index = index if index is not None else torch.zeros(batch, dtype=torch.long)
    return prefix_kv_reference([encode_prefix_reference(*w) for w in weights], index, L, HKV, DH)


def text_states(batch, seq, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, HKV, seq, DH, generator=g).requires_grad_(requires_grad),
             torch.randn(batch, HKV, seq, DH, generator=g).requires_grad_(requires_grad)) for _ in range(L)]


# ----------------------------------------------------------------------------- layout and Cache API
@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_and_in_place_appends(backend):
    weights = [make_weights(4, True, requires_grad=False)]
    with use_backend(backend):
        cache = make_cache(weights, batch=3, capacity=5)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == L
    P, itemsize = 4, 4
    assert cache.storage_bytes() == L * 2 * 3 * HKV * (P + 5) * DH * itemsize  # one buffer, all layers
    prefix = reference_prefix(weights, None, 3)
    assert cache.get_seq_length() == P and cache.get_mask_sizes(2, 0) == (P + 2, 0)
    assert cache.get_mask_sizes(torch.arange(2), 0) == (P + 2, 0)  # transformers < 5.23 passes cache_position

    text = text_states(3, 3, seed=1)
    for layer, (k, v) in enumerate(text):
        keys, values = cache.update(k, v, layer)
        assert keys.shape == (3, HKV, P + 3, DH)
        assert keys.data_ptr() == cache.buffer.storage[layer, 0].data_ptr()  # the storage itself: no copy
        torch.testing.assert_close(keys, torch.cat([prefix[layer, 0], k], 2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values, torch.cat([prefix[layer, 1], v], 2), rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == P + 3 and cache.get_mask_sizes(1, 0) == (P + 4, 0)

    # Decode past the capacity: the layer grows and keeps its contents.
    steps = text_states(3, 4, seed=2)
    for layer, (k, v) in enumerate(steps):
        keys, values = cache.update(k, v, layer)
        torch.testing.assert_close(keys, torch.cat([prefix[layer, 0], text[layer][0], k], 2), rtol=1e-6, atol=1e-6)
    assert cache.get_seq_length() == P + 7 and cache.layers[0].capacity >= P + 7
    before = cache.layers[1].keys.clone()

    cache.crop(-2)
    assert cache.get_seq_length() == P + 5
    torch.testing.assert_close(cache.layers[1].keys, before[:, :, : P + 5])
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(2)
    with pytest.raises(ValueError, match="cannot remove 6 tokens from layer 0: only 5 follow the 4-token prefix"):
        cache.crop(-6)

    beam = torch.tensor([2, 0, 1])
    cache.reorder_cache(beam)
    torch.testing.assert_close(cache.layers[1].keys, before[beam, :, : P + 5])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 6
    cache.batch_select_indices(torch.tensor([1, 4]))
    torch.testing.assert_close(cache.layers[1].keys, before[beam][[0, 2], :, : P + 5])
    cache.reset()
    assert cache.get_seq_length() == P
    torch.testing.assert_close(cache.layers[2].values, prefix[2, 1][beam][[0, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapters_and_prefix_lengths(backend):
    weights = [make_weights(2, False, seed=3, requires_grad=False), make_weights(4, True, seed=4, requires_grad=False)]
    index = torch.tensor([1, 0, 0, 1])
    with use_backend(backend):
        cache = make_cache(weights, index=index, capacity=2)
    assert cache.num_virtual_tokens == 4 and cache.prompt_lengths().tolist() == [4, 2, 2, 4]
    prefix = reference_prefix(weights, index, 4)
    torch.testing.assert_close(cache.buffer.storage[..., :4, :], prefix, rtol=1e-6, atol=1e-6)
    assert cache.buffer.storage[:, :, 1:3, :, :2].abs().max().item() == 0  # empty columns hold zeros


# ----------------------------------------------------------------------------- autograd
def attention_loss(keys, values, query, weight):
    """SDPA saves keys/values for its backward, as the model's attention does."""
    return (F.scaled_dot_product_attention(query, keys, values) * weight).sum()


def run_layers(cache_or_prefix, text, queries, weights_out):
    loss = 0
    for layer, (k, v) in enumerate(text):
        if isinstance(cache_or_prefix, PrefixKVCache):
            keys, values = cache_or_prefix.update(k, v, layer)
        else:
            keys = torch.cat([cache_or_prefix[layer, 0], k], 2)
            values = torch.cat([cache_or_prefix[layer, 1], v], 2)
        loss = loss + attention_loss(keys, values, queries[layer], weights_out[layer])
    return loss


# Gradients take autograd's own ops with one adapter (PrefixKVBuffer.encoded_prefix) and the
# buffer's Functions with several: every autograd test runs both.
def adapters_case(adapters, projected, seeds=(5, 6)):
    """(weights, adapter_index) of one adapter, or of two of different lengths (3 and 2 tokens)."""
    if adapters == "one":
        return [make_weights(3, projected, seed=seeds[0])], None
    weights = [make_weights(3, projected, seed=seeds[0]), make_weights(2, projected, seed=seeds[1])]
    return weights, torch.tensor([0, 1, 1])


@pytest.mark.parametrize("adapters", ["one", "two"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("projected", [False, True])
def test_gradients_match_cat_path(backend, projected, adapters):
    """Loss and the gradients of every prefix parameter and of the text keys/values equal the
    torch.cat path (what DynamicCache does), with one adapter or two of different lengths."""
    weights, index = adapters_case(adapters, projected)
    text = text_states(3, 4, seed=7, requires_grad=True)
    g = torch.Generator().manual_seed(8)
    queries = [torch.randn(3, HKV, 4, DH, generator=g) for _ in range(L)]
    outs = [torch.randn(3, HKV, 4, DH, generator=g) for _ in range(L)]
    inputs = params(weights) + [t for kv in text for t in kv]

    with use_backend(backend):
        cache = make_cache(weights, batch=3, index=index, capacity=4)
        assert (cache.buffer.encoded_prefix is not None) == (adapters == "one")
        loss = run_layers(cache, text, queries, outs)
        grads = torch.autograd.grad(loss, inputs)
    # The reference hides the empty columns of the short prefix by a mask; here they hold zeros in
    # both paths and take part in attention equally, so the comparison is exact in structure.
    ref_loss = run_layers(reference_prefix(weights, index, 3), text, queries, outs)
    ref_grads = torch.autograd.grad(ref_loss, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_frozen_prefix_still_routes_text_gradients():
    weights = [make_weights(3, False, requires_grad=False)]
    text = text_states(2, 3, seed=9, requires_grad=True)
    queries = [torch.randn(2, HKV, 3, DH) for _ in range(L)]
    outs = [torch.ones(2, HKV, 3, DH)] * L
    cache = make_cache(weights, batch=2)
    assert not cache.buffer.requires_grad
    grads = torch.autograd.grad(run_layers(cache, text, queries, outs), [t for kv in text for t in kv])
    ref = torch.autograd.grad(run_layers(reference_prefix(weights, None, 2), text, queries, outs),
                              [t for kv in text for t in kv])
    for got, exp in zip(grads, ref):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adapters", ["one", "two"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_replay_their_write(reentrant, adapters):
    """Under (non-reentrant) activation checkpointing a layer is recomputed in the backward and
    calls update again: it must get the same views, and gradients equal the plain run."""
    weights, index = adapters_case(adapters, True, seeds=(10, 11))
    text = text_states(3, 3, seed=11, requires_grad=True)
    queries = [torch.randn(3, HKV, 3, DH) for _ in range(L)]
    outs = [torch.randn(3, HKV, 3, DH) for _ in range(L)]
    inputs = params(weights) + [t for kv in text for t in kv]
    ref = torch.autograd.grad(run_layers(make_cache(weights, batch=3, index=index), text, queries, outs), inputs)

    cache = make_cache(weights, batch=3, index=index)

    def layer_fn(k, v, layer):
        keys, values = cache.update(k, v, layer)
        return attention_loss(keys, values, queries[layer], outs[layer])

    if reentrant:  # the forward runs without autograd, so the recompute cannot be a replay
        with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
            loss = sum(checkpoint(layer_fn, k, v, i, use_reentrant=True) for i, (k, v) in enumerate(text))
            loss.backward()
        return
    loss = sum(checkpoint(layer_fn, k, v, i, use_reentrant=False) for i, (k, v) in enumerate(text))
    got = torch.autograd.grad(loss, inputs)
    assert cache.get_seq_length() == 3 + 3  # the recompute did not append again
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_errors():
    weights = [make_weights(3, False)]
    cache = make_cache(weights, batch=2)
    k = torch.randn(2, HKV, 2, DH)
    cache.update(k.requires_grad_(), k.detach().requires_grad_(), 0)
    with pytest.raises(ValueError, match="already took part in a forward that needs gradients"):
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="the model's key_states are torch.float64 but the cache holds torch.float32"):
        cache.update(k.double(), k.double(), 1)
    with pytest.raises(ValueError, match=r"`key_states` has shape \(3, 2, 2, 5\), expected \(batch=2"):
        cache.update(torch.randn(3, HKV, 2, DH), torch.randn(3, HKV, 2, DH), 1)
    with pytest.raises(ValueError, match="`value_states` must be a 4D tensor"):
        cache.update(torch.randn(2, HKV, 2, DH), torch.randn(2, 2 * DH), 1)
    with pytest.raises(TypeError, match="`buffer` must be a PrefixKVBuffer"):
        PrefixKVCache(weights)
    with pytest.raises(ValueError, match="`capacity` must be >= 0"):
        make_cache(weights, batch=2, capacity=-1)


# ----------------------------------------------------------------------------- memory
class AllocatedBytes(TorchDispatchMode):
    """Bytes of every new storage an ATen op creates (views and in-place writes create none)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.seen = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.bytes += t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_is_written_once_not_per_row(backend, dtype):
    """Building the cache without gradients (generation, serving) allocates the storage (the
    attention layout: one prefix copy per row, plus the room for the text) and nothing else that
    grows with the batch; appends allocate nothing. A bf16 cache from fp32 weights is written
    directly in bf16 (no fp32 B x T x J round trip). PEFT's get_prompt + cache allocates at least
    three B x T x J copies of the prefix."""
    T, S = 4, 3
    weights = [make_weights(T, True, seed=12, requires_grad=False)]
    extra = {}
    for batch in (1, 8):
        with use_backend(backend), AllocatedBytes() as counter:
            cache = make_cache(weights, batch=batch, capacity=S, dtype=dtype)
        storage = L * 2 * batch * HKV * (T + S) * DH * dtype.itemsize
        assert cache.storage_bytes() == storage
        extra[batch] = counter.bytes - storage
        text = [(k.to(dtype), v.to(dtype)) for k, v in text_states(batch, S, seed=13)]
        with AllocatedBytes() as counter, torch.no_grad():
            for layer, (k, v) in enumerate(text):
                cache.update(k, v, layer)
        assert counter.bytes == 0  # in place
    # Besides the storage: a few (T, J)-sized fp32 temporaries at most, and row indices (bytes per
    # row), where one more fp32 copy of the prefix would cost T * J * 4 = 960 bytes per row.
    assert extra[8] < 4 * T * J * 4
    assert extra[8] - extra[1] <= 16 * (8 - 1)


def test_autograd_path_encodes_once_and_allocates_what_attention_reads():
    """One adapter with gradients in fp32: building the cache allocates the (T, J) prefix (and the
    encoder's two (T, Hh) temporaries), nothing per row; each layer's append allocates exactly the
    keys and values it returns, (B, Hkv, T + S, Dh) each (PEFT's cache allocates those too, after
    B x T x J copies). A bf16 cache keeps the buffer (its reduction accumulates the rows in fp32)."""
    T, S = 4, 3
    weights = [make_weights(T, True, seed=12)]
    for batch in (1, 8):
        with AllocatedBytes() as counter:
            cache = make_cache(weights, batch=batch, capacity=S)
        assert cache.buffer.encoded_prefix is not None and cache.buffer.storage is None
        assert counter.bytes <= (T * J + 2 * T * HH) * 4
        text = [(k.requires_grad_(), v.requires_grad_()) for k, v in text_states(batch, S, seed=13)]
        with AllocatedBytes() as counter:
            for layer, (k, v) in enumerate(text):
                cache.update(k, v, layer)
        assert counter.bytes == L * 2 * batch * HKV * (T + S) * DH * 4
        assert cache.storage_bytes() == counter.bytes  # each layer holds what it returned
    assert make_cache(weights, batch=2, dtype=torch.bfloat16).buffer.storage is not None


def test_autograd_path_cache_api():
    """After a forward with gradients (one adapter) the cache keeps working: its layers hold the
    prefix and the text, later appends without gradients grow them, and the buffer refuses the
    hand-made gradient protocol of the Functions' path."""
    weights = [make_weights(3, True, seed=14)]
    cache = make_cache(weights, batch=2)
    prefix = reference_prefix(weights, None, 2).detach()
    assert torch.equal(cache.layers[1].keys, prefix[1, 0])  # before any append: the prefix alone
    text = text_states(2, 2, seed=15, requires_grad=True)
    more = text_states(2, 1, seed=16)
    for layer in range(L):
        cache.update(*text[layer], layer)
        with torch.no_grad():
            keys, values = cache.update(*more[layer], layer)
        torch.testing.assert_close(values, torch.cat([prefix[layer, 1], text[layer][1].detach(), more[layer][1]], 2))
    assert cache.get_seq_length() == 3 + 3 and torch.equal(cache.layers[2].keys, keys)
    cache.crop(-1)
    torch.testing.assert_close(cache.layers[0].keys, torch.cat([prefix[0, 0], text[0][0].detach()], 2))
    with pytest.raises(ValueError, match="routes the prefix gradient through autograd"):
        cache.buffer.accumulate_layer_grad(0, torch.randn(2, HKV, 3, DH), None)


def test_peft_path_copies_the_prefix_three_times():
    """The yardstick of the test above: PEFT's path on the same prefix (the encoder on B x T rows,
    the view/permute/split, the cache) allocates at least three B x T x J copies."""
    T, S, batch = 4, 3, 8
    weights = [make_weights(T, True, seed=12)]
    text = text_states(batch, S, seed=13)
    with AllocatedBytes() as counter:
        w = weights[0]
        out = F.linear(torch.tanh(F.linear(w.embedding.expand(batch, T, D), w.w1, w.b1)), w.w2, w.b2)
        kv = out.view(batch, T, L * 2, HKV, DH).permute(2, 0, 3, 1, 4).split(2)
        peft_cache = DynamicCache(kv)
        for layer, (k, v) in enumerate(text):
            peft_cache.update(k, v, layer)
    one_copy = batch * T * J * 4
    assert counter.bytes >= 3 * one_copy
