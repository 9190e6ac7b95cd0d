"""`embedkit run PIPELINE.yaml`: a whole study (extract, probes, finetune, report) in one file.

A pipeline lists blocks; each block crosses datasets x models x resolutions and says what to do
for every combination: extract features (with the given options), run probes on them, and/or
finetune the encoder. The runner first prints the plan, with what is already in the cache or
the results folder and the estimated forward compute of what is not, then runs the steps in
order. Every step is idempotent (extraction resumes or reuses its cache entry; a probe or
finetune run finds its record), so rerunning after a kill continues where it stopped. A failing
step is reported and the run goes on; the summary at the end lists every failure, and the exit
status is non-zero if there was one. The report is built last, from all records.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from embedkit.errors import CacheNotFoundError, ConfigError, EmbedkitError
from embedkit.manifest import Manifest, load_manifest
from embedkit.manifest.loader import format_validation_error, read_yaml
from embedkit.models import EncoderSpec, resolve, validate_resolution


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExtractOptions(_Strict):
    batch_size: Annotated[int, Field(ge=1)] = 32
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    storage_dtype: Literal["float16", "float32"] = "float16"
    device: str = "auto"
    workers: Annotated[int, Field(ge=0)] = 2
    unit_rows: Annotated[int, Field(ge=1)] = 1024
    patch_tokens: bool = False
    resize: Literal["squash", "pad", "crop"] = "squash"
    snap_resolution: bool = True  # DINOv2 (patch 14) at 512 -> 518, recorded in the key
    on_bad_image: Literal["fail", "skip"] = "fail"


class ProbeStep(_Strict):
    kind: Literal["linear", "knn", "fewshot"]
    pooling: str | None = None
    seed: int = 0
    n_boot: Annotated[int, Field(ge=1)] = 1000
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    draws: Annotated[int, Field(ge=1)] = 5
    max_iter: Annotated[int, Field(ge=1)] = 1000


class FinetuneStep(_Strict):
    method: Literal["full", "lora", "bitfit", "linear"]
    epochs: Annotated[int, Field(ge=1)] = 10
    lr: Annotated[float | None, Field(gt=0)] = None  # default: the method's (full: 1e-5)
    batch_size: Annotated[int, Field(ge=1)] = 32
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)  # method-specific (lora_r, ...)


class Block(_Strict):
    name: str
    datasets: tuple[str, ...] | None = None  # default: the pipeline's datasets
    models: tuple[str, ...] = Field(min_length=1)
    resolutions: tuple[int, ...] = Field(min_length=1)
    extract: ExtractOptions = ExtractOptions()
    probes: tuple[ProbeStep, ...] = ()
    finetune: tuple[FinetuneStep, ...] = ()


class PipelineFile(_Strict):
    name: str
    description: str = ""
    manifest: str = "data_manifest.yaml"  # relative to the pipeline file
    cache: str | None = None  # default: the manifest's cache
    results: str = "embedkit-results"
    report: str = "embedkit-report"
    datasets: tuple[str, ...] = Field(min_length=1)
    blocks: tuple[Block, ...] = Field(min_length=1)


@dataclass(frozen=True)
class Pipeline:
    path: Path
    spec: PipelineFile

    def resolve_path(self, value: str) -> str:
        """A relative local path is relative to the pipeline file; URLs stay as they are."""
        if "://" in value or os.path.isabs(value):
            return value
        return str((self.path.parent / value).resolve())


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Parse and validate a pipeline file, including that every model name and resolution
    is usable (names resolve in the registry or as hub ids / folders, without network)."""
    source = Path(path)
    data = read_yaml(source, ConfigError)
    try:
        spec = PipelineFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error(exc, source=str(source), root=PipelineFile)
        ) from None
    for block in spec.blocks:
        for model in block.models:
            target = resolve(model)
            if isinstance(target, EncoderSpec):
                for res in block.resolutions:
                    validate_resolution(target, res, snap=block.extract.snap_resolution)
    return Pipeline(source.resolve(), spec)


@dataclass
class Step:
    action: Literal["extract", "probe", "finetune"]
    block: str
    dataset: str
    model: str
    resolution: int
    options: Any  # ExtractOptions | ProbeStep | FinetuneStep
    status: str = "to run"
    estimate: str = ""
    error: str = ""

    @property
    def what(self) -> str:
        if isinstance(self.options, ProbeStep):
            return f"probe {self.options.kind}"
        if isinstance(self.options, FinetuneStep):
            return f"finetune {self.options.method}"
        return "extract"


