"""Segmentation finetuning: the encoder end to end with a linear head on its patch tokens.

The network is the frozen segmentation probe's made trainable (DINOv2 linear evaluation for
segmentation): one linear layer maps every patch token to ``K + 1`` logits (background and the
``K`` classes), the logit grid is upsampled bilinearly to the mask size, and the loss is
cross-entropy plus the soft Dice loss of the foreground classes (``1 - mean_k (2 |P∩T| + 1) /
(|P| + |T| + 1)`` over the batch). Which encoder parameters train is the finetuning method's
choice (:mod:`embedkit.finetune.methods`: full, LoRA, BitFit, linear), as for classification;
so are the optimiser, schedule, warm-up, layer decay, epoch seeds, checkpoints and resume
(:mod:`embedkit.finetune.train`). Training masks are resized (nearest) to the input resolution
and flipped / rotated with their image (the one-hot map goes through the image's warp and is
read back by argmax; pixels warped in from outside are background).

Label maps and classes are the frozen probe's: the manifest's ``classes:`` and ``mask`` column,
read row by row by :class:`embedkit.data.masks.RowLabelMaps` (a volume dataset's label map slice
by slice on the image slices' grid). Evaluation on test is the probe's too
(:class:`embedkit.eval.segmentation.CaseScorer`, conventions in :mod:`embedkit.eval.segmentation`
and docs/statistics.md): each image predicted at its mask's own size and scored per image, or
per volume for a volume dataset (slices stacked back in order): Dice and IoU per class (+ HD95
in mm for volumes; a class absent from truth and prediction has no score), their mean over
classes, and 95% bootstrap percentile CIs over images or volumes. The record (``task =
"segmentation"``) keeps the per-image (per-volume) Dice as its scores
(:func:`embedkit.results.segmentation.dice_table`, the probe's table), so frozen and finetuned
runs pair by id in the report, and a few best and worst test cases beside it as
``<record>.overlays.npz`` (:mod:`embedkit.results.segmentation`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from embedkit.data.masks import RowLabelMaps
from embedkit.data.readers import read_image
from embedkit.data.transforms import Preprocessing
from embedkit.distributed import DistContext
from embedkit.errors import ConfigError, EmbedkitError, ImageReadError, ManifestError
from embedkit.eval.segmentation import (
    CaseScorer,
    SegmentationScores,
    mean_dice,
    ranked_cases,
    summarize_segmentation,
)
from embedkit.finetune import checkpoint as ckpt
from embedkit.finetune.augment import apply as apply_augmentation
from embedkit.finetune.augment import draw as draw_augmentation
from embedkit.finetune.model import EncoderHead
from embedkit.manifest import DatasetTable
from embedkit.models import EncoderSpec, get_family, load_encoder
from embedkit.results import ResultRecord, ResultsDir
from embedkit.results.consistency import DatasetSignature, TestTargets, segmentation_reference
from embedkit.results.segmentation import (
    SEGMENTATION_TASK,
    Overlays,
    dice_table,
    overlays_name,
    write_overlays,
)

if TYPE_CHECKING:
    from embedkit.finetune.request import FinetuneRequest
    from embedkit.finetune.train import EpochLog, FinetuneOutcome, _Plan

__all__ = [
    "OVERLAY_CASES",
    "Segmenter",
    "expected_results",
    "label_maps",
    "run_segmentation",
    "segmentation_loss",
]


#: Best and worst test cases kept for the report's overlay figure (each).
OVERLAY_CASES = 3


def label_maps(table: DatasetTable, dataset: str) -> RowLabelMaps:
    """The label map of every row of ``table`` (the manifest's ``classes:`` and ``mask``)."""
    if table.classes is None or table.masks is None:
        raise ManifestError(
            f"dataset {dataset!r} has no label maps: add `classes:` (background first) to its "
            "manifest entry and a `mask` column of label-map paths to its index"
        )
    return RowLabelMaps(table.masks, table.paths, table.classes, table.volume_slices)


class Segmenter(EncoderHead):
    """``upsample(head(patch tokens))``: logits of shape (B, n_classes + 1, H, W)."""

    head: nn.Linear

    def __init__(self, encoder: nn.Module, spec: EncoderSpec, n_classes: int):
        super().__init__(encoder, spec)
        self.n_outputs = n_classes + 1  # background is class 0
        self.head = nn.Linear(spec.embed_dim, self.n_outputs)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        adapter = get_family(self.spec.family)
        image_size = (int(pixels.shape[2]), int(pixels.shape[3]))
        outputs = adapter.forward(self.encoder, pixels, self.spec)
        patches = adapter.tokens(outputs, self.spec, image_size).patches  # (B, h, w, D)
        grid = self.head(patches.to(self.head.weight.dtype)).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size or image_size, mode="bilinear", align_corners=False)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0
) -> torch.Tensor:
    """Cross-entropy (mean over pixels) + soft Dice loss of the foreground classes over the batch.

    ``logits`` (B, K + 1, H, W), ``target`` (B, H, W) int64 with values in 0..K."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)[:, 1:]
    truth = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * truth).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    dice = ((2 * inter + smooth) / (total + smooth)).mean()
    return ce + (1 - dice)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU (as classification finetuning); fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Pairs(Dataset[tuple[torch.Tensor, torch.Tensor, int, str]]):
    """(pixels, label map resized to the input, row, error) of a row; on an unreadable image
    or mask, zeros and the error."""

    def __init__(self, table: DatasetTable, masks: RowLabelMaps, prep: Preprocessing):
        self.sources, self.masks, self.prep = table.sources, masks, prep

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        side = self.prep.size
        try:
            pixels = self.prep(read_image(self.sources[row]))
            label = torch.from_numpy(self.masks.row(row)[0])
        except ImageReadError as exc:
            return (
                torch.zeros(3, side, side),
                torch.zeros(side, side, dtype=torch.int64),
                row,
                str(exc),
            )
        resized = F.interpolate(label[None, None].float(), size=(side, side), mode="nearest-exact")
        return pixels, resized[0, 0].long(), row, ""


def _collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor, int, str]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    return (
        torch.stack([i[0] for i in items]),
        torch.stack([i[1] for i in items]),
        torch.tensor([i[2] for i in items], dtype=torch.int64),
        [i[3] for i in items],
    )


def _warp_masks(
    target: torch.Tensor, n_outputs: int, flips: torch.Tensor, angles: torch.Tensor
) -> torch.Tensor:
    """The label maps under the images' flip + rotation (one-hot warp, argmax; outside = 0)."""
    onehot = F.one_hot(target, n_outputs).permute(0, 3, 1, 2).float()
    warped = apply_augmentation(onehot, flips, angles)
    inside = warped.sum(1) > 0.5
    return torch.where(inside, warped.argmax(1), torch.zeros_like(target))


