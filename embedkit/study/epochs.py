"""One finetuning epoch as a line of text, the same for `embedkit finetune` and pipeline runs."""

from __future__ import annotations

from typing import Any


def epoch_line(log: Any, epochs: int) -> str:
    """``epoch 3/20: train loss 0.4123, val loss 0.3987, lr 1.00e-05 (12.3 s; checkpoint saved)``.

    ``log`` is an :class:`~embedkit.finetune.EpochLog` (``epoch``, ``train_loss``, ``val_loss``
    or None, ``lr``, ``seconds``).
    """
    val = "" if log.val_loss is None else f", val loss {log.val_loss:.4f}"
    return (
        f"epoch {log.epoch}/{epochs}: train loss {log.train_loss:.4f}{val}, lr {log.lr:.2e} "
        f"({log.seconds:.1f} s; checkpoint saved)"
    )
