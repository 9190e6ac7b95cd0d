"""The extraction engine: manifest split ─► loader ─► frozen encoder ─► poolings ─► store units.

One call of :func:`extract` produces (or finds) one cache entry. The work is cut into units of
``unit_rows`` consecutive images, each written with its own completion record, so a run that is
interrupted at any moment (Ctrl-C, SIGKILL, a full disk) resumes from its finished units. Batches
never straddle a unit and always start at the same rows, so a resumed run feeds the encoder the
very same batches as an uninterrupted one and the stored features are bit-identical.

Several jobs (processes, torchrun ranks, machines) may extract the same entry at once: each
claims a unit just before computing it (:class:`embedkit.store.lease.Leases`), so they split the
units and none is computed twice; a unit whose job died is taken over once its claim expires.

Data loading runs in worker processes (``num_workers``) and overlaps the forward pass; a
background thread writes finished units while the encoder works on the next ones.

Each image is computed once per feature space (:mod:`embedkit.store.reuse`): before anything
is computed, the rows whose image (same id, same content fingerprint,
:mod:`embedkit.extract.fingerprint`) a complete entry of the same feature space already holds
are planned as copies. Units whose rows are all copies are claimed, copied, checksummed and
recorded like computed ones, without loading the encoder; in the other units only the rows
to compute go through the encoder (in batches that start at the same rows on every run), and
the copied rows fill the rest before the unit is written.
"""

from __future__ import annotations

import getpass
import os
import platform
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from embedkit import distributed
from embedkit.data.dataset import Batch, ImageDataset, collate
from embedkit.data.transforms import Preprocessing
from embedkit.errors import BadImagesError, CacheNotFoundError, EmbedkitError, EntryExistsError
from embedkit.extract.fingerprint import FingerprintMode, content_digest, image_fingerprints
from embedkit.extract.request import ExtractionRequest
from embedkit.manifest import DatasetTable, Manifest, load_manifest
from embedkit.models import (
    EncoderIdentity,
    EncoderSpec,
    LoadedEncoder,
    identify_encoder,
    load_encoder,
    pooling_dims,
    stored_poolings,
    validate_resolution,
)
from embedkit.models.device import resolve_device, resolve_dtype
from embedkit.models.families import get_family
from embedkit.models.throughput import ModelShape, ThroughputReport, shape_from_config
from embedkit.store import (
    CacheKey,
    CacheRoot,
    FeatureEntry,
    PendingUnit,
    canonical_json,
    digest_ids,
)
from embedkit.store.entry import remove_entry
from embedkit.store.layout import existing_attrs
from embedkit.store.lease import Leases, Owner, resolve_ttl
from embedkit.store.reuse import (
    RECORD_COPIED,
    RECORD_FINGERPRINTS,
    ReusePlan,
    RowCopier,
    plan_reuse,
)
from embedkit.versions import package_versions


@dataclass(slots=True)
class ExtractionResult:
    """What :func:`extract` did: the entry, and whether it computed anything."""

    entry: FeatureEntry
    computed_units: int
    reused: bool
    elapsed_s: float
    images_computed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    throughput: ThroughputReport | None = None
    #: The units this process computed and wrote (another job may have written the others).
    units: tuple[int, ...] = ()
    #: Rows this process copied from complete entries of the feature space (not computed).
    images_copied: int = 0
    #: The entries rows were copied from (relative paths).
    copied_from: tuple[str, ...] = ()

    @property
    def images_per_s(self) -> float:
        return self.images_computed / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]
#: The fewest batches the computed rows of a unit with copied rows are split into.
MIXED_UNIT_BATCHES = 4


def content_fingerprint(
    ids: Sequence[str], paths: Sequence[Path], mode: FingerprintMode = "quick"
) -> str:
    """The key's ``content_digest`` of the image files: sha256 over every (id, image
    fingerprint); see :mod:`embedkit.extract.fingerprint` for what a fingerprint covers."""
    return content_digest(ids, image_fingerprints(paths, mode))


@dataclass(frozen=True, slots=True)
class ExtractionPlan:
    """The resolved request: spec, preprocessing and the cache key, before any compute."""

    request: ExtractionRequest
    table: DatasetTable
    spec: EncoderSpec
    preprocessing: Preprocessing
    device: torch.device
    compute_dtype: str
    poolings: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    key: CacheKey
    #: The content fingerprint of each image (``table.ids`` order).
    fingerprints: tuple[str, ...] = ()


