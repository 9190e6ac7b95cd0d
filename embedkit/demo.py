"""`embedkit demo`: the whole pipeline on the synthetic demo dataset, offline.

Builds the demo images (resumable), checks the manifest, extracts features with a tiny
random-weight encoder at each resolution, lists the cache, and runs the linear, kNN and
few-shot probes on every entry, ending with a comparison table. The manifest it uses is
``./data_manifest.yaml`` when that file defines a ``demo`` dataset stored in ``out_dir``;
otherwise it writes ``<out_dir>/manifest.yaml`` (demo data + a cache inside ``out_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape

from embedkit.data.demo import FINDINGS, DemoSpec, generate_demo
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractionRequest, ExtractionResult, extract
from embedkit.manifest import Manifest, check_dataset, load_manifest, render_report
from embedkit.probe import PROBE_KINDS, ProbeRequest, comparison_table, run_probe
from embedkit.progress import rich_progress
from embedkit.report import build_report
from embedkit.store import CacheRoot, list_entries, render_entries

DEMO_DATASET = "demo"


def demo_dataset_config() -> dict[str, object]:
    """The manifest entry of the demo dataset, with paths relative to the demo folder."""
    return {
        "images": "images",
        "index": "index.csv",
        "id_column": "image_id",
        "path_column": "path",
        "patient_column": "patient_id",
        "labels": {
            "format": "separated",
            "column": "findings",
            "separator": "|",
            "negative": "No Finding",
            "names": list(FINDINGS),
        },
        "splits": {
            "method": "patient",
            "fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
            "seed": 0,
        },
    }


def _manifest_for(out_dir: Path) -> Manifest:
    default = Path("data_manifest.yaml")
    if default.is_file():
        man = load_manifest(default)
        cfg = man.datasets.get(DEMO_DATASET)
        if cfg is not None and Path(cfg.index).resolve() == (out_dir / "index.csv").resolve():
            return man
    path = out_dir / "manifest.yaml"
    doc = {"cache": "cache", "datasets": {DEMO_DATASET: demo_dataset_config()}}
    tmp = path.with_name("manifest.yaml.tmp")
    tmp.write_text(
        "# Written by `embedkit demo`: the synthetic demo dataset (no real patients).\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    os.replace(tmp, path)
    return load_manifest(path)


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    patients: int = 100,
    images_per_patient: int = 3,
    size: int = 1024,
    model: str = "test/tiny-dinov3-vit",
    resolutions: tuple[int, ...] = (224, 512),
    workers: int = 2,
    batch_size: int = 16,
    probe_max_iter: int = 200,
    console: Console | None = None,
) -> list[ExtractionResult]:
    """Generate, check, extract and probe the demo dataset; return one result per resolution.

    The demo's linear probes stop L-BFGS after ``probe_max_iter`` iterations per C (recorded in
    each result) to keep the demo quick; `embedkit probe` uses the protocol's 1000.
    """
    con = console or Console()
    out = Path(out_dir)
    spec = DemoSpec(n_patients=patients, images_per_patient=images_per_patient, size=size)
    con.print(f"[bold]1/3[/bold] demo images: {spec.n_images} synthetic radiographs in {out}/")
    with rich_progress(spec.n_images, "generate", console=con) as advance:
        last = [0]

        def tick(done: int, _total: int) -> None:
            advance(done - last[0])
            last[0] = done

        generate_demo(out, spec, progress=tick)
    man = _manifest_for(out)
    con.print(f"[bold]2/3[/bold] manifest check ({man.path})")
    report = check_dataset(man.dataset(DEMO_DATASET), check_files=True)
    con.print(render_report(report))
    if model.startswith("test/"):
        con.print(
            f"[bold]3/3[/bold] extract with [bold]{model}[/bold]: a tiny model with [yellow]RANDOM "
            "weights[/yellow] (the features exercise the pipeline, they mean nothing). For real "
            "features: embedkit demo --model dinov3/vitb16 (needs the checkpoint) or "
            "--model /path/to/local/checkpoint."
        )
    else:
        con.print(f"[bold]3/3[/bold] extract with {model}")
    results = []
    for resolution in resolutions:
        request = ExtractionRequest(
            model=model,
            dataset=DEMO_DATASET,
            resolution=resolution,
            num_workers=workers,
            batch_size=batch_size,
            unit_rows=64,
        )
        result = extract(request, manifest=man, progress=rich_progress)
        state = "found (cached)" if result.reused else f"wrote ({result.images_per_s:.1f} img/s)"
        con.print(f"  {resolution}px: {state} {result.entry.uri}")
        results.append(result)
    root = CacheRoot.from_uri(man.cache)
    con.print(render_entries(list_entries(root)))
    records = []
    con.print(f"[bold]probes[/bold] (results in {out / 'results'})")
    for resolution in resolutions:
        for kind in PROBE_KINDS:
            probe_request = ProbeRequest(
                kind=kind,  # type: ignore[arg-type]
                model=model,
                dataset=DEMO_DATASET,
                resolution=resolution,
                shots=(1, 2, 4, 8),
                max_iter=probe_max_iter,
            )
            try:
                outcome = run_probe(probe_request, manifest=man, results=out / "results")
            except EmbedkitError as exc:  # e.g. too few patients for few-shot draws
                con.print(f"  [yellow]{kind} @ {resolution}px skipped[/yellow]: {escape(str(exc))}")
                continue
            records.append(outcome.record)
    con.print(comparison_table(records))
    if records:
        built = build_report(out / "results", out / "report")
        con.print(f"report: {built.html} ({len(built.comparisons)} paired comparisons)")
    con.print(
        f"Next: embedkit cache info {results[0].entry.key.short()} --manifest {man.path}  |  "
        f"embedkit probe --kind linear --model {model} --dataset {DEMO_DATASET} "
        f"--resolution {resolutions[0]} --manifest {man.path} --out {out / 'results'}"
    )
    return results
