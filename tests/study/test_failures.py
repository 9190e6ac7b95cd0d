"""A run whose steps failed says so, instead of pointing at a report that does not hold them."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from embedkit.study.demo import run_demo


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.mark.usefixtures("offline")
def test_demo_whose_steps_fail_says_so_and_does_not_offer_the_report(tmp_path: Path) -> None:
    console = Console(width=200, record=True)
    summary = run_demo(
        tmp_path / "demo",
        console=console,
        patients=4,
        images_per_patient=1,
        size=64,
        model="someorg/not-cached",  # a hub model that is not in the (empty, offline) cache
        resolutions=(224,),
        workers=0,
    )
    text = " ".join(console.export_text().split())
    assert summary.failed and len(summary.failed) == len(summary.steps)
    assert f"{len(summary.failed)} of {len(summary.steps)} steps failed" in text
    assert "could not download someorg/not-cached" in text  # each failed step with its error
    assert "The demo did not finish" in text
    assert "Open the report" not in text
