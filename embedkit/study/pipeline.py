"""`embedkit run PIPELINE.yaml`: a whole study (extract, probes, finetune, report) in one file.

A pipeline lists blocks; each block crosses datasets x models x resolutions and says what to do
for every combination: extract features (with the given options), run probes on them, and/or
finetune the encoder. The runner first prints the plan, with what is already in the cache or
the results folder and the estimated forward compute of what is not, then runs the steps in
order. Every step is idempotent (extraction resumes or reuses its cache entry; a probe or
finetune run finds its record), so rerunning after a kill continues where it stopped. A failing
step is reported and the run goes on; the summary at the end lists every failure, and the exit
status is non-zero if there was one. The report is built last, from all records.

Everything a pipeline names is checked before any compute starts, and every problem is reported
at once with the file and the key (``blocks[1].models[0]``): unknown models, resolutions a model
cannot take, probe kinds, finetuning methods and options, poolings, datasets missing from the
manifest, and a results folder that already holds records of another dataset of the same name.
A pipeline whose dataset is the synthetic demo says so (``demo_data:``); the runner then
generates those images first (resumable), which is how `embedkit demo` runs this same runner.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from embedkit.errors import CacheNotFoundError, ConfigError, EmbedkitError, did_you_mean
from embedkit.extract.request import ExtractionRequest
from embedkit.finetune.request import FinetuneRequest
from embedkit.manifest import DatasetTable, Manifest, load_manifest
from embedkit.manifest.loader import format_validation_error, read_yaml
from embedkit.models import EncoderSpec, resolve, validate_resolution
from embedkit.probes.request import ProbeRequest
from embedkit.study.display import epoch_line, step_bar, working
from embedkit.study.options import (
    REQUEST_TYPES,
    request_from_options,
    step_schema,
    step_values,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A block's `extract:`, `probes:` and `finetune:` steps take the fields of the request they
# build, with its types and defaults (embedkit.study.options derives them; `workers` is also
# accepted for num_workers, and a finetune step may put its options in an `options:` mapping).
# Typed access goes through the request a step builds, so mypy sees plain models here.
if TYPE_CHECKING:
    ExtractOptions = BaseModel
    ProbeStep = BaseModel
    FinetuneStep = BaseModel
else:
    ExtractOptions = step_schema(ExtractionRequest)
    ProbeStep = step_schema(ProbeRequest)
    FinetuneStep = step_schema(FinetuneRequest)


class Block(_Strict):
    name: str
    datasets: tuple[str, ...] | None = None  # default: the pipeline's datasets
    models: tuple[str, ...] = Field(min_length=1)
    resolutions: tuple[int, ...] = Field(min_length=1)
    extract: ExtractOptions = ExtractOptions()
    probes: tuple[ProbeStep, ...] = ()
    finetune: tuple[FinetuneStep, ...] = ()


class DemoData(_Strict):
    """The pipeline's dataset ``dataset`` is the synthetic demo: generate it before the run."""

    dataset: str = "demo"
    patients: Annotated[int, Field(ge=1)] = 100
    images_per_patient: Annotated[int, Field(ge=1)] = 3
    size: Annotated[int, Field(ge=64, le=4096)] = 1024


class RunSelectorStep(_Strict):
    """One side of a ``compare`` entry without ``axis``: the runs it means (None: any)."""

    model: str | None = None  # a registry name or alias
    kind: str | None = None  # a probe kind (linear, knn, ...)
    method: str | None = None  # a finetuning method (full, lora, bitfit) or probe kind
    resolution: int | None = None  # the nominal tier (224, 512, 1024)
    pooling: str | None = None


class CompareStep(_Strict):
    """One kind of paired comparison for the report (default: every comparable pair).

    Either ``axis`` with optional values ``a`` / ``b`` (runs that differ only along it), or no
    axis and two run selectors ``a: {model: dinov3/vit7b16, kind: linear}``, ``b: {model:
    dinov3/vitb16, method: full}`` (attributes neither names must agree, e.g. the tier)."""

    axis: Literal["resolution", "model", "method"] | None = None
    a: str | int | RunSelectorStep | None = None  # a model, resolution or method; or a selector
    b: str | int | RunSelectorStep | None = None


