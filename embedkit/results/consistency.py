"""One dataset name, one dataset: refuse results folders that mix records of different manifests.

Records name their dataset only by its manifest name, so two manifests that both call a dataset
``chexpert`` (another image list, label set, label policy or split) would silently share rows of
one table. Every record carries what identifies its data: the digest of the dataset's image
list (probes: ``entry.key.ids_digest``; finetuning: ``entry.ids_digest``), the label names and
the task; the test scores beside it carry the test images with their targets and masks. Records
of one dataset name must agree on the first three, their test images must all come from one
test split (each record's test ids a subset of the largest one's: runs may leave unreadable
images out) and the targets of a test image must be the same in every record.

:func:`check_records` checks a set of records among themselves (the report);
:func:`check_results_dataset` checks a results folder against the dataset a manifest defines
now (before a probe, finetune or pipeline run adds to it). Segmentation records (frozen probe
and finetuned alike) have their own targets, :func:`segmentation_reference`: which classes each
test case's truth holds, never anything a prediction decides, so both kinds agree.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedkit.errors import ImageReadError, MixedResultsError
from embedkit.manifest import DatasetTable
from embedkit.results.records import ResultRecord, load_record, load_scores
from embedkit.results.segmentation import SEGMENTATION_TASK
from embedkit.store import digest_ids

__all__ = [
    "DatasetSignature",
    "MixedResultsError",
    "TestTargets",
    "check_records",
    "check_results_dataset",
    "dataset_signature",
    "record_signature",
    "segmentation_reference",
]


@dataclass(frozen=True, slots=True)
class DatasetSignature:
    """What a record's dataset is: its image list, label names and task."""

    ids_digest: str
    labels: tuple[str, ...]
    task: str

    def describe(self) -> str:
        return f"image list {self.ids_digest[:12]}, labels [{', '.join(self.labels)}], {self.task}"


@dataclass(frozen=True, slots=True, eq=False)
class TestTargets:
    """Test images with their targets and masks (from a manifest or a record's scores)."""

    ids: tuple[str, ...]
    y: np.ndarray
    mask: np.ndarray


def dataset_signature(table: DatasetTable) -> DatasetSignature:
    return DatasetSignature(digest_ids(table.ids), tuple(table.labels.names), table.labels.kind)


def test_targets(table: DatasetTable) -> TestTargets:
    rows = table.indices("test")
    ids = tuple(table.ids[i] for i in rows)
    if table.volumes is not None:  # records of a volume dataset score slices or whole volumes
        volumes = [table.volumes[i] for i in rows]
        firsts = rows[[k for k, v in enumerate(volumes) if k == 0 or v != volumes[k - 1]]]
        ids += tuple(table.volumes[i] for i in firsts)
        rows = np.concatenate([rows, firsts])
    return TestTargets(ids, table.labels.y[rows], table.labels.mask[rows])


def segmentation_reference(table: DatasetTable) -> tuple[DatasetSignature, TestTargets] | None:
    """What every segmentation record of ``table`` (frozen probe or finetuned) must agree on:
    the image list, the classes without the background, the task, and per test case (image, or
    volume of a volume dataset) which classes its truth holds (an unreadable label map: none),
    the targets of :func:`~embedkit.results.segmentation.dice_table`. None without label maps."""
    from embedkit.data.masks import RowLabelMaps

    if table.classes is None or table.masks is None:
        return None
    masks = RowLabelMaps(table.masks, table.paths, table.classes, table.volume_slices)
    test = table.indices("test")
    volumes = table.volumes if table.volume_slices is not None else None
    units = [table.ids[r] if volumes is None else volumes[r] for r in test]
    cases = list(dict.fromkeys(units))
    at = {c: k for k, c in enumerate(cases)}
    present = np.zeros((len(cases), len(table.classes) - 1), dtype=np.float32)
    for unit, row in zip(units, test, strict=True):
        try:
            truth = masks.row(int(row))[0]
        except ImageReadError:
            continue
        in_truth = np.bincount(truth.ravel(), minlength=len(table.classes))[1:] > 0
        present[at[unit]] = np.maximum(present[at[unit]], in_truth)
    signature = DatasetSignature(digest_ids(table.ids), table.classes[1:], SEGMENTATION_TASK)
    return signature, TestTargets(tuple(cases), present, np.ones(present.shape, bool))


def record_signature(record: ResultRecord) -> DatasetSignature | None:
    """The record's dataset signature (None for a record that does not store its image list)."""
    key = record.entry.get("key")
    digest = key.get("ids_digest") if isinstance(key, Mapping) else record.entry.get("ids_digest")
    if not isinstance(digest, str):
        return None
    return DatasetSignature(digest, tuple(record.labels), record.task)


