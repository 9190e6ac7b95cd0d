"""The shipped CXR resolution-scaling study on demo data: every comparison the paper reports
appears in the report, Holm-corrected (tiny random models stand in for the real encoders, and
small sizes for the resolution tiers: the comparisons, not the numbers, are under test)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from embedkit.models import EncoderSpec, resolve, validate_resolution
from embedkit.study.demodata import demo_dataset_config
from embedkit.study.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[2]

#: Each real encoder of the study and a tiny stand-in (the DINOv2 ones have patch 14, so their
#: tiers snap like the real DINOv2's: 64 -> 70, 96 -> 98).
STAND_IN = {
    "dinov3/vit7b16": "test/tiny-dinov3-vit",
    "dinov3/vitb16": "test/tiny-vit",
    "dinov3/convnext-base": "test/tiny-dinov3-convnext",
    "dinov2/base": "test/tiny-dinov2",
    "imagenet/vit-base16": "test/tiny-dinov2-reg",
    "imagenet/convnext-base": "test/tiny-convnext",
}
TIER = {224: 32, 512: 64, 1024: 96}


def _stand_in(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stand_in(v) for k, v in value.items()}
    if isinstance(value, str):
        return STAND_IN.get(value, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return TIER.get(value, value)
    return value


@pytest.mark.slow
def test_the_cxr_study_on_demo_data_reports_every_comparison_of_the_paper(
    tmp_path: Path,
) -> None:
    shipped = yaml.safe_load((ROOT / "pipelines" / "cxr_resolution_scaling.yaml").read_text())
    (tmp_path / "data").mkdir()
    manifest = {"cache": "../cache", "datasets": {"demo": demo_dataset_config()}}
    (tmp_path / "data" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    doc = dict(shipped, datasets=["demo"])
    doc["demo_data"] = {"dataset": "demo", "patients": 24, "images_per_patient": 2, "size": 96}
    doc["compare"] = [_stand_in(c) for c in shipped["compare"]]
    for block in doc["blocks"]:
        block["models"] = [STAND_IN[m] for m in block["models"]]
        block["resolutions"] = [TIER[r] for r in block["resolutions"]]
        block["extract"] = {**block.get("extract", {}), "workers": 0, "batch_size": 8,
                            "unit_rows": 8, "dtype": "fp32"}  # fmt: skip
        for step in block.get("probes", []):
            step["max_iter"] = 50
        for step in block.get("finetune", []):
            step.update(epochs=1, batch_size=8, options={"num_workers": 0})
    [frozen] = [b for b in doc["blocks"] if b["name"] == "frozen-7b"]
    assert frozen["probes"] == [{"kind": "linear", "pooling": "mean", "max_iter": 50}]
    (tmp_path / "cxr.yaml").write_text(yaml.safe_dump(doc))

    summary = run_pipeline(
        tmp_path / "cxr.yaml", manifest=tmp_path / "data" / "manifest.yaml",
        results=tmp_path / "results", report=tmp_path / "report",
        console=Console(width=200, record=True),
    )  # fmt: skip
    assert not summary.failed, [(s.what, s.error) for s in summary.failed]
    with (tmp_path / "report" / "comparisons.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    found = {(r["a"], r["b"]) for r in rows}

    def run(model: str, tier: int, method: str) -> str:
        spec = resolve(STAND_IN[model])
        assert isinstance(spec, EncoderSpec)
        snapped = validate_resolution(spec, TIER[tier], snap=True)
        res = f"{TIER[tier]}px" + (f" ({snapped})" if snapped != TIER[tier] else "")
        return f"{STAND_IN[model]} · {res} · {method}"

    ft = "finetune-full"
    base = [m for m in STAND_IN if m != "dinov3/vit7b16"]
    expected = set()
    for tier in (224, 512, 1024):
        for a, b in [
            ("dinov3/vitb16", "dinov2/base"),  # DINOv3 vs DINOv2 vs ImageNet, per architecture
            ("dinov3/vitb16", "imagenet/vit-base16"),
            ("dinov2/base", "imagenet/vit-base16"),
            ("dinov3/convnext-base", "imagenet/convnext-base"),
            ("dinov3/convnext-base", "dinov3/vitb16"),  # ConvNeXt-B vs ViT-B
            ("imagenet/convnext-base", "imagenet/vit-base16"),
        ]:
            expected.add((run(a, tier, ft), run(b, tier, ft)))
        for model in base:  # frozen 7B linear probe vs each finetuned base model
            expected.add((run("dinov3/vit7b16", tier, "linear"), run(model, tier, ft)))
    for high, low in ((512, 224), (1024, 512)):  # each resolution step
        expected.add((run("dinov3/vit7b16", high, "linear"), run("dinov3/vit7b16", low, "linear")))
        for model in base:
            expected.add((run(model, high, ft), run(model, low, ft)))
    assert expected <= found, sorted(expected - found)
    assert len(rows) == len(expected) == 45  # nothing else is compared
    p = np.array([float(r["p_value"]) for r in rows])
    holm = np.minimum(1, np.maximum.accumulate(np.sort(p) * (len(p) - np.arange(len(p)))))
    assert sorted(float(r["p_adjusted"]) for r in rows) == pytest.approx(list(holm))
    assert all("permutation" in r["test"] for r in rows)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "holm-adjusted" in page
    for a, b in expected:
        assert f"<td>{a}</td><td>{b}</td>" in page


def test_compare_selectors_are_validated_with_their_keys(tmp_path: Path) -> None:
    from embedkit.errors import ConfigError
    from embedkit.report import RunPair, RunSelector
    from embedkit.study.pipeline import _pair_choices, load_pipeline

    doc = {
        "name": "x",
        "datasets": ["demo"],
        "blocks": [{"name": "b", "models": ["test/tiny-vit"], "resolutions": [224]}],
        "compare": [
            {"a": {"model": "dinov3-7b", "kind": "linear"}, "b": {"model": "dinov3/vitb16",
                                                                  "method": "full"}},
        ],
    }  # fmt: skip
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    [(pair, problem)] = _pair_choices(load_pipeline(path).spec)
    assert problem is None and pair == RunPair(
        RunSelector(model="dinov3/vit7b16", method="linear"),
        RunSelector(model="dinov3/vitb16", method="full"),
    )  # aliases resolve to the names records hold
    doc["compare"] = [
        {"a": {"model": "dinov3/vitb61"}, "b": {"model": "dinov2/base"}},
        {"axis": "model", "a": {"model": "dinov2/base"}, "b": {"model": "dinov3/vitb16"}},
        {"a": "dinov2/base", "b": "dinov3/vitb16"},
        {"a": {"kind": "linear", "method": "full"}, "b": {"model": "dinov2/base"}},
    ]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    text = str(caught.value)
    assert "compare[0]: " in text and "did you mean" in text
    assert "compare[1]: Expected no axis with run selectors" in text
    assert "compare[2]: Expected an axis, or two run selectors" in text
    assert "compare[3]: Expected kind or method" in text