class ExpectedSize(_Strict):
    """How big a dataset is expected to be, for planning before its data is in the manifest."""

    images: Annotated[int, Field(ge=1)]
    patients: Annotated[int, Field(ge=1)] | None = None


class PipelineFile(_Strict):
    name: str
    description: str = ""
    manifest: str = "data_manifest.yaml"  # relative to the pipeline file
    cache: str | None = None  # default: the manifest's cache
    results: str = "embedkit-results"
    report: str = "embedkit-report"
    datasets: tuple[str, ...] = Field(min_length=1)
    blocks: tuple[Block, ...] = Field(min_length=1)
    demo_data: DemoData | None = None
    compare: tuple[CompareStep, ...] | None = None  # the report's paired comparisons
    # Dataset sizes for the plan of a study whose data is not (yet) in the manifest (sizes of
    # datasets the pipeline does not name are not used: a dataset may be dropped and kept here).
    expected: dict[str, ExpectedSize] = Field(default_factory=dict)


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
    """Parse and validate a pipeline file (see :func:`parse_pipeline`)."""
    source = Path(path)
    return parse_pipeline(read_yaml(source, ConfigError), source)


def parse_pipeline(data: object, source: Path) -> Pipeline:
    """Validate already-parsed pipeline YAML, including every model name (registry, hub id or
    folder, without network), resolution, pooling, finetuning method and option; all problems
    are reported together in one :class:`ConfigError`, each with the file and key."""
    try:
        spec = PipelineFile.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{source}: {line.strip()}"
            for line in format_validation_error(exc, source="", root=PipelineFile).splitlines()
            if line.strip() and not line.strip().endswith("problems:")
        ]
        lines = [line.replace(f"{source}: : ", f"{source}: ") for line in lines]
        lines += [f"{source}: {p}" for p in _raw_model_problems(data)]
        raise ConfigError(_joined(lines)) from None
    problems = [f"{source}: {p}" for p in _name_problems(spec)]
    if problems:
        raise ConfigError(_joined(problems))
    return Pipeline(source.resolve(), spec)


def _raw_model_problems(data: object) -> list[str]:
    """Model names of a pipeline that failed schema validation, checked anyway, so one run
    reports every problem of the file (the schema does not check names)."""
    problems: list[str] = []
    blocks = data.get("blocks") if isinstance(data, dict) else None
    for i, block in enumerate(blocks if isinstance(blocks, list) else []):
        models = block.get("models") if isinstance(block, dict) else None
        for j, model in enumerate(models if isinstance(models, list) else []):
            if not isinstance(model, str):
                continue
            try:
                resolve(model)
            except EmbedkitError as exc:
                problems.append(f"blocks[{i}].models[{j}]: {exc}")
    return problems


