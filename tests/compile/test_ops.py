"""The package's custom ops (the C++ mask and positions builders) as torch.library sees them:
their fake implementations agree with the real ones (shapes, dtypes, strides; ``opcheck``), and
the builders give the same masks through the ops as the PyTorch reference."""
import pytest
import torch

from ptuning_fast._extension import load_extension
from ptuning_fast.ops import mask as mask_ops
from ptuning_fast.reference.mask import prompt_attention_mask_reference, prompt_position_ids_reference

pytestmark = pytest.mark.skipif(load_extension() is None, reason="the C++ extension is not built here")


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    attention_mask = (torch.rand(3, 6, generator=generator) > 0.3).long()
    lengths = torch.randint(0, 4, (3,), generator=generator)
    return attention_mask, lengths


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_attention_mask_op_passes_opcheck_and_equals_the_reference(dtype):
    attention_mask, lengths = _inputs()
    args = (attention_mask, lengths, 4, 2, True, 0, dtype)
    torch.library.opcheck(mask_ops._attention_mask_op, args)
    expected = prompt_attention_mask_reference(attention_mask, lengths, 4, causal=True, past_length=2, dtype=dtype)
    assert torch.equal(mask_ops._attention_mask_op(*args), expected)


def test_position_ids_op_passes_opcheck_and_equals_the_reference():
    attention_mask, lengths = _inputs(1)
    args = (attention_mask, lengths, 4, 1, True)
    torch.library.opcheck(mask_ops._position_ids_op, args)
    expected = prompt_position_ids_reference(attention_mask, lengths, past_length=1, after_prompt=True)
    assert torch.equal(mask_ops._position_ids_op(*args), expected)


def test_per_row_positions_read_no_length_from_the_host():
    """Positions need no number of prompt columns: per-row lengths are not read for them."""
    from benchmarks.counting import HostReads
    from ptuning_fast import build_prompt_position_ids, value_checks

    attention_mask, lengths = _inputs(2)
    with value_checks("never"), HostReads() as reads:
        got = build_prompt_position_ids(attention_mask, lengths)
    assert reads.own() == []
    assert torch.equal(got, prompt_position_ids_reference(attention_mask, lengths))
