"""`embedkit demo`: the demo pipeline (``pipelines/demo.yaml``) end to end, offline.

The demo is an ordinary pipeline run: :func:`run_demo` picks the manifest, applies the command's
options to the pipeline file (demo data size, model, resolutions, workers) and hands it to
:func:`embedkit.study.pipeline.run_pipeline`, the runner behind `embedkit run`. The pipeline
declares (``demo_data:``) that its dataset is the synthetic demo, so the runner generates those
images first (:func:`ensure_demo_data`: resumable), then extracts, probes, finetunes and builds
the report. The manifest is ``./data_manifest.yaml`` when that file defines a ``demo`` dataset
stored in ``out_dir``; otherwise ``<out_dir>/manifest.yaml`` is written (demo data + a cache
inside ``out_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from embedkit.errors import ConfigError
from embedkit.manifest import Manifest, load_manifest
from embedkit.manifest.loader import read_yaml
from embedkit.study.demodata import (
    DEMO_DATASET,
    demo_dataset_config,
    demo_folder,
    ensure_demo_data,
)
from embedkit.study.pipeline import Pipeline, RunSummary, parse_pipeline, run_pipeline

__all__ = [
    "DEMO_DATASET",
    "DEMO_PIPELINE",
    "demo_dataset_config",
    "demo_folder",
    "demo_pipeline",
    "ensure_demo_data",
    "run_demo",
]

#: The shipped demo pipeline (in a source checkout, beside the package).
DEMO_PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


def _manifest_for(out_dir: Path) -> Manifest:
    default = Path("data_manifest.yaml")
    if default.is_file():
        man = load_manifest(default)
        cfg = man.datasets.get(DEMO_DATASET)
        if cfg is not None and Path(cfg.index).resolve() == (out_dir / "index.csv").resolve():
            return man
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "manifest.yaml"
    doc = {"cache": "cache", "datasets": {DEMO_DATASET: demo_dataset_config()}}
    tmp = path.with_name("manifest.yaml.tmp")
    tmp.write_text(
        "# Written by `embedkit demo`: the synthetic demo dataset (no real patients).\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    os.replace(tmp, path)
    return load_manifest(path)


def _with_workers(step: dict[str, Any], workers: int) -> dict[str, Any]:
    """A finetune step with ``num_workers`` set where the step sets it (top level or, as
    pipelines/demo.yaml does, in its ``options``)."""
    if "num_workers" in step:
        return {**step, "num_workers": workers}
    return {**step, "options": {**(step.get("options") or {}), "num_workers": workers}}


def _apply_options(
    data: dict[str, Any],
    *,
    patients: int | None,
    images_per_patient: int | None,
    size: int | None,
    model: str | None,
    resolutions: tuple[int, ...] | None,
    workers: int | None,
) -> dict[str, Any]:
    """The pipeline document with the demo command's options applied."""
    demo = dict(data.get("demo_data") or {})
    for key, value in (("patients", patients), ("images_per_patient", images_per_patient),
                       ("size", size)):  # fmt: skip
        if value is not None:
            demo[key] = value
    blocks = []
    for raw in data.get("blocks") or []:
        block = dict(raw)
        if model is not None:
            block["models"] = [model]
        # what trains a network (finetuning, a head on patch tokens) runs at the smallest only
        trains = block.get("finetune") or (block.get("extract") or {}).get("patch_tokens")
        if resolutions is not None:
            block["resolutions"] = [min(resolutions)] if trains else list(resolutions)
        if workers is not None:
            block["extract"] = {**(block.get("extract") or {}), "workers": workers}
            block["finetune"] = [
                _with_workers(step, workers) for step in block.get("finetune") or []
            ]
        blocks.append(block)
    return {**data, "demo_data": demo, "blocks": blocks}


def demo_pipeline(
    pipeline: str | os.PathLike[str] = DEMO_PIPELINE,
    *,
    patients: int | None = None,
    images_per_patient: int | None = None,
    size: int | None = None,
    model: str | None = None,
    resolutions: tuple[int, ...] | None = None,
    workers: int | None = None,
) -> Pipeline:
    """The demo pipeline file with the demo command's options applied and validated.

    Options left at None keep the file's values; ``model`` replaces every block's models and
    ``resolutions`` every block's resolutions (finetuning blocks get the smallest one).
    """
    source = Path(pipeline)
    data = read_yaml(source, ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a pipeline mapping, got {type(data).__name__}")
    data = _apply_options(
        data, patients=patients, images_per_patient=images_per_patient, size=size,
        model=model, resolutions=resolutions, workers=workers,
    )  # fmt: skip
    pipe = parse_pipeline(data, source)
    if pipe.spec.demo_data is None:
        raise ConfigError(f"{source}: a demo pipeline needs `demo_data:` (see pipelines/demo.yaml)")
    return pipe


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    pipeline: str | os.PathLike[str] = DEMO_PIPELINE,
    console: Console | None = None,
    **options: Any,
) -> RunSummary:
    """Run the demo pipeline into ``out_dir`` (results in ``results/``, report in ``report/``);
    ``options`` are those of :func:`demo_pipeline`."""
    con = console or Console()
    out = Path(out_dir)
    pipe = demo_pipeline(pipeline, **options)
    man = _manifest_for(out)
    models = sorted({m for b in pipe.spec.blocks for m in b.models})
    if all(m.startswith("test/") for m in models):
        con.print(
            f"demo encoders {', '.join(models)}: tiny models with [yellow]RANDOM weights[/yellow] "
            "(the features exercise the pipeline, they mean nothing). For real features: "
            "embedkit demo --model dinov3/vitb16 (needs the checkpoint) or --model /path/to/dir."
        )
    summary = run_pipeline(
        pipe, manifest=man.path, results=out / "results", report=out / "report", console=con
    )
    if summary.failed:
        where = f" The report at {summary.report} does not hold them." if summary.report else ""
        con.print(
            f"[red]The demo did not finish: {len(summary.failed)} of {len(summary.steps)} steps "
            f"failed[/red] (listed above).{where}"
        )
    elif summary.report is not None:
        con.print(
            f"[bold]Open the report:[/bold] {summary.report.resolve().as_uri()}\n"
            f"Next: embedkit cache ls --manifest {man.path}  |  "
            f"embedkit report --results {out / 'results'} --out {out / 'report'}"
        )
    return summary