class _SegRun:
    """One segmentation run: the model, its data and the batches over a list of rows."""

    def __init__(
        self,
        request: FinetuneRequest,
        plan: _Plan,
        model: Segmenter,
        masks: RowLabelMaps,
        device: torch.device,
    ):
        self.request, self.plan, self.model, self.masks = request, plan, model, masks
        self.device = device
        table = plan.table
        self.pairs = _Pairs(table, masks, plan.preprocessing)
        self.skipped: dict[str, str] = {}

    def batches(self, rows: np.ndarray) -> DataLoader[tuple[torch.Tensor, torch.Tensor, int, str]]:
        workers = self.request.num_workers
        return DataLoader(
            Subset(self.pairs, [int(r) for r in rows]),
            batch_size=self.request.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=workers > 0,
        )

    def readable(
        self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        pixels, target, rows, errors = batch
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        for row, error in zip(rows.tolist(), errors, strict=True):
            if error:
                self.skipped[self.plan.table.ids[row]] = error
        if not bool(ok.any()):
            return None
        return pixels[ok], target[ok], rows[ok]

    def predict(
        self, rows: np.ndarray
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(pixels, targets at the input size, rows, logits) of each batch of the readable
        rows of ``rows``, in eval mode without gradients."""
        self.model.eval()
        with torch.no_grad():
            for batch in self.batches(rows):
                part = self.readable(batch)
                if part is None:
                    continue
                pixels, target, kept = part
                with _autocast(self.device):
                    logits = self.model(pixels.to(self.device))
                yield pixels, target, kept, logits

    def mean_loss(self, rows: np.ndarray) -> float:
        total, count = 0.0, 0
        for _, target, _, logits in self.predict(rows):
            loss = segmentation_loss(logits, target.to(self.device))
            total, count = total + float(loss) * len(target), count + len(target)
        return total / max(count, 1)


def run_segmentation(
    request: FinetuneRequest,
    plan: _Plan,
    ctx: DistContext,
    out: ResultsDir,
    cache_dir: Path | None,
    on_epoch: Callable[[EpochLog], None] | None,
    requested_resolution: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> FinetuneOutcome:
    """Train, keep the epoch of lowest validation loss, evaluate on test and write the record
    (called by :func:`~embedkit.finetune.train.run_finetune` for ``task="segmentation"``)."""
    from embedkit.finetune.train import (
        EpochLog,
        FinetuneOutcome,
        _epoch_seed,
        _load_trainable,
        _lr_factor,
        _param_groups,
        _trainable,
        prepare_model,
        split_rows,
    )

    if ctx.world_size > 1:
        raise ConfigError(
            "segmentation finetuning runs in one process; run it without torchrun / --nproc"
        )
    masks = plan.masks
    if masks is None:
        raise EmbedkitError("internal: a segmentation plan without masks")
    run_dir = out.root / "runs" / plan.run_id
    found = out.find(plan.relpath) if not request.overwrite else None
    if found is not None:
        path = (out.root / plan.relpath).with_suffix(".json")
        return FinetuneOutcome(found, path, True, run_dir)
    if request.overwrite:
        for stale in run_dir.glob("epoch-*.safetensors"):
            stale.unlink()

    started = time.perf_counter()
    table = plan.table
    rows = split_rows(request, table)
    notes: list[str] = []
    encoder = load_encoder(request.model, device="cpu", cache_dir=cache_dir)
    torch.manual_seed(request.seed)
    model = Segmenter(encoder.model, plan.spec, len(masks.classes) - 1)
    counts = prepare_model(model, request, plan, ctx.device, notes)
    run = _SegRun(request, plan, model, masks, ctx.device)

    lr = request.effective_lr
    optimizer = torch.optim.AdamW(
        _param_groups(model, lr, request.weight_decay, request.layer_decay), lr=lr
    )
    train_rows = rows["train"]
    steps_per_epoch = math.ceil(len(train_rows) / request.batch_size)
    total_steps = steps_per_epoch * request.epochs
    warmup_steps = max(1, round(request.warmup * total_steps))
    state = ckpt.Checkpoint(plan.run_id, 0, 0, {}, _trainable(model), {}, 0, math.inf)
    latest = ckpt.latest_checkpoint(run_dir)
    resumed_from = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, plan.run_id)
        _load_trainable(model, state.model)
        optimizer.load_state_dict(state.optimizer)
        resumed_from = state.epoch
    has_val = len(rows["val"]) > 0
    if not has_val:
        notes.append("no validation split: the last epoch is used")

    for epoch in range(state.epoch, request.epochs):
        tick = time.perf_counter()
        seed = _epoch_seed(request.seed, epoch)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
        flips, angles = draw_augmentation(len(order), generator)
        position = np.empty(len(table), dtype=np.int64)
        position[order] = np.arange(len(order))
        model.train()
        losses: list[float] = []
        for batch in run.batches(order):
            part = run.readable(batch)
            if part is None:
                continue
            pixels, target, kept = part
            pixels, target = pixels.to(ctx.device), target.to(ctx.device)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(state.step, total_steps, warmup_steps)
            if request.augment:
                at = torch.from_numpy(position[kept.numpy()])
                pixels = apply_augmentation(pixels, flips[at], angles[at])
                target = _warp_masks(target, model.n_outputs, flips[at], angles[at])
            with _autocast(ctx.device):
                logits = model(pixels)
            loss = segmentation_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            if on_batch is not None:
                on_batch(state.step, total_steps)
            losses.append(float(loss.detach()))
        val_loss = run.mean_loss(rows["val"]) if has_val else None
        state.epoch = epoch + 1
        score = val_loss if val_loss is not None else -float(state.epoch)
        if score < state.best_loss:
            state.best_loss, state.best_epoch, state.best = score, state.epoch, _trainable(model)
        log = EpochLog(
            state.epoch,
            float(np.mean(losses)) if losses else math.nan,
            val_loss,
            float(optimizer.param_groups[-1]["lr"]),
            round(time.perf_counter() - tick, 3),
        )
        state.history.append({k: v for k, v in asdict(log).items() if v is not None})
        state.model = _trainable(model)
        state.optimizer = optimizer.state_dict()
        ckpt.save(run_dir, state)
        if on_epoch is not None:
            on_epoch(log)

    _load_trainable(model, state.best)
    scores, shown = _evaluate(run, rows["test"])
    overlays = _overlays(run, scores, shown, ctx.device)
    if run.skipped:
        notes.append(
            f"{len(run.skipped)} unreadable images or masks left out: "
            + "; ".join(f"{i}: {e}" for i, e in sorted(run.skipped.items())[:3])
        )
    record, path = _write_record(
        request, plan, out, encoder.source, encoder.weights_fingerprint, run_dir, state, counts,
        scores, overlays, rows, notes, resumed_from, str(ctx.device), started,
        requested_resolution,
    )  # fmt: skip
    return FinetuneOutcome(record, path, False, run_dir, resumed_from, record.notes)


def _predict(
    run: _SegRun, rows: np.ndarray
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(row, pixels, target at the input size, logits at the input size) of every readable row
    of ``rows``, in eval mode."""
    for pixels, target, kept, logits in run.predict(rows):
        cpu = logits.float().cpu()
        for i, row in enumerate(kept.tolist()):
            yield row, pixels[i], target[i], cpu[i]


def _evaluate(run: _SegRun, rows: np.ndarray) -> tuple[SegmentationScores, dict[str, int]]:
    """Score every readable test image at its mask's size (volume datasets: every volume), and
    the row shown for each case in the overlays."""
    table, masks = run.plan.table, run.masks
    volumes = table.volumes if table.volume_slices is not None else None
    expected = Counter(volumes[r] for r in rows) if volumes is not None else None
    scorer = CaseScorer(masks.classes, expected=expected)
    for row, _, _, logits in _predict(run, rows):
        truth, spacing = masks.row(row)
        full = logits[None]
        if truth.shape != tuple(full.shape[2:]):
            full = F.interpolate(full, size=truth.shape, mode="bilinear", align_corners=False)
        pred = full[0].argmax(0).numpy()
        if volumes is None or table.slices is None:
            scorer.add(table.ids[row], truth, [pred], key=row)
        else:
            scorer.add(volumes[row], truth, [pred], spacing, key=row, slice_at=table.slices[row])
    if not scorer.shown:
        raise EmbedkitError("no test image and label map could be read; see the notes")
    (scores,) = scorer.finish()
    return scores, scorer.shown


def _overlays(
    run: _SegRun, scores: SegmentationScores, shown: dict[str, int], device: torch.device
) -> Overlays:
    """The best and worst test cases by mean Dice, best first, at the input resolution."""
    picks = ranked_cases(scores, OVERLAY_CASES)
    rows = np.array([shown[scores.ids[k]] for k in picks], dtype=np.int64)
    mean = torch.tensor(run.plan.preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(run.plan.preprocessing.std).view(3, 1, 1)
    views = {
        row: ((pixels * std + mean).mean(0).clamp(0, 1).numpy(), target.numpy(),
              logits.argmax(0).numpy())
        for row, pixels, target, logits in _predict(run, rows)
    }  # fmt: skip
    return Overlays(
        image=np.stack([views[int(r)][0] for r in rows]).astype(np.float32),
        truth=np.stack([views[int(r)][1] for r in rows]).astype(np.int64),
        pred=np.stack([views[int(r)][2] for r in rows]).astype(np.int64),
        ids=np.asarray([scores.ids[k] for k in picks]),
        mean_dice=mean_dice(scores)[picks].astype(np.float64),
    )


def _write_record(
    request: FinetuneRequest,
    plan: _Plan,
    out: ResultsDir,
    source: str,
    weights: str,
    run_dir: Path,
    state: ckpt.Checkpoint,
    counts: dict[str, int],
    scores: SegmentationScores,
    overlays: Overlays,
    rows: dict[str, np.ndarray],
    notes: list[str],
    resumed_from: int,
    device: str,
    started: float,
    requested_resolution: int,
) -> tuple[ResultRecord, Path]:
    labels = list(scores.labels)
    metrics, per_label = summarize_segmentation(scores, n_boot=request.n_boot, seed=request.seed)
    from embedkit.finetune.train import finetune_record

    record = finetune_record(
        request, plan, task=SEGMENTATION_TASK, labels=labels, source=source, weights=weights,
        run_dir=run_dir, state=state, rows=rows, metrics=metrics, per_label=per_label,
        notes=notes, started=started, requested_resolution=requested_resolution,
        extra={
            "parameters": counts, "resumed_from_epoch": resumed_from, "device": device,
            "world_size": 1, "batch_per_rank": request.batch_size,
            "n_scored": {"test": len(scores.ids)},
            "scored_per": "volume" if plan.table.volume_slices is not None else "image",
        },
    )  # fmt: skip
    record.extra["overlays"] = overlays_name(record)
    write_overlays(out, record, overlays)
    path = out.write(record, dice_table(scores), overwrite=request.overwrite)
    return record, path


def expected_results(plan: _Plan) -> tuple[DatasetSignature, TestTargets]:
    """What records of this segmentation dataset must agree on
    (:func:`~embedkit.results.consistency.segmentation_reference`, as the frozen probe)."""
    reference = segmentation_reference(plan.table)
    if reference is None:
        raise EmbedkitError("internal: a segmentation plan without masks")
    return reference
