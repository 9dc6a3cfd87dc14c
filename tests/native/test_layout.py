"""Where each row's text, v1 prompt and padding go: packed layouts and PEFT's."""
import torch

from ptuning_fast.native.layout import build_prompt_layout


def test_layout_places_prompt_next_to_the_text():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    left = build_prompt_layout(mask, torch.tensor([2, 2]), pad_left=True)
    assert left.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert left.prompt_index.tolist() == [[-1, -1, 0, 1, -1, -1], [-1, 0, 1, -1, -1, -1]]
    assert left.text_columns[:, :].tolist()[1][:3] == [3, 4, 5]
    right = build_prompt_layout(mask, torch.tensor([2, 2]), pad_left=False)
    assert right.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert right.position_ids.tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 0]]


def test_peft_layout_keeps_the_input_columns_behind_the_prompts():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    layout = build_prompt_layout(mask, torch.tensor([2, 1]), longest=2, pad_left=True, positions="peft")
    assert layout.outputs_in_layout and layout.shift == 2 and layout.width == 5
    assert layout.prompt_index.tolist() == [[0, 1, -1, -1, -1], [0, -1, -1, -1, -1]]  # where PEFT puts them
    assert layout.attention_mask.tolist() == [[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]  # PEFT counts padding
    assert layout.scatter(torch.tensor([[7, 8, 9], [4, 5, 6]]), -1).tolist() == [[-1, -1, 7, 8, 9],
                                                                               [-1, -1, 4, 5, 6]]
    uniform = build_prompt_layout(mask, 2, pad_left=True, positions="peft")
    assert uniform.position_ids is None  # arange over the columns: the model's own positions


def test_gather_back_to_the_input_columns_and_its_gradient():
    """A packed layout's per-token outputs come back at the input columns; their gradient (a
    gather through the inverse map) equals gather's own, in float64 (gradcheck, gradgradcheck),
    including the zeros at prompt and padding columns."""
    from ptuning_fast.native.layout import _GatherColumns

    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    layout = build_prompt_layout(mask, torch.tensor([2, 0, 3]), longest=3, pad_left=True)
    assert layout.shift is None and layout.width == 8  # packed: a gather, not a view
    values = torch.randn(3, 8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = layout.gather(values)
    expected = values.gather(1, layout.text_columns[..., None].expand(-1, -1, 4))
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours, = torch.autograd.grad(out, values, grad)
    theirs, = torch.autograd.grad(expected, values, grad)
    assert torch.equal(ours, theirs) and (ours == 0).any()
    gather = lambda v: _GatherColumns.apply(v, layout.text_columns)  # noqa: E731
    assert torch.autograd.gradcheck(gather, (values,)) and torch.autograd.gradgradcheck(gather, (values,))
    assert torch.equal(layout.gather(values.detach()), expected.detach())  # no autograd: plain gather
