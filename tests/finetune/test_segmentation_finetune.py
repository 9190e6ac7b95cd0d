"""Segmentation finetuning: masks from the index's mask column, a head on the patch tokens,
CE + Dice, records per the segmentation contract, LoRA leaving the base weights alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from embedkit.errors import ConfigError, ManifestError
from embedkit.eval.segmentation import dice_iou
from embedkit.finetune import FinetuneRequest, run_finetune
from embedkit.finetune.segmentation import segmentation_loss
from embedkit.manifest import load_manifest
from embedkit.models import load_encoder
from embedkit.report import build_report
from embedkit.results import ScoreTable, load_record, load_scores
from embedkit.results.segmentation import load_overlays

VIT = "test/tiny-dinov3-vit"
SIZE = 64  # images and masks
RESOLUTION = 128  # the encoder input: an 8 x 8 patch grid
CLASSES = ("background", "disk", "square")


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image with a bright disk (class 1) and a dark square (class 2)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = 0.5 + 0.05 * rng.standard_normal((SIZE, SIZE))
    label = np.zeros((SIZE, SIZE), dtype=np.uint8)
    cy, cx = rng.integers(18, SIZE - 18, size=2)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2
    image[disk], label[disk] = 0.95, 1
    sy, sx = rng.integers(0, SIZE - 16, size=2)
    square = np.zeros_like(disk)
    square[sy : sy + 16, sx : sx + 16] = True
    square &= ~disk
    image[square], label[square] = 0.05, 2
    return np.clip(image, 0, 1), label


@pytest.fixture(scope="module")
def seg_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 images + PNG label maps of 64 px (20 patients), a manifest with a mask column."""
    root = tmp_path_factory.mktemp("seg-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        image, label = _scene(rng)
        Image.fromarray((image * 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "images" / f"im{i}_mask.png")
        rows.append({"image_id": f"im{i}", "path": f"im{i}.png", "patient_id": f"p{i // 2}",
                     "kind": "scene", "mask": f"im{i}_mask.png"})  # fmt: skip
    with (root / "index.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = {
        "cache": str(root / "cache"),
        "datasets": {
            "shapes": {
                "images": "images", "index": "index.csv", "id_column": "image_id",
                "path_column": "path", "patient_column": "patient_id",
                "labels": {"format": "single", "column": "kind"},
                "splits": {"method": "patient",
                           "fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "seed": 0},
                "classes": list(CLASSES),
            }
        },
    }  # fmt: skip
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _case_means(scores: ScoreTable) -> dict[str, float]:
    """Each case's mean Dice over its scored classes (NaN entries: no score)."""
    means = {}
    for case, row in zip(scores.ids, scores.scores, strict=True):
        scored = row[np.isfinite(row)]
        means[case] = float(scored.mean()) if scored.size else float("nan")
    return means


def _request(method: str, **kw: object) -> FinetuneRequest:
    args: dict[str, object] = {
        "model": VIT, "dataset": "shapes", "resolution": RESOLUTION, "method": method,
        "task": "segmentation", "epochs": 6, "batch_size": 8, "n_boot": 200, "device": "cpu",
        "augment": False,
    }  # fmt: skip
    args.update(kw)
    return FinetuneRequest(**args)  # type: ignore[arg-type]


def test_full_finetuning_learns_the_shapes_and_writes_a_contract_record(
    seg_manifest: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    steps: list[tuple[int, int]] = []
    outcome = run_finetune(
        _request("full", lr=1e-2, epochs=20), manifest=seg_manifest, results=results,
        on_batch=lambda done, total: steps.append((done, total)),
    )  # fmt: skip
    record = outcome.record
    assert record.task == "segmentation" and record.kind == "finetune-full"
    assert record.labels == ["disk", "square"] and record.pooling == "patch"
    assert steps[-1][0] == steps[-1][1] == 20 * 3  # progress per batch: 24 train images / 8
    for name in ("dice", "iou"):
        m = record.metrics[name]
        assert m["low"] <= m["point"] <= m["high"]
    assert [row["label"] for row in record.per_label] == ["disk", "square"]

    # An empty prediction scores Dice 0 on every class in the truth (absent classes: no score).
    table = load_manifest(seg_manifest).dataset("shapes").load()
    scores = load_scores(outcome.path)
    assert scores.scores.shape == (record.n["test"], 2) and scores.mask.all()
    present = scores.y.astype(bool)
    assert np.isnan(scores.scores[~present]).all() or (scores.scores[~present] <= 1).all()
    empty_dice = 0.0
    assert set(scores.ids) == {table.ids[i] for i in table.indices("test")}
    # the margin: half the way from an empty prediction to a perfect one
    assert record.metrics["dice"]["point"] > empty_dice + 0.5 * (1 - empty_dice)
    class_means = np.nanmean(scores.scores, axis=0)
    assert np.isclose(class_means.mean(), record.metrics["dice"]["point"])

    overlays = load_overlays(outcome.path, record)
    assert overlays is not None and record.extra["overlays"].endswith(".overlays.npz")
    assert overlays.image.shape == overlays.truth.shape == overlays.pred.shape
    assert overlays.image.shape[1:] == (RESOLUTION, RESOLUTION) and 2 <= len(overlays.ids) <= 6
    assert np.all(np.diff(overlays.mean_dice) <= 0)  # best first
    by_id = _case_means(scores)
    assert np.allclose(overlays.mean_dice, [by_id[str(i)] for i in overlays.ids])

    again = run_finetune(_request("full", lr=1e-2, epochs=20), manifest=seg_manifest,
                         results=results)  # fmt: skip
    assert again.reused and again.record == record


def test_lora_leaves_the_base_weights_unchanged_and_pairs_in_the_report(
    seg_manifest: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    lora = run_finetune(_request("lora", epochs=2, lr=1e-3), manifest=seg_manifest,
                        results=results)  # fmt: skip
    assert lora.record.params["lora"]["targets"] == ["q_proj", "v_proj"]
    counts = lora.record.extra["parameters"]
    assert counts["trainable"] < counts["total"]
    base = load_encoder(VIT, device="cpu").model.state_dict()
    [checkpoint] = sorted(lora.run_dir.glob("epoch-*.safetensors"))
    trained = {k.removeprefix("model/") for k in load_file(checkpoint) if k.startswith("model/")}
    assert trained and all(".lora_" in k or k.startswith("head.") for k in trained)
    # the same base weights load again, unchanged by training (no in-place update leaked)
    again = load_encoder(VIT, device="cpu").model.state_dict()
    assert all(torch.equal(base[k], again[k]) for k in base)

    linear = run_finetune(_request("linear", epochs=2, lr=1e-2), manifest=seg_manifest,
                          results=results)  # fmt: skip
    report = build_report(results, tmp_path / "report", n_boot=200)
    [pair] = report.comparisons
    assert pair.metric == "mean_dice" and {pair.a, pair.b} == {
        f"{VIT} · 128px · finetune-lora",
        f"{VIT} · 128px · finetune-linear",
    }
    a, b = (lora, linear) if pair.a.endswith("lora") else (linear, lora)
    da, db = (_case_means(load_scores(r.path)) for r in (a, b))
    expected = np.mean([da[i] - db[i] for i in da if np.isfinite(da[i]) and np.isfinite(db[i])])
    assert np.isclose(pair.delta, expected)
    page = report.html.read_text()
    assert "Segmentation" in page and "finetune-lora" in page


def test_augmentation_warps_masks_with_their_images(seg_manifest: Path, tmp_path: Path) -> None:
    outcome = run_finetune(_request("bitfit", epochs=1, augment=True), manifest=seg_manifest,
                           results=tmp_path / "r")  # fmt: skip
    assert outcome.record.params["augment"].startswith("hflip")
    from embedkit.finetune.segmentation import _warp_masks

    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[0, 2:4, 0:2] = 1
    flipped = _warp_masks(target, 2, torch.tensor([True]), torch.zeros(1))
    assert torch.equal(flipped, target.flip(-1))


def test_dice_iou_and_loss() -> None:
    truth = np.array([[0, 1, 1], [0, 2, 2], [0, 0, 0]])
    pred = np.array([[0, 1, 0], [0, 2, 2], [2, 0, 0]])
    dice, iou = dice_iou(truth, pred, 4)
    assert np.allclose(dice[:2], [2 * 1 / 3, 2 * 2 / 5]) and np.isnan(dice[2])  # 3: no score
    assert np.allclose(iou[:2], [1 / 2, 2 / 3]) and np.isnan(iou[2])
    target = torch.from_numpy(truth)[None]
    perfect = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 50
    assert float(segmentation_loss(perfect, target)) < 1e-3 + 1 / 3  # class 3 empty: dice 1/1
    assert float(segmentation_loss(-perfect, target)) > 1.0


def test_bad_requests_and_manifests(seg_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="patch tokens"):
        _request("full", pooling="mean")
    with pytest.raises(ConfigError, match="task"):
        _request("full", task="detection")
    doc = yaml.safe_load(seg_manifest.read_text())
    index = seg_manifest.parent / "index.csv"
    text = index.read_text().replace(",im3_mask.png", ",")
    (tmp_path / "index.csv").write_text(text)
    doc["datasets"]["shapes"]["index"] = str(tmp_path / "index.csv")
    doc["datasets"]["shapes"]["images"] = str(seg_manifest.parent / "images")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError, match="empty 'mask' cell"):
        run_finetune(_request("full"), manifest=tmp_path / "m.yaml", results=tmp_path / "r")
    del doc["datasets"]["shapes"]["classes"]  # label maps need the manifest's classes
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError, match="add `classes:`"):
        run_finetune(_request("full"), manifest=tmp_path / "m.yaml", results=tmp_path / "r")


def test_record_json_holds_the_overlay_file_name(seg_manifest: Path, tmp_path: Path) -> None:
    outcome = run_finetune(_request("linear", epochs=1), manifest=seg_manifest,
                           results=tmp_path / "r")  # fmt: skip
    data = json.loads(outcome.path.read_text())
    assert (outcome.path.parent / data["extra"]["overlays"]).is_file()
    assert load_record(outcome.path).task == "segmentation"


def test_lora_steps_change_adapters_and_head_but_not_the_base_weights() -> None:
    from embedkit.finetune import get_method
    from embedkit.finetune.methods import LoraSettings
    from embedkit.finetune.segmentation import Segmenter

    encoder = load_encoder(VIT, device="cpu")
    model = Segmenter(encoder.model, encoder.spec, 2)
    get_method("lora").prepare(model, LoraSettings())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    for _ in range(3):
        optimizer.zero_grad()
        segmentation_loss(model(pixels), target).backward()
        optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n or n.startswith("head.") for n in changed)
    assert any(".lora_B" in n for n in changed)  # the adapters moved, not only the head
    base = [n for n in before if ".lora_" not in n and not n.startswith("head.")]
    assert base and all(torch.equal(before[n], after[n]) for n in base)


def test_volumes_are_scored_per_volume_with_hd95(tmp_path: Path) -> None:
    """A phantom CT volume dataset (`volumes:` in the manifest): slices through the encoder,
    label maps read slice by slice on the image slices' grid, scores per volume."""
    from embedkit.data.phantoms import write_phantom_dataset

    manifest = write_phantom_dataset(tmp_path / "ct", n_volumes=12, shape=(32, 32, 4))
    results = tmp_path / "results"
    request = _request("full", lr=1e-2, epochs=3, dataset="phantom-ct")
    outcome = run_finetune(request, manifest=manifest, results=results)
    record = outcome.record
    assert record.extra["scored_per"] == "volume"
    table = load_manifest(manifest).dataset("phantom-ct").load()
    assert table.volumes is not None
    test_volumes = {table.volumes[i] for i in table.indices("test")}
    scores = load_scores(outcome.path)
    assert set(scores.ids) == test_volumes and scores.scores.shape == (len(test_volumes), 6)
    assert {"point", "low", "high"} <= set(record.metrics["hd95"])
    assert all("hd95" in row for row in record.per_label)
    overlays = load_overlays(outcome.path, record)
    assert overlays is not None and set(overlays.ids.tolist()) <= test_volumes
    # a second run with another method checks the results folder against per-volume targets
    again = run_finetune(_request("linear", epochs=1, dataset="phantom-ct"), manifest=manifest,
                         results=results)  # fmt: skip
    assert set(load_scores(again.path).ids) == test_volumes


class _Killed(Exception):
    pass


def test_kill_and_resume_matches_an_uninterrupted_run(seg_manifest: Path, tmp_path: Path) -> None:
    request = _request("lora", epochs=2, lr=1e-3, augment=True)
    straight = run_finetune(request, manifest=seg_manifest, results=tmp_path / "a")

    def kill_after_first(log: object) -> None:
        raise _Killed

    with pytest.raises(_Killed):
        run_finetune(request, manifest=seg_manifest, results=tmp_path / "b",
                     on_epoch=kill_after_first)  # fmt: skip
    assert not list((tmp_path / "b").rglob("*.json"))  # no record from the killed run
    resumed = run_finetune(request, manifest=seg_manifest, results=tmp_path / "b")
    assert resumed.resumed_from == 1 and straight.resumed_from == 0
    final_a = load_file(straight.run_dir / "epoch-0002.safetensors")
    final_b = load_file(resumed.run_dir / "epoch-0002.safetensors")
    assert final_a.keys() == final_b.keys()
    for name, value in final_a.items():  # deterministic on CPU: bit-identical
        assert torch.equal(value, final_b[name]), name
    assert straight.record.metrics == resumed.record.metrics
    assert load_scores(straight.path).scores.tolist() == load_scores(resumed.path).scores.tolist()


def test_cli_finetune_segmentation(seg_manifest: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app

    args = ["finetune", "--task", "segmentation", "--model", VIT, "-d", "shapes", "-r", "64",
            "--method", "linear", "--epochs", "1", "--batch-size", "8", "--n-boot", "50",
            "--device", "cpu", "-m", str(seg_manifest), "--out", str(tmp_path / "res")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Dice [95% CI]" in result.output and "mean over classes" in result.output
    assert "wrote" in result.output


def test_a_frozen_probe_and_a_finetune_run_pair_in_the_report(
    seg_manifest: Path, tmp_path: Path
) -> None:
    """The frozen segmentation probe and finetuning on the same data write the same score
    targets: the results guard accepts both in one folder and the report pairs them."""
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.results.consistency import check_records

    results = tmp_path / "results"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    common = ["--manifest", str(seg_manifest), "-d", "shapes", "--model", VIT,
              "-r", str(RESOLUTION)]  # fmt: skip
    runner = CliRunner()
    extract = runner.invoke(app, ["extract", *common, "--patch-tokens", "--workers", "0"], env=env)
    assert extract.exit_code == 0, extract.output
    probe = runner.invoke(
        app, ["probe", *common, "--kind", "segmentation", "--n-boot", "100", "--results",
              str(results)], env=env,
    )  # fmt: skip
    assert probe.exit_code == 0, probe.output
    tuned = run_finetune(_request("linear", epochs=2, lr=1e-2), manifest=seg_manifest,
                         results=results)  # fmt: skip
    (frozen_path,) = results.rglob("segmentation-*.json")
    frozen = load_scores(frozen_path)
    finetuned = load_scores(tuned.path)
    # one set of targets: same cases, classes in truth, every entry a target
    order = np.argsort(finetuned.ids)
    assert sorted(frozen.ids) == sorted(finetuned.ids)
    np.testing.assert_array_equal(frozen.y[np.argsort(frozen.ids)], finetuned.y[order])
    assert frozen.mask.all() and finetuned.mask.all()
    check_records([(load_record(frozen_path), frozen_path), (tuned.record, tuned.path)])
    # both agree with what the manifest defines now; other classes are another dataset
    import dataclasses

    from embedkit.errors import MixedResultsError
    from embedkit.results.consistency import (
        check_results_dataset,
        record_signature,
        segmentation_reference,
    )

    table = load_manifest(seg_manifest).dataset("shapes").load()
    reference = segmentation_reference(table)
    assert reference is not None
    assert (
        reference[0] == record_signature(load_record(frozen_path)) == record_signature(tuned.record)
    )
    check_results_dataset(results, "shapes", table, expected=reference)
    renamed = dataclasses.replace(table, classes=("background", "disk", "ring"))
    with pytest.raises(MixedResultsError, match="ring"):
        check_results_dataset(results, "shapes", renamed, expected=segmentation_reference(renamed))

    report = build_report(results, tmp_path / "report", n_boot=100)
    [pair] = report.comparisons
    assert pair.metric == "mean_dice"
    assert {pair.a, pair.b} == {f"{VIT} · 128px · segmentation", f"{VIT} · 128px · finetune-linear"}
    first, second = (frozen, finetuned) if pair.a.endswith("segmentation") else (finetuned, frozen)
    da, db = _case_means(first), _case_means(second)
    expected = np.mean([da[i] - db[i] for i in da if np.isfinite(da[i]) and np.isfinite(db[i])])
    assert np.isclose(pair.delta, expected) and pair.low <= pair.delta <= pair.high
    assert "finetune-linear" in report.html.read_text()
    from embedkit.report.compare import DICE_TEST_NAME

    printed = (tmp_path / "report" / "comparisons.md").read_text()
    assert "mean_dice" in printed and DICE_TEST_NAME in printed and "finetune-linear" in printed