def _joined(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


#: Stand-ins for a block's axes when a step's options are checked on their own.
_PLACEHOLDER = {"model": "-", "dataset": "-", "resolution": 1}


def _checked(
    problems: list[str], where: str, request_type: type[Any], values: dict[str, Any]
) -> Any:
    """The request ``values`` build (the block's axes stood in for), or None after recording
    why they do not."""
    try:
        return request_from_options(request_type, {**values, **_PLACEHOLDER}, where=where)
    except EmbedkitError as exc:
        problems.append(str(exc))
        return None


def _name_problems(spec: PipelineFile) -> list[str]:
    """``key: problem`` for every name and option value in ``spec`` that does not resolve."""
    from embedkit.finetune import get_method
    from embedkit.finetune.model import head_dim
    from embedkit.models import available_poolings

    problems: list[str] = []
    for i, block in enumerate(spec.blocks):
        at = f"blocks[{i}]"
        targets: dict[str, EncoderSpec | None] = {}
        for j, model in enumerate(block.models):
            try:
                resolved = resolve(model)
            except EmbedkitError as exc:
                problems.append(f"{at}.models[{j}]: {exc}")
                continue
            targets[model] = resolved if isinstance(resolved, EncoderSpec) else None
        extract = _checked(problems, f"{at}.extract", ExtractionRequest, step_values(block.extract))
        snap = extract.snap_resolution if extract is not None else True
        probes = [
            _checked(problems, f"{at}.probes[{k}]", ProbeRequest, step_values(probe))
            for k, probe in enumerate(block.probes)
        ]
        for model, target in targets.items():
            if target is None:
                continue
            for k, res in enumerate(block.resolutions):
                try:
                    validate_resolution(target, res, snap=snap)
                except EmbedkitError as exc:
                    problems.append(f"{at}.resolutions[{k}]: {exc}")
            offered = available_poolings(target)
            for k, probe in enumerate(probes):
                if probe is not None and probe.pooling is not None and probe.pooling not in offered:
                    problems.append(
                        f"{at}.probes[{k}].pooling: {probe.pooling!r} is not stored for "
                        f"{model}; choose one of {', '.join(offered)}"
                    )
        for k, step in enumerate(block.finetune):
            where = f"{at}.finetune[{k}]"
            values = step_values(step)
            try:
                get_method(values["method"])
            except EmbedkitError as exc:
                problems.append(f"{where}.method: {exc}")
                continue
            request = _finetune_checked(problems, where, step)
            pooling = None if request is None else request.pooling
            key = "pooling" if "pooling" in step.model_fields_set else "options.pooling"
            for model, spec_or_none in targets.items():
                if spec_or_none is not None and pooling is not None:
                    try:
                        head_dim(spec_or_none, pooling)
                    except EmbedkitError as exc:
                        problems.append(f"{where}.{key}: {model}: {exc}")
    for i, (_, problem) in enumerate(_pair_choices(spec)):
        if problem is not None:
            problems.append(f"compare[{i}]: {problem}")
    if spec.demo_data is not None and spec.demo_data.dataset not in spec.datasets:
        problems.append(
            f"demo_data.dataset: {spec.demo_data.dataset!r} is not one of the pipeline's "
            f"datasets {list(spec.datasets)}"
        )
    return problems


def _pair_choices(spec: PipelineFile) -> list[tuple[Any, str | None]]:
    """The report's :class:`~embedkit.report.PairChoice` per ``compare`` entry, or a problem.

    Model names are canonical registry names (as records hold them), so aliases work."""
    from embedkit.report.compare import PairChoice

    out: list[tuple[Any, str | None]] = []
    for step in spec.compare or ():
        if step.axis is None or isinstance(step.a, RunSelectorStep):
            out.append(_run_pair(step))
            continue
        if isinstance(step.b, RunSelectorStep):
            out.append((None, "Expected a value of the axis for b like a, got a run selector"))
            continue
        values = []
        for value in (step.a, step.b):
            if value is not None and step.axis == "model":
                try:
                    target = resolve(str(value))
                except EmbedkitError as exc:
                    out.append((None, str(exc)))
                    break
                value = target.name if isinstance(target, EncoderSpec) else value
            values.append(None if value is None else str(value))
        else:
            try:
                out.append((PairChoice(step.axis, values[0], values[1]), None))
            except ValueError as exc:
                out.append((None, str(exc)))
    return out


def _run_pair(step: CompareStep) -> tuple[Any, str | None]:
    """The report's :class:`~embedkit.report.RunPair` of a selector entry, or a problem."""
    from embedkit.report.compare import RunPair, RunSelector

    if step.axis is not None:
        return None, f"Expected no axis with run selectors a and b, got axis {step.axis!r}"
    if not isinstance(step.a, RunSelectorStep) or not isinstance(step.b, RunSelectorStep):
        return None, (
            f"Expected an axis, or two run selectors such as a: {{model: dinov3/vit7b16, "
            f"kind: linear}} and b: {{model: dinov3/vitb16, method: full}}, got a={step.a!r}, "
            f"b={step.b!r} instead"
        )
    sides = []
    for side in (step.a, step.b):
        if side.kind is not None and side.method is not None:
            return None, f"Expected kind or method in a run selector, got both: {side}"
        model = side.model
        if model is not None:
            try:
                target = resolve(model)
            except EmbedkitError as exc:
                return None, str(exc)
            model = target.name if isinstance(target, EncoderSpec) else model
        try:
            sides.append(
                RunSelector(model, side.kind or side.method, side.resolution, side.pooling)
            )
        except ValueError as exc:
            return None, str(exc)
    if sides[0] == sides[1]:
        return None, f"Expected two different run selectors, got {step.a} twice"
    return RunPair(sides[0], sides[1]), None


def _finetune_checked(problems: list[str], where: str, step: BaseModel) -> Any:
    """A finetune step's request (axes stood in for), or None after recording its problems.

    Its ``options:`` mapping takes the same keys as the step itself, each set in one place."""
    nested: dict[str, Any] = step.model_dump(include={"options"})["options"]
    allowed = [n for n in step_schema(FinetuneRequest).model_fields if n != "options"]
    found = [
        f"{where}.options.{k}: unknown option{did_you_mean(k, allowed) or '.'} "
        f"Options: {', '.join(allowed)}"
        for k in nested
        if k not in allowed
    ]
    found += [
        f"{where}.options.{k}: also set at the step's top level; set it in one place"
        for k in nested
        if k in step.model_fields_set
    ]
    if found:
        problems.extend(found)
        return None
    return _checked(
        problems, f"{where}.options" if nested else where, FinetuneRequest, step_values(step)
    )


@dataclass
class Step:
    action: Literal["extract", "probe", "finetune"]
    block: str
    dataset: str
    model: str
    resolution: int
    options: BaseModel  # ExtractOptions | ProbeStep | FinetuneStep
    status: str = "to run"
    estimate: str = ""
    error: str = ""

    @property
    def what(self) -> str:
        values = step_values(self.options)
        if self.action == "probe":
            return f"probe {values['kind']}"
        if self.action == "finetune":
            return f"finetune {values['method']}"
        return "extract"

    def request(self, resolution: int | None = None) -> Any:
        """The request this step runs (at ``resolution``, default the block's), built from
        its options by the same mapping as the command line's."""
        res = self.resolution if resolution is None else resolution
        axes = {"model": self.model, "dataset": self.dataset, "resolution": res}
        return request_from_options(
            REQUEST_TYPES[self.action], {**step_values(self.options), **axes}
        )


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
    missing: frozenset[str] = frozenset()  # datasets the manifest does not define
    tables: dict[str, DatasetTable] = field(default_factory=dict)  # loaded once per dataset
    # (block, dataset, model, resolution) -> digest of the entry that block's extract step
    # wrote or found: the block's probes read that entry, not another one of the same
    # dataset, model and resolution (e.g. a patch-token entry of another block).
    extracted: dict[tuple[str, str, str, int], str] = field(default_factory=dict)

    def table(self, dataset: str) -> DatasetTable:
        if dataset not in self.tables:
            self.tables[dataset] = self.manifest.dataset(dataset).load()
        return self.tables[dataset]


#: The GPU the plan's GPU-hours are stated for: name, dense bf16 FLOP/s, and the model FLOPs
#: utilisation assumed.
PLAN_GPU = ("H100", 800e12, 0.5)


def gpu_hours(flops: float) -> float:
    """``flops`` in GPU-hours on :data:`PLAN_GPU` at its stated MFU."""
    _, peak, mfu = PLAN_GPU
    return flops / (peak * mfu) / 3600


def _flops_text(flops: float) -> str:
    return f"{flops / 1e15:.3g} PFLOP (~{gpu_hours(flops):.2g} GPU-h)"


def _images(ctx: Context, dataset: str) -> int | None:
    """The dataset's image count: from the manifest when it defines (and can read) it, else the
    pipeline's ``expected`` size."""
    if dataset not in ctx.n_images:
        n: int | None = None
        if dataset not in ctx.missing:
            try:
                n = len(ctx.manifest.dataset(dataset).load())
            except EmbedkitError:
                n = None
        expected = ctx.pipeline.spec.expected.get(dataset)
        ctx.n_images[dataset] = n if n is not None or expected is None else expected.images
    return ctx.n_images[dataset]


def _forward_flops(ctx: Context, step: Step) -> tuple[int, float] | None:
    """(images, forward FLOPs per image) of a step (registry models with a known size)."""
    from embedkit.models.throughput import flops_per_image, shape_from_spec

    target = resolve(step.model)
    n = _images(ctx, step.dataset)
    if not isinstance(target, EncoderSpec) or n is None:
        return None
    snap = step.request().snap_resolution if step.action == "extract" else True
    side = validate_resolution(target, step.resolution, snap=snap)
    return n, flops_per_image(shape_from_spec(target), side)


def _compute(ctx: Context, step: Step) -> float | None:
    """The step's compute in FLOPs: extraction one forward pass per image; finetuning
    epochs x images x 3 x forward (forward + backward); probes ~0 (they read features)."""
    if step.action == "probe":
        return 0.0
    found = _forward_flops(ctx, step)
    if found is None:
        return None
    n, per_image = found
    if step.action == "extract":
        return n * per_image
    epochs: int = step.request(_effective_resolution(step, snap=True)).epochs
    return float(epochs * n * 3 * per_image)


def _estimate(ctx: Context, step: Step) -> str:
    """The step's compute in words (what :func:`_compute` counts)."""
    if step.action == "probe":
        return ""
    found = _forward_flops(ctx, step)
    total = _compute(ctx, step)
    if found is None or total is None:
        return "?"
    n, per_image = found
    if step.action == "extract":
        return f"{n:,} img x {per_image / 1e9:.3g} GFLOP = {_flops_text(total)}"
    epochs = total / (n * 3 * per_image)
    return f"{epochs:g} ep x {n:,} img x 3 x {per_image / 1e9:.3g} GFLOP = {_flops_text(total)}"


def _status(ctx: Context, step: Step) -> str:
    from embedkit.probes.run import find_probe_entry, probe_plan
    from embedkit.store import CacheRoot, digest_ids
    from embedkit.store.layout import PATCH_POOLING

    if step.dataset in ctx.missing:
        return "no data"

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
        snap = step.request().snap_resolution if step.action == "extract" else True
        res = validate_resolution(target, res, snap=snap)
    if "://" not in ctx.cache and not Path(ctx.cache).exists():
        return "to run"  # planning never creates the cache folder
    try:  # the current image list picks among snapshots (unknown while the data is missing)
        ids: tuple[str, ...] | None = tuple(ctx.table(step.dataset).ids)
    except (EmbedkitError, OSError):
        ids = None
    patches = _block_patches(ctx, step)  # the entry this block's extract step makes
    try:
        entry = find_probe_entry(CacheRoot.from_uri(ctx.cache), step.dataset, step.model, res,
                                 None, ids, patches)  # fmt: skip
    except CacheNotFoundError:
        return "to run"
    if ids is not None and entry.key.ids_digest != digest_ids(ids):
        return "to run"  # an older snapshot only: extraction copies its rows, computes the rest
    if (PATCH_POOLING in entry.poolings) != patches:
        return "to run"  # the block's entry (with or without patch tokens) is not there yet
    if step.action == "extract":
        return "cached"
    if step.action == "probe":
        request = step.request(res)
        *_, relpath = probe_plan(request, entry, ctx.table(step.dataset))
        return "done" if (ctx.results / relpath).with_suffix(".json").is_file() else "to run"
    return "to run"


def _block_patches(ctx: Context, step: Step) -> bool:
    """Whether the extract step of ``step``'s block stores patch tokens."""
    for block in ctx.pipeline.spec.blocks:
        if block.name == step.block:
            return bool(step_values(block.extract).get("patch_tokens"))
    return False


def _effective_resolution(step: Step, snap: bool) -> int:
    target = resolve(step.model)
    if isinstance(target, EncoderSpec):
        return validate_resolution(target, step.resolution, snap=snap)
    return step.resolution


def _run_extract(ctx: Context, step: Step) -> str:
    from embedkit.extract import extract
    from embedkit.progress import rich_progress

    result = extract(
        step.request(),
        manifest=ctx.manifest,
        cache=ctx.cache,
        progress=lambda total, desc: rich_progress(total, desc, console=ctx.console),
    )
    ctx.extracted[_entry_slot(step)] = result.entry.key.digest()
    return "cached" if result.reused else f"wrote {result.entry.key.short()}"


def _entry_slot(step: Step) -> tuple[str, str, str, int]:
    return (step.block, step.dataset, step.model, step.resolution)


def _run_probe(ctx: Context, step: Step) -> str:
    from embedkit.probes.run import run_probe
    from embedkit.progress import rich_progress

    request = step.request(_effective_resolution(step, snap=True))
    if request.entry is None and _entry_slot(step) in ctx.extracted:
        request = replace(request, entry=ctx.extracted[_entry_slot(step)])
    live = nullcontext() if ctx.local_cache else working(ctx.console, f"  probe {request.kind}")
    with live:
        outcome = run_probe(
            request,
            manifest=ctx.manifest,
            cache=ctx.cache,
            results=ctx.results,
            local_cache=ctx.local_cache,
            progress=lambda total, desc: rich_progress(
                total, f"  {desc}", console=ctx.console, unit="unit"
            ),
        )
    return "done (reused)" if outcome.reused else "done"


def _finetune_request(step: Step) -> Any:
    return step.request(_effective_resolution(step, snap=True))


def _run_finetune(ctx: Context, step: Step) -> str:
    from embedkit.finetune import run_finetune

    request = _finetune_request(step)

    def progress(log: Any) -> None:
        ctx.console.print(f"  {escape(epoch_line(log, request.epochs))}", highlight=False)

    with step_bar(ctx.console, f"  finetune {request.method}", unit="batches") as on_batch:
        outcome = run_finetune(
            request, manifest=ctx.manifest, results=ctx.results, on_epoch=progress,
            requested_resolution=step.resolution, on_batch=on_batch,
        )  # fmt: skip
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


def totals_table(ctx: Context, steps: list[Step]) -> Table:
    """Compute still to do (steps neither cached nor done), per block and for the study."""
    name, peak, mfu = PLAN_GPU
    table = Table(
        title=f"compute to do, in GPU-hours on an {name} ({peak / 1e12:.0f} TFLOP/s dense bf16) "
        f"at {mfu:.0%} MFU",
        title_justify="left",
    )
    for column in ("block", "steps", "extract", "finetune", "total", "unknown"):
        table.add_column(column)
    rows: dict[str, dict[str, float]] = {}
    for step in steps:
        if step.status in ("cached", "done"):
            continue
        row = rows.setdefault(step.block, {"steps": 0, "extract": 0.0, "finetune": 0.0, "?": 0})
        row["steps"] += 1
        flops = _compute(ctx, step)
        if flops is None:
            row["?"] += 1
        elif step.action != "probe":
            row[step.action] += flops
    study = {"steps": 0.0, "extract": 0.0, "finetune": 0.0, "?": 0.0}
    for block, row in rows.items():
        for k in study:
            study[k] += row[k]
        table.add_row(*_totals_row(block, row))
    table.add_row(*_totals_row("study", study), style="bold")
    return table


def _totals_row(label: str, row: dict[str, float]) -> list[str]:
    total = row["extract"] + row["finetune"]
    unknown = f"{row['?']:.0f} steps" if row["?"] else ""
    return [
        label,
        f"{row['steps']:.0f}",
        f"{gpu_hours(row['extract']):,.3g}",
        f"{gpu_hours(row['finetune']):,.3g}",
        f"{gpu_hours(total):,.3g}",
        unknown,
    ]


@dataclass
class RunSummary:
    steps: list[Step]
    report: Path | None

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]


