"""`embedkit probe`: fit a probe on cached features and write a self-describing result record.

The features come from a complete cache entry (found by dataset, model and resolution, or named
by digest), joined with the manifest's labels and splits by image id. Nothing is re-extracted.
The probe kind (``linear``, ``knn``, ``fewshot``, ``sgd``, ...) is looked up in the kind
registry (:mod:`embedkit.probes.registry`, kinds in :mod:`embedkit.probes.kinds`): it gives the
default pooling, the hyper-parameters of the record identity, and the fit-and-score step.

Test metrics of a kind that returns test scores: per-label AUROC and AP, sensitivity /
specificity at the Youden threshold chosen on the validation scores (``operating_point`` on the
record), macro AUROC (labels without both classes in test are reported and left out), each with
a 95% percentile bootstrap CI from ``n_boot`` resamples that keep the test set's label set. The
bootstrap indices depend only on the test targets and the seed, so runs compared on the same
test set share them, as paired tests require. A label with one class among its train entries
is reported in the notes, not fitted (its scores are NaN) and left out of the macro average;
the other labels go on. Rules and their simulation check: ``docs/statistics.md``. A kind
whose metrics form a curve (few-shot) computes them itself and declares the curve on its
record (``ResultRecord.curve``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from embedkit.atomic import atomic_write
from embedkit.errors import CacheNotFoundError, ConfigError, EmbedkitError, ProbeInputError
from embedkit.eval import evaluate_scores
from embedkit.manifest import DatasetTable, Manifest, load_manifest
from embedkit.models import EncoderSpec, resolve
from embedkit.probes import PROBE_KINDS
from embedkit.probes.features import SplitFeatures, split_features
from embedkit.probes.registry import (
    KindResult,
    PatchData,
    PatchSplit,
    ProbeData,
    get_kind,
    kind_inputs,
)
from embedkit.probes.request import ProbeRequest
from embedkit.progress import progress_scope
from embedkit.report.tables import headline
from embedkit.results import ResultRecord, ResultsDir, ScoreTable, record_id
from embedkit.results.consistency import check_results_dataset, segmentation_reference
from embedkit.store import (
    CacheRoot,
    FeatureEntry,
    digest_ids,
    find_entry,
    list_entries,
    open_local_copy,
)
from embedkit.store.layout import PATCH_POOLING
from embedkit.store.readcache import ProgressFactory
from embedkit.versions import package_versions

DEFAULT_RESULTS = "embedkit-results"


@dataclass
class ProbeOutcome:
    record: ResultRecord
    path: Path
    reused: bool
    notes: list[str] = field(default_factory=list)


def _model_name(model: str) -> str:
    target = resolve(model)
    return target.name if isinstance(target, EncoderSpec) else target.hub_id


def find_probe_entry(
    root: CacheRoot,
    dataset: str,
    model: str,
    resolution: int,
    query: str | None = None,
    ids: Sequence[str] | None = None,
    patches: bool | None = None,
) -> FeatureEntry:
    """The complete entry of (dataset, model, resolution) to read, or the one named by
    ``query``; see :func:`select_probe_entry`."""
    return select_probe_entry(root, dataset, model, resolution, query, ids, patches)[0]


def select_probe_entry(
    root: CacheRoot,
    dataset: str,
    model: str,
    resolution: int,
    query: str | None = None,
    ids: Sequence[str] | None = None,
    patches: bool | None = None,
) -> tuple[FeatureEntry, str | None]:
    """The complete entry of (dataset, model, resolution), or the one named by ``query``, and
    a note saying why it was chosen when several match.

    Of several complete entries, the one whose image list is ``ids`` (the current manifest's
    dataset) is the current one and is used; older snapshots (superseded, see
    ``embedkit cache ls``) are left alone. Without ``ids``, or when none or several hold that
    list, the choice is refused with the candidates listed.

    ``patches``: True keeps only entries storing patch tokens (what a kind on the patch grid
    reads); False prefers, of otherwise equal candidates, an entry without them (its pooled
    features are the same; an entry made with ``--patch-tokens`` for segmentation then does not
    make a linear probe ambiguous); None is False for ties and else no preference.
    """
    if query is not None:
        return find_entry(root, query, allow_partial=False), None
    name = _model_name(model)
    matches = [
        s
        for s in list_entries(root)
        if s.dataset == dataset and s.model == name and s.resolution == resolution
    ]
    complete = [s for s in matches if s.complete]
    command = f"embedkit extract --model {model} --dataset {dataset} --resolution {resolution}"
    if not complete:
        partial = f" ({len(matches)} incomplete: rerun `{command}` to finish)" if matches else ""
        raise CacheNotFoundError(
            f"no complete cache entry for {dataset} / {name} / {resolution}px in {root.uri}"
            f"{partial}. Extract it first: {command}"
        )
    if patches:
        complete = [s for s in complete if PATCH_POOLING in s.poolings]
        if not complete:
            raise CacheNotFoundError(
                f"no complete cache entry for {dataset} / {name} / {resolution}px in "
                f"{root.uri} stores patch tokens; extract them: {command} --patch-tokens"
            )
    if len(complete) > 1:
        current = [] if ids is None else [s for s in complete if s.ids_digest == digest_ids(ids)]
        plain = [s for s in current if PATCH_POOLING not in s.poolings]
        if len(current) > 1 and len(plain) == 1 and not patches:
            current = plain  # the same pooled features, without the patch grid to skip over
        if len(current) == 1:
            others = ", ".join(s.digest[:12] for s in complete if s is not current[0])
            note = (
                f"{len(complete)} complete entries match {dataset} / {name} / {resolution}px; "
                f"used {current[0].digest[:12]}, whose image list is the current manifest's "
                f"({current[0].n_images} images; not used: {others}, older snapshots: "
                "`embedkit cache gc --superseded` removes them)"
            )
            return find_entry(root, current[0].relpath, allow_partial=False), note
        listing = ", ".join(
            f"{s.digest[:12]} ({s.n_images} images, {s.storage_dtype}"
            + (", superseded" if s.superseded_by else "")
            + ")"
            for s in complete
        )
        why = (
            "none of them holds the current manifest's image list"
            if ids is not None and not current
            else "they differ in more than their image list"
        )
        raise CacheNotFoundError(
            f"{len(complete)} complete entries match {dataset} / {name} / {resolution}px and "
            f"{why}: {listing}; choose one with --entry DIGEST (see `embedkit cache info "
            f"DIGEST`), or extract the current one with `{command}`"
        )
    return find_entry(root, complete[0].relpath, allow_partial=False), None


def probe_plan(
    request: ProbeRequest, entry: FeatureEntry, table: DatasetTable
) -> tuple[str, dict[str, Any], str, str]:
    """(pooling, hyper-parameters, record id, record relpath) of ``request`` on ``entry`` with
    the labels and splits of ``table``.

    The record id covers the entry digest, the kind, every hyper-parameter, the seed, and the
    digest of the exact ids, targets and masks of every split (``table.splits_digest``), so an
    identical run finds its record without computing anything, and a changed label, split,
    filter or uncertainty policy is a new run, never the old record.
    """
    kind = get_kind(request.kind)
    if kind_inputs(kind) == "features" and not table.labels.names:
        raise ConfigError(
            f"dataset {table.name!r} has no image-level labels (its manifest entry names only "
            f"`classes`, for segmentation): --kind {request.kind} needs `labels`; use "
            "--kind segmentation, or add a labels block to the manifest entry"
        )
    pooling = request.pooling or kind.default_pooling(entry.poolings)
    params: dict[str, Any] = {"pooling": pooling, "n_boot": request.n_boot, **kind.params(request)}
    # volume-level labels from pooled slice features (a patch-input kind scores slices itself)
    if table.volumes is not None and kind_inputs(kind) == "features":
        params["volume_pooling"] = request.volume_pooling
    identity = {
        "entry": entry.key.digest(),
        "data": table.splits_digest,
        "kind": request.kind,
        "params": params,
    }
    rid = record_id({**identity, "seed": request.seed})
    model = entry.key.model.replace("/", "--")
    relpath = f"{request.dataset}/{model}/{entry.key.resolution}px/{request.kind}-{rid}"
    return pooling, params, rid, relpath


def _labels_to_fit(
    train: SplitFeatures, labels: list[str], task: str
) -> tuple[list[int], list[str]]:
    """Columns to fit, and a note for each multi-label column whose valid train entries hold
    one class only: it is left out of the fit (its scores are NaN, and it is left out of the
    macro average like a test label without both classes) and the probe goes on."""
    if task != "multilabel":
        return list(range(len(labels))), []
    keep, notes = [], []
    for j, name in enumerate(labels):
        y = train.y[train.mask[:, j], j]
        n_pos = int((y == 1).sum())
        if n_pos == 0 or n_pos == y.size:
            notes.append(
                f"'{name}' has {n_pos} positives and {y.size - n_pos} negatives in train: "
                "not fitted, left out of the macro average"
            )
        else:
            keep.append(j)
    if not keep:
        raise EmbedkitError(
            f"no label has both classes in the train split: nothing to fit ({'; '.join(notes)})"
        )
    return keep, notes


def _columns(part: SplitFeatures, keep: list[int]) -> SplitFeatures:
    if part.y.ndim == 1 or len(keep) == part.y.shape[1]:
        return part
    return replace(part, y=part.y[:, keep], mask=part.mask[:, keep])


def _expand(scores: np.ndarray, keep: list[int], n_labels: int) -> np.ndarray:
    """Scores of the fitted columns put back in place, NaN for the columns left out."""
    if scores.ndim == 1 or len(keep) == n_labels:
        return scores
    out = np.full((scores.shape[0], n_labels), np.nan)
    out[:, keep] = scores
    return out


def _requested_resolution(entry: FeatureEntry) -> int:
    """The resolution asked for at extraction (the nominal tier), else the stored one."""
    provenance = entry.attrs.get("provenance") or {}
    value = provenance.get("requested_resolution")
    return int(value) if isinstance(value, int) else entry.key.resolution


def run_probe(
    request: ProbeRequest,
    *,
    manifest: Manifest | str | Path | None = None,
    cache: str | Path | None = None,
    results: str | Path = DEFAULT_RESULTS,
    local_cache: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> ProbeOutcome:
    """Run one probe from the cache and write (or find) its result record.

    With ``local_cache`` (a local directory) the features are read from a local copy of the
    entry, fetched and verified on first use and reused while it matches the cache's entry
    (:func:`embedkit.store.open_local_copy`; ``progress`` shows that fetch).
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    root = CacheRoot.from_uri(str(cache) if cache is not None else man.cache)
    table = man.dataset(request.dataset).load()
    needs_patches = kind_inputs(get_kind(request.kind)) == "patches"
    entry, chosen = select_probe_entry(
        root, request.dataset, request.model, request.resolution, request.entry, table.ids,
        patches=needs_patches,
    )  # fmt: skip
    pooling, params, rid, relpath = probe_plan(request, entry, table)
    out = ResultsDir(results)
    # A results folder holding records of another dataset under this name is refused.
    segmentation = kind_inputs(get_kind(request.kind)) == "patches"
    expected = segmentation_reference(table) if segmentation else None
    check_results_dataset(results, request.dataset, table, expected=expected)
    found = out.find(relpath)
    if found is not None and not request.overwrite:
        return ProbeOutcome(found, (out.root / relpath).with_suffix(".json"), True)

    started = time.perf_counter()
    source = entry  # the record names the cache's entry, not the local copy
    if local_cache is not None:
        entry = open_local_copy(entry, local_cache, progress=progress).entry
    kind = get_kind(request.kind)
    fit = _FITS[kind_inputs(kind)](request, entry, table, pooling, progress)
    result, notes = fit.result, fit.notes
    if chosen is not None:  # which of several entries was read, and why
        notes.insert(0, chosen)
    record = ResultRecord(
        record_id=rid,
        kind=request.kind,
        dataset=request.dataset,
        model=entry.key.model,
        resolution=entry.key.resolution,
        pooling=pooling,
        task=fit.task,
        labels=fit.labels,
        entry={
            "digest": source.key.digest(),
            "relpath": source.relpath,
            "cache": root.uri,
            "key": source.key.to_dict(),
        },
        params=params,
        selected=result.selected,
        seed=request.seed,
        metrics=fit.metrics,
        per_label=fit.per_label,
        n=fit.n,
        versions=package_versions("scikit-learn"),
        elapsed_s=round(time.perf_counter() - started, 3),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
        extra=result.extra,
        curve=kind.curve,
        operating_point=fit.operating_point,
        requested_resolution=_requested_resolution(source),
    )
    for name, arrays in result.arrays.items():  # files beside the record, named in its extra
        npz = (out.root / relpath).parent / f"{Path(relpath).name}.{name}.npz"
        _save_npz(npz, arrays)
        record.extra[name] = npz.name
    path = out.write(record, fit.table, overwrite=request.overwrite)
    return ProbeOutcome(record, path, False, notes)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]

    atomic_write(path, write, suffix=".npz")