def _targets_of(path: Path) -> TestTargets | None:
    if not path.with_suffix(".parquet").is_file():
        return None
    scores = load_scores(path)
    return TestTargets(scores.ids, scores.y, scores.mask)


def _test_problem(reference: TestTargets, other: TestTargets) -> str | None:
    """Why ``other``'s test images cannot come from ``reference``'s test split, if so."""
    where = {image_id: i for i, image_id in enumerate(reference.ids)}
    outside = [i for i in other.ids if i not in where]
    if outside:
        return (
            f"{len(outside)} of its test images are not in the other test split "
            f"(e.g. {outside[0]!r})"
        )
    at = np.array([where[i] for i in other.ids], dtype=np.int64)
    same_mask = np.array_equal(reference.mask[at], other.mask)
    observed = other.mask.astype(bool)
    same_y = same_mask and np.array_equal(reference.y[at][observed], other.y[observed])
    if not same_y:
        return "its test targets differ (another label column, policy or parsing)"
    return None


def check_records(
    pairs: Sequence[tuple[ResultRecord, Path]],
    *,
    expected: Mapping[str, tuple[DatasetSignature, TestTargets]] | None = None,
    where: str = "the results folder",
) -> None:
    """Raise :class:`MixedResultsError` if records of one dataset name differ in their data.

    ``expected`` maps dataset names to what the current manifest defines; records of those
    datasets are checked against it instead of against each other.
    """
    # Classification and segmentation records of one dataset have their own label sets and
    # targets: each family is checked among itself.
    groups: dict[tuple[str, bool], list[tuple[ResultRecord, Path]]] = defaultdict(list)
    for record, path in pairs:
        groups[(record.dataset, record.task == SEGMENTATION_TASK)].append((record, path))
    problems: list[str] = []
    for (name, segmentation), group in sorted(groups.items()):
        reference = expected.get(name) if expected is not None else None
        if reference is not None and (reference[0].task == SEGMENTATION_TASK) != segmentation:
            reference = None
        by_signature: dict[DatasetSignature, list[Path]] = defaultdict(list)
        for record, path in group:
            signature = record_signature(record)
            if signature is not None:
                by_signature[signature].append(path)
        if reference is not None:
            stale = {s: p for s, p in by_signature.items() if s != reference[0]}
            if stale:
                problems.append(
                    f"dataset '{name}': the manifest now defines {reference[0].describe()}, but "
                    + "; ".join(
                        f"{len(p)} records have {s.describe()} (e.g. {p[0]})"
                        for s, p in stale.items()
                    )
                )
                continue
        elif len(by_signature) > 1:
            problems.append(
                f"dataset '{name}' has records of {len(by_signature)} different datasets: "
                + "; ".join(
                    f"{len(p)} with {s.describe()} (e.g. {p[0]})" for s, p in by_signature.items()
                )
            )
            continue
        tests = [(path, t) for _, path in group if (t := _targets_of(path)) is not None]
        if reference is not None:
            ref_name, ref_test = "the manifest's test split", reference[1]
        elif tests:
            ref_path, ref_test = max(tests, key=lambda pt: len(pt[1].ids))
            ref_name = str(ref_path)
        else:
            continue
        for path, test in tests:
            problem = _test_problem(ref_test, test)
            if problem is not None:
                problems.append(f"dataset '{name}': {path} vs {ref_name}: {problem}")
                break
    if problems:
        raise MixedResultsError(
            f"{where} mixes records made from different manifests under one dataset name:\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nKeep one study per results folder: move the records that do not belong to "
            "another folder (or delete them and rerun), or give the dataset a different name in "
            "one of the manifests."
        )


def check_results_dataset(
    results: str | os.PathLike[str],
    dataset: str,
    table: DatasetTable,
    *,
    expected: tuple[DatasetSignature, TestTargets] | None = None,
) -> None:
    """Refuse to add records of ``dataset`` (as ``table`` defines it now) to ``results`` if
    records of another dataset of that name are there. ``expected``: what the new record's
    dataset is when the table's labels do not say it (segmentation: the classes and which
    classes each test image holds); records of the other task family are not checked."""
    root = Path(results) / dataset
    if not root.is_dir():
        return
    pairs = [
        (load_record(p), p) for p in sorted(root.rglob("*.json")) if not p.name.startswith(".")
    ]
    reference = expected or (dataset_signature(table), test_targets(table))
    family = reference[0].task == SEGMENTATION_TASK
    check_records(
        [(r, p) for r, p in pairs
         if r.dataset == dataset and (r.task == SEGMENTATION_TASK) == family],
        expected={dataset: reference},
        where=str(results),
    )  # fmt: skip