def expand(pipeline: Pipeline) -> list[Step]:
    """Every step of the pipeline, in run order."""
    steps: list[Step] = []
    for block in pipeline.spec.blocks:
        for dataset in block.datasets or pipeline.spec.datasets:
            for model in block.models:
                for res in block.resolutions:
                    base = (block.name, dataset, model, res)
                    if block.probes or not block.finetune:
                        steps.append(Step("extract", *base, block.extract))
                    steps.extend(Step("probe", *base, p) for p in block.probes)
                    steps.extend(Step("finetune", *base, f) for f in block.finetune)
    return steps


@dataclass
class Context:
    pipeline: Pipeline
    manifest: Manifest
    cache: str
    results: Path
    console: Console
    n_images: dict[str, int | None] = field(default_factory=dict)
    local_cache: str | None = None  # probes read through a local copy of each entry


def _images(ctx: Context, dataset: str) -> int | None:
    if dataset not in ctx.n_images:
        try:
            ctx.n_images[dataset] = len(ctx.manifest.dataset(dataset).load())
        except EmbedkitError:
            ctx.n_images[dataset] = None
    return ctx.n_images[dataset]


def _estimate(ctx: Context, step: Step) -> str:
    """Forward compute of an extraction: images x FLOPs per image (registry models only)."""
    from embedkit.throughput import flops_per_image, shape_from_spec

    target = resolve(step.model)
    n = _images(ctx, step.dataset)
    if not isinstance(target, EncoderSpec) or n is None:
        return "?"
    side = validate_resolution(target, step.resolution, snap=step.options.snap_resolution)
    total = n * flops_per_image(shape_from_spec(target), side)
    hours = total / (800e12 * 0.5) / 3600  # an H100 at 50% of ~800 dense bf16 TFLOP/s
    return (
        f"{n:,} img x {total / n / 1e9:.3g} GFLOP = {total / 1e15:.3g} PFLOP "
        f"(~{hours:.2g} H100-hours at 50% MFU)"
    )


def _status(ctx: Context, step: Step) -> str:
    from embedkit.probe import find_probe_entry, probe_plan
    from embedkit.store import CacheRoot

    if step.action == "finetune":
        from embedkit.finetune import finetune_record_relpath

        try:
            relpath = finetune_record_relpath(_finetune_request(step), ctx.manifest)
        except EmbedkitError:
            return "to run"
        return "done" if (ctx.results / relpath).with_suffix(".json").is_file() else "to run"
    target = resolve(step.model)
    res = step.resolution
    if isinstance(target, EncoderSpec):
        snap = step.options.snap_resolution if isinstance(step.options, ExtractOptions) else True
        res = validate_resolution(target, res, snap=snap)
    if "://" not in ctx.cache and not Path(ctx.cache).exists():
        return "to run"  # planning never creates the cache folder
    try:
        entry = find_probe_entry(CacheRoot.from_uri(ctx.cache), step.dataset, step.model, res)
    except CacheNotFoundError:
        return "to run"
    if step.action == "extract":
        return "cached"
    if step.action == "probe":
        request = _probe_request(step, res)
        *_, relpath = probe_plan(request, entry)
        return "done" if (ctx.results / relpath).with_suffix(".json").is_file() else "to run"
    return "to run"


def _probe_request(step: Step, resolution: int) -> Any:
    from embedkit.probe import ProbeRequest

    p: ProbeStep = step.options
    return ProbeRequest(
        kind=p.kind,
        model=step.model,
        dataset=step.dataset,
        resolution=resolution,
        pooling=p.pooling,
        seed=p.seed,
        n_boot=p.n_boot,
        shots=p.shots,
        draws=p.draws,
        max_iter=p.max_iter,
    )


def _effective_resolution(step: Step, snap: bool) -> int:
    target = resolve(step.model)
    if isinstance(target, EncoderSpec):
        return validate_resolution(target, step.resolution, snap=snap)
    return step.resolution


def _run_extract(ctx: Context, step: Step) -> str:
    from embedkit.extract import ExtractionRequest, extract
    from embedkit.progress import rich_progress

    o: ExtractOptions = step.options
    result = extract(
        ExtractionRequest(
            model=step.model,
            dataset=step.dataset,
            resolution=step.resolution,
            patch_tokens=o.patch_tokens,
            dtype=o.dtype,
            storage_dtype=o.storage_dtype,
            batch_size=o.batch_size,
            device=o.device,
            num_workers=o.workers,
            unit_rows=o.unit_rows,
            resize=o.resize,
            snap_resolution=o.snap_resolution,
            on_bad_image=o.on_bad_image,
        ),
        manifest=ctx.manifest,
        cache=ctx.cache,
        progress=lambda total, desc: rich_progress(total, desc, console=ctx.console),
    )
    return "cached" if result.reused else f"wrote {result.entry.key.short()}"


