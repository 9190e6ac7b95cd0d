"""Checkpoints are safetensors with a JSON header; nothing is ever unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from embedkit.finetune import CheckpointError
from embedkit.finetune.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save


def _state(run_id: str = "run", epoch: int = 1) -> tuple[Checkpoint, torch.nn.Linear]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    model = {n: p.detach() for n, p in layer.named_parameters()}
    ckpt = Checkpoint(
        run_id, epoch, 7, model, model, optimizer.state_dict(), 1, 0.5, [{"epoch": 1.0}]
    )
    return ckpt, layer


def test_roundtrip_restores_weights_and_optimizer(tmp_path: Path) -> None:
    ckpt, layer = _state()
    path = save(tmp_path, ckpt)
    assert path.name == "epoch-0001.safetensors"
    loaded = load_checkpoint(path, "run")
    assert (loaded.epoch, loaded.step, loaded.best_epoch, loaded.best_loss) == (1, 7, 1, 0.5)
    assert all(torch.equal(loaded.model[k], v) for k, v in ckpt.model.items())
    fresh = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)
    original = ckpt.optimizer["state"][0]
    restored = fresh.state_dict()["state"][0]
    assert all(torch.equal(original[k], restored[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert fresh.state_dict()["param_groups"][0]["betas"] == pytest.approx((0.9, 0.999))


def test_only_the_latest_epoch_is_kept(tmp_path: Path) -> None:
    save(tmp_path, _state(epoch=1)[0])
    save(tmp_path, _state(epoch=2)[0])
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch-0002.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.safetensors"]
    assert latest_checkpoint(tmp_path / "missing") is None


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(Path(_Payload.target)),))

    target = ""


def test_a_tampered_pickle_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Payload.target = str(marker)
    run = tmp_path / "run"
    run.mkdir()
    (run / "epoch-0003.safetensors").write_bytes(pickle.dumps(_Payload()))
    found = latest_checkpoint(run)
    assert found is not None
    with pytest.raises(CheckpointError, match="not a readable embedkit checkpoint"):
        load_checkpoint(found, "run")
    assert not marker.exists()


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    path = save(tmp_path, _state(run_id="other")[0])
    with pytest.raises(CheckpointError, match="belongs to run 'other'"):
        load_checkpoint(path, "run")


def test_checkpoints_are_readable_by_the_other_users_of_a_shared_folder(tmp_path: Path) -> None:
    from embedkit.atomic import shared_mode

    path = save(tmp_path, _state()[0])
    assert (path.stat().st_mode & 0o777) == shared_mode()
