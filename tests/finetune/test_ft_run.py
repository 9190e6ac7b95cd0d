"""`run_finetune` end to end: record, report beside a probe, overfitting, kill-and-resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from embedkit.data.dataset import read_all
from embedkit.data.transforms import Preprocessing
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractionRequest, extract
from embedkit.finetune import (
    Classifier,
    EpochLog,
    FinetuneRequest,
    LoraSettings,
    get_method,
    run_finetune,
)
from embedkit.finetune.losses import masked_loss
from embedkit.finetune.train import _param_groups
from embedkit.manifest import load_manifest
from embedkit.models import load_encoder
from embedkit.probes.run import ProbeRequest, run_probe
from embedkit.report import build_report
from embedkit.results import load_record, load_scores
from embedkit.results.consistency import MixedResultsError

VIT = "test/tiny-dinov3-vit"


def _request(method: str = "bitfit", **kw: object) -> FinetuneRequest:
    args: dict[str, object] = {
        "model": VIT, "dataset": "demo", "resolution": 64, "method": method, "epochs": 2,
        "batch_size": 8, "n_boot": 100, "device": "cpu",
    }  # fmt: skip
    args.update(kw)
    return FinetuneRequest(**args)  # type: ignore[arg-type]


def test_record_is_a_probe_style_record_and_pairs_with_a_probe_in_the_report(
    ft_manifest: Path, ft_model_cache: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    outcome = run_finetune(
        _request("lora"), manifest=ft_manifest, results=results, model_cache_dir=ft_model_cache
    )
    record = outcome.record
    assert record.kind == "finetune-lora" and record.model == VIT and record.resolution == 64
    assert record.selected["epoch"] in (1, 2) and record.selected["lr"] == 1e-4
    assert record.params["lora"] == {"r": 16, "alpha": 16, "dropout": 0.05,
                                     "targets": ["q_proj", "v_proj"]}  # fmt: skip
    assert record.extra["parameters"]["trainable"] < record.extra["parameters"]["total"]
    assert {"point", "low", "high"} <= set(record.metrics["macro_auroc"])
    assert load_record(outcome.path) == record
    scores = load_scores(outcome.path)
    assert scores.scores.shape == (record.n["test"], len(record.labels))
    assert np.all((scores.scores >= 0) & (scores.scores <= 1))
    # identical request: found, not recomputed
    again = run_finetune(
        _request("lora"), manifest=ft_manifest, results=results, model_cache_dir=ft_model_cache
    )
    assert again.reused and again.record == record

    extract(
        ExtractionRequest(model=VIT, dataset="demo", resolution=64, num_workers=0, unit_rows=8),
        manifest=ft_manifest, model_cache_dir=ft_model_cache,
    )  # fmt: skip
    probe = ProbeRequest(kind="linear", model=VIT, dataset="demo", resolution=64, max_iter=50,
                         n_boot=100)  # fmt: skip
    run_probe(probe, manifest=ft_manifest, results=results)
    report = build_report(results, tmp_path / "report", n_boot=100)
    assert {r.method for r in report.summary} == {"linear", "finetune-lora"}
    [pair] = report.comparisons
    assert pair.axis == "method" and pair.n_test == record.n["test"]


def test_a_few_steps_lower_the_training_loss_on_8_demo_images(
    ft_manifest: Path, ft_model_cache: Path
) -> None:
    table = load_manifest(ft_manifest).dataset("demo").load()
    rows = table.indices("train")[:8]
    encoder = load_encoder(VIT, cache_dir=ft_model_cache)
    prep = Preprocessing(64, mean=encoder.spec.mean, std=encoder.spec.std)
    pixels, _ = read_all([table.ids[i] for i in rows], [table.paths[i] for i in rows], prep,
                         on_bad_image="fail")  # fmt: skip
    y, mask = torch.from_numpy(table.labels.y[rows]), torch.from_numpy(table.labels.mask[rows])
    torch.manual_seed(0)
    model = Classifier(encoder.model, encoder.spec, y.shape[1], "mean")
    get_method("full").prepare(model, LoraSettings())
    optimizer = torch.optim.AdamW(_param_groups(model, 3e-3, 0.0, 1.0))
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = masked_loss(model(pixels), y, mask)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


class _Killed(Exception):
    pass


def _kill_after_first(log: EpochLog) -> None:
    if log.epoch == 1:
        raise _Killed


def test_kill_and_resume_matches_an_uninterrupted_run(
    ft_manifest: Path, ft_model_cache: Path, tmp_path: Path
) -> None:
    request = _request("lora", epochs=2, lora_dropout=0.1)
    kw = {"manifest": ft_manifest, "model_cache_dir": ft_model_cache}
    straight = run_finetune(request, results=tmp_path / "a", **kw)  # type: ignore[arg-type]
    with pytest.raises(_Killed):
        run_finetune(request, results=tmp_path / "b", on_epoch=_kill_after_first, **kw)  # type: ignore[arg-type]
    run_dir = tmp_path / "b" / "runs" / straight.record.record_id
    assert [p.name for p in run_dir.iterdir()] == ["epoch-0001.safetensors"]
    resumed = run_finetune(request, results=tmp_path / "b", **kw)  # type: ignore[arg-type]
    assert resumed.resumed_from == 1 and straight.resumed_from == 0
    final_a = load_file(straight.run_dir / "epoch-0002.safetensors")
    final_b = load_file(resumed.run_dir / "epoch-0002.safetensors")
    assert final_a.keys() == final_b.keys()
    for name, value in final_a.items():  # deterministic on CPU: bit-identical
        assert np.array_equal(value.numpy(), final_b[name].numpy()), name
    assert load_scores(straight.path).scores.tolist() == load_scores(resumed.path).scores.tolist()
    assert straight.record.selected == resumed.record.selected
    assert straight.record.metrics == resumed.record.metrics


def test_changed_hyper_parameters_are_a_new_run(ft_manifest: Path, ft_model_cache: Path) -> None:
    from embedkit.finetune.train import _plan

    man = load_manifest(ft_manifest)
    base = _request()
    ids = {
        _plan(r, man, ft_model_cache).run_id
        for r in (base, dataclasses.replace(base, lr=1e-2), dataclasses.replace(base, epochs=3),
                  dataclasses.replace(base, device="cpu", num_workers=1))
    }  # fmt: skip
    assert len(ids) == 3  # device and workers do not change the run


def test_cli_finetune_writes_and_then_finds_the_record(
    ft_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = ["finetune", "--model", "test/tiny-dinov2", "-d", "demo", "-r", "56",
            "--method", "linear", "--epochs", "1", "--batch-size", "8", "--n-boot", "50",
            "--device", "cpu", "--num-workers", "0", "-m", str(ft_manifest),
            "--out", str(tmp_path / "res")]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output and "finetune-linear" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "found (identical run)" in second.output
    bad = CliRunner().invoke(app, [*args[:7], "--method", "adapter"])
    assert bad.exit_code == 2


@pytest.mark.parametrize(("batch_size", "advice"), [(8, "try --batch-size 4"),
                                                    (1, "even with batch size 1")])  # fmt: skip
def test_out_of_memory_names_the_batch_size_to_try(
    batch_size: int,
    advice: str,
    ft_manifest: Path,
    ft_model_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU running out of memory in a training step (simulated: this machine has no GPU)
    becomes one clear error with the batch size to try; no record is written."""
    import embedkit.finetune.train as train

    def out_of_memory(*_args: object, **_kw: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "masked_loss", out_of_memory)
    with pytest.raises(EmbedkitError, match=advice) as caught:
        run_finetune(_request(batch_size=batch_size), manifest=ft_manifest,
                     results=tmp_path / "r", model_cache_dir=ft_model_cache)  # fmt: skip
    assert "out of memory finetuning test/tiny-dinov3-vit at 64px" in str(caught.value)
    assert "--gradient-checkpointing" in str(caught.value)
    assert not list((tmp_path / "r").rglob("*.json"))


def test_a_results_folder_of_another_manifest_for_the_same_dataset_is_refused(
    ft_manifest: Path, ft_model_cache: Path, tmp_path: Path
) -> None:
    request = _request("linear", epochs=1)
    kw = {"results": tmp_path / "r", "model_cache_dir": ft_model_cache}
    run_finetune(request, manifest=ft_manifest, **kw)  # type: ignore[arg-type]
    doc = yaml.safe_load(ft_manifest.read_text())
    doc["datasets"]["demo"]["splits"]["seed"] = 3  # another split of the same images
    other = ft_manifest.with_name("ft-other-split.yaml")  # beside it: same relative paths
    other.write_text(yaml.safe_dump(doc))
    with pytest.raises(MixedResultsError, match=r"dataset 'demo': .* manifest's test split"):
        run_finetune(request, manifest=other, **kw)  # type: ignore[arg-type]
    assert len(list((tmp_path / "r").rglob("*.json"))) == 1