def _run_probe(ctx: Context, step: Step) -> str:
    from embedkit.probe import run_probe

    request = _probe_request(step, _effective_resolution(step, snap=True))
    outcome = run_probe(
        request,
        manifest=ctx.manifest,
        cache=ctx.cache,
        results=ctx.results,
        local_cache=ctx.local_cache,
    )
    return "done (reused)" if outcome.reused else "done"


def _finetune_request(step: Step) -> Any:
    from embedkit.finetune import FinetuneRequest

    f: FinetuneStep = step.options
    return FinetuneRequest(
        model=step.model,
        dataset=step.dataset,
        resolution=_effective_resolution(step, snap=True),
        method=f.method,
        epochs=f.epochs,
        lr=f.lr,
        batch_size=f.batch_size,
        seed=f.seed,
        **f.options,
    )


def _run_finetune(ctx: Context, step: Step) -> str:
    from embedkit.finetune import run_finetune

    request = _finetune_request(step)
    outcome = run_finetune(request, manifest=ctx.manifest, results=ctx.results)
    return "done (reused)" if outcome.reused else "done"


ACTIONS: dict[str, Callable[[Context, Step], str]] = {
    "extract": _run_extract,
    "probe": _run_probe,
    "finetune": _run_finetune,
}


def plan_table(steps: list[Step], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("#", "block", "step", "dataset", "model", "res", "status", "compute / note"):
        table.add_column(column)
    for i, s in enumerate(steps, 1):
        note = s.error or s.estimate
        table.add_row(
            str(i), s.block, s.what, s.dataset, s.model, str(s.resolution), s.status, escape(note)
        )
    return table


@dataclass
class RunSummary:
    steps: list[Step]
    report: Path | None

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]


def run_pipeline(
    path: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    cache: str | None = None,
    results: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    local_cache: str | None = None,
) -> RunSummary:
    """Plan (and unless ``dry_run``, run) a pipeline; see the module docstring.

    ``local_cache``: a local directory through which probes read their entries (see
    :func:`embedkit.store.open_local_copy`).
    """
    con = console or Console()
    pipe = load_pipeline(path)
    spec = pipe.spec
    man = load_manifest(manifest if manifest is not None else pipe.resolve_path(spec.manifest))
    missing = [
        d for b in spec.blocks for d in (b.datasets or spec.datasets) if d not in man.datasets
    ]
    if missing:
        raise ConfigError(
            f"{pipe.path}: datasets {sorted(set(missing))} are not in {man.path}; define them "
            "there (data_manifest.yaml has commented entries for public CXR datasets)"
        )
    ctx = Context(
        pipe,
        man,
        cache or (pipe.resolve_path(spec.cache) if spec.cache else man.cache),
        Path(results) if results is not None else Path(pipe.resolve_path(spec.results)),
        con,
        local_cache=local_cache,
    )
    steps = expand(pipe)
    for step in steps:
        step.status = _status(ctx, step)
        if step.action == "extract" and step.status != "cached":
            step.estimate = _estimate(ctx, step)
    con.print(plan_table(steps, f"pipeline {spec.name}: plan ({len(steps)} steps)"))
    report_dir = Path(report) if report is not None else Path(pipe.resolve_path(spec.report))
    if dry_run:
        return RunSummary(steps, None)
    for i, step in enumerate(steps, 1):
        if step.status in ("cached", "done"):
            continue
        con.print(
            f"[bold]step {i}/{len(steps)}[/bold] {step.what} · {step.dataset} · "
            f"{step.model} · {step.resolution}px"
        )
        try:
            step.status = ACTIONS[step.action](ctx, step)
        except EmbedkitError as exc:
            step.status, step.error = "failed", str(exc).splitlines()[0]
            con.print(f"  [red]failed[/red]: {escape(str(exc))}")
        except Exception as exc:  # a bug or an environment problem: report it, keep going
            step.status, step.error = "failed", f"{type(exc).__name__}: {exc}"
            con.print(f"  [red]failed[/red]: {escape(traceback.format_exc(limit=3))}")
    built: Path | None = None
    try:
        from embedkit.report import build_report

        built = build_report(ctx.results, report_dir).html
        con.print(f"report: {built}")
    except EmbedkitError as exc:
        con.print(f"[yellow]no report[/yellow]: {escape(str(exc))}")
    con.print(plan_table(steps, f"pipeline {spec.name}: result"))
    summary = RunSummary(steps, built)
    if summary.failed:
        con.print(f"[red]{len(summary.failed)} of {len(steps)} steps failed[/red] (see above)")
    return summary