@dataclass
class _Fit:
    """A kind's result and what the record takes from its inputs."""

    result: KindResult
    task: str
    labels: list[str]
    n: dict[str, int]
    metrics: dict[str, Any]
    per_label: list[dict[str, Any]]
    table: ScoreTable | None
    notes: list[str]
    operating_point: str | None = None


def _fit_features(
    request: ProbeRequest,
    entry: FeatureEntry,
    table: DatasetTable,
    pooling: str,
    progress: ProgressFactory | None,
) -> _Fit:
    """A kind on pooled features joined with the image labels (``inputs = "features"``)."""
    # A volume dataset pools its slice features per volume (params, so the record id, say how).
    by_volume = {"volume_pooling": request.volume_pooling} if table.volumes is not None else {}
    parts = {
        s: split_features(entry, table, s, pooling, **by_volume) for s in ("train", "val", "test")
    }
    train, val, test = parts["train"], parts["val"], parts["test"]
    for name in ("train", "test"):
        if len(parts[name].ids) == 0:
            raise EmbedkitError(
                f"the {name} split of {request.dataset} is empty; check the manifest's splits"
            )
    labels = list(table.labels.names)
    task = table.labels.kind
    notes = [
        f"{p.n_skipped} unreadable {s} images left out" for s, p in parts.items() if p.n_skipped
    ]
    keep, dropped = _labels_to_fit(train, labels, task)
    notes.extend(dropped)
    data = ProbeData(
        _columns(train, keep), _columns(val, keep), _columns(test, keep),
        tuple(labels[j] for j in keep), task, request.dataset,
    )  # fmt: skip
    with torch.inference_mode(False), progress_scope(progress):
        result = get_kind(request.kind).fit_score(request, data)
    notes.extend(result.notes)
    scores_out: ScoreTable | None = None
    operating_point: str | None = None
    if result.scores is not None:
        scores = _expand(result.scores, keep, len(labels))
        val_part = None
        if result.val_scores is not None and len(val.ids):
            val_part = (val.y, val.mask, _expand(result.val_scores, keep, len(labels)))
        with progress_scope(progress):  # bootstrap bars on large test sets
            metrics, per_label, more, operating_point = evaluate_scores(
                test.y, test.mask, labels, scores, request.n_boot, request.seed, val=val_part
            )
        notes.extend(more)
        scores_out = ScoreTable(test.ids, tuple(labels), test.y, test.mask, scores)
    else:
        metrics, per_label = dict(result.metrics or {}), []
    n = {s: len(p.ids) for s, p in parts.items()}
    return _Fit(result, task, labels, n, metrics, per_label, scores_out, notes, operating_point)


