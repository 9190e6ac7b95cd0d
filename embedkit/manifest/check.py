"""``embedkit manifest check``: what a dataset holds, and what is wrong with it."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from embedkit.manifest.schema import SPLIT_NAMES, DatasetConfig, FilesSplits, PatientSplits
from embedkit.manifest.table import DatasetTable


@dataclass(frozen=True)
class SplitSize:
    split: str  # 'train' | 'val' | 'test' | '' (in no split)
    images: int
    patients: int


@dataclass(frozen=True)
class LabelCount:
    name: str
    split: str  # 'all' or a split name
    positive: int
    negative: int
    ignored: int


@dataclass(frozen=True)
class DatasetReport:
    """Counts and findings for one dataset; ``ok`` is False when ``problems`` is not empty."""

    dataset: str
    index: Path
    label_kind: str
    split_method: str
    images: int
    patients: int
    patient_column: str | None
    splits: tuple[SplitSize, ...]
    labels: tuple[LabelCount, ...]
    leakage: tuple[str, ...]
    files_checked: bool
    missing_files: int
    missing_examples: tuple[str, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    volumes: int | None = None  # volume datasets: how many volumes the images (slices) come from

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(config: DatasetConfig, *, check_files: bool = False) -> DatasetReport:
    """Load ``config``'s table (raising ``ManifestError`` on bad input) and report on it."""
    table = config.load()
    problems: list[str] = []
    warnings: list[str] = list(table.notes)
    if not table.has_patients:
        warnings.append(
            "no patient_column: each image counts as its own patient, so patient leakage "
            "between splits cannot be detected"
        )
    splits = _split_sizes(table)
    leakage = _leaking_patients(table)
    if leakage:
        shown = ", ".join(map(repr, leakage[:10]))
        problems.append(
            f"LEAKAGE: {len(leakage)} patients have images in more than one split "
            f"(first: {shown}); splits must be patient-wise"
        )
    for size in splits:
        if size.split and size.images == 0 and _split_expected(config, size.split):
            warnings.append(f"split {size.split!r} is empty although the manifest asks for it")
    labels = _label_counts(table)
    no_positives: dict[str, list[str]] = defaultdict(list)
    for count in labels:
        if count.positive == 0:
            no_positives[count.name].append(count.split)
    for name, where in no_positives.items():
        warnings.append(f"{name!r} has no positives in {', '.join(where)} (AUC is undefined there)")
    missing: list[str] = []
    if check_files:
        missing = _missing_files(table.paths)
        if missing:
            problems.append(f"{len(missing)} of {len(table)} image files do not exist")
    return DatasetReport(
        dataset=config.name,
        index=config.index,
        label_kind=table.labels.kind,
        split_method=config.splits.method,
        images=len(table),
        patients=len(set(table.patients)),
        patient_column=config.patient_column,
        splits=splits,
        labels=labels,
        leakage=tuple(leakage),
        files_checked=check_files,
        missing_files=len(missing),
        missing_examples=tuple(missing[:5]),
        problems=tuple(problems),
        warnings=tuple(warnings),
        volumes=None if table.volumes is None else len(set(table.volumes)),
    )


def _split_expected(config: DatasetConfig, split: str) -> bool:
    spec = config.splits
    if isinstance(spec, PatientSplits):
        return bool(getattr(spec.fractions, split) > 0)
    if isinstance(spec, FilesSplits):
        return split in spec.files()
    return False


def _split_sizes(table: DatasetTable) -> tuple[SplitSize, ...]:
    frame = pd.DataFrame({"split": table.split, "patient": np.asarray(table.patients, dtype=str)})
    grouped = frame.groupby("split")["patient"].agg(["size", "nunique"])
    names = list(SPLIT_NAMES) + ([""] if "" in grouped.index else [])
    return tuple(
        SplitSize(
            name,
            int(grouped["size"].get(name, 0)),
            int(grouped["nunique"].get(name, 0)),
        )
        for name in names
    )


def _leaking_patients(table: DatasetTable) -> list[str]:
    frame = pd.DataFrame({"split": table.split, "patient": np.asarray(table.patients, dtype=str)})
    frame = frame[frame["split"] != ""]
    per_patient = frame.groupby("patient")["split"].nunique()
    return sorted(per_patient.index[per_patient.to_numpy() > 1].tolist())


def _label_counts(table: DatasetTable) -> tuple[LabelCount, ...]:
    out = [LabelCount(n, "all", p, q, i) for n, p, q, i in table.labels.counts()]
    for split in SPLIT_NAMES:
        rows = table.indices(split)
        if rows.size:
            out += [LabelCount(n, split, p, q, i) for n, p, q, i in table.labels.counts(rows)]
    return tuple(out)


def _missing_files(paths: tuple[Path, ...]) -> list[str]:
    """Paths that do not exist, listing each folder once (far fewer calls than a stat per file)."""
    by_folder: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        text = str(path)
        folder, _, name = text.rpartition(os.sep)
        by_folder[folder].append(name)
    missing: list[str] = []
    for folder, names in by_folder.items():
        try:
            present = {entry.name for entry in os.scandir(folder or os.sep) if not entry.is_dir()}
        except OSError:
            present = set()
        missing += [os.path.join(folder, n) for n in names if n not in present]
    return missing


def render_report(report: DatasetReport) -> Table:
    """A rich table for the CLI: summary, splits, label counts, then problems and warnings."""
    status = Text("OK", style="bold green") if report.ok else Text("FAILED", style="bold red")
    outer = Table(
        title=Text.assemble(f"dataset {report.dataset} — ", status),
        show_header=False,
        box=None,
        expand=False,
    )
    outer.add_column()

    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("index", str(report.index))
    summary.add_row("images", f"{report.images:,}")
    if report.volumes is not None:
        summary.add_row("volumes", f"{report.volumes:,} (the images are their slices)")
    patients = f"{report.patients:,}"
    if report.patient_column is None:
        patients += " (no patient_column: one patient per image)"
    summary.add_row("patients", patients)
    summary.add_row("labels", report.label_kind)
    summary.add_row("split method", report.split_method)
    if report.files_checked:
        summary.add_row("missing files", f"{report.missing_files:,}")
    outer.add_row(summary)

    splits = Table(title="splits")
    for header in ("split", "images", "patients", "share of images"):
        splits.add_column(header, justify="right" if header != "split" else "left")
    for size in report.splits:
        share = f"{size.images / report.images:.1%}" if report.images else "-"
        splits.add_row(size.split or "(none)", f"{size.images:,}", f"{size.patients:,}", share)
    outer.add_row(splits)

    labels = Table(title="labels (positive / negative / ignored)")
    labels.add_column("label")
    present = ["all", *[s.split for s in report.splits if s.split and s.images]]
    for split in present:
        labels.add_column(split, justify="right")
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    for count in report.labels:
        cells[count.name][count.split] = (
            f"{count.positive:,} / {count.negative:,} / {count.ignored:,}"
        )
    for name, by_split in cells.items():
        labels.add_row(name, *(by_split.get(split, "-") for split in present))
    outer.add_row(labels)

    for problem in report.problems:
        outer.add_row(Text(f"✗ {problem}", style="bold red"))
    if report.missing_examples:
        outer.add_row(Text("  missing: " + ", ".join(report.missing_examples), style="red"))
    for warning in report.warnings:
        outer.add_row(Text(f"! {warning}", style="yellow"))
    return outer
