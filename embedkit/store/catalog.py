"""The catalog of a cache root: list, find, describe and verify entries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.table import Table

from embedkit.errors import CacheNotFoundError
from embedkit.store.entry import FeatureEntry
from embedkit.store.index import indexed_summaries
from embedkit.store.key import CacheKey
from embedkit.store.layout import (
    COMPLETE_FILE,
    UNITS_DIR,
    entry_relpaths,
    read_attrs,
    resolve_entry,
)
from embedkit.store.root import CacheRoot

__all__ = [
    "EntrySummary",
    "find_entry",
    "list_entries",
    "mark_superseded",
    "render_entries",
    "render_info",
    "verify_root",
]


@dataclass(frozen=True, slots=True)
class EntrySummary:
    """One row of ``embedkit cache ls``."""

    relpath: str
    digest: str
    dataset: str
    model: str
    resolution: int
    poolings: dict[str, int]  # pooling -> feature dim (last axis)
    n_images: int
    storage_dtype: str
    complete: bool
    units_done: int
    units_total: int
    bytes_on_disk: int
    created_at: str
    created_by: str
    #: :meth:`CacheKey.feature_space` of the entry, and the digest of its ordered image ids.
    feature_space: str = ""
    ids_digest: str = ""
    #: When the entry's layout was created (seconds since the epoch; orders snapshots).
    created_unix: float = 0.0
    #: Digest of the newer complete entry of the same dataset and feature space that
    #: supersedes this one ("" if none; see :func:`mark_superseded`).
    superseded_by: str = ""

    @property
    def status(self) -> str:
        if not self.complete:
            return f"partial {self.units_done}/{self.units_total}"
        return f"superseded by {self.superseded_by[:12]}" if self.superseded_by else "complete"


def _summary(root: CacheRoot, relpath: str) -> EntrySummary:
    attrs = read_attrs(root, relpath)
    key = attrs["key"]
    prov = attrs.get("provenance") or {}
    by = prov.get("created_by") or attrs.get("created_by") or {}
    if isinstance(by, dict):
        by = f"{by.get('user', '')}@{by.get('host', '?')}".lstrip("@")
    units = [n for n in root.listdir(f"{relpath}/{UNITS_DIR}") if n.endswith(".json")]
    return EntrySummary(
        relpath=relpath,
        digest=str(attrs.get("digest", "")),
        dataset=key["dataset"],
        model=key["model"],
        resolution=int(key["resolution"]),
        poolings={p: int(spec["shape"][-1]) for p, spec in attrs["poolings"].items()},
        n_images=int(attrs["n_images"]),
        storage_dtype=key["storage_dtype"],
        complete=root.exists(f"{relpath}/{COMPLETE_FILE}"),
        units_done=len(units),
        units_total=int(attrs["n_units"]),
        bytes_on_disk=root.size_bytes(relpath),
        created_at=str(prov.get("created_at") or attrs.get("created_at", "")),
        created_by=str(by),
        feature_space=CacheKey.from_dict(key).feature_space(),
        ids_digest=str(key["ids_digest"]),
        created_unix=float(attrs.get("created_unix") or 0.0),
    )


def _summary_or_none(root: CacheRoot, relpath: str) -> EntrySummary | None:
    try:
        return _summary(root, relpath)
    except (FileNotFoundError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        # not an embedkit entry, its layout was never finished, or it was removed (gc,
        # --overwrite) while we listed it (CacheNotFoundError is a FileNotFoundError)
        return None


def _from_index(summary: dict[str, Any]) -> EntrySummary | None:
    if not summary.get("feature_space"):
        return None  # indexed before feature spaces were summarised: summarise afresh
    try:
        return replace(EntrySummary(**summary), superseded_by="")
    except TypeError:  # written by another embedkit version: summarise afresh
        return None


def _created_order(s: EntrySummary) -> tuple[float, str, str]:
    return (s.created_unix, s.created_at, s.relpath)


def mark_superseded(summaries: Sequence[EntrySummary]) -> list[EntrySummary]:
    """``summaries`` with :attr:`EntrySummary.superseded_by` set.

    A complete entry is superseded when a complete entry of the same dataset and feature space
    with another image list was created after it: an older snapshot of that dataset (before
    images were added, removed or re-filtered). It is set to the newest such entry. Its rows are
    still served, and copied by new extractions, until ``embedkit cache gc --superseded``
    removes it.
    """
    newest: dict[tuple[str, str], EntrySummary] = {}
    for s in summaries:
        if s.complete and s.feature_space:
            group = (s.dataset, s.feature_space)
            if group not in newest or _created_order(s) > _created_order(newest[group]):
                newest[group] = s
    out = []
    for s in summaries:
        latest = newest.get((s.dataset, s.feature_space))
        superseded = (
            s.complete
            and latest is not None
            and latest.ids_digest != s.ids_digest
            and _created_order(latest) > _created_order(s)
        )
        out.append(replace(s, superseded_by=latest.digest if superseded and latest else ""))
    return out


def list_entries(
    root: CacheRoot,
    *,
    dataset: str | None = None,
    model: str | None = None,
    use_index: bool = True,
) -> list[EntrySummary]:
    """Every entry under ``root`` (complete and partial), sorted by path.

    ``dataset`` / ``model`` keep only the entries of that dataset / model (exact names, e.g.
    ``dinov3/vitb16``). With ``use_index`` the catalog index (:mod:`embedkit.store.index`)
    supplies the summaries of unchanged complete entries and is refreshed; the result is the
    same as without it, only faster on object stores.
    """
    if use_index:

        def summarise(relpath: str) -> dict[str, Any] | None:
            s = _summary_or_none(root, relpath)
            return None if s is None else asdict(s)

        found = [
            s
            for d in indexed_summaries(root, summarise, valid=lambda d: _from_index(d) is not None)
            if (s := _from_index(d)) is not None
        ]
    else:
        found = [s for rp in entry_relpaths(root) if (s := _summary_or_none(root, rp)) is not None]
    return [
        s
        for s in mark_superseded(found)
        if (dataset is None or s.dataset == dataset) and (model is None or s.model == model)
    ]


def find_entry(root: CacheRoot, query: str, *, allow_partial: bool = True) -> FeatureEntry:
    """Open the entry named by a full digest, a unique digest prefix (>= 6), or a path.

    A path may be relative to the root or absolute; an absolute local path outside the root
    is opened against its own root (three levels up: ``<root>/<dataset>/<model>/<x>.zarr``).
    """
    q = query.strip()
    path = Path(q)
    if path.is_absolute():
        if root.local_path is not None and path.resolve().is_relative_to(root.local_path):
            return FeatureEntry.open(
                root,
                path.resolve().relative_to(root.local_path).as_posix(),
                allow_partial=allow_partial,
            )
        resolved = path.resolve()
        if len(resolved.parts) < 4:
            raise CacheNotFoundError(
                f"{q} is not a cache entry path (<root>/<dataset>/<model>/<x>.zarr)."
            )
        other = CacheRoot.from_uri(resolved.parents[2])
        return FeatureEntry.open(other, "/".join(resolved.parts[-3:]), allow_partial=allow_partial)
    return FeatureEntry.open(root, resolve_entry(root, q), allow_partial=allow_partial)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def render_entries(summaries: list[EntrySummary]) -> Table:
    """A rich table for ``embedkit cache ls``."""
    table = Table(title="Feature cache entries")
    for col in (
        "digest",
        "dataset",
        "model",
        "res",
        "poolings",
        "N",
        "dtype",
        "status",
        "size",
        "created",
    ):
        table.add_column(col, justify="right" if col in {"res", "N", "size"} else "left")
    for s in summaries:
        table.add_row(
            s.digest[:12],
            s.dataset,
            s.model,
            str(s.resolution),
            ", ".join(f"{p}:{d}" for p, d in s.poolings.items()),
            str(s.n_images),
            s.storage_dtype,
            s.status,
            _human(s.bytes_on_disk),
            f"{s.created_at} {s.created_by}".strip(),
        )
    return table


def render_info(info: dict[str, Any]) -> str:
    """Readable text for ``embedkit cache info`` (from :meth:`FeatureEntry.info`)."""
    key = info["key"]
    lines = [
        f"entry      {info['uri']}",
        f"digest     {info['digest']}",
        f"dataset    {key['dataset']}  ({info['n_images']} images)",
        f"model      {key['model']}  weights {key['weights']}",
        f"resolution {key['resolution']} px  compute {key['compute_dtype']}  "
        f"storage {key['storage_dtype']}",
        f"preprocess {key['preprocessing']}",
        "poolings   "
        + ", ".join(
            f"{p} {spec['dtype']} {tuple(spec['shape'])}" for p, spec in info["poolings"].items()
        ),
        f"units      {info['units_done']} of {info['units_total']} written "
        f"({info['unit_rows']} rows each)",
        f"on disk    {_human(info['bytes_on_disk'])}  compression {info.get('compression')}",
        f"created    {info.get('created_at')} by {info.get('created_by')}",
    ]
    done = info.get("completion")
    if done:
        lines.append(
            f"complete   {done['completed_at']} after {done['elapsed_s']} s; "
            f"{done['n_valid']} valid, {len(done['skipped'])} skipped"
        )
    else:
        lines.append("complete   no (partial entry)")
    if info.get("local_copy"):
        lines.append(f"local copy {info['local_copy']}")
    if info.get("provenance"):
        lines.append("provenance " + json.dumps(info["provenance"], sort_keys=True, default=str))
    return "\n".join(lines)


def _why_unopenable(root: CacheRoot, relpath: str, exc: Exception) -> str:
    """Why the entry at ``relpath`` cannot be opened: its group metadata, else ``exc``."""
    try:
        meta = json.loads(root.read_bytes(f"{relpath}/zarr.json"))
        if not isinstance(meta, dict) or not isinstance(meta.get("attributes"), dict):
            return "zarr.json holds no attributes object"
    except Exception as bad:  # unreadable or not JSON
        return f"zarr.json is unreadable ({type(bad).__name__}: {bad})"
    return f"{type(exc).__name__}: {exc}"


def verify_root(root: CacheRoot, relpath: str | None = None) -> dict[str, list[str]]:
    """Problems per entry relpath (an empty list means that entry is healthy).

    Damage of any kind in one entry (bad JSON or zarr metadata, missing arrays or chunks) is
    reported as that entry's problems; the other entries are still checked. ``relpath``:
    check that entry only.
    """
    results: dict[str, list[str]] = {}
    for rp in entry_relpaths(root) if relpath is None else [relpath]:
        try:
            entry = FeatureEntry.open(root, rp, allow_partial=True)
        except Exception as exc:  # bad JSON, bad attrs, a damaged key: report, go on
            results[rp] = [f"cannot open: {_why_unopenable(root, rp, exc)}"]
            continue
        results[rp] = entry.verify()
    return results