def _fit_patches(
    request: ProbeRequest,
    entry: FeatureEntry,
    table: DatasetTable,
    pooling: str,
    progress: ProgressFactory | None,
) -> _Fit:
    """A kind on the patch-token grid joined with label maps (``inputs = "patches"``); it
    computes its own metrics, per-label rows and per-case score table."""
    data = patch_data(request.dataset, entry, table, pooling, progress)
    for part in (data.train, data.test):
        if not part.ids:
            raise EmbedkitError(
                f"the {part.split} split of {request.dataset} is empty; check the manifest's splits"
            )
    with torch.inference_mode(False):
        result = get_kind(request.kind).fit_score(request, data)
    parts = (data.train, data.val, data.test)
    notes = [f"{p.n_skipped} unreadable {p.split} images left out" for p in parts if p.n_skipped]
    return _Fit(
        result,
        result.task or table.labels.kind,
        list(result.labels if result.labels is not None else table.labels.names),
        {p.split: len(p.ids) for p in parts},
        dict(result.metrics or {}),
        list(result.per_label or []),
        result.table,
        notes + result.notes,
    )


def patch_data(
    dataset: str,
    entry: FeatureEntry,
    table: DatasetTable,
    pooling: str,
    progress: ProgressFactory | None = None,
) -> PatchData:
    """The splits of ``table`` (a dataset with ``classes:`` and a ``mask`` column) on the valid
    rows of ``entry``, for kinds that read patch tokens and label maps."""
    if table.classes is None or table.masks is None:
        raise ProbeInputError(
            f"dataset {dataset!r} has no label maps: add `classes:` (background first) to its "
            "manifest entry and a `mask` column of label-map paths to its index"
        )
    valid = entry.valid_mask()

    def split(name: str) -> PatchSplit:
        rows = table.indices(name)
        ok = valid[entry.read_rows([table.ids[r] for r in rows])] if len(rows) else rows
        kept = rows[np.flatnonzero(ok)] if len(rows) else rows

        def pick(values: Any) -> Any:
            return None if values is None else tuple(values[r] for r in kept)

        return PatchSplit(
            name, pick(table.ids), pick(table.paths), pick(table.masks), pick(table.patients),
            len(rows) - len(kept), pick(table.volumes), pick(table.slices),
            pick(table.volume_slices),
        )  # fmt: skip

    resize = str(json.loads(entry.key.preprocessing).get("resize", "squash"))
    return PatchData(
        split("train"), split("val"), split("test"), table.classes, entry, pooling, resize,
        dataset, progress,
    )  # fmt: skip


