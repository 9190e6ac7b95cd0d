"""Finetuning under torchrun with 2 CPU ranks (gloo): DDP equals one process with the global
batch, the record covers the whole test split, and a killed job resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from embedkit.manifest import load_manifest
from embedkit.results import load_record, load_scores

from .conftest import run, torchrun

pytestmark = pytest.mark.slow

# DINOv2 has no train-time randomness inside the model (no dropout, no drop-path, no RoPE
# jitter), so 2 ranks x 7 images must train like 1 process x 14 up to float summation order.
MODEL = "test/tiny-dinov2"


def finetune_args(data: Path, out: Path, batch_size: int, epochs: int) -> list[str]:
    return [
        "finetune",
        "--model", MODEL,
        "--dataset", "demo",
        "--resolution", "56",
        "--method", "full",
        "--lr", "1e-3",
        "--epochs", str(epochs),
        "--batch-size", str(batch_size),
        "--n-boot", "50",
        "--device", "cpu",
        "--num-workers", "0",
        "--manifest", str(data / "manifest.yaml"),
        "--out", str(out),
    ]  # fmt: skip


def single(data: Path, out: Path, batch_size: int, epochs: int) -> list[str]:
    return [sys.executable, "-m", "embedkit", *finetune_args(data, out, batch_size, epochs)]


def record_of(out: Path) -> Path:
    (path,) = out.glob("demo/*/*/finetune-full-*.json")
    return path


def final_weights(out: Path, epochs: int) -> dict[str, np.ndarray]:
    (run_dir,) = (out / "runs").iterdir()
    tensors = load_file(run_dir / f"epoch-{epochs:04d}.safetensors")
    return {k: v.numpy() for k, v in tensors.items() if k.startswith("model/")}


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=0, atol=1e-5, err_msg=name)


def test_two_ranks_of_half_the_batch_train_like_one_process(
    dist_data: Path, dist_env: dict[str, str], tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    # 15 train images: global batches of 14 and 1, so in the last step rank 1 has no image
    run(single(dist_data, one, 14, 2), dist_env)
    out = run(torchrun(2, finetune_args(dist_data, two, 7, 2)), dist_env).stdout
    assert out.count("wrote") == 1  # only rank 0 reports (and writes)

    assert_same_weights(final_weights(one, 2), final_weights(two, 2))
    a, b = load_record(record_of(one)), load_record(record_of(two))
    assert a.record_id == b.record_id  # 2 x 7 is the run of 1 x 14
    assert b.params["batch_size"] == 14 and b.extra["world_size"] == 2
    assert b.extra["batch_per_rank"] == 7 and a.extra["world_size"] == 1
    table = load_manifest(dist_data / "manifest.yaml").dataset("demo").load()
    test_ids = tuple(table.ids[i] for i in table.indices("test"))
    scores_a, scores_b = load_scores(record_of(one)), load_scores(record_of(two))
    assert b.n["test"] == len(test_ids) and scores_b.ids == test_ids == scores_a.ids
    np.testing.assert_allclose(scores_b.scores, scores_a.scores, rtol=0, atol=1e-5)
    assert b.selected == a.selected
    for ha, hb in zip(a.extra["history"], b.extra["history"], strict=True):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], abs=1e-5)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], abs=1e-5)


def test_a_killed_torchrun_job_resumes_from_its_checkpoint(
    dist_data: Path, dist_env: dict[str, str], tmp_path: Path
) -> None:
    epochs = 25  # ~0.1 s each: the kill lands long before the last one
    killed = tmp_path / "killed"
    job = subprocess.Popen(
        torchrun(2, finetune_args(dist_data, killed, 7, epochs)),
        env=dist_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 200
        while not list(killed.glob("runs/*/epoch-*.safetensors")):
            assert job.poll() is None, "the job ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 200 s"
            time.sleep(0.02)
        # torchrun starts each rank in its own session: kill the ranks hard, then torchrun
        ranks = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
        assert len(ranks) == 2
        for pid in ranks:
            os.kill(int(pid), signal.SIGKILL)
    finally:
        job.kill()
        job.wait(timeout=60)
    done = max(int(p.stem.split("-")[1]) for p in killed.glob("runs/*/epoch-*.safetensors"))
    assert 1 <= done < epochs and not list(killed.glob("demo/**/*.json"))

    run(torchrun(2, finetune_args(dist_data, killed, 7, epochs)), dist_env)
    record = load_record(record_of(killed))
    assert record.extra["resumed_from_epoch"] == done
    assert [h["epoch"] for h in record.extra["history"]] == list(range(1, epochs + 1))
    straight = tmp_path / "straight"
    run(single(dist_data, straight, 14, epochs), dist_env)
    assert_same_weights(final_weights(straight, epochs), final_weights(killed, epochs))
    assert load_record(record_of(straight)).selected == record.selected
