"""The segmentation probe: a linear head on patch tokens, 2D images and 3D volumes, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedkit.data.masks import nearest_resize
from embedkit.data.volumes import VolumeSlice, VolumeSpec, Window
from embedkit.probes.registry import PatchData, PatchSplit, kind_inputs
from embedkit.probes.segmentation import SegmentationKind, SegmentationSettings, fit_segmentation
from embedkit.store import CacheKey, CacheRoot, FeatureEntry, canonical_json, digest_ids

GRID, DIM, SIZE = 8, 16, 32
CLASSES = ("background", "organ", "lesion")
FAST = SegmentationSettings(lrs=(1e-2, 1e-1), epochs=25, batch_size=8)


def _grid_mask(rng: np.random.Generator) -> np.ndarray:
    """An 8x8 grid label map: a large organ rectangle and a small lesion inside or beside it."""
    g = np.zeros((GRID, GRID), np.int64)
    r, c = rng.integers(0, 3, 2)
    g[r : r + rng.integers(3, 6), c : c + rng.integers(3, 6)] = 1
    r, c = rng.integers(0, GRID - 2, 2)
    g[r : r + 2, c : c + 2] = 2
    return g


def _tokens(grid: np.ndarray, rng: np.random.Generator, proj: np.ndarray) -> np.ndarray:
    onehot = np.eye(len(CLASSES))[grid]  # (h, w, C)
    return (onehot @ proj + 0.4 * rng.standard_normal((GRID, GRID, DIM))).astype(np.float32)


def _entry(tmp_path: Path, ids: list[str], tokens: np.ndarray, resize: str) -> FeatureEntry:
    key = CacheKey(
        dataset="seg", model="test/tiny-vit", weights="0" * 40, resolution=SIZE,
        preprocessing=canonical_json({"resize": resize, "size": SIZE}), compute_dtype="fp32",
        storage_dtype="float16", poolings=("patch",), ids_digest=digest_ids(ids),
        content_digest=digest_ids([*ids, "c"]), n_images=len(ids),
    )  # fmt: skip
    root = CacheRoot.from_uri(str(tmp_path / "cache"))
    unit = 16
    entry = FeatureEntry.create_or_open(
        root, key, ids=ids, shapes={"patch": (GRID, GRID, DIM)}, unit_rows=unit, provenance={}
    )
    for u in range(entry.n_units):
        lo, hi = entry.unit_bounds(u)
        entry.write_unit(u, {"patch": tokens[lo:hi]}, valid=np.ones(hi - lo, bool))
    entry.finalize()
    return FeatureEntry.open(root, key)


def _split(
    name: str,
    rows: range,
    ids: list[str],
    images: list[Path],
    masks: list[Path],
    volumes: list[str] | None = None,
    slices: list[int] | None = None,
    sources: list[VolumeSlice] | None = None,
) -> PatchSplit:
    patients = tuple(volumes[i] if volumes else ids[i] for i in rows)
    return PatchSplit(
        name,
        tuple(ids[i] for i in rows),
        tuple(images[i] for i in rows),
        tuple(masks[i] for i in rows),
        patients,
        0,
        None if volumes is None else tuple(volumes[i] for i in rows),
        None if slices is None else tuple(slices[i] for i in rows),
        None if sources is None else tuple(sources[i] for i in rows),
    )


def _baseline(truths: list[np.ndarray]) -> float:
    """The best mean Dice of a constant prediction (every pixel one class; empty scores 0)."""
    best = 0.0
    for c in range(1, len(CLASSES)):
        per_class = []
        for k in range(1, len(CLASSES)):
            scores = [
                2 * (t == k).sum() / ((t == k).sum() + t.size) if c == k else 0.0
                for t in truths
                if (t == k).any() or c == k
            ]
            per_class.append(np.mean(scores))
        best = max(best, float(np.mean(per_class)))
    return best


Images2D = tuple[list[str], np.ndarray, list[Path], list[Path], list[np.ndarray]]


def _images_2d(tmp_path: Path, n: int, seed: int = 0) -> Images2D:
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((len(CLASSES), DIM)) * 2
    ids, images, masks, truths, tokens = [], [], [], [], []
    (tmp_path / "img").mkdir()
    for i in range(n):
        grid = _grid_mask(rng)
        full = nearest_resize(grid, (SIZE, SIZE)).astype(np.uint8)
        ids.append(f"im{i:03d}")
        images.append(tmp_path / "img" / f"im{i:03d}.png")
        masks.append(tmp_path / "img" / f"im{i:03d}_mask.png")
        Image.fromarray(full * 100).save(images[-1])
        Image.fromarray(full).save(masks[-1])
        truths.append(full.astype(np.int64))
        tokens.append(_tokens(grid, rng, proj))
    return ids, np.stack(tokens), images, masks, truths


def test_a_linear_head_segments_separable_tokens_well_above_a_constant_prediction(
    tmp_path: Path,
) -> None:
    ids, tokens, images, masks, truths = _images_2d(tmp_path, 40)
    entry = _entry(tmp_path, ids, tokens, "squash")
    train, val, test = range(0, 24), range(24, 32), range(32, 40)
    ticks: list[int] = []

    def progress(total: int, description: str):  # type: ignore[no-untyped-def]
        from contextlib import contextmanager

        @contextmanager
        def bar():  # type: ignore[no-untyped-def]
            yield ticks.append

        assert total == FAST.epochs and "epoch" in description
        return bar()

    data = PatchData(
        _split("train", train, ids, images, masks), _split("val", val, ids, images, masks),
        _split("test", test, ids, images, masks), CLASSES, entry, "patch", "squash", "seg",
        progress,
    )  # fmt: skip
    fit = fit_segmentation(data, FAST, seed=0)
    assert len(ticks) == FAST.epochs  # one progress tick per epoch
    assert fit.scores.ids == tuple(ids[i] for i in test)
    assert fit.scores.dice.shape == (8, 2) and fit.scores.hd95 is None  # 2D: no HD95
    assert set(fit.val_dice) == set(FAST.lrs) and fit.lr == max(fit.val_dice, key=fit.val_dice.get)  # type: ignore[arg-type]
    mean_dice = float(np.nanmean(np.nanmean(fit.scores.dice, axis=0)))
    baseline = _baseline([truths[i] for i in test])
    assert mean_dice > baseline + 0.3, (mean_dice, baseline)
    # the scores are those of the predictions: recompute one case's Dice from the overlays
    ov = fit.overlays
    assert ov["image"].shape[1:] == (SIZE, SIZE) and 0 <= ov["image"].min() < ov["image"].max() <= 1
    assert len(ov["ids"]) == 6 and list(ov["mean_dice"]) == sorted(ov["mean_dice"], reverse=True)
    from embedkit.eval.segmentation import dice_iou

    k = list(fit.scores.ids).index(str(ov["ids"][0]))
    d, _ = dice_iou(ov["truth"][0], ov["pred"][0], len(CLASSES))
    np.testing.assert_allclose(d, fit.scores.dice[k])
    assert ov["mean_dice"][0] == pytest.approx(np.nanmax(np.nanmean(fit.scores.dice, axis=1)))
    assert ov["mean_dice"][-1] == pytest.approx(np.nanmin(np.nanmean(fit.scores.dice, axis=1)))


def _volume_sources(ipath: Path, depth: int) -> list[VolumeSlice]:
    spec = VolumeSpec(Window(0.0, 400.0), "axial")
    return [VolumeSlice(str(ipath), k, spec, str(ipath)) for k in range(depth)]


def test_volumes_stack_slices_back_and_report_hd95(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(3)
    proj = rng.standard_normal((len(CLASSES), DIM)) * 2
    n_vol, depth = 6, 5
    ids, images, masks, volumes, slices, tokens = [], [], [], [], [], []
    sources: list[VolumeSlice] = []
    truths = []
    for v in range(n_vol):
        grids = [_grid_mask(rng) for _ in range(depth)]  # slice k as displayed
        shown = np.stack([nearest_resize(g, (SIZE, SIZE)) for g in grids]).astype(np.int16)
        truths.append(shown.astype(np.int64))
        # stored RAS so that the radiological display of axial slice k is shown[k]
        label = np.ascontiguousarray(shown.transpose(2, 1, 0)[::-1, ::-1])
        mpath, ipath = tmp_path / f"v{v}_mask.nii.gz", tmp_path / f"v{v}.nii.gz"
        nib.save(nib.Nifti1Image(label, np.diag([0.7, 0.9, 3.0, 1.0])), mpath)
        nib.save(nib.Nifti1Image(label.astype(np.float32) * 40 - 100, np.eye(4)), ipath)
        vsources = _volume_sources(ipath, depth)
        for k in (3, 0, 4, 1, 2):  # rows not in slice order: the probe must restack by index
            ids.append(f"v{v}-s{k}")
            images.append(ipath)
            masks.append(mpath)
            volumes.append(f"v{v}")
            slices.append(k)
            sources.append(vsources[k])
            tokens.append(_tokens(grids[k], rng, proj))
    entry = _entry(tmp_path, ids, np.stack(tokens), "squash")
    d = depth
    parts = {"train": range(0, 3 * d), "val": range(3 * d, 4 * d), "test": range(4 * d, 6 * d)}
    split = {
        n: _split(n, r, ids, images, masks, volumes, slices, sources) for n, r in parts.items()
    }
    data = PatchData(
        split["train"], split["val"], split["test"], CLASSES, entry, "patch", "squash", "seg"
    )
    fit = fit_segmentation(data, FAST, seed=0)
    assert fit.scores.ids == ("v4", "v5")  # one row per volume
    assert fit.scores.hd95 is not None and np.isfinite(fit.scores.hd95).all()
    mean_dice = float(np.nanmean(fit.scores.dice))
    assert mean_dice > _baseline(truths[4:]) + 0.3
    # HD95 in mm: no more than the volume diagonal, and 0 only where the prediction is exact
    diagonal = np.sqrt(np.sum((np.array([SIZE, SIZE, depth]) * [0.7, 0.9, 3.0]) ** 2))
    assert (fit.scores.hd95 <= diagonal + 1e-9).all()
    # the overlay images are the windowed slices the encoder saw, on the label map's grid
    first = list(fit.overlays["ids"]).index("v4") if "v4" in fit.overlays["ids"] else None
    if first is not None:
        image, truth = fit.overlays["image"][first], fit.overlays["truth"][first]
        assert image[truth == 1].mean() > image[truth == 0].mean()


def test_the_kind_declares_patch_inputs_and_refuses_pooled_entries(tmp_path: Path) -> None:
    from embedkit.errors import ProbeInputError
    from embedkit.probes import get_kind

    kind = get_kind("segmentation")
    assert kind_inputs(kind) == "patches" and kind.default_pooling(["cls", "patch"]) == "patch"
    assert kind_inputs(get_kind("linear")) == "features"
    ids, tokens, images, masks, _ = _images_2d(tmp_path, 4)
    entry = _entry(tmp_path, ids, tokens, "squash")
    part = _split("train", range(4), ids, images, masks)
    data = PatchData(part, part, part, CLASSES, entry, "cls", "squash", "seg")
    with pytest.raises(ProbeInputError, match="--patch-tokens"):
        fit_segmentation(data, FAST)
    assert SegmentationKind(FAST).params(None)["lrs"] == [1e-2, 1e-1]  # type: ignore[arg-type]


def _seg_dataset(folder: Path, n: int = 30, size: int = 96) -> Path:
    """PNG images with a large bright disk ("organ") and a small grey square ("lesion"), their
    PNG label maps, and a manifest with `classes:` and a `mask` column."""
    import yaml

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = ["id,path,mask,kind,split"]
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        label = np.zeros((size, size), np.uint8)
        cy, cx, r = rng.integers(30, 66), rng.integers(30, 66), rng.integers(18, 28)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
        sy, sx = rng.integers(0, size - 20, 2)
        label[sy : sy + 20, sx : sx + 20] = 2
        pixels = np.choose(label, [0.1, 0.85, 0.45]) + 0.05 * rng.standard_normal((size, size))
        image = np.clip(pixels * 255, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"im{i}.png")
        Image.fromarray(label).save(folder / "images" / f"im{i}_mask.png")
        split = "train" if i < 18 else "val" if i < 22 else "test"
        rows.append(f"im{i},im{i}.png,im{i}_mask.png,{'ab'[i % 2]},{split}")
    (folder / "index.csv").write_text("\n".join(rows) + "\n")
    entry = {
        "images": "./images",
        "index": "./index.csv",
        "id_column": "id",
        "path_column": "path",
        "labels": {"format": "single", "column": "kind"},
        "splits": {"method": "given", "column": "split"},
        "classes": list(CLASSES),
    }
    path = folder / "manifest.yaml"
    doc = {"cache": str(folder / "cache"), "datasets": {"shapes": entry}}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_extract_patch_tokens_then_probe_segmentation_from_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.results import load_record, load_scores
    from embedkit.results.segmentation import load_overlays

    manifest = _seg_dataset(tmp_path / "data")
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    common = ["--manifest", str(manifest), "-d", "shapes", "--model", "test/tiny-dinov2"]
    runner = CliRunner()
    result = runner.invoke(
        app, ["extract", *common, "-r", "112", "--patch-tokens", "--workers", "0"], env=env
    )
    assert result.exit_code == 0, result.output
    results = tmp_path / "results"
    probe = ["probe", *common, "-r", "112", "--kind", "segmentation", "--n-boot", "200"]
    result = runner.invoke(app, [*probe, "--results", str(results)], env=env)
    assert result.exit_code == 0, result.output
    assert "dice [95% CI]" in result.output and "lesion" in result.output  # the per-class table
    (path,) = results.rglob("segmentation-*.json")
    record = load_record(path)
    assert record.task == "segmentation" and record.labels == ["organ", "lesion"]
    assert record.pooling == "patch" and record.selected["lr"] in record.params["lrs"]
    assert set(record.metrics) == {"dice", "iou"}  # 2D: no HD95
    assert [row["label"] for row in record.per_label] == ["organ", "lesion"]
    for row in record.per_label:
        assert row["dice"]["low"] <= row["dice"]["point"] <= row["dice"]["high"]
    scores = load_scores(path)
    assert scores.ids == tuple(f"im{i}" for i in range(22, 30))
    assert scores.scores.shape == (8, 2)
    dice = record.metrics["dice"]["point"]
    assert dice == pytest.approx(np.mean(np.nanmean(scores.scores, axis=0)))
    # well above the best constant prediction on the same test masks
    truths = [
        np.asarray(Image.open(tmp_path / "data/images" / f"im{i}_mask.png"), np.int64)
        for i in range(22, 30)
    ]
    assert dice > _baseline(truths) + 0.2, (dice, _baseline(truths))
    overlays = load_overlays(path, record)  # as the report reads them
    assert overlays is not None and record.extra["overlays"] == path.stem + ".overlays.npz"
    assert overlays.image.shape == (6, 112, 112) and len(set(overlays.ids.tolist())) == 6
    # an identical run finds its record (the results folder holds a segmentation record now)
    again = runner.invoke(app, [*probe, "--results", str(results)], env=env)
    assert again.exit_code == 0, again.output
    assert "found (identical run)" in again.output
    # the report reads the record: its segmentation table and the overlay figure
    from embedkit.report import build_report

    build_report(results, tmp_path / "report", n_boot=50)
    assert "| organ |" in (tmp_path / "report/segmentation.md").read_text()
    assert list((tmp_path / "report").glob("overlays_*.png"))


def test_token_reads_are_blockwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, tokens, images, masks, _ = _images_2d(tmp_path, 20)
    entry = _entry(tmp_path, ids, tokens, "squash")
    row_bytes = GRID * GRID * DIM * 2  # float16
    settings = SegmentationSettings(lrs=(1e-2,), epochs=2, batch_size=2, block_bytes=3 * row_bytes)
    sizes: list[int] = []
    real = entry.read

    def read(pooling: str, **kw: object) -> np.ndarray:
        out = real(pooling, **kw)  # type: ignore[arg-type]
        sizes.append(len(out))
        return out

    monkeypatch.setattr(entry, "read", read)
    train, val, test = (
        _split(n, r, ids, images, masks)
        for n, r in (("train", range(12)), ("val", range(12, 16)), ("test", range(16, 20)))
    )
    data = PatchData(train, val, test, CLASSES, entry, "patch", "squash", "seg")
    fit = fit_segmentation(data, settings)
    assert max(sizes) == 3 and sum(sizes) >= 12 * (settings.epochs + 1)  # stats + every epoch
    assert fit.scores.dice.shape == (4, 2)


def test_the_batched_head_loss_is_the_sum_of_each_heads_ce_and_dice() -> None:
    import torch
    import torch.nn.functional as F

    from embedkit.probes.segmentation import _head_losses

    torch.manual_seed(0)
    logits, target = torch.randn(4, 3, 3, 5, 5), torch.randint(0, 3, (4, 20, 20))
    expected = torch.zeros(())
    for h in range(3):  # the plain per-head form: upsample, cross-entropy, one-hot soft Dice
        up = F.interpolate(logits[:, h], size=(20, 20), mode="bilinear", align_corners=False)
        probs = up.softmax(1)[:, 1:]
        onehot = F.one_hot(target, 3).permute(0, 3, 1, 2)[:, 1:].float()
        inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
        dice = (2 * inter + 1) / (total + 1)
        expected = expected + F.cross_entropy(up, target) + 0.7 * (1 - dice.mean())
    assert float(_head_losses(logits, target, 20, 0.7)) == pytest.approx(float(expected), rel=1e-5)


def test_a_dataset_without_label_maps_is_a_clear_error(tmp_path: Path) -> None:
    import yaml

    from embedkit.errors import ProbeInputError
    from embedkit.manifest import load_manifest
    from embedkit.probes.run import patch_data

    manifest = _seg_dataset(tmp_path / "data", n=4)
    doc = yaml.safe_load(manifest.read_text())
    del doc["datasets"]["shapes"]["classes"]
    manifest.write_text(yaml.safe_dump(doc))
    table = load_manifest(manifest).dataset("shapes").load()
    with pytest.raises(ProbeInputError, match="add `classes:`"):
        patch_data("shapes", None, table, "patch")  # type: ignore[arg-type]
