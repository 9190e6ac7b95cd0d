"""Resumable finetuning checkpoints: one safetensors file per finished epoch, no pickle.

``<run dir>/epoch-0003.safetensors`` holds, as tensors:

- ``model/<name>``: the trainable parameters after the epoch (frozen ones come from the base
  weights, whose fingerprint is part of the run id);
- ``best/<name>``: the trainable parameters of the best epoch so far (lowest validation loss);
- ``optim/<param index>/<state name>``: the AdamW moments and step counts;

and, as the safetensors header metadata ``"state"``, a JSON document: run id, epoch, global
step, optimizer param groups (learning rates, betas, ...), best epoch and loss, loss history.

A file is written to a temporary name and renamed into place, so a kill leaves either the old
or the new checkpoint; older epochs are removed after the rename. Loading never unpickles: a
file that is not valid safetensors raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from embedkit.atomic import atomic_write
from embedkit.errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "latest_checkpoint", "load_checkpoint", "save"]

_NAME = re.compile(r"^epoch-(\d{4,})\.safetensors$")


@dataclass
class Checkpoint:
    """The state of a run after ``epoch`` (1-based) finished epochs."""

    run_id: str
    epoch: int
    step: int
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    best_epoch: int
    best_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def _tensor(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to("cpu").clone().contiguous()


def _flatten(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"model/{k}": _tensor(v) for k, v in ckpt.model.items()}
    tensors.update({f"best/{k}": _tensor(v) for k, v in ckpt.best.items()})
    for index, entries in ckpt.optimizer["state"].items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optim/{index}/{key}"] = _tensor(value)
    state = {
        "run_id": ckpt.run_id,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "param_groups": ckpt.optimizer["param_groups"],
        "best_epoch": ckpt.best_epoch,
        "best_loss": ckpt.best_loss,
        "history": ckpt.history,
    }
    return tensors, state


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically as ``epoch-NNNN.safetensors`` and drop older epochs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors, state = _flatten(ckpt)
    path = run_dir / f"epoch-{ckpt.epoch:04d}.safetensors"
    atomic_write(
        path,
        lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(state)}),
        suffix=".safetensors",
    )
    for older in run_dir.iterdir():
        match = _NAME.match(older.name)
        if match and int(match[1]) < ckpt.epoch:
            older.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of the highest finished epoch in ``run_dir``, if any."""
    if not run_dir.is_dir():
        return None
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def load_checkpoint(path: Path, run_id: str) -> Checkpoint:
    """Read a checkpoint written by :func:`save` for run ``run_id`` (safetensors only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        state = json.loads(metadata["state"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable embedkit checkpoint ({type(exc).__name__}: {exc}); "
            "delete it (or the run folder) to start this run again"
        ) from exc
    if state.get("run_id") != run_id:
        raise CheckpointError(
            f"{path} belongs to run {state.get('run_id')!r}, not {run_id!r}; "
            "refusing to resume from it"
        )
    model: dict[str, torch.Tensor] = {}
    best: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model[rest] = value
        elif kind == "best":
            best[rest] = value
        else:
            index, _, name = rest.partition("/")
            optim.setdefault(int(index), {})[name] = value
    return Checkpoint(
        run_id=run_id,
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        model=model,
        best=best,
        optimizer={"state": optim, "param_groups": state["param_groups"]},
        best_epoch=int(state["best_epoch"]),
        best_loss=float(state["best_loss"]),
        history=list(state["history"]),
    )
