"""Training losses with label masks.

Multi-label: BCE-with-logits with ``pos_weight = neg / pos`` per label (counted on the train
split, masked entries excluded), averaged over the entries whose mask is True; a masked entry
contributes exactly zero to the loss and its gradient. Multi-class: cross-entropy over the rows
whose mask is True.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["masked_loss", "pos_weight"]


def pos_weight(y: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """``neg / pos`` per label over the unmasked entries, and the labels without positives.

    A label with no positive (or no negative) in train gets weight 1.0 and is reported.
    """
    observed = mask.astype(bool)
    pos = ((y == 1) & observed).sum(axis=0).astype(np.float64)
    neg = ((y == 0) & observed).sum(axis=0).astype(np.float64)
    degenerate = [int(j) for j in np.flatnonzero((pos == 0) | (neg == 0))]
    weight = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.as_tensor(weight, dtype=torch.float32), degenerate


def masked_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Masked loss of one batch; ``reduction="sum"`` returns the sum (for split-level means).

    ``y`` is (B, L) float for multi-label (``weight`` = pos_weight) or (B,) int64 for
    multi-class; ``mask`` has ``y``'s shape. The mean divides by the number of unmasked entries.
    """
    m = mask.to(torch.bool)
    if y.ndim == 1:
        per_row = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
        losses = torch.where(m, per_row, torch.zeros_like(per_row))
    else:
        per_entry = F.binary_cross_entropy_with_logits(
            logits.float(), y.float(), pos_weight=weight, reduction="none"
        )
        losses = torch.where(m, per_entry, torch.zeros_like(per_entry))
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / m.sum().clamp(min=1)