def _named_datasets(
    datasets: Sequence[object], block_datasets: Sequence[Sequence[object] | None]
) -> list[tuple[str, str]]:
    """``(key, name)`` of every dataset a pipeline names (``datasets[0]``,
    ``blocks[1].datasets[0]``)."""
    named = [(f"datasets[{i}]", d) for i, d in enumerate(datasets)]
    for i, names in enumerate(block_datasets):
        named += [(f"blocks[{i}].datasets[{j}]", d) for j, d in enumerate(names or ())]
    return [(key, name) for key, name in named if isinstance(name, str)]


def _missing_datasets(pipe: Pipeline, man: Manifest) -> list[tuple[str, str]]:
    """``(key, name)`` of every dataset the pipeline names that the manifest does not define."""
    named = _named_datasets(pipe.spec.datasets, [b.datasets for b in pipe.spec.blocks])
    return [(key, name) for key, name in named if name not in man.datasets]


def _not_in_manifest(source: Path, missing: list[tuple[str, str]], man: Manifest) -> list[str]:
    return [
        f"{source}: {key}: dataset {name!r} is not in {man.path}"
        f"{did_you_mean(name, man.datasets) or '.'} To add it: {how_to_add(name, man)}"
        for key, name in missing
    ]


def how_to_add(name: str, man: Manifest) -> str:
    """How to define dataset ``name`` in the manifest (naming a commented entry only when the
    manifest file holds one)."""
    try:
        text = Path(man.path).read_text(encoding="utf-8")
    except OSError:
        text = ""
    commented = any(
        line.lstrip().startswith("#") and line.lstrip("# \t").startswith(f"{name}:")
        for line in text.splitlines()
    )
    if commented:
        return f"uncomment its entry in {man.path} and point it at your copy of the data"
    return (
        f"add an entry `{name}:` under `datasets:` in {man.path} (images folder, index CSV, "
        "labels, splits; see the `demo` entry), then check it with `embedkit manifest check "
        f"-m {man.path} -d {name}`"
    )