#: How the runner loads and fits a kind, by what the kind declares it reads.
_FITS = {"features": _fit_features, "patches": _fit_patches}


def _fmt(metric: Any) -> str:
    if isinstance(metric, dict) and "point" in metric:
        return f"{metric['point']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"
    if isinstance(metric, dict) and "mean" in metric:
        return f"{metric['mean']:.3f} ± {metric['std']:.3f}"
    return "-" if metric is None else f"{metric:.3f}"


def render_record(record: ResultRecord) -> Table:
    """Per-label table (or the curve's table) of one record, with the headline in the title."""
    chosen = ", ".join(f"{k}={v:g}" for k, v in record.selected.items())
    title = (
        f"{record.kind} · {record.dataset} · {record.model} · {record.resolution}px · "
        f"{record.pooling}" + (f" · {chosen}" if chosen else "")
    )
    table = Table(title=title, title_justify="left")
    if record.curve is not None:
        table.add_column(record.curve)
        names = sorted({m for v in record.metrics.values() for m in v})
        for name in names:
            table.add_column(f"{name} (mean ± std over draws)")
        for point, values in record.metrics.items():
            table.add_row(point, *(_fmt(values.get(n)) for n in names))
        return table
    if record.per_label and "auroc" not in record.per_label[0]:  # e.g. segmentation: Dice, IoU
        names = [k for k, v in record.per_label[0].items() if isinstance(v, dict) and "point" in v]
        table.add_column("label")
        for name in names:
            table.add_column(f"{name} [95% CI]")
        for row in record.per_label:
            table.add_row(row["label"], *(_fmt(row[name]) for name in names))
        table.add_section()
        metrics = record.metrics
        table.add_row("[bold]mean[/bold]", *(_fmt(metrics.get(name)) for name in names))
        return table
    if record.per_label:
        for column in ("label", "AUROC [95% CI]", "AP", "sens", "spec", "pos/neg"):
            table.add_column(column)
        for row in record.per_label:
            auc = None if row["auroc"] is None else {
                "point": row["auroc"], "low": row["low"], "high": row["high"]
            }  # fmt: skip
            table.add_row(
                row["label"], _fmt(auc), _fmt(row["ap"]), _fmt(row["sensitivity"]),
                _fmt(row["specificity"]), f"{row['n_pos']}/{row['n_neg']}",
            )  # fmt: skip
        table.add_section()
        for name, value in record.metrics.items():
            table.add_row(f"[bold]{name}[/bold]", _fmt(value), "", "", "", "")
    else:
        table.add_column("metric")
        table.add_column("value [95% CI]")
        for name, value in record.metrics.items():
            table.add_row(name, _fmt(value))
    return table


def comparison_table(records: list[ResultRecord]) -> Table:
    """Headline metric of several records side by side (e.g. resolutions x probe kinds)."""
    table = Table(title="probe comparison (test split)", title_justify="left")
    for column in ("dataset", "model", "res", "probe", "pooling", "chosen", "headline"):
        table.add_column(column)
    for r in records:
        name, point, low, high = headline(r)
        value = _fmt(
            {"point": point, "low": low, "high": high}
            if low is not None and high is not None
            else point
        )
        chosen = ", ".join(f"{k}={v:g}" for k, v in r.selected.items())
        table.add_row(
            r.dataset, r.model, str(r.resolution), r.kind, r.pooling, chosen, f"{name} {value}"
        )
    return table


__all__ = [
    "PROBE_KINDS",
    "ProbeOutcome",
    "ProbeRequest",
    "comparison_table",
    "find_probe_entry",
    "patch_data",
    "probe_plan",
    "render_record",
    "run_probe",
    "select_probe_entry",
]
