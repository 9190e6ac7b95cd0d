"""`embedkit finetune`: train an encoder + linear head, keep the best epoch, evaluate on test.

The run uses the encoder from the registry and the preprocessing of extraction
(``Preprocessing(size=R, mean=spec.mean, std=spec.std)``), the manifest's train / val / test
splits, and writes a result record in the probes' format (``kind = "finetune-<method>"``, the
same test metrics with bootstrap CIs, test scores kept for paired tests), so ``embedkit report``
compares probes and finetuning on the same test images.

Training: AdamW (weight decay 0 by default), linear warm-up then cosine decay per step,
optional layer-wise lr decay (families whose adapter declares depth-ordered blocks: the ViTs),
flip + small-rotation augmentation on train only, BCE-with-logits with
``pos_weight = neg / pos`` (multi-label, masked entries ignored) or cross-entropy (multi-class).
The best epoch is the one with the lowest validation loss. On a GPU, bf16 autocast and (if
asked) gradient checkpointing; on CPU, fp32 without either.

Segmentation (``task="segmentation"``): a head on the patch tokens, masks from the index's mask
column, Dice / IoU records; the same plan, optimiser groups, schedule, epoch seeds and
checkpoints in its own loop, one process (:mod:`embedkit.finetune.segmentation`).

Resuming: after each epoch a checkpoint is written to ``<results>/runs/<run id>/``; rerunning
the same request continues from the last finished epoch. Data order, augmentation and dropout
are seeded per epoch, so on CPU a resumed run ends with the same weights as an uninterrupted one.

Data parallel: under ``torchrun`` the model is wrapped in DDP and each global batch
(``batch_size x world_size`` images of the epoch order) is split over the ranks by position
(:mod:`embedkit.finetune.ddp`); the loss is scaled so that the averaged gradient is that of the
global batch mean, so the run equals one process with the global batch (the run id holds the
global batch, not the rank count). Rank 0 alone writes checkpoints and the record.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedkit import distributed
from embedkit.data.dataset import Batch, ImageDataset, make_loader
from embedkit.data.masks import RowLabelMaps
from embedkit.data.transforms import Preprocessing
from embedkit.distributed import DistContext
from embedkit.errors import ConfigError, EmbedkitError
from embedkit.eval import evaluate_scores
from embedkit.finetune import checkpoint as ckpt
from embedkit.finetune import ddp
from embedkit.finetune.augment import MAX_ROTATION_DEG
from embedkit.finetune.augment import apply as apply_augmentation
from embedkit.finetune.augment import draw as draw_augmentation
from embedkit.finetune.losses import masked_loss, pos_weight
from embedkit.finetune.methods import count_parameters, get_method
from embedkit.finetune.model import Classifier, EncoderHead, default_pooling
from embedkit.finetune.request import FinetuneRequest
from embedkit.manifest import DatasetTable, Manifest, load_manifest
from embedkit.models import (
    EncoderSpec,
    LoadedEncoder,
    get_family,
    identify_encoder,
    load_encoder,
    validate_resolution,
)
from embedkit.models.device import resolve_device
from embedkit.results import ResultRecord, ResultsDir, ScoreTable, record_id
from embedkit.results.consistency import check_results_dataset
from embedkit.store import canonical_json, digest_ids
from embedkit.versions import package_versions

__all__ = ["DEFAULT_RESULTS", "EpochLog", "FinetuneOutcome", "FinetuneRequest", "run_finetune"]

DEFAULT_RESULTS = "embedkit-results"


@dataclass(frozen=True, slots=True)
class EpochLog:
    epoch: int  # 1-based
    train_loss: float
    val_loss: float | None
    lr: float  # head learning rate at the end of the epoch
    seconds: float


@dataclass
class FinetuneOutcome:
    record: ResultRecord
    path: Path
    reused: bool
    run_dir: Path
    resumed_from: int = 0  # finished epochs found in a checkpoint (0: started fresh)
    notes: list[str] = field(default_factory=list)
    rank: int = 0  # this process's rank in a torchrun job (rank 0 reports)
    world_size: int = 1


@dataclass
class _Plan:
    table: DatasetTable
    spec: EncoderSpec
    size: int
    preprocessing: Preprocessing
    pooling: str
    params: dict[str, Any]
    identity: dict[str, Any]
    run_id: str
    relpath: str
    masks: RowLabelMaps | None = None  # segmentation: the label map of every row, the classes


def _plan(
    request: FinetuneRequest, manifest: Manifest, cache_dir: Path | None, *, world_size: int = 1
) -> _Plan:
    """Everything about a run that needs no weights; ``batch_size`` in the identity is the
    global batch (``request.batch_size x world_size``), so 2 ranks x 16 is the run of 1 x 32."""
    ident = identify_encoder(request.model, cache_dir=cache_dir)
    spec = ident.spec
    size = validate_resolution(spec, request.resolution)
    config = manifest.dataset(request.dataset)
    table = config.load()
    preprocessing = Preprocessing(size=size, mean=spec.mean, std=spec.std)
    segmentation = request.task == "segmentation"
    masks = None
    if segmentation:
        from embedkit.finetune.segmentation import label_maps

        masks = label_maps(table, request.dataset)
    pooling = "patch" if segmentation else request.pooling or default_pooling(spec)
    if request.layer_decay != 1.0 and not get_family(spec.family).supports_layer_decay:
        raise ConfigError(
            f"layer-wise lr decay applies to ViT families; {spec.name} is a {spec.family} "
            "(use --layer-decay 1.0)"
        )
    method = get_method(request.method)
    params: dict[str, Any] = {
        "method": request.method,
        "epochs": request.epochs,
        "lr": request.effective_lr,
        "batch_size": request.batch_size * world_size,
        "weight_decay": request.weight_decay,
        "warmup": request.warmup,
        "layer_decay": request.layer_decay,
        "optimizer": "adamw",
        "schedule": "linear warm-up + cosine",
        "augment": f"hflip+rot{MAX_ROTATION_DEG:g}" if request.augment else "none",
        "loss": _loss_name(table, segmentation),
        "select": "min val loss",
        "pooling": pooling,
        "n_boot": request.n_boot,
    }
    params.update(method.record_params(spec, request.lora_settings()))
    if segmentation:  # classification run ids stay what they were
        params["task"] = request.task
    device = resolve_device(request.device)
    params["precision"] = "bf16-autocast" if device.type == "cuda" else "fp32"
    params["gradient_checkpointing"] = request.gradient_checkpointing and device.type == "cuda"
    kind = f"finetune-{method.name}"
    identity = {
        "kind": kind,
        "model": spec.name,
        "weights": ident.weights_fingerprint,
        "dataset": request.dataset,
        "ids": digest_ids(table.ids),
        "data": table.splits_digest,
        "preprocessing": canonical_json(preprocessing.describe()),
        "params": params,
        "seed": request.seed,
    }
    run_id = record_id(identity)
    relpath = f"{request.dataset}/{spec.name.replace('/', '--')}/{size}px/{kind}-{run_id}"
    return _Plan(
        table, spec, size, preprocessing, pooling, params, identity, run_id, relpath, masks
    )


def _loss_name(table: DatasetTable, segmentation: bool) -> str:
    if segmentation:
        return "cross-entropy+dice"
    return "bce-pos_weight" if table.labels.kind == "multilabel" else "cross-entropy"


def finetune_record_relpath(
    request: FinetuneRequest,
    manifest: Manifest,
    cache_dir: Path | None = None,
    *,
    world_size: int = 1,
) -> str:
    """Where the result record of ``request`` lives under a results folder (without suffix),
    so planners can tell a finished run from one still to do without training anything."""
    return _plan(request, manifest, cache_dir, world_size=world_size).relpath


def _param_groups(
    model: EncoderHead, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups; with ``layer_decay < 1`` the lr of layer id ``l`` of ``n`` blocks is
    ``lr * layer_decay ** (n + 1 - l)`` (layer ids from the family adapter: 0 = embeddings,
    ``i + 1`` = block ``i``; the final norm and the head train at ``lr``)."""
    depths: dict[str, int] = {}
    if layer_decay != 1.0:
        adapter = get_family(model.spec.family)
        top = len(adapter.blocks(model.encoder)) + 1
        depths = {
            f"encoder.{name}": top - layer
            for name, layer in adapter.layer_ids(model.encoder).items()
        }
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(depths.get(name, 0), []).append(param)
    return [
        {"params": ps, "lr": lr * layer_decay**d, "base_lr": lr * layer_decay**d,
         "weight_decay": weight_decay}
        for d, ps in sorted(groups.items())
    ]  # fmt: skip


