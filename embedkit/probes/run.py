"""`embedkit probe`: fit a probe on cached features and write a self-describing result record.

The features come from a complete cache entry (found by dataset, model and resolution, or named
by digest), joined with the manifest's labels and splits by image id. Nothing is re-extracted.

- ``linear``: L2 logistic regression over the DINOv2 C grid, C chosen on the validation split
  (one C for all labels, by macro AUROC), refit on train + val, evaluated on test;
- ``knn``: cosine kNN with the DINO weighted vote, k chosen on validation from {10, 20, 100, 200};
- ``fewshot``: n = 1, 2, 4, 8, 16 training examples per class / label, 5 draws each, sampled by
  patient from the train split only; mean, std and 95% CI over draws.

Test metrics: per-label AUROC and AP, sensitivity / specificity at the Youden threshold, macro
AUROC (labels without both classes are reported and left out), each with a 95% percentile
bootstrap CI from ``n_boot`` resamples. The bootstrap indices depend only on the test-set size
and the seed, so runs compared on the same test set share them, as paired tests require.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from embedkit.errors import CacheNotFoundError, EmbedkitError
from embedkit.eval import evaluate_scores, macro_auroc, ovr_macro_auroc
from embedkit.manifest import Manifest, load_manifest
from embedkit.models import EncoderSpec, resolve
from embedkit.probes import FewShotSamplingError, KNNProbe, LogisticProbe, run_fewshot
from embedkit.probes.features import SplitFeatures, split_features
from embedkit.probes.request import PROBE_KINDS, ProbeRequest
from embedkit.results import ResultRecord, ResultsDir, ScoreTable, record_id
from embedkit.store import CacheRoot, FeatureEntry, find_entry, list_entries, open_local_copy
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
    root: CacheRoot, dataset: str, model: str, resolution: int, query: str | None = None
) -> FeatureEntry:
    """The one complete entry of (dataset, model, resolution), or the one named by ``query``."""
    if query is not None:
        return find_entry(root, query, allow_partial=False)
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
    if len(complete) > 1:
        listing = ", ".join(f"{s.digest[:12]} ({s.storage_dtype})" for s in complete)
        raise CacheNotFoundError(
            f"{len(complete)} complete entries match {dataset} / {name} / {resolution}px: "
            f"{listing}; choose one with --entry DIGEST (see `embedkit cache info DIGEST`)"
        )
    return find_entry(root, complete[0].relpath, allow_partial=False)


def _default_pooling(kind: str, entry: FeatureEntry) -> str:
    stored = set(entry.poolings)
    if "cls" in stored:
        return "cls" if kind == "knn" else "cls+mean"
    return "pooled" if kind == "knn" else "pooled+mean"


def _fit_linear(
    req: ProbeRequest, train: SplitFeatures, val: SplitFeatures, test: SplitFeatures
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    probe = LogisticProbe(seed=req.seed, max_iter=req.max_iter)
    if len(val.ids):
        probe.fit_select(train.X, train.y, train.mask, val.X, val.y, val.mask)
    else:  # no validation split: hold out 10% of train by patient (DINOv2 protocol)
        probe.fit(train.X, train.y, train.mask, groups=np.asarray(train.patients))
    path = probe.path_
    extra = {
        "val_score_per_C": dict(zip(map(float, path.Cs), map(float, path.score), strict=True)),
        "val_metric": path.metric,
        "converged": bool(np.all(probe.converged_)),
    }
    return probe.predict_proba(test.X), {"C": float(probe.C_)}, extra


def _fit_knn(
    req: ProbeRequest, train: SplitFeatures, val: SplitFeatures, test: SplitFeatures
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    ks = tuple(k for k in req.ks if k <= len(train.ids)) or (len(train.ids),)
    probe = KNNProbe(k=ks).fit(train.X, train.y, train.mask)
    if len(val.ids):
        val_scores = probe.predict_proba(val.X)
        by_k = {k: _point(val, s) for k, s in val_scores.items()}
        finite = {k: v for k, v in by_k.items() if np.isfinite(v)}
        best = max(finite, key=lambda k: (finite[k], -k)) if finite else 20
    else:
        by_k, best = {}, min(ks, key=lambda k: abs(k - 20))
    scores = probe.predict_proba(test.X, k=best)
    return scores, {"k": int(best)}, {"val_score_per_k": {int(k): v for k, v in by_k.items()}}


def _point(part: SplitFeatures, scores: np.ndarray) -> float:
    """The selection metric on validation: macro AUROC (one-vs-rest for multi-class)."""
    if part.y.ndim == 1:
        return float(ovr_macro_auroc(part.y, scores, part.mask))
    return float(macro_auroc(part.y, part.mask, scores))


def probe_plan(request: ProbeRequest, entry: FeatureEntry) -> tuple[str, dict[str, Any], str, str]:
    """(pooling, hyper-parameters, record id, record relpath) of ``request`` on ``entry``.

    The record id covers the entry digest, the kind, every hyper-parameter and the seed, so an
    identical run finds its record without computing anything.
    """
    pooling = request.pooling or _default_pooling(request.kind, entry)
    params: dict[str, Any] = {"pooling": pooling, "n_boot": request.n_boot}
    if request.kind == "linear":
        params.update(
            Cs="10^linspace(-6, 5, 45)", standardize=True, select="joint", max_iter=request.max_iter
        )
    elif request.kind == "knn":
        params.update(ks=list(request.ks), temperature=0.07)
    else:
        params.update(shots=list(request.shots), draws=request.draws, classifier="linear", C=1.0)
    identity = {"entry": entry.key.digest(), "kind": request.kind, "params": params}
    rid = record_id({**identity, "seed": request.seed})
    model = entry.key.model.replace("/", "--")
    relpath = f"{request.dataset}/{model}/{entry.key.resolution}px/{request.kind}-{rid}"
    return pooling, params, rid, relpath


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
    entry = find_probe_entry(
        root, request.dataset, request.model, request.resolution, request.entry
    )
    pooling, params, rid, relpath = probe_plan(request, entry)
    out = ResultsDir(results)
    found = out.find(relpath)
    if found is not None and not request.overwrite:
        return ProbeOutcome(found, (out.root / relpath).with_suffix(".json"), True)

    started = time.perf_counter()
    source = entry  # the record names the cache's entry, not the local copy
    if local_cache is not None:
        entry = open_local_copy(entry, local_cache, progress=progress).entry
    table = man.dataset(request.dataset).load()
    parts = {s: split_features(entry, table, s, pooling) for s in ("train", "val", "test")}
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
    scores_out: ScoreTable | None = None
    extra: dict[str, Any] = {}
    if request.kind == "fewshot":
        metrics: dict[str, Any] = {}
        extra["runs"] = {}
        for n_shots in request.shots:
            try:
                fs = run_fewshot(
                    train.X, train.y, train.mask, np.asarray(train.patients),
                    test.X, test.y, test.mask, shots=(n_shots,),
                    seeds=range(request.seed, request.seed + request.draws), task=task,
                )  # fmt: skip
            except FewShotSamplingError as exc:
                named = re.sub(r"label (\d+)", lambda m: f"'{labels[int(m[1])]}'", str(exc))
                notes.append(f"{n_shots}-shot skipped: {named}")
                continue
            metrics[f"{n_shots}-shot"] = fs.summary[n_shots]
            extra["runs"].update({f"{n}-shot/seed{s}": v for (n, s), v in fs.runs.items()})
        if not metrics:
            raise EmbedkitError(
                f"few-shot: no shot count in {list(request.shots)} can be drawn from the train "
                f"split of {request.dataset}: " + "; ".join(notes)
            )
        per_label: list[dict[str, Any]] = []
        selected: dict[str, Any] = {}
    else:
        fit = _fit_linear if request.kind == "linear" else _fit_knn
        with torch.inference_mode(False):
            scores, selected, extra = fit(request, train, val, test)
        metrics, per_label, more = evaluate_scores(
            test.y, test.mask, labels, scores, request.n_boot, request.seed
        )
        notes.extend(more)
        scores_out = ScoreTable(test.ids, tuple(labels), test.y, test.mask, scores)
    record = ResultRecord(
        record_id=rid,
        kind=request.kind,
        dataset=request.dataset,
        model=entry.key.model,
        resolution=entry.key.resolution,
        pooling=pooling,
        task=task,
        labels=labels,
        entry={
            "digest": source.key.digest(),
            "relpath": source.relpath,
            "cache": root.uri,
            "key": source.key.to_dict(),
        },
        params=params,
        selected=selected,
        seed=request.seed,
        metrics=metrics,
        per_label=per_label,
        n={s: len(p.ids) for s, p in parts.items()},
        versions=package_versions("scikit-learn"),
        elapsed_s=round(time.perf_counter() - started, 3),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
        extra=extra,
    )
    path = out.write(record, scores_out, overwrite=request.overwrite)
    return ProbeOutcome(record, path, False, notes)


def _fmt(metric: Any) -> str:
    if isinstance(metric, dict) and "point" in metric:
        return f"{metric['point']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"
    if isinstance(metric, dict) and "mean" in metric:
        return f"{metric['mean']:.3f} ± {metric['std']:.3f}"
    return "-" if metric is None else f"{metric:.3f}"


def render_record(record: ResultRecord) -> Table:
    """Per-label table (or few-shot table) of one record, with the headline in the title."""
    chosen = ", ".join(f"{k}={v:g}" for k, v in record.selected.items())
    title = (
        f"{record.kind} · {record.dataset} · {record.model} · {record.resolution}px · "
        f"{record.pooling}" + (f" · {chosen}" if chosen else "")
    )
    table = Table(title=title, title_justify="left")
    if record.kind == "fewshot":
        table.add_column("shots")
        names = sorted({m for v in record.metrics.values() for m in v})
        for name in names:
            table.add_column(f"{name} (mean ± std over draws)")
        for shots, values in record.metrics.items():
            table.add_row(shots, *(_fmt(values.get(n)) for n in names))
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
        if r.kind == "fewshot":
            most = max(r.metrics, key=lambda s: int(s.split("-")[0]))
            key = "macro_auroc" if "macro_auroc" in r.metrics[most] else "ovr_macro_auroc"
            headline = f"{most} {key} {_fmt(r.metrics[most][key])}"
        else:
            key = "macro_auroc" if "macro_auroc" in r.metrics else "ovr_macro_auroc"
            headline = f"{key} {_fmt(r.metrics[key])}"
        chosen = ", ".join(f"{k}={v:g}" for k, v in r.selected.items())
        table.add_row(r.dataset, r.model, str(r.resolution), r.kind, r.pooling, chosen, headline)
    return table


__all__ = [
    "PROBE_KINDS",
    "ProbeOutcome",
    "ProbeRequest",
    "comparison_table",
    "find_probe_entry",
    "probe_plan",
    "render_record",
    "run_probe",
]