def plan_extraction(
    request: ExtractionRequest,
    manifest: Manifest,
    encoder: EncoderIdentity,
    progress: ProgressFactory | None = None,
) -> ExtractionPlan:
    """Resolve everything that determines the entry's bytes and build its cache key.

    Needs only the encoder's identity (spec + weights fingerprint), not its weights; reads
    the image files only to fingerprint them (``progress`` shows that).
    """
    table = manifest.dataset(request.dataset).load()
    fingerprints = _fingerprints(table.paths, request.fingerprint, progress)
    spec = encoder.spec
    size = validate_resolution(spec, request.resolution, snap=request.snap_resolution)
    preprocessing = Preprocessing(size=size, resize=request.resize, mean=spec.mean, std=spec.std)
    device = resolve_device(request.device)
    compute_dtype = resolve_dtype(request.dtype, device)
    poolings = tuple(p for p in stored_poolings(spec) if p != "patch" or request.patch_tokens)
    shapes = pooling_dims(spec, poolings, resolution=size)
    key = CacheKey(
        dataset=request.dataset,
        model=spec.name,
        weights=encoder.weights_fingerprint,
        resolution=size,
        preprocessing=canonical_json({**preprocessing.describe(), **table.reading}),
        compute_dtype=compute_dtype,
        storage_dtype=request.storage_dtype,
        poolings=tuple(sorted(poolings)),
        ids_digest=digest_ids(table.ids),
        content_digest=content_digest(table.ids, fingerprints),
        n_images=len(table.ids),
    )
    return ExtractionPlan(
        request, table, spec, preprocessing, device, compute_dtype, poolings, shapes, key,
        tuple(fingerprints),
    )  # fmt: skip


def _fingerprints(
    paths: Sequence[Path], mode: FingerprintMode, progress: ProgressFactory | None
) -> list[str]:
    if progress is None or mode == "quick":  # quick: a stat and two small reads per image
        return image_fingerprints(paths, mode)
    with progress(len(paths), "fingerprinting images (full content)") as advance:
        return image_fingerprints(paths, mode, advance=advance)


