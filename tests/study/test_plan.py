"""Planning a study before its data is there: the whole plan, compute per step, totals."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from embedkit.errors import ConfigError
from embedkit.study.demodata import demo_dataset_config
from embedkit.study.pipeline import gpu_hours, run_pipeline

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Online mode against an endpoint that refuses connections, with an empty hub cache."""
    from huggingface_hub import constants

    from embedkit.models import loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for proxy in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(loading, "_HUB_DOWN", {})
    monkeypatch.setattr(loading, "_HUB_CONFIGS", {})


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=240), buffer


def _study(tmp_path: Path, expected: dict[str, object] | None = None) -> Path:
    datasets = {"demo": demo_dataset_config()}  # the manifest defines another dataset only
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({"cache": "c", "datasets": datasets}))
    doc: dict[str, object] = {
        "name": "s",
        "manifest": "manifest.yaml",
        "datasets": ["big-cxr"],
        "blocks": [
            {
                "name": "frozen",
                "models": ["dinov3/vitb16"],
                "resolutions": [224, 512],
                "probes": [{"kind": "linear"}],
            },
            {
                "name": "tuned",
                "models": ["dinov3/vitb16"],
                "resolutions": [224],
                "finetune": [{"method": "full", "epochs": 10}],
            },
        ],
    }
    if expected is not None:
        doc["expected"] = expected
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.usefixtures("unreachable_hub")
def test_dry_run_without_data_prints_the_whole_plan_and_totals(tmp_path: Path) -> None:
    from embedkit.models import get_spec
    from embedkit.models.throughput import flops_per_image, shape_from_spec

    console, buffer = _console()
    summary = run_pipeline(
        _study(tmp_path, {"big-cxr": {"images": 100_000, "patients": 30_000}}),
        dry_run=True,
        console=console,
    )
    text = buffer.getvalue()
    assert [s.what for s in summary.steps] == [
        "extract", "probe linear", "extract", "probe linear", "finetune full"
    ]  # fmt: skip
    assert {s.status for s in summary.steps} == {"no data"}
    assert not summary.failed
    assert "big-cxr: not in the manifest (planned with the expected 100,000 images)" in text
    assert "how to add it" in text and "embedkit manifest check -m" in text
    # Finetuning: epochs x images x 3 x forward; extraction: images x forward.
    forward = flops_per_image(shape_from_spec(get_spec("dinov3/vitb16")), 224)
    finetune = 10 * 100_000 * 3 * forward
    assert f"{finetune / 1e15:.3g} PFLOP" in text
    assert f"{100_000 * forward / 1e15:.3g} PFLOP" in text
    assert "GPU-hours on an H100" in text and "50% MFU" in text
    for label in ("frozen", "tuned", "study"):
        assert f"│ {label} " in text
    forward_512 = flops_per_image(shape_from_spec(get_spec("dinov3/vitb16")), 512)
    study = gpu_hours(100_000 * (forward + forward_512) + finetune)
    assert f"{study:,.3g}" in text


@pytest.mark.usefixtures("unreachable_hub")
def test_running_a_study_without_its_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'big-cxr' is not in .*To add it"):
        run_pipeline(_study(tmp_path), console=_console()[0])


@pytest.mark.usefixtures("unreachable_hub")
def test_a_dataset_without_an_expected_size_says_so(tmp_path: Path) -> None:
    console, buffer = _console()
    run_pipeline(_study(tmp_path, {"big-cxrr": {"images": 10}}), dry_run=True, console=console)
    text = " ".join(buffer.getvalue().split())
    assert "big-cxr: not in the manifest (no size under `expected:`" in text
    assert "did you mean 'big-cxrr'?" in text and "its compute is unknown" in text


@pytest.mark.usefixtures("unreachable_hub")
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_pipeline_plans_offline_in_seconds(path: Path, tmp_path: Path) -> None:
    console, buffer = _console()
    started = time.monotonic()
    summary = run_pipeline(
        path,
        dry_run=True,
        console=console,
        cache=str(tmp_path / "cache"),
        results=tmp_path / "results",
    )
    assert time.monotonic() - started < 10
    text = buffer.getvalue()
    assert f"plan ({len(summary.steps)} steps)" in text
    assert "│ study " in text
    assert "Retrying" not in text