def _lr_factor(step: int, total: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1, then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _targets(table: DatasetTable, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = rows.numpy()
    return torch.from_numpy(table.labels.y[idx]), torch.from_numpy(table.labels.mask[idx])


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


_Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # pixels, y, mask, rows


@dataclass
class _Run:
    """One rank's view of a run: the model, the data, and the job it is part of."""

    request: FinetuneRequest
    plan: _Plan
    model: Classifier
    dataset: ImageDataset
    ctx: DistContext
    weight: torch.Tensor | None
    skipped: set[str] = field(default_factory=set)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loader(self, rows: np.ndarray) -> Iterator[Batch]:
        """Batches of ``request.batch_size`` images over ``rows``, in the given order."""
        return iter(
            make_loader(
                self.dataset,
                batch_size=self.request.batch_size,
                num_workers=self.request.num_workers,
                indices=[int(r) for r in rows],
            )
        )

    def readable(self, batch: Batch | None) -> _Part | None:
        """(pixels, y, mask, rows) of the readable images of ``batch`` (None: there are none)."""
        if batch is None:
            return None
        self.skipped.update(i for i, ok in zip(batch.ids, batch.ok.tolist(), strict=True)
                            if not ok)  # fmt: skip
        if not bool(batch.ok.any()):
            return None
        rows = batch.indices[batch.ok]
        y, mask = _targets(self.plan.table, rows)
        pixels = batch.pixels[batch.ok].to(self.device)
        return pixels, y.to(self.device), mask.to(self.device), rows

    def empty_part(self) -> _Part:
        """One black image whose every target is masked: it adds exactly 0 to loss and
        gradients, so a rank without readable images still joins the gradient all-reduce."""
        side = self.plan.size
        y, mask = _targets(self.plan.table, torch.zeros(1, dtype=torch.int64))
        return (
            torch.zeros(1, 3, side, side, device=self.device),
            torch.zeros_like(y).to(self.device),
            torch.zeros_like(mask).to(self.device),
            torch.zeros(0, dtype=torch.int64),
        )

    def mean_loss(self, rows: np.ndarray) -> float:
        """Mean masked loss over the readable images of ``rows`` (eval mode, no augmentation),
        each rank taking its share of ``rows``; every rank gets the job-wide value."""
        self.model.eval()
        total, count = 0.0, 0
        share = ddp.rank_share(rows, self.ctx.rank, self.ctx.world_size)
        with torch.no_grad(), self.autocast():
            for batch in self.loader(share):
                part = self.readable(batch)
                if part is None:
                    continue
                pixels, y, mask, _ = part
                logits = self.model(pixels)
                total += float(masked_loss(logits, y, mask, self.weight, reduction="sum"))
                count += int(mask.sum())
        total, n = ddp.sums(self.ctx, total, count)
        return total / max(n, 1)

    def scores(self, rows: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Rows actually scored, in the order of ``rows``, and their probabilities (sigmoid
        or softmax); each rank scores its share and every rank gets the whole split."""
        self.model.eval()
        kept: list[int] = []
        out: list[np.ndarray] = []
        multiclass = self.plan.table.labels.kind != "multilabel"
        share = ddp.rank_share(rows, self.ctx.rank, self.ctx.world_size)
        with torch.no_grad(), self.autocast():
            for batch in self.loader(share):
                part = self.readable(batch)
                if part is None:
                    continue
                logits = self.model(part[0]).float()
                probs = logits.softmax(1) if multiclass else logits.sigmoid()
                out.append(probs.cpu().numpy().astype(np.float64))
                kept.extend(int(i) for i in part[3])
        width = len(self.plan.table.labels.names)
        mine = np.concatenate(out) if out else np.empty((0, width))
        parts = ddp.gather(self.ctx, (kept, mine))
        all_rows = [r for k, _ in parts for r in k]
        all_scores = np.concatenate([s for _, s in parts]) if parts else mine
        position = {int(r): i for i, r in enumerate(rows)}
        order = sorted(range(len(all_rows)), key=lambda i: position[all_rows[i]])
        return [all_rows[i] for i in order], all_scores[order].reshape(-1, width)

    def gather_skipped(self) -> set[str]:
        return {i for part in ddp.gather(self.ctx, sorted(self.skipped)) for i in part}


def split_rows(request: FinetuneRequest, table: DatasetTable) -> dict[str, np.ndarray]:
    """The rows of each split; an empty train or test split is an error."""
    rows = {s: table.indices(s) for s in ("train", "val", "test")}
    for name in ("train", "test"):
        if len(rows[name]) == 0:
            raise EmbedkitError(
                f"the {name} split of {request.dataset} is empty; check the manifest's splits"
            )
    return rows


def prepare_model(
    model: EncoderHead,
    request: FinetuneRequest,
    plan: _Plan,
    device: torch.device,
    notes: list[str],
) -> dict[str, int]:
    """Apply the method (which parameters train), move the model to ``device``, turn on
    gradient checkpointing where asked and supported (else a note); the parameter counts."""
    get_method(request.method).prepare(model, request.lora_settings())
    model.to(device)
    if plan.params["gradient_checkpointing"]:
        if getattr(model.encoder, "supports_gradient_checkpointing", False):
            model.encoder.gradient_checkpointing_enable()  # type: ignore[operator]
        else:
            notes.append(f"{plan.spec.family} does not support gradient checkpointing; off")
    return count_parameters(model)


def _trainable(model: EncoderHead) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: EncoderHead, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(values) != expected:
        raise ckpt.CheckpointError(
            f"the checkpoint holds {len(values)} tensors but this run trains {len(expected)} "
            "parameters; delete the run folder to start again"
        )
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _oom(request: FinetuneRequest, world_size: int) -> EmbedkitError:
    smaller = max(1, request.batch_size // 2)
    per_rank = " per rank" if world_size > 1 else ""
    hint = " or --gradient-checkpointing" if not request.gradient_checkpointing else ""
    if request.batch_size == 1:
        return EmbedkitError(
            f"out of memory finetuning {request.model} at {request.resolution}px even with batch "
            f"size 1{per_rank}; try a lower --resolution, --method lora or bitfit{hint}"
        )
    return EmbedkitError(
        f"out of memory finetuning {request.model} at {request.resolution}px with batch size "
        f"{request.batch_size}{per_rank}; try --batch-size {smaller}{hint}"
    )


def run_finetune(
    request: FinetuneRequest,
    *,
    manifest: Manifest | str | Path | None = None,
    results: str | Path = DEFAULT_RESULTS,
    model_cache_dir: str | Path | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    requested_resolution: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> FinetuneOutcome:
    """Finetune, select the best epoch on validation, evaluate on test and write the record.

    ``requested_resolution``: the nominal tier the run stands for (a pipeline asks for 512 and
    runs DINOv2 at 518); the record stores it beside the resolution used (default: the
    request's). Sensitivity / specificity are measured at the Youden threshold chosen on the
    best epoch's validation scores.

    An identical finished run is found and returned (``reused``) unless ``overwrite``; an
    interrupted one resumes from ``<results>/runs/<run id>/``. ``on_epoch`` is called after each
    epoch's checkpoint is written (progress display; tests use it to simulate a kill).
    ``on_batch(steps done, total steps)`` is called after every optimiser step (a progress bar
    over all epochs; rank 0 only).

    Under ``torchrun`` every rank calls this: the model is wrapped in DDP, each global batch of
    ``batch_size x world_size`` images is split over the ranks, validation and test are scored
    in shares and gathered, and rank 0 alone writes checkpoints and the record (``on_epoch``
    runs on rank 0 only). Every rank returns the same outcome.
    """
    man = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    cache_dir = Path(model_cache_dir) if model_cache_dir is not None else None
    with distributed.session(resolve_device(request.device)) as ctx:
        plan = _plan(request, man, cache_dir, world_size=ctx.world_size)
        train = _train
        if plan.masks is not None:
            from embedkit.finetune.segmentation import expected_results, run_segmentation

            check_results_dataset(
                results, request.dataset, plan.table, expected=expected_results(plan)
            )
            train = run_segmentation
        else:
            check_results_dataset(results, request.dataset, plan.table)
        try:
            return train(
                request, plan, ctx, ResultsDir(results), cache_dir, on_epoch,
                requested_resolution or request.resolution, on_batch,
            )  # fmt: skip
        except torch.OutOfMemoryError as exc:
            raise _oom(request, ctx.world_size) from exc


def _train(
    request: FinetuneRequest,
    plan: _Plan,
    ctx: DistContext,
    out: ResultsDir,
    cache_dir: Path | None,
    on_epoch: Callable[[EpochLog], None] | None,
    requested_resolution: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> FinetuneOutcome:
    run_dir = out.root / "runs" / plan.run_id
    found = out.find(plan.relpath) if ctx.is_main and not request.overwrite else None
    found = ctx.broadcast(found)
    if found is not None:
        path = (out.root / plan.relpath).with_suffix(".json")
        return FinetuneOutcome(found, path, True, run_dir, rank=ctx.rank, world_size=ctx.world_size)
    if request.overwrite and ctx.is_main:
        for stale in run_dir.glob("epoch-*.safetensors"):
            stale.unlink()
    ctx.barrier()

    started = time.perf_counter()
    table = plan.table
    rows = split_rows(request, table)
    notes: list[str] = []
    device = ctx.device
    encoder = load_encoder(request.model, device="cpu", cache_dir=cache_dir)
    torch.manual_seed(request.seed)
    model = Classifier(encoder.model, plan.spec, len(table.labels.names), plan.pooling)
    counts = prepare_model(model, request, plan, device, notes)

    weight: torch.Tensor | None = None
    train_rows = rows["train"]
    if table.labels.kind == "multilabel":
        w, degenerate = pos_weight(table.labels.y[train_rows], table.labels.mask[train_rows])
        weight = w.to(device)
        notes.extend(
            f"'{table.labels.names[j]}' lacks positives or negatives in train: pos_weight 1"
            for j in degenerate
        )
    run = _Run(request, plan, model, ImageDataset(table.ids, table.sources, plan.preprocessing),
               ctx, weight)  # fmt: skip

    lr = request.effective_lr
    optimizer = torch.optim.AdamW(
        _param_groups(model, lr, request.weight_decay, request.layer_decay), lr=lr
    )
    global_batch = request.batch_size * ctx.world_size
    steps_per_epoch = math.ceil(len(train_rows) / global_batch)
    total_steps = steps_per_epoch * request.epochs
    warmup_steps = max(1, round(request.warmup * total_steps))

    state = ckpt.Checkpoint(plan.run_id, 0, 0, {}, _trainable(model), {}, 0, math.inf)
    latest = ctx.broadcast(ckpt.latest_checkpoint(run_dir) if ctx.is_main else None)
    resumed_from = 0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, plan.run_id)
        _load_trainable(model, state.model)
        optimizer.load_state_dict(state.optimizer)
        resumed_from = state.epoch
    trained = ddp.wrap(model, ctx)  # after loading: DDP starts from rank 0's weights

    has_val = len(rows["val"]) > 0
    if not has_val:
        notes.append("no validation split: the last epoch is used")
    for epoch in range(state.epoch, request.epochs):
        tick = time.perf_counter()
        seed = _epoch_seed(request.seed, epoch)
        torch.manual_seed(seed + ctx.rank)  # dropout (LoRA, drop-path) of this epoch and rank
        generator = torch.Generator().manual_seed(seed)
        order = train_rows[torch.randperm(len(train_rows), generator=generator).numpy()]
        flips, angles = draw_augmentation(len(order), generator)
        position = np.empty(len(table), dtype=np.int64)
        position[order] = np.arange(len(order))
        starts = range(0, len(order), global_batch)
        mine = np.concatenate([
            ddp.rank_share(np.arange(s, min(s + global_batch, len(order))), ctx.rank,
                           ctx.world_size)
            for s in starts
        ])  # fmt: skip
        batches = run.loader(order[mine])
        trained.train()
        losses: list[float] = []
        for _ in starts:
            part = run.readable(next(batches, None))
            n_ok = 0 if part is None else len(part[3])
            n_obs = 0 if part is None else int(part[2].sum())
            job_ok, job_obs = ddp.sums(ctx, n_ok, n_obs)
            if job_ok == 0:
                continue  # no readable image in this global batch: no step
            pixels, y, mask, kept = part if part is not None else run.empty_part()
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(state.step, total_steps,
                                                             warmup_steps)  # fmt: skip
            if request.augment and len(kept):
                at = torch.from_numpy(position[kept.numpy()])
                pixels = apply_augmentation(pixels, flips[at], angles[at])
            with run.autocast():
                loss_sum = masked_loss(trained(pixels), y, mask, weight, reduction="sum")
            # DDP averages gradients over ranks: scaling each rank's sum by world / (entries
            # in the global batch) makes that average the gradient of the global batch mean.
            loss = loss_sum * (ctx.world_size / max(job_obs, 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            if on_batch is not None and ctx.is_main:
                on_batch(state.step, total_steps)
            (job_sum,) = ddp.sums(ctx, float(loss_sum.detach()))
            losses.append(job_sum / max(job_obs, 1))
        val_loss = run.mean_loss(rows["val"]) if has_val else None
        train_loss = float(np.mean(losses)) if losses else math.nan
        state.epoch = epoch + 1
        score = val_loss if val_loss is not None else -float(state.epoch)
        if score < state.best_loss:
            state.best_loss, state.best_epoch, state.best = score, state.epoch, _trainable(model)
        log = EpochLog(state.epoch, train_loss, val_loss,
                       float(optimizer.param_groups[-1]["lr"]),
                       round(time.perf_counter() - tick, 3))  # fmt: skip
        state.history.append({k: v for k, v in asdict(log).items() if v is not None})
        state.model = _trainable(model)
        state.optimizer = optimizer.state_dict()
        if ctx.is_main:
            ckpt.save(run_dir, state)
        ctx.barrier()  # no rank starts the next epoch before this one's checkpoint is on disk
        if on_epoch is not None and ctx.is_main:
            on_epoch(log)

    _load_trainable(model, state.best)
    kept_rows, scores = run.scores(rows["test"])
    val_scored = run.scores(rows["val"]) if len(rows["val"]) else None  # operating points
    skipped = run.gather_skipped()
    result: tuple[ResultRecord, Path] | None = None
    if ctx.is_main:
        result = _write_record(
            request, plan, out, encoder, run_dir, state, counts,
            kept_rows, scores, rows, notes, skipped, resumed_from, ctx, started,
            val_scored, requested_resolution,
        )  # fmt: skip
    ctx.barrier()  # no rank reports before the record is written
    shared = ctx.broadcast(result)
    if shared is None:
        raise EmbedkitError("rank 0 wrote no result record; see its log for the error")
    record, path = shared
    return FinetuneOutcome(
        record, path, False, run_dir, resumed_from, record.notes, ctx.rank, ctx.world_size
    )


def finetune_record(
    request: FinetuneRequest,
    plan: _Plan,
    *,
    task: str,
    labels: list[str],
    source: str,
    weights: str,
    run_dir: Path,
    state: ckpt.Checkpoint,
    rows: dict[str, np.ndarray],
    metrics: dict[str, Any],
    per_label: list[dict[str, Any]],
    notes: list[str],
    started: float,
    requested_resolution: int,
    extra: dict[str, Any],
    operating_point: str | None = None,
) -> ResultRecord:
    """The record of a finished finetuning run (classification or segmentation): identity,
    hyper-parameters, selection, metrics and the history; ``extra`` adds to its ``extra``."""
    has_val = len(rows["val"]) > 0
    return ResultRecord(
        record_id=plan.run_id,
        kind=f"finetune-{request.method}",
        dataset=request.dataset,
        model=plan.spec.name,
        resolution=plan.size,
        pooling=plan.pooling,
        task=task,
        labels=labels,
        entry={
            "source": source,
            "weights": weights,
            "preprocessing": plan.identity["preprocessing"],
            "ids_digest": plan.identity["ids"],
            "run_dir": str(run_dir),
        },
        params=plan.params,
        selected={"epoch": state.best_epoch, "lr": request.effective_lr},
        seed=request.seed,
        metrics=metrics,
        per_label=per_label,
        n={s: len(r) for s, r in rows.items()},
        versions=package_versions(*get_method(request.method).packages),
        elapsed_s=round(time.perf_counter() - started, 3),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=notes,
        extra={
            "history": state.history,
            "best_val_loss": state.best_loss if has_val else None,
            **extra,
        },
        operating_point=operating_point,
        requested_resolution=requested_resolution,
    )


def _write_record(
    request: FinetuneRequest,
    plan: _Plan,
    out: ResultsDir,
    encoder: LoadedEncoder,
    run_dir: Path,
    state: ckpt.Checkpoint,
    counts: dict[str, int],
    kept: list[int],
    scores: np.ndarray,
    rows: dict[str, np.ndarray],
    notes: list[str],
    skipped: set[str],
    resumed_from: int,
    ctx: DistContext,
    started: float,
    val_scored: tuple[list[int], np.ndarray] | None,
    requested_resolution: int,
) -> tuple[ResultRecord, Path]:
    table = plan.table
    test_rows = np.asarray(kept, dtype=np.int64)
    labels = list(table.labels.names)
    val = None
    if val_scored is not None and len(val_scored[0]) and table.labels.kind == "multilabel":
        val_rows = np.asarray(val_scored[0], dtype=np.int64)
        val = (table.labels.y[val_rows], table.labels.mask[val_rows], val_scored[1])
    metrics, per_label, more, operating_point = evaluate_scores(
        table.labels.y[test_rows], table.labels.mask[test_rows], labels, scores,
        request.n_boot, request.seed, val=val,
    )  # fmt: skip
    notes = [*notes, *more]
    if skipped:
        notes.append(f"{len(skipped)} unreadable images left out: {sorted(skipped)[:5]}")
    record = finetune_record(
        request, plan, task=table.labels.kind, labels=labels, source=encoder.source,
        weights=encoder.weights_fingerprint, run_dir=run_dir, state=state, rows=rows,
        metrics=metrics, per_label=per_label, notes=notes, started=started,
        requested_resolution=requested_resolution, operating_point=operating_point,
        extra={
            "parameters": counts, "resumed_from_epoch": resumed_from, "device": str(ctx.device),
            "world_size": ctx.world_size, "batch_per_rank": request.batch_size,
        },
    )  # fmt: skip
    score_table = ScoreTable(
        tuple(table.ids[i] for i in test_rows), tuple(labels), table.labels.y[test_rows],
        table.labels.mask[test_rows], scores,
    )  # fmt: skip
    path = out.write(record, score_table, overwrite=request.overwrite)
    return record, path