def _iter_unit_batches(
    entry: FeatureEntry,
    units: Iterable[int],
    batch_size: int,
    reuse: ReusePlan | None = None,
    on_copy_unit: Callable[[int], None] | None = None,
) -> Iterator[list[int]]:
    """Row batches that start at each unit's first row to compute and never cross a unit
    boundary.

    With ``reuse``, only the rows to compute are batched, and a unit with none is handed to
    ``on_copy_unit`` instead. A unit with copied rows has few rows left to compute: they go in
    at least :data:`MIXED_UNIT_BATCHES` batches (of at most ``batch_size``), so that the loader
    workers decode the next batches while the encoder runs (one batch would run load, then
    forward, one after the other). The batches depend only on the unit's rows, the reuse plan
    and ``batch_size``, so they are the same on every run. ``units`` is consumed lazily: with
    claimed units, the next unit is claimed only when the loader asks for its first batch.
    """
    for u in units:
        start, stop = entry.unit_bounds(u)
        rows = list(range(start, stop)) if reuse is None else reuse.compute_rows(start, stop)
        if not rows and on_copy_unit is not None:
            on_copy_unit(u)
        size = batch_size
        if len(rows) < stop - start:
            size = min(batch_size, max(1, -(-len(rows) // MIXED_UNIT_BATCHES)))
        for b in range(0, len(rows), size):
            yield rows[b : b + size]


def _unit_batches(
    entry: FeatureEntry,
    units: Sequence[int],
    batch_size: int,
    reuse: ReusePlan | None = None,
) -> list[list[int]]:
    return list(_iter_unit_batches(entry, units, batch_size, reuse))


class _LazyBatches:
    """A batch sampler over units claimed on the fly (the DataLoader iterates it once)."""

    def __init__(self, batches: Iterator[list[int]]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches


#: Images left out of a unit: (image id, why).
Skipped = list[tuple[str, str]]
_QueuedUnit = tuple[int, dict[str, np.ndarray], np.ndarray, Skipped, dict[str, object]]


class _UnitWriter:
    """Writes finished units on a background thread, so writes overlap the forward pass.

    When units queue up (writes slower than the forward pass), unit ``k + 1`` is begun
    before unit ``k`` is committed (:meth:`FeatureEntry.begin_unit`), so the chunk pool
    never idles between units; otherwise each unit is committed as soon as it is written.

    With ``leases``, a unit is written only while this job still holds its claim (a unit
    taken over by another job after our claim expired is dropped), then released.
    """

    def __init__(self, entry: FeatureEntry, leases: Leases | None = None) -> None:
        self._entry = entry
        self._leases = leases
        self._queue: queue.Queue[_QueuedUnit | None]
        self._queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self.units: list[int] = []
        self._thread = threading.Thread(target=self._run, name="embedkit-writer", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return len(self.units)

    def _run(self) -> None:
        pending: tuple[int, PendingUnit] | None = None  # begun, to commit after the next begins
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            u, arrays, valid, skipped, extra = item
            try:
                if self._leases is not None and not self._leases.holds_unit(u):
                    continue  # our claim expired and another job took the unit over
                begun = self._begin(u, arrays, valid, skipped, extra)
                if pending is not None:  # the pool writes unit u meanwhile
                    self._commit(*pending)
                    pending = None
                if begun is None:
                    continue
                if self._queue.empty():  # nothing to overlap with: record it now
                    self._commit(u, begun)
                else:  # writes are the bottleneck: commit after the next unit is begun
                    pending = (u, begun)
            except BaseException as exc:  # re-raised on the main thread
                self._error = exc
                pending = None
        try:
            if pending is not None and self._error is None:
                self._commit(*pending)
        except BaseException as exc:
            self._error = exc

    def _begin(
        self,
        u: int,
        arrays: dict[str, np.ndarray],
        valid: np.ndarray,
        skipped: list[tuple[str, str]],
        extra: dict[str, object],
    ) -> PendingUnit | None:
        try:
            return self._entry.begin_unit(
                u, arrays, valid=valid, skipped=skipped, record_extra=extra
            )
        except EntryExistsError:
            if self._leases is None:
                raise
            return None  # taken over and written by another job after our check

    def _commit(self, u: int, begun: PendingUnit) -> None:
        try:
            begun.commit()
        except EntryExistsError:
            if self._leases is None:
                raise
            return  # taken over and written by another job after our check
        self.units.append(u)
        if self._leases is not None:
            self._leases.release_unit(u)

    def submit(
        self,
        u: int,
        arrays: dict[str, np.ndarray],
        valid: np.ndarray,
        skipped: list[tuple[str, str]],
        extra: dict[str, object] | None = None,
    ) -> None:
        """Queue unit ``u`` for writing; ``extra``: more fields of its record."""
        self.raise_if_failed()
        self._queue.put((u, arrays, valid, skipped, dict(extra or {})))

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_if_failed()


class _UnitBuffer:
    """Collects one unit's rows until all of them have been computed (copied rows, if any, are
    filled in when the buffer is made)."""

    def __init__(
        self,
        start: int,
        stop: int,
        shapes: dict[str, tuple[int, ...]],
        copier: RowCopier | None = None,
    ) -> None:
        n = stop - start
        self.start = start
        self.remaining = n
        self.arrays = {
            name: np.zeros((n, *shape), dtype=np.float32) for name, shape in shapes.items()
        }
        self.valid = np.zeros(n, dtype=bool)
        self.skipped: list[tuple[str, str]] = []
        self.failed = False
        self.extra: dict[str, object] = {}
        self.copied = 0
        if copier is not None and (copied := copier.plan.copied_in(start, stop)):
            self.extra[RECORD_COPIED] = copier.fill(start, stop, self.arrays)
            self.valid[copier.plan.source_of[start:stop] >= 0] = True
            self.remaining -= copied
            self.copied = copied


def _unit_record(plan: ExtractionPlan, entry: FeatureEntry, u: int) -> dict[str, object]:
    """Fields every unit record of an extraction holds: the fingerprints of its rows."""
    start, stop = entry.unit_bounds(u)
    return {RECORD_FINGERPRINTS: list(plan.fingerprints[start:stop])} if plan.fingerprints else {}


def _copy_unit(
    plan: ExtractionPlan, entry: FeatureEntry, copier: RowCopier, u: int, writer: _UnitWriter
) -> int:
    """Read unit ``u``'s rows (all copies) from their sources and queue the unit; its rows."""
    start, stop = entry.unit_bounds(u)
    arrays, copied = copier.unit_arrays(start, stop, entry.shapes, entry.dtypes)
    extra = {**_unit_record(plan, entry, u), RECORD_COPIED: copied}
    writer.submit(u, arrays, np.ones(stop - start, dtype=bool), [], extra)
    return stop - start


def _batches_from_loader(
    dataset: ImageDataset, batches: Iterable[list[int]], num_workers: int, pin: bool
) -> Iterator[Batch]:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,  # any iterable of index lists
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    yield from loader


def run_extraction(
    plan: ExtractionPlan,
    encoder: LoadedEncoder,
    entry: FeatureEntry,
    *,
    units: Sequence[int] | None = None,
    leases: Leases | None = None,
    progress: ProgressFactory | None = None,
    min_forwards: int = 0,
    prefer: Sequence[int] = (),
    copier: RowCopier | None = None,
) -> ExtractionResult:
    """Compute and write units of ``entry``.

    With ``copier`` (a reuse plan), only the rows it does not copy are computed; the copied
    rows fill the rest of each unit, and a unit with no row to compute is copied whole.

    Without ``leases``: the given ``units`` (default: every pending unit). With ``leases``
    (and no ``units``): pending units claimed one by one as the loader needs them, ``prefer``
    first, until none is claimable; given ``units`` must already be claimed. Units whose claim
    is lost before their write are not written.

    ``min_forwards``: run dummy one-image forwards after the real batches until at least this
    many forward calls were made (FSDP ranks must all make the same number of calls).
    """
    request = plan.request
    reuse = copier.plan if copier is not None else None
    writer = _UnitWriter(entry, leases)
    copied = 0

    def copy_whole(u: int) -> None:
        nonlocal copied
        if copier is not None:
            copied += _copy_unit(plan, entry, copier, u, writer)

    batches: Iterable[list[int]]
    if leases is not None and units is None:
        n_images = sum(
            len(reuse.compute_rows(s, e)) if reuse is not None else e - s
            for s, e in map(entry.unit_bounds, entry.pending_units())
        )
        claimed = _iter_unit_batches(
            entry, leases.iter_units(entry, prefer), request.batch_size, reuse, copy_whole
        )
        batches = _LazyBatches(claimed)
    else:
        todo = sorted(entry.pending_units() if units is None else units)
        batches = list(_iter_unit_batches(entry, todo, request.batch_size, reuse, copy_whole))
        n_images = sum(len(b) for b in batches)
    dataset = ImageDataset(plan.table.ids, plan.table.sources, plan.preprocessing)
    buffers: dict[int, _UnitBuffer] = {}
    failures: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    started = time.perf_counter()
    stored = tuple(plan.shapes)
    computed = forwards = 0
    bar = progress(n_images, f"{plan.spec.name} @ {plan.key.resolution}px") if progress else None
    with bar if bar is not None else nullcontext(lambda _n: None) as advance:
        try:
            for batch in _batches_from_loader(
                dataset, batches, request.num_workers, pin=plan.device.type == "cuda"
            ):
                first = int(batch.indices[0])
                u = first // entry.unit_rows
                start, stop = entry.unit_bounds(u)
                buf = buffers.get(u) or buffers.setdefault(
                    u, _UnitBuffer(start, stop, plan.shapes, copier)
                )
                feats = encoder.encode(batch.pixels.to(plan.device, non_blocking=True), stored)
                forwards += 1
                computed += len(batch.indices)
                ok = batch.ok.numpy()
                rows = batch.indices.numpy() - start
                for name in stored:
                    buf.arrays[name][rows] = feats[name].float().cpu().numpy()
                for row, good, image_id, err in zip(rows, ok, batch.ids, batch.errors, strict=True):
                    if good:
                        buf.valid[row] = True
                    elif request.on_bad_image == "skip":
                        for arr in buf.arrays.values():
                            arr[row] = 0.0
                        buf.skipped.append((image_id, err))
                    else:
                        failures.append((image_id, err))
                        buf.failed = True
                buf.remaining -= len(rows)
                if buf.remaining == 0:
                    del buffers[u]
                    skipped.extend(buf.skipped)
                    if not buf.failed:
                        extra = {**_unit_record(plan, entry, u), **buf.extra}
                        writer.submit(u, buf.arrays, buf.valid, buf.skipped, extra)
                        copied += buf.copied
                advance(len(rows))
            side = plan.key.resolution
            for _ in range(min_forwards - forwards):
                encoder.encode(torch.zeros(1, 3, side, side, device=plan.device), stored)
        finally:
            writer.close()
    elapsed = time.perf_counter() - started
    if failures:
        raise BadImagesError(failures, total=computed)
    return ExtractionResult(
        entry=entry,
        computed_units=writer.written,
        reused=False,
        elapsed_s=elapsed,
        images_computed=computed,
        skipped=skipped,
        units=tuple(writer.units),
        images_copied=copied,
        copied_from=tuple(s.relpath for s in reuse.sources) if reuse is not None else (),
    )


def _provenance(plan: ExtractionPlan, encoder: EncoderIdentity) -> dict[str, object]:
    device_name = (
        torch.cuda.get_device_name(plan.device)
        if plan.device.type == "cuda"
        else platform.processor()
    )
    return {
        "model": plan.spec.name,
        "family": plan.spec.family,
        "source": encoder.source,
        "revision": plan.request.revision,
        "weights_fingerprint": encoder.weights_fingerprint,
        "compute_dtype": plan.compute_dtype,
        "storage_dtype": plan.request.storage_dtype,
        "resolution": plan.key.resolution,
        "requested_resolution": plan.request.resolution,
        "preprocessing": plan.preprocessing.describe(),
        "poolings": list(plan.poolings),
        "fingerprint": plan.request.fingerprint,
        "dataset": plan.request.dataset,
        "n_images": len(plan.table.ids),
        "batch_size": plan.request.batch_size,
        "device": f"{plan.device.type}:{device_name}",
        "versions": package_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "created_by": f"{getpass.getuser()}@{socket.gethostname()}",
        "command": " ".join(sys.argv),
    }


def extract(
    request: ExtractionRequest,
    *,
    manifest: Manifest | str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    progress: ProgressFactory | None = None,
    model_cache_dir: str | os.PathLike[str] | None = None,
) -> ExtractionResult:
    """Extract ``request`` into the cache (or find it there) and return the entry.

    ``manifest`` is a loaded manifest or a path (default ``./data_manifest.yaml``); ``cache`` a
    cache root path or URL (default: the manifest's ``cache``). An existing complete entry is
    returned without computing anything; an interrupted one is finished.
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    root = CacheRoot.from_uri(str(cache) if cache is not None else man.cache)
    identity = identify_encoder(
        request.model,
        revision=request.revision,
        cache_dir=Path(model_cache_dir) if model_cache_dir is not None else None,
    )
    plan = plan_extraction(request, man, identity, progress)
    with distributed.session(plan.device) as ctx:
        if ctx.device != plan.device:
            plan = replace(plan, device=ctx.device)
        if not ctx.distributed:
            return _extract_one(plan, identity, root, progress)
        return _extract_ranks(plan, identity, root, ctx, progress)


def load_planned_encoder(
    plan: ExtractionPlan, identity: EncoderIdentity, ctx: distributed.DistContext
) -> LoadedEncoder:
    """The encoder as this request asks: replica or FSDP shard, optionally compiled."""
    from embedkit.models.sharding import load_sharded_encoder, resolve_shard

    request = plan.request
    mode = resolve_shard(
        request.shard,
        _shape(plan, identity),
        side=plan.key.resolution,
        batch_size=request.batch_size,
        device=plan.device,
        world_size=ctx.world_size,
        local_world_size=ctx.env.local_world_size,
        dtype=plan.compute_dtype,
    )
    if mode == "fsdp":
        encoder = load_sharded_encoder(
            identity, ctx.mesh(), device=plan.device, dtype=plan.compute_dtype
        )
    else:
        if request.device_map is not None and ctx.world_size > 1:
            raise EmbedkitError(
                f"--device-map places one model over all GPUs of one process; it cannot run "
                f"in each of {ctx.world_size} torchrun ranks. Use --shard fsdp instead."
            )
        encoder = load_encoder(
            identity,
            device=plan.device,
            dtype=plan.compute_dtype,
            device_map=request.device_map,
        )
        if get_family(plan.spec.family).channels_last and plan.device.type == "cuda":
            cast(Any, encoder.model).to(memory_format=torch.channels_last)
    if request.compile:
        encoder.model = torch.compile(encoder.model, dynamic=False)  # type: ignore[assignment]
    return encoder


def _shape(plan: ExtractionPlan, identity: EncoderIdentity) -> ModelShape:
    from embedkit.models.registry import read_config_json

    return shape_from_config(plan.spec, read_config_json(identity.directory))


def _auto_batch(
    plan: ExtractionPlan, encoder: LoadedEncoder, ctx: distributed.DistContext
) -> ExtractionPlan:
    """``--auto-batch``: the largest batch (up to 8x --batch-size) that fits, on every rank."""
    from embedkit.models.throughput import largest_batch

    if not plan.request.auto_batch or plan.device.type != "cuda":
        return plan  # on CPU memory is not the limit: keep --batch-size
    side, stored = plan.key.resolution, tuple(plan.shapes)

    def attempt(n: int) -> None:
        encoder.encode(torch.zeros(n, 3, side, side, device=plan.device), stored)
        torch.cuda.synchronize(plan.device)

    start = plan.request.batch_size
    found = largest_batch(attempt, start=start, limit=min(8 * start, plan.request.unit_rows))
    best = int(ctx.min(found))
    return replace(plan, request=replace(plan.request, batch_size=best))


def _report(
    plan: ExtractionPlan,
    identity: EncoderIdentity,
    images: int,
    seconds: float,
    devices: int,
) -> ThroughputReport:
    from embedkit.models.throughput import device_peak_tflops, flops_per_image

    name, peak = device_peak_tflops(plan.device)
    per_image = flops_per_image(_shape(plan, identity), plan.key.resolution)
    return ThroughputReport(images, seconds, per_image, devices, name, peak)


def _finish(entry: FeatureEntry, elapsed: float, result: ExtractionResult | None) -> None:
    """Finalize the entry unless another job already did (exactly one job writes it)."""
    if entry.is_complete:
        return
    extra: dict[str, object] = {"elapsed_s": round(elapsed, 3)}
    if result is not None:
        extra["images_per_s_last_run"] = round(result.images_per_s, 3)
    with suppress(EntryExistsError):  # completed by another job since the check above
        entry.finalize(extra)


def _open_entry(
    plan: ExtractionPlan, identity: EncoderIdentity, root: CacheRoot
) -> tuple[FeatureEntry, ReusePlan]:
    """The entry (created now, or found to resume) and the reuse plan it records.

    A new entry records the sources of its reuse plan in its provenance; a resumed one is
    planned against the sources it recorded (by whichever job created it), so every job and
    every run of one entry copies the same rows from the same places.
    """
    reuse = _plan_reuse(plan, root, _recorded_sources(existing_attrs(root, plan.key.relpath())))
    provenance = _provenance(plan, identity)
    provenance["reuse"] = reuse.provenance()
    entry = FeatureEntry.create_or_open(
        root,
        plan.key,
        ids=plan.table.ids,
        shapes=plan.shapes,
        unit_rows=plan.request.unit_rows,
        provenance=provenance,
        compression=plan.request.compression,
        lease_ttl_s=plan.request.lease_ttl_s,
    )
    recorded = _recorded_sources(entry.attrs)
    if recorded != [s.relpath for s in reuse.sources]:  # another job created it meanwhile
        reuse = _plan_reuse(plan, root, recorded)
    return entry, reuse


def _recorded_sources(attrs: dict[str, Any] | None) -> list[str] | None:
    """The reuse sources an existing entry recorded (None: no entry yet; [] for entries made
    without reuse, which stay without it)."""
    if attrs is None:
        return None
    reuse = (attrs.get("provenance") or {}).get("reuse") or {}
    return [str(s["relpath"]) for s in reuse.get("sources", [])]


def _plan_reuse(plan: ExtractionPlan, root: CacheRoot, sources: list[str] | None) -> ReusePlan:
    if not plan.request.reuse or not plan.fingerprints:
        return ReusePlan.compute_all(len(plan.table.ids))
    return plan_reuse(
        root, plan.key, plan.table.ids, plan.fingerprints, plan.shapes, sources=sources
    )


def _existing(plan: ExtractionPlan, root: CacheRoot) -> FeatureEntry | None:
    """The complete entry of ``plan`` if there is one (after ``--overwrite`` removed it: None)."""
    if not root.exists(plan.key.relpath()):
        return None
    if plan.request.overwrite:
        remove_entry(root, plan.key)
        return None
    try:
        found = FeatureEntry.open(root, plan.key, allow_partial=True)
    except CacheNotFoundError:  # another job is creating its layout right now
        return None
    return found if found.is_complete else None


def _merge(total: ExtractionResult | None, part: ExtractionResult) -> ExtractionResult:
    if total is None:
        return part
    total.computed_units += part.computed_units
    total.images_computed += part.images_computed
    total.elapsed_s += part.elapsed_s
    total.skipped.extend(part.skipped)
    total.units += part.units
    total.images_copied += part.images_copied
    total.copied_from = tuple(dict.fromkeys((*total.copied_from, *part.copied_from)))
    return total


def _copy_claimed(
    plan: ExtractionPlan,
    entry: FeatureEntry,
    leases: Leases,
    copier: RowCopier,
    progress: ProgressFactory | None,
    prefer: Sequence[int] = (),
) -> tuple[ExtractionResult | None, int | None]:
    """Claim and copy the units whose rows are all copies (no encoder needed).

    Stops when no copy unit is claimable; returns what it did and the claimed unit that needs
    a forward pass (the first unit claimed after the copy units, or None): the caller computes
    it first.
    """
    reuse = copier.plan
    copy_units = [u for u in entry.pending_units() if reuse.is_copy_unit(*entry.unit_bounds(u))]
    if not copy_units:
        return None, None
    wanted = set(copy_units)
    order = [*(u for u in prefer if u in wanted), *copy_units]
    total_rows = sum(e - s for s, e in map(entry.unit_bounds, copy_units))
    started = time.perf_counter()
    writer = _UnitWriter(entry, leases)
    copied = 0
    held: int | None = None
    what = f"copying rows from {len(reuse.sources)} entries"
    bar = progress(total_rows, what) if progress is not None else None
    with bar if bar is not None else nullcontext(lambda _n: None) as advance:
        try:
            for u in leases.iter_units(entry, order):
                if u not in wanted:
                    held = u
                    break
                n = _copy_unit(plan, entry, copier, u, writer)
                copied += n
                advance(n)
        finally:
            writer.close()
    done = ExtractionResult(
        entry=entry,
        computed_units=writer.written,
        reused=False,
        elapsed_s=time.perf_counter() - started,
        images_computed=0,
        units=tuple(writer.units),
        images_copied=copied,
        copied_from=tuple(s.relpath for s in reuse.sources),
    )
    return done, held


def _needs_encoder(entry: FeatureEntry, reuse: ReusePlan) -> bool:
    """Whether a pending unit of ``entry`` has a row to compute."""
    return any(not reuse.is_copy_unit(*entry.unit_bounds(u)) for u in entry.pending_units())


def _copy_then_compute(
    plan: ExtractionPlan,
    identity: EncoderIdentity,
    entry: FeatureEntry,
    leases: Leases,
    copier: RowCopier,
    progress: ProgressFactory | None,
) -> ExtractionResult | None:
    """Copy what can be copied, then compute the rest (the encoder is loaded only when a unit
    needs it); waits for other jobs and takes over their expired units, as
    :func:`_compute_claimed` does."""
    total: ExtractionResult | None = None
    encoder: LoadedEncoder | None = None
    while True:
        part, held = _copy_claimed(plan, entry, leases, copier, progress)
        if part is not None:
            total = _merge(total, part)
        if held is not None or _needs_encoder(entry, copier.plan):
            if encoder is None:
                ctx = distributed.DistContext(distributed.rank_env({}), plan.device, None)
                encoder = load_planned_encoder(plan, identity, ctx)
                plan = _auto_batch(plan, encoder, ctx)
            if held is not None:  # claimed by the copy phase: ours to compute
                part = run_extraction(
                    plan, encoder, entry, units=[held], leases=leases, progress=progress,
                    copier=copier,
                )  # fmt: skip
                total = _merge(total, part)
            part = run_extraction(
                plan, encoder, entry, leases=leases, progress=progress, copier=copier
            )
            total = _merge(total, part)
        if not _wait_for_others(entry, leases, progress):
            return total


def _compute_claimed(
    plan: ExtractionPlan,
    encoder: LoadedEncoder,
    entry: FeatureEntry,
    leases: Leases,
    progress: ProgressFactory | None,
    prefer: Sequence[int] = (),
    copier: RowCopier | None = None,
    held: int | None = None,
) -> ExtractionResult | None:
    """Claim and compute units until every unit of ``entry`` is written (by anyone).

    When nothing is claimable (other jobs hold the rest) this waits, and takes over the units
    of a job whose claims expire. ``held``: a unit claimed already, computed first.
    """
    total: ExtractionResult | None = None
    if held is not None:
        total = run_extraction(
            plan, encoder, entry, units=[held], leases=leases, progress=progress, copier=copier
        )
    while True:
        part = run_extraction(
            plan, encoder, entry, leases=leases, progress=progress, prefer=prefer, copier=copier
        )
        total = _merge(total, part)
        if not _wait_for_others(entry, leases, progress):
            return total


def _wait_for_others(entry: FeatureEntry, leases: Leases, progress: ProgressFactory | None) -> bool:
    """:meth:`Leases.wait_for_units`, shown as a bar of the units written so far."""
    if progress is None or not entry.pending_units():
        return leases.wait_for_units(entry)
    with progress(entry.n_units, "units (other jobs are writing the rest)") as advance:
        shown = 0

        def polled(done: int) -> None:
            nonlocal shown
            advance(done - shown)
            shown = done

        return leases.wait_for_units(entry, polled)


def _compute_rounds(
    plan: ExtractionPlan,
    encoder: LoadedEncoder,
    entry: FeatureEntry,
    leases: Leases,
    ctx: distributed.DistContext,
    progress: ProgressFactory | None,
    prefer: Sequence[int],
    copier: RowCopier | None = None,
    held: int | None = None,
) -> ExtractionResult | None:
    """:func:`_compute_claimed` for FSDP ranks, which must run their forwards in lockstep.

    Each round every rank claims at most one unit, and all ranks make as many forward calls as
    the busiest one; the job ends when no rank sees a pending unit.
    """
    total: ExtractionResult | None = None
    while True:
        u, held = (held, None) if held is not None else (leases.claim_unit(entry, prefer), None)
        mine = [] if u is None else [u]
        reuse = copier.plan if copier is not None else None
        most = int(ctx.max(len(_unit_batches(entry, mine, plan.request.batch_size, reuse))))
        if most == 0 and int(ctx.max(len(mine))) == 0:
            if int(ctx.max(len(entry.pending_units()))) == 0:
                return total
            leases.wait_for_units(entry)
            continue
        part = run_extraction(
            plan, encoder, entry, units=mine, leases=leases, progress=progress,
            min_forwards=most, copier=copier,
        )  # fmt: skip
        total = _merge(total, part)


def _leases(plan: ExtractionPlan, entry: FeatureEntry, rank: int | None = None) -> Leases:
    ttl = resolve_ttl(plan.request.lease_ttl_s)
    return Leases(entry.root, entry.relpath, ttl, Owner.this_process(rank))


def _extract_one(
    plan: ExtractionPlan,
    identity: EncoderIdentity,
    root: CacheRoot,
    progress: ProgressFactory | None,
) -> ExtractionResult:
    started = time.perf_counter()
    found = _existing(plan, root)
    if found is not None:
        return ExtractionResult(found, 0, True, 0.0, 0, found.skipped())
    entry, reuse = _open_entry(plan, identity, root)
    if not entry.is_complete and not entry.pending_units():  # its last writer stopped early
        _finish(entry, time.perf_counter() - started, None)
    if entry.is_complete:  # another job finished it just now
        return ExtractionResult(entry, 0, True, 0.0, 0, entry.skipped())
    with _leases(plan, entry) as leases:
        result = _copy_then_compute(plan, identity, entry, leases, RowCopier(root, reuse), progress)
    elapsed = time.perf_counter() - started
    _finish(entry, elapsed, result)
    if result is None or not result.units:  # other jobs wrote every unit meanwhile
        return ExtractionResult(entry, 0, True, elapsed, 0, entry.skipped())
    result.elapsed_s = elapsed
    if result.images_computed:
        result.throughput = _report(plan, identity, result.images_computed, elapsed, 1)
    return result


def _extract_ranks(
    plan: ExtractionPlan,
    identity: EncoderIdentity,
    root: CacheRoot,
    ctx: distributed.DistContext,
    progress: ProgressFactory | None,
) -> ExtractionResult:
    """One rank of a torchrun job; every rank of the job calls this with the same plan.

    Every rank claims units for itself (its share ``sorted(pending)[rank::world]`` first), so
    ranks split the work between them and with any other job on the same entry exactly as
    separate processes do; FSDP ranks claim in lockstep rounds. Rank 0 finalizes after every
    rank has stopped.
    """
    started = time.perf_counter()
    found = _existing(plan, root) if ctx.is_main else None  # --overwrite removes on rank 0 only
    ctx.barrier()
    if ctx.broadcast(found is not None):
        done = FeatureEntry.open(root, plan.key)
        return ExtractionResult(done, 0, True, 0.0, 0, done.skipped(), ctx.rank, ctx.world_size)
    entry, reuse = _open_entry(plan, identity, root)  # the layout is made by exactly one rank
    if ctx.broadcast(entry.is_complete):  # another job finished it just now
        ctx.barrier()
        return ExtractionResult(entry, 0, True, 0.0, 0, entry.skipped(), ctx.rank, ctx.world_size)
    copier = RowCopier(root, reuse)
    encoder = load_planned_encoder(plan, identity, ctx)
    plan = _auto_batch(plan, encoder, ctx)
    share = distributed.assign_units(entry.pending_units(), ctx.rank, ctx.world_size)
    ctx.barrier()  # all ranks start claiming together, each with its own share first
    bar = progress if ctx.is_main else None
    with _leases(plan, entry, ctx.rank) as leases:
        copied, held = _copy_claimed(plan, entry, leases, copier, bar, share)
        if _is_sharded(encoder):
            result = _compute_rounds(plan, encoder, entry, leases, ctx, bar, share, copier, held)
        else:
            result = _compute_claimed(plan, encoder, entry, leases, bar, share, copier, held)
    if copied is not None:
        result = _merge(copied, result) if result is not None else copied
    result = result or ExtractionResult(entry, 0, False, 0.0, 0)
    result.images_copied = int(ctx.sum(result.images_copied))
    images = int(ctx.sum(result.images_computed))
    seconds = ctx.max(result.elapsed_s)
    units_written = int(ctx.sum(result.computed_units))
    ctx.barrier()  # every rank's units are written (run_extraction joins its writer)
    elapsed = time.perf_counter() - started
    if ctx.is_main:
        _finish(entry, elapsed, result)
    ctx.barrier()  # no rank reports success before the entry is complete
    result.elapsed_s = elapsed
    result.rank, result.world_size = ctx.rank, ctx.world_size
    result.computed_units, result.images_computed = units_written, images
    result.reused = units_written == 0
    result.throughput = _report(plan, identity, images, seconds, ctx.world_size)
    return result


def _is_sharded(encoder: LoadedEncoder) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in encoder.model.parameters())
