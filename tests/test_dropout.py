"""translator.model.dropout: F.dropout's distribution from a cheaper mask. Statistical bounds are
several standard deviations wide at these sizes; the exact properties are checked exactly."""

from __future__ import annotations

import pytest
import torch

from translator.model import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_each_element_is_kept_at_one_minus_p_in_every_lane_of_a_draw(p):
    torch.manual_seed(0)
    x = torch.ones(4_000_000)
    kept = (dropout(x, p) != 0).view(-1, 4).float()  # columns: the four 16-bit lanes of one 64-bit draw
    per_lane = kept.mean(0)  # 1,000,000 elements each: sd <= 0.0005
    assert torch.allclose(per_lane, torch.full((4,), 1 - p), atol=0.003), per_lane
    both = (kept[:, :-1] * kept[:, 1:]).mean()  # neighbours within a draw are independent
    assert abs(both.item() - (1 - p) ** 2) < 0.003


def test_kept_elements_are_scaled_and_dropped_ones_are_zero():
    torch.manual_seed(1)
    x = torch.randn(300, 257)
    y = dropout(x, 0.3)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / 0.7))
    assert 0.6 < kept.float().mean() < 0.8


def test_the_gradient_goes_through_the_kept_elements_only():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.25)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.equal(x.grad, kept.float() * (1 / 0.75))


def test_the_same_seed_draws_the_same_mask():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    c = dropout(x, 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_nothing_is_dropped_outside_training_or_at_zero():
    x = torch.randn(10, 10)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert not torch.equal(module.train()(x), x)


def test_bf16_activations_keep_their_dtype():
    torch.manual_seed(4)
    x = torch.randn(100, 100).to(torch.bfloat16)
    y = dropout(x, 0.3)
    assert y.dtype == torch.bfloat16 and 0.6 < (y != 0).float().mean() < 0.8
