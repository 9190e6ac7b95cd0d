"""Masked BCE with pos_weight, masked cross-entropy, and seeded augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.finetune.augment import augment
from embedkit.finetune.losses import masked_loss, pos_weight


def test_pos_weight_is_neg_over_pos_on_unmasked_entries() -> None:
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=bool)
    weight, degenerate = pos_weight(y, mask)
    # label 0: pos 1 (row 3 masked), neg 2; label 1: no positive left -> 1.0; label 2: 2 / 2
    assert weight.tolist() == pytest.approx([2.0, 1.0, 1.0])
    assert degenerate == [1]


def test_masked_entries_contribute_zero_gradient() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.randint(0, 2, (5, 3)).float()
    mask = torch.rand(5, 3) > 0.4
    weight = torch.tensor([3.0, 0.5, 1.0])
    loss = masked_loss(logits, y, mask, weight)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask] != 0)
    expected = F.binary_cross_entropy_with_logits(
        logits[mask], y[mask], pos_weight=weight.expand(5, 3)[mask]
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # a masked target may hold anything (e.g. NaN-free garbage): the loss does not change
    y2 = torch.where(mask, y, torch.full_like(y, 7.0))
    assert float(masked_loss(logits, y2, mask, weight).detach()) == pytest.approx(
        float(loss.detach())
    )


def test_multiclass_cross_entropy_ignores_masked_rows() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 2, -1, 1])
    mask = torch.tensor([True, True, False, True])
    loss = masked_loss(logits, y, mask)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[2] == 0)
    assert float(loss.detach()) == pytest.approx(
        float(F.cross_entropy(logits[mask], y[mask]).detach())
    )


def test_augment_is_seeded_and_keeps_shape() -> None:
    pixels = torch.randn(6, 3, 32, 32)
    a = augment(pixels, torch.Generator().manual_seed(3))
    b = augment(pixels, torch.Generator().manual_seed(3))
    c = augment(pixels, torch.Generator().manual_seed(4))
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.equal(a, c)
    # no rotation: exactly the flipped or the original image
    same = augment(pixels, torch.Generator().manual_seed(3), degrees=0.0)
    for i in range(6):
        assert torch.allclose(same[i], pixels[i], atol=1e-5) or torch.allclose(
            same[i], pixels[i].flip(-1), atol=1e-5
        )
