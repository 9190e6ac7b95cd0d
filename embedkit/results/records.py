"""Self-describing result records of probe (and later finetuning) runs.

A record is one JSON file plus one Parquet file of test-set scores, side by side:

``<results>/<dataset>/<model>/<resolution>px/<kind>-<record id>.json`` and ``...parquet``.

The record id is a digest of everything that determines the result (the cache entry digest, the
probe kind and hyper-parameters, the pooling, the seed), so rerunning an identical probe finds
its record and reuses it unless asked to overwrite. The JSON holds the cache key it used, the
chosen hyper-parameters, metrics with confidence intervals, the per-label table, library
versions and the time taken; the Parquet file keeps the test scores (with image ids, targets
and masks) so that later paired tests between runs need no recomputation. Both files are
written atomically, the Parquet file first, so a JSON record always has its scores.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.atomic import atomic_write
from embedkit.errors import CacheNotFoundError, EntryExistsError

RECORD_FORMAT_VERSION = 1


def record_id(identity: Mapping[str, Any]) -> str:
    """16 hex chars of the sha256 of the canonical JSON of ``identity``."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ScoreTable:
    """Test-set scores of one run: ``scores[i, j]`` for image ``ids[i]`` and label ``labels[j]``."""

    ids: tuple[str, ...]
    labels: tuple[str, ...]
    y: np.ndarray  # (n, L) float32 multi-label, or (n,) int64 multi-class
    mask: np.ndarray  # same leading shape as y
    scores: np.ndarray  # (n, L) float64

    def to_table(self) -> pa.Table:
        cols: dict[str, Any] = {"id": list(self.ids)}
        if self.y.ndim == 1:
            cols["y"] = self.y.astype(np.int64)
            cols["mask"] = self.mask.astype(bool)
        for j, name in enumerate(self.labels):
            if self.y.ndim == 2:
                cols[f"y:{name}"] = self.y[:, j].astype(np.float32)
                cols[f"mask:{name}"] = self.mask[:, j].astype(bool)
            cols[f"score:{name}"] = self.scores[:, j].astype(np.float64)
        return pa.table(cols)

    @classmethod
    def from_table(cls, table: pa.Table, labels: Sequence[str]) -> ScoreTable:
        data = table.to_pydict()
        ids = tuple(str(i) for i in data["id"])
        if "y" in data:
            y = np.asarray(data["y"], dtype=np.int64)
            mask = np.asarray(data["mask"], dtype=bool)
        else:
            y = np.stack([np.asarray(data[f"y:{n}"], dtype=np.float32) for n in labels], 1)
            mask = np.stack([np.asarray(data[f"mask:{n}"], dtype=bool) for n in labels], 1)
        scores = np.stack([np.asarray(data[f"score:{n}"], dtype=np.float64) for n in labels], 1)
        return cls(ids, tuple(labels), y, mask, scores)


@dataclass
class ResultRecord:
    """Everything needed to read, compare and reproduce one run."""

    record_id: str
    kind: str  # a registered probe kind (linear, knn, fewshot, sgd, ...) or finetune-<method>
    dataset: str
    model: str
    resolution: int
    pooling: str
    task: str  # multilabel | multiclass
    labels: list[str]
    entry: dict[str, Any]  # digest, relpath, cache root, key
    params: dict[str, Any]  # hyper-parameters asked for
    selected: dict[str, Any]  # chosen on validation (C, k, lr, ...)
    seed: int
    metrics: dict[str, Any]  # name -> {"point", "low", "high"} or a number
    per_label: list[dict[str, Any]]
    n: dict[str, int]  # images per split actually used
    versions: dict[str, str]
    elapsed_s: float
    created_at: str
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = RECORD_FORMAT_VERSION
    # What the report reads instead of the kind name: None = point metrics on the test split
    # (per-image scores saved beside the record); else the axis of the curve the metrics form,
    # keyed "<x>-<unit>" (few-shot: "shots", keys "1-shot", "2-shot", ...).
    curve: str | None = None
    # How sensitivity / specificity were measured ("youden on validation"); None: not measured.
    operating_point: str | None = None
    # The resolution asked for (the nominal tier: 224, 512, 1024), beside ``resolution``, the one
    # used after snapping to the patch grid (DINOv2: 518 for 512). None in records written before
    # it existed: the report falls back to ``resolution``.
    requested_resolution: int | None = None

    @property
    def tier(self) -> int:
        """The nominal resolution the report pairs runs by."""
        requested = self.requested_resolution
        return requested if requested is not None else self.resolution

    def relpath(self) -> str:
        model = self.model.replace("/", "--")
        return f"{self.dataset}/{model}/{self.resolution}px/{self.kind}-{self.record_id}"


class ResultsDir:
    """A folder of result records (local path)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def paths(self, record: ResultRecord) -> tuple[Path, Path]:
        base = self.root / record.relpath()
        return base.with_suffix(".json"), base.with_suffix(".parquet")

    def find(self, relpath: str) -> ResultRecord | None:
        path = (self.root / relpath).with_suffix(".json")
        if not path.is_file():
            return None
        return load_record(path)

    def write(
        self, record: ResultRecord, scores: ScoreTable | None, *, overwrite: bool = False
    ) -> Path:
        """Write the scores (if any) and then the JSON record; refuse to replace one silently."""
        json_path, parquet_path = self.paths(record)
        if json_path.exists() and not overwrite:
            raise EntryExistsError(
                f"{json_path} exists; pass --overwrite to replace this result record"
            )
        if scores is not None:
            table = scores.to_table()
            atomic_write(parquet_path, lambda tmp: pq.write_table(table, tmp))
        text = json.dumps(asdict(record), indent=1, sort_keys=True, default=_json_default)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text + "\n"))
        return json_path

    def records(self) -> list[ResultRecord]:
        return [load_record(p) for p in sorted(self.root.rglob("*.json"))]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_record(path: str | os.PathLike[str]) -> ResultRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CacheNotFoundError(f"no result record at {path}") from exc
    if "curve" not in data and data.get("kind") == "fewshot":  # written before `curve` existed
        data["curve"] = "shots"
    return ResultRecord(**data)


def load_scores(json_path: str | os.PathLike[str]) -> ScoreTable:
    """The test scores saved beside a record (for paired tests between runs)."""
    record = load_record(json_path)
    table = pq.read_table(Path(json_path).with_suffix(".parquet"))
    return ScoreTable.from_table(table, record.labels)