def _raw_dataset_problems(source: Path, manifest: str | os.PathLike[str] | None) -> list[str]:
    """Datasets an invalid pipeline file names that its manifest lacks (reported with its other
    problems); nothing when the file or its manifest cannot be read."""
    try:
        data = read_yaml(source, ConfigError)
        if not isinstance(data, dict):
            return []
        where = manifest if manifest is not None else data.get("manifest", "data_manifest.yaml")
        man = load_manifest(source.parent / str(where) if manifest is None else where)
    except EmbedkitError:
        return []
    blocks = [b.get("datasets") if isinstance(b, dict) else None for b in data.get("blocks") or []]
    named = _named_datasets(data.get("datasets") or [], blocks)
    return _not_in_manifest(source, [(k, n) for k, n in named if n not in man.datasets], man)


def _dataset_problems(pipe: Pipeline, man: Manifest) -> list[str]:
    return _not_in_manifest(pipe.path, _missing_datasets(pipe, man), man)


def _prepare_demo(pipe: Pipeline, man: Manifest, console: Console, dry_run: bool) -> None:
    """Generate the demo images the pipeline's ``demo_data`` asks for (not in a dry run)."""
    from embedkit.data.demo import DemoSpec
    from embedkit.manifest import check_dataset, render_report
    from embedkit.progress import rich_progress
    from embedkit.study.demodata import demo_folder, ensure_demo_data

    demo = pipe.spec.demo_data
    if demo is None:
        return
    config = man.dataset(demo.dataset)
    folder = demo_folder(config)
    spec = DemoSpec(n_patients=demo.patients, images_per_patient=demo.images_per_patient,
                    size=demo.size)  # fmt: skip
    if dry_run:
        state = "found" if (folder / "index.csv").is_file() else "to generate"
        console.print(f"demo data: {spec.n_images} synthetic images in {folder} ({state})")
        return
    console.print(f"demo data: {spec.n_images} synthetic radiographs ({spec.size} px) in {folder}")
    with rich_progress(spec.n_images, "generate", console=console) as advance:
        last = [0]

        def tick(done: int, _total: int) -> None:
            advance(done - last[0])
            last[0] = done

        ensure_demo_data(config, spec, progress=tick)
    console.print(render_report(check_dataset(config, check_files=True)))


