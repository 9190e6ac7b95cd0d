"""Where and in which dtype an encoder runs: the one rule for extraction and finetuning."""

from __future__ import annotations

import torch

from embedkit.errors import EmbedkitError
from embedkit.models.policies import ComputeDtype


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable CUDA is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbedkitError(
            f"--device {device} was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
        )
    return dev


def resolve_dtype(dtype: ComputeDtype, device: torch.device) -> str:
    """``auto`` is bf16 on GPU and fp32 on CPU (bf16 is ~6x slower than fp32 on CPUs)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"
