"""Finetuning reports every optimiser step (a progress bar over all epochs) and its epochs as
formatted lines."""

from __future__ import annotations

from pathlib import Path

from embedkit.finetune import FinetuneRequest, run_finetune


def test_on_batch_counts_every_step_up_to_the_total(
    ft_manifest: Path, ft_model_cache: Path, tmp_path: Path
) -> None:
    request = FinetuneRequest(
        model="test/tiny-dinov2", dataset="demo", resolution=56, method="linear", epochs=2,
        batch_size=8, n_boot=50, device="cpu", num_workers=0,
    )  # fmt: skip
    calls: list[tuple[int, int]] = []
    epochs: list[int] = []
    run_finetune(
        request, manifest=ft_manifest, results=tmp_path / "res", model_cache_dir=ft_model_cache,
        on_batch=lambda done, total: calls.append((done, total)),
        on_epoch=lambda log: epochs.append(len(calls)),
    )  # fmt: skip
    assert calls, "no optimiser step was reported"
    total = calls[0][1]
    assert [done for done, _ in calls] == list(range(1, len(calls) + 1))
    assert {t for _, t in calls} == {total} and calls[-1][0] == total
    assert epochs == [total // 2, total]  # half the steps in each of the 2 epochs
