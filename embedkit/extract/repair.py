"""Repairing a damaged cache entry (``embedkit cache repair``): recompute its damaged units.

A complete entry is immutable except here. :func:`repair_entry` finds the units whose chunks
or records are damaged or missing (:meth:`FeatureEntry.damaged_units`), rebuilds the
extraction request from the entry's recorded provenance (model, revision, resolution,
preprocessing, compute and storage dtype, batch size, unit size, compression), checks that it
still produces the entry's cache key (same weights, images and image list), and recomputes
exactly those units with the same batch boundaries as the original run, under a ``repair``
claim on the entry. Each unit's record is removed and written again after its chunks, as
extraction writes it. The entry is verified afterwards. Rows computed with the same batch and
thread settings on the same kind of device are bit-identical to the undamaged ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from embedkit import distributed
from embedkit.errors import EntryExistsError, IntegrityError
from embedkit.extract.request import ExtractionRequest
from embedkit.extract.runner import (
    ProgressFactory,
    load_planned_encoder,
    plan_extraction,
    run_extraction,
)
from embedkit.manifest import Manifest, load_manifest
from embedkit.models import identify_encoder
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.lease import LEASES_DIR, Leases, Owner, resolve_ttl

__all__ = ["RepairResult", "repair_entry", "request_of"]

#: The claim a repair holds on the entry while it rewrites units.
REPAIR_CLAIM = "repair"


@dataclass(frozen=True, slots=True)
class RepairResult:
    """What :func:`repair_entry` did: the units recomputed (empty: nothing was damaged)."""

    entry: FeatureEntry
    units: tuple[int, ...]
    problems: dict[int, list[str]]
    elapsed_s: float


def request_of(
    entry: FeatureEntry, *, device: str = "auto", num_workers: int = 0
) -> ExtractionRequest:
    """The extraction request recorded in ``entry`` (its provenance and key)."""
    prov: dict[str, Any] = dict(entry.attrs.get("provenance") or {})
    missing = [
        k for k in ("model", "requested_resolution", "batch_size", "preprocessing") if k not in prov
    ]
    if missing:
        raise IntegrityError(
            f"{entry.uri}: its provenance lacks {missing}; it cannot be recomputed. "
            "Re-extract it with --overwrite."
        )
    key = entry.key
    dtypes = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    compute = dtypes.get(key.compute_dtype, key.compute_dtype)
    return ExtractionRequest(
        model=str(prov["model"]),
        dataset=key.dataset,
        resolution=int(prov["requested_resolution"]),
        patch_tokens="patch" in key.poolings,
        dtype=cast(Any, compute),
        storage_dtype=cast(Any, key.storage_dtype),
        compression=cast(Any, entry.attrs.get("compression") or "none"),
        batch_size=int(prov["batch_size"]),
        fingerprint=cast(Any, prov.get("fingerprint", "quick")),
        device=device,
        num_workers=num_workers,
        unit_rows=entry.unit_rows,
        resize=cast(Any, prov["preprocessing"].get("resize", "squash")),
        revision=prov.get("revision"),
    )


def repair_entry(
    query: str,
    *,
    manifest: Manifest | str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str = "auto",
    num_workers: int = 0,
    progress: ProgressFactory | None = None,
    model_cache_dir: str | os.PathLike[str] | None = None,
) -> RepairResult:
    """Recompute the damaged or missing units of the complete entry named by ``query``."""
    started = time.perf_counter()
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    root = CacheRoot.from_uri(str(cache) if cache is not None else man.cache)
    entry = FeatureEntry.open_for_repair(root, query)
    problems = entry.damaged_units()
    if not problems:
        return RepairResult(entry, (), {}, time.perf_counter() - started)
    request = request_of(entry, device=device, num_workers=num_workers)
    identity = identify_encoder(
        request.model,
        revision=request.revision,
        cache_dir=Path(model_cache_dir) if model_cache_dir is not None else None,
    )
    plan = plan_extraction(request, man, identity)
    if plan.key != entry.key:
        raise IntegrityError(
            f"{entry.uri} cannot be repaired from the manifest: its recorded request now gives "
            f"another cache key (entry {entry.key.short()}, now {plan.key.short()}: the images, "
            "the image list or the weights changed). Re-extract it with --overwrite."
        )
    ctx = distributed.DistContext(distributed.rank_env({}), plan.device, None)
    encoder = load_planned_encoder(plan, identity, ctx)
    leases = Leases(
        root, entry.relpath, resolve_ttl(None), Owner.this_process(), in_complete_entry=True
    )
    units = tuple(sorted(problems))
    with leases:
        generation = leases.claimable(REPAIR_CLAIM, leases.generations().get(REPAIR_CLAIM))
        if generation is None or not leases.try_claim(REPAIR_CLAIM, generation):
            raise EntryExistsError(
                f"Another job is repairing {entry.uri} right now; wait for it, then verify."
            )
        try:
            for u in units:
                entry.reopen_unit(u)
            run_extraction(plan, encoder, entry, units=units, progress=progress)
        finally:
            leases.release(REPAIR_CLAIM)
    root.remove_tree(f"{entry.relpath}/{LEASES_DIR}")  # a complete entry keeps no claims
    done = FeatureEntry.open(root, entry.relpath)
    left = done.verify()
    if left:
        shown = "\n  ".join(left[:10])
        raise IntegrityError(
            f"{done.uri} still has problems after recomputing units {list(units)}:\n  {shown}\n"
            "The images or the model changed since extraction; re-extract with --overwrite."
        )
    return RepairResult(done, units, problems, time.perf_counter() - started)