def _results_problems(ctx: Context, datasets: list[str]) -> None:
    """Refuse a results folder holding records of another dataset under one of these names."""
    from embedkit.results.consistency import check_results_dataset

    for name in datasets:
        try:
            table = ctx.manifest.dataset(name).load()
        except EmbedkitError:
            continue  # not readable yet (a dry run before the data exists); its steps say so
        check_results_dataset(ctx.results, name, table)


def run_pipeline(
    path: str | os.PathLike[str] | Pipeline,
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
    try:
        pipe = path if isinstance(path, Pipeline) else load_pipeline(path)
    except ConfigError as exc:  # add the datasets the manifest lacks: one round of fixes
        missing = [] if dry_run else _raw_dataset_problems(Path(path), manifest)  # type: ignore[arg-type]
        if missing:
            raise ConfigError(_joined([str(exc), *missing])) from None
        raise
    spec = pipe.spec
    man = load_manifest(manifest if manifest is not None else pipe.resolve_path(spec.manifest))
    problems = _dataset_problems(pipe, man)
    if problems and not dry_run:
        raise ConfigError(_joined(problems))
    ctx = Context(
        pipe,
        man,
        cache or (pipe.resolve_path(spec.cache) if spec.cache else man.cache),
        Path(results) if results is not None else Path(pipe.resolve_path(spec.results)),
        con,
        local_cache=local_cache,
        missing=frozenset(name for _, name in _missing_datasets(pipe, man)),
    )
    _prepare_demo(pipe, man, con, dry_run)
    if spec.demo_data is not None:  # known before the images exist (a dry run)
        demo = spec.demo_data
        ctx.n_images[demo.dataset] = demo.patients * demo.images_per_patient
    _results_problems(ctx, sorted({d for b in spec.blocks for d in (b.datasets or spec.datasets)}))
    steps = expand(pipe)
    for step in steps:
        step.status = _status(ctx, step)
        if step.status not in ("cached", "done"):
            step.estimate = _estimate(ctx, step)
    con.print(plan_table(steps, f"pipeline {spec.name}: plan ({len(steps)} steps)"))
    con.print(totals_table(ctx, steps))
    for name in sorted(ctx.missing):
        size = spec.expected.get(name)
        planned = (
            f" (planned with the expected {size.images:,} images)"
            if size
            else " (no size under `expected:` in the pipeline"
            f"{did_you_mean(name, spec.expected) or ''}: its compute is unknown)"
        )
        con.print(
            f"[yellow]{escape(name)}[/yellow]: not in the manifest{planned}; how to add it: "
            f"{escape(how_to_add(name, man))}"
        )
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
    failed = [s for s in steps if s.status == "failed"]
    try:
        from embedkit.report import build_report

        pairs = [c for c, _ in _pair_choices(spec)] if spec.compare is not None else None
        built = build_report(ctx.results, report_dir, pairs=pairs).html
        if failed:
            con.print(
                f"report (of the records in {ctx.results}; it holds no result of the "
                f"{len(failed)} failed steps): {built}"
            )
        else:
            con.print(f"report: {built}")
    except EmbedkitError as exc:
        con.print(f"[yellow]no report[/yellow]: {escape(str(exc))}")
    con.print(plan_table(steps, f"pipeline {spec.name}: result"))
    summary = RunSummary(steps, built)
    if summary.failed:
        con.print(failure_summary(summary))
    return summary


def failure_summary(summary: RunSummary) -> str:
    """``N of M steps failed`` with each failed step and its first error line (rich markup)."""
    lines = [f"[red]{len(summary.failed)} of {len(summary.steps)} steps failed[/red]:"]
    for step in summary.failed:
        lines.append(
            f"  {escape(step.what)} · {escape(step.dataset)} · {escape(step.model)} · "
            f"{step.resolution}px: {escape(step.error)}"
        )
    lines.append("Fix the cause and rerun the same command: finished steps are kept.")
    return "\n".join(lines)
