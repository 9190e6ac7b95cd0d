"""The ``segmentation`` probe kind: a linear head on frozen patch tokens (DINOv2's evaluation).

Inputs (``inputs = "patches"``): the entry's patch-token grid (``--patch-tokens``, pooling
``patch``, ``(N, h, w, D)`` float16, the last layer's tokens) and the dataset's label maps
(``classes:`` and the ``mask`` column of the manifest; :mod:`embedkit.data.masks`).

Protocol:

- **Head**: tokens standardised per channel (mean / std over the train tokens, the inference
  form of DINOv2's BatchNorm head), then one linear map ``D -> C`` per token (a 1x1 conv), ``C``
  the number of classes with the background. The logit grid ``(C, h, w)`` is upsampled
  bilinearly to the mask resolution: for training, to the label map in the square frame the
  encoder saw (``size x size``, the entry's resolution, nearest-neighbour, same resize mode as
  the images); for evaluation, onto the mask's own pixels
  (:func:`embedkit.data.masks.logits_to_mask`).
- **Loss**: cross-entropy + ``dice_weight`` x soft Dice loss (1 - mean soft Dice of the
  foreground classes over the batch).
- **Training** (on the GPU when torch sees one, else the CPU): AdamW (weight decay 1e-4), cosine
  schedule, ``epochs`` passes of mini-batches of ``batch_size`` images; one head per learning
  rate in ``lrs``, all trained in the same pass.
  Patch tokens are read **blockwise** from the store: the train rows in storage order, cut into
  blocks of at most ``block_bytes`` of float16 tokens; each epoch visits the blocks in a random
  order and each block's images in a random order, so at most one block of tokens is in memory
  (plus the train label maps at ``size x size``, one byte per pixel).
- **Selection**: the learning rate whose head has the best mean validation Dice (mean over
  classes of the per-image means); without a validation split, 10% of the train patients are
  held out for it (as the other probes do).
- **Evaluation** on test at the mask resolution: per class Dice and IoU per image (2D), or per
  volume (3D: rows of a volume dataset, predictions stacked back into the volume along the
  slice axis, the label map read slice by slice on the image slices' grid and orientation by
  :func:`embedkit.data.masks.read_volume_labels`) with HD95 in its voxel spacing, permuted to
  the slice stack (mm); bootstrap CIs over images or volumes
  (:class:`embedkit.eval.segmentation.CaseScorer`, conventions in that module).

Record (the contract with the report): ``task = "segmentation"``, ``labels`` = the classes
without the background, ``metrics = {"dice", "iou"(, "hd95")}`` each ``{"point", "low", "high"}``,
``per_label`` rows ``{"label", "dice", "iou"(, "hd95"), "n_cases"}``, the score table's
``scores`` = per-case Dice ``(n, L)`` with ids the image or volume ids
(:func:`embedkit.results.segmentation.dice_table`, as finetuning writes it), and beside the record
``<stem>.overlays.npz`` (the format of :mod:`embedkit.results.segmentation`) with ``image``
(float in [0, 1]), ``truth`` and ``pred`` (int label maps), all in the encoder's square frame,
``ids`` and ``mean_dice`` of the best and worst cases by mean Dice, best first
(``extra["overlays"]`` names it).

torch, scipy and the readers load inside the functions, so registering the kind stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from embedkit.errors import ProbeInputError
from embedkit.probes.registry import KindResult, PatchData, PatchSplit, register
from embedkit.results.segmentation import SEGMENTATION_TASK
from embedkit.store.layout import PATCH_POOLING

if TYPE_CHECKING:
    import torch

    from embedkit.data.masks import RowLabelMaps
    from embedkit.data.policies import ResizeMode
    from embedkit.eval.segmentation import SegmentationScores
    from embedkit.probes.request import ProbeRequest

__all__ = ["SegmentationKind", "SegmentationSettings", "fit_segmentation"]

#: Overlays kept per record: this many best and this many worst cases by mean Dice.
N_OVERLAYS = 3


@dataclass(frozen=True, slots=True)
class SegmentationSettings:
    """The hyper-parameters of the segmentation head (all enter the record identity)."""

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    epochs: int = 30
    batch_size: int = 16
    dice_weight: float = 1.0
    weight_decay: float = 1e-4
    block_bytes: int = 256 * 2**20  # float16 tokens read from the store at a time

    def __post_init__(self) -> None:
        if not self.lrs or min(self.lrs) <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ProbeInputError(
                f"Expected positive lrs, epochs >= 1 and batch_size >= 1, got {self}"
            )
        if self.dice_weight < 0 or self.block_bytes < 1:
            raise ProbeInputError(f"Expected dice_weight >= 0 and block_bytes >= 1, got {self}")


# ---- label maps of rows ----------------------------------------------------------------------


def _label_maps(split: PatchSplit, classes: Sequence[str]) -> RowLabelMaps:
    """The label maps of ``split``'s rows (:class:`~embedkit.data.masks.RowLabelMaps`)."""
    from embedkit.data.masks import RowLabelMaps

    return RowLabelMaps(split.masks, split.images, classes, split.volume_slices)


def _grid_masks(
    split: PatchSplit, rows: np.ndarray, classes: Sequence[str], resize: ResizeMode, size: int
) -> np.ndarray:
    """``(len(rows), size, size)`` uint8 / int16 training targets in the encoder's frame."""
    from embedkit.data.masks import to_model_grid

    masks = _label_maps(split, classes)
    dtype = np.uint8 if len(classes) <= 256 else np.int16
    out = np.empty((len(rows), size, size), dtype=dtype)
    for j, i in enumerate(rows):
        out[j] = to_model_grid(masks.row(int(i))[0], resize, size)
    return out


# ---- blockwise token reads ---------------------------------------------------------------------


def _rows_per_block(data: PatchData, settings: SegmentationSettings) -> int:
    shape = data.entry.shapes[data.pooling]
    row_bytes = int(np.prod(shape)) * data.entry.dtypes[data.pooling].itemsize
    return max(1, settings.block_bytes // max(row_bytes, 1))


def _read_blocks(
    data: PatchData, split: PatchSplit, order: np.ndarray, block: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, tokens) of ``split`` in ``order``, ``block`` rows read from the store at a time."""
    for lo in range(0, len(order), block):
        rows = order[lo : lo + block]
        tokens = data.entry.read(data.pooling, ids=[split.ids[i] for i in rows])
        yield rows, tokens


def _storage_order(data: PatchData, split: PatchSplit) -> np.ndarray:
    """The split's rows sorted by their row in the entry (contiguous reads)."""
    return np.argsort(data.entry.read_rows(split.ids), kind="stable")


# ---- the head ---------------------------------------------------------------------------------


@dataclass
class _Heads:
    """Standardisation statistics and one linear head per learning rate."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weights: list[torch.nn.Linear] = field(default_factory=list)

    def logits(self, tokens: np.ndarray, heads: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, H, C, h, w)`` logits of the heads ``heads`` (all by default) for
        ``(B, h, w, D)`` tokens, computed as one matmul."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(tokens)).to(self.mean.device).float()
        x = (x - self.mean) / self.std
        chosen = [self.weights[k] for k in (range(len(self.weights)) if heads is None else heads)]
        weight = torch.cat([h.weight for h in chosen])  # (H * C, D)
        bias = torch.cat([h.bias for h in chosen])
        out = F.linear(x, weight, bias)  # (B, h, w, H * C)
        b, gh, gw, _ = out.shape
        return out.permute(0, 3, 1, 2).reshape(b, len(chosen), -1, gh, gw)


def _token_stats(
    data: PatchData, split: PatchSplit, rows: np.ndarray, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the tokens of ``rows`` (float64 sums, one pass)."""
    import torch

    total = count = total_sq = None
    for _, tokens in _read_blocks(data, split, rows, block):
        flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
        s, sq = flat.sum(0), (flat * flat).sum(0)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count = flat.shape[0] + (count or 0)
    assert total is not None and total_sq is not None and count  # rows is never empty here
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def _head_losses(
    logits: torch.Tensor, target: torch.Tensor, size: int, dice_weight: float
) -> torch.Tensor:
    """Sum over heads of cross-entropy + ``dice_weight`` x soft Dice loss, for ``(B, H, C, h,
    w)`` logits upsampled bilinearly to the ``(B, size, size)`` targets."""
    import torch
    import torch.nn.functional as F

    b, n_heads, n_classes, gh, gw = logits.shape
    flat = logits.reshape(b, n_heads * n_classes, gh, gw)
    up = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    logp = up.reshape(b, n_heads, n_classes, size, size).log_softmax(2)
    index = target[:, None, None].expand(b, n_heads, 1, size, size)
    logp_true = logp.gather(2, index)[:, :, 0]  # (B, H, S, S)
    # mean over images and pixels of each head, summed over heads (their parameters are apart)
    loss = -logp_true.mean() * n_heads
    if dice_weight:
        predicted = logp.exp().sum((0, 3, 4))[:, 1:]  # (H, C - 1) soft voxel counts
        truth = torch.bincount(target.flatten(), minlength=n_classes)[1:].float()
        p_true = logp_true.exp()
        inter = torch.stack(
            [(p_true * (target == c)[:, None]).sum((0, 2, 3)) for c in range(1, n_classes)], 1
        )  # (H, C - 1): probability mass on each class's true pixels
        dice = (2.0 * inter + 1.0) / (predicted + truth + 1.0)
        loss = loss + dice_weight * (1.0 - dice.mean(1)).sum()
    return loss


def _train(
    data: PatchData,
    train: PatchSplit,
    rows: np.ndarray,
    settings: SegmentationSettings,
    seed: int,
) -> _Heads:
    """Heads for every learning rate, trained on ``rows`` of ``train`` (see the module doc)."""
    import torch

    classes = data.classes
    size = _frame_size(data)
    block = _rows_per_block(data, settings)
    order = rows[np.argsort(data.entry.read_rows([train.ids[i] for i in rows]), kind="stable")]
    targets = _grid_masks(train, order, classes, _resize(data), size)
    position = {int(i): j for j, i in enumerate(order)}
    mean, std = _token_stats(data, train, order, block)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    linear = [torch.nn.Linear(mean.numel(), len(classes)).to(device) for _ in settings.lrs]
    heads = _Heads(mean.to(device), std.to(device), linear)
    groups = [
        {"params": h.parameters(), "lr": lr}
        for h, lr in zip(heads.weights, settings.lrs, strict=True)
    ]
    optimiser = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps_per_epoch = sum(
        math.ceil(len(order[lo : lo + block]) / settings.batch_size)
        for lo in range(0, len(order), block)
    )
    total = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    blocks = [order[lo : lo + block] for lo in range(0, len(order), block)]
    rng = np.random.default_rng(seed)
    bar = data.progress(settings.epochs, "segmentation head: epochs") if data.progress else None
    with bar if bar is not None else nullcontext() as advance:
        for _epoch in range(settings.epochs):
            for b in rng.permutation(len(blocks)):
                block_rows = blocks[b]
                tokens = data.entry.read(data.pooling, ids=[train.ids[i] for i in block_rows])
                shuffled = rng.permutation(len(block_rows))
                for lo in range(0, len(block_rows), settings.batch_size):
                    pick = shuffled[lo : lo + settings.batch_size]
                    target = torch.from_numpy(
                        targets[[position[int(i)] for i in block_rows[pick]]].astype(np.int64)
                    ).to(device)
                    logits = heads.logits(tokens[pick])
                    loss = _head_losses(logits, target, size, settings.dice_weight)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    schedule.step()
            if advance is not None:
                advance(1)
    return heads


def _frame_size(data: PatchData) -> int:
    return int(json.loads(data.entry.key.preprocessing)["size"])


def _resize(data: PatchData) -> ResizeMode:
    return cast("ResizeMode", data.resize)


# ---- prediction and scores ----------------------------------------------------------------------


@dataclass
class _Row:
    """One predicted row on the mask's scored pixels."""

    index: int
    truth: np.ndarray
    preds: list[np.ndarray]
    spacing: tuple[float, ...]


def _predict_rows(
    data: PatchData,
    split: PatchSplit,
    heads: _Heads,
    order: np.ndarray,
    which: Sequence[int],
    block: int,
) -> Iterator[_Row]:
    """Rows of ``split`` in ``order``: truth and each head's argmax on the scored pixels."""
    import torch

    from embedkit.data.masks import logits_to_mask, scored_region

    masks = _label_maps(split, data.classes)
    resize = _resize(data)
    with torch.no_grad():
        for rows, tokens in _read_blocks(data, split, order, block):
            per_head = heads.logits(tokens, which).unbind(1)
            for j, i in enumerate(rows):
                truth, spacing = masks.row(int(i))
                shape = (int(truth.shape[0]), int(truth.shape[1]))
                r, c = scored_region(shape, resize)
                preds = [
                    logits_to_mask(lg[j], shape, resize).argmax(0).cpu().numpy() for lg in per_head
                ]
                yield _Row(int(i), truth[r, c], preds, spacing)


def _volume_order(split: PatchSplit) -> np.ndarray:
    """Rows sorted by (volume, slice)."""
    assert split.volumes is not None and split.slices is not None
    keys = list(zip(split.volumes, split.slices, strict=True))
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def _score_cases(
    data: PatchData,
    split: PatchSplit,
    heads: _Heads,
    which: Sequence[int],
    block: int,
    *,
    with_hd95: bool = True,
) -> tuple[list[SegmentationScores], dict[str, int]]:
    """Per-image (2D) or per-volume (3D) scores of each head in ``which`` on ``split``, and the
    row shown for each case in the overlays (3D: the slice with the most foreground)."""
    from collections import Counter

    from embedkit.eval.segmentation import CaseScorer

    volumes = split.volumes if split.volume_slices is not None else None
    order = _volume_order(split) if volumes is not None else _storage_order(data, split)
    expected = Counter(volumes) if volumes is not None else None
    scorer = CaseScorer(data.classes, n_preds=len(which), expected=expected, with_hd95=with_hd95)
    for row in _predict_rows(data, split, heads, order, which, block):
        i = row.index
        if volumes is None:
            scorer.add(split.ids[i], row.truth, row.preds, key=i)
        else:
            at = split.slices[i] if split.slices is not None else None
            scorer.add(volumes[i], row.truth, row.preds, row.spacing, key=i, slice_at=at)
    return scorer.finish(), scorer.shown


# ---- overlays ---------------------------------------------------------------------------------


def _image01(split: PatchSplit, i: int) -> np.ndarray:
    """Row ``i``'s image (the slice of a volume, as the encoder saw it) as grayscale in [0, 1],
    min-max scaled."""
    if split.volume_slices is not None:
        pixels = split.volume_slices[i].read().astype(np.float64)
    else:
        from embedkit.data.readers import read_image

        pixels = read_image(split.images[i]).astype(np.float64)
        pixels = pixels.mean(-1) if pixels.ndim == 3 else pixels
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    return scaled.astype(np.float32)


def _overlays(
    data: PatchData,
    split: PatchSplit,
    heads: _Heads,
    head: int,
    scores: SegmentationScores,
    shown: dict[str, int],
    block: int,
) -> dict[str, np.ndarray]:
    """Best and worst cases by mean Dice in the encoder's square frame."""
    from embedkit.data.masks import scored_region, to_model_grid
    from embedkit.eval.segmentation import mean_dice, ranked_cases

    mean = mean_dice(scores)
    picks = ranked_cases(scores, N_OVERLAYS)
    rows = np.array([shown[scores.ids[k]] for k in picks], dtype=np.int64)
    size, resize = _frame_size(data), _resize(data)
    images, truths, preds = [], [], []
    by_row = {r.index: r for r in _predict_rows(data, split, heads, rows, [head], block)}
    masks = _label_maps(split, data.classes)
    for i in rows:
        full_truth = masks.row(int(i))[0]
        shape = (int(full_truth.shape[0]), int(full_truth.shape[1]))
        full_pred = np.zeros_like(full_truth)
        r, c = scored_region(shape, resize)
        full_pred[r, c] = by_row[int(i)].preds[0]
        images.append(to_model_grid(_image01(split, int(i)), resize, size))
        truths.append(to_model_grid(full_truth, resize, size).astype(np.int64))
        preds.append(to_model_grid(full_pred, resize, size).astype(np.int64))
    return {
        "image": np.stack(images),
        "truth": np.stack(truths),
        "pred": np.stack(preds),
        "ids": np.array([scores.ids[k] for k in picks], dtype=str),
        "mean_dice": mean[picks].astype(np.float64),
    }


# ---- the whole fit ------------------------------------------------------------------------------


@dataclass
class SegmentationFit:
    """What :func:`fit_segmentation` returns."""

    lr: float
    val_dice: dict[float, float]
    scores: SegmentationScores
    overlays: dict[str, np.ndarray]
    notes: list[str]


def _subset(split: PatchSplit, rows: np.ndarray, name: str) -> PatchSplit:
    def pick(values: Sequence[Any] | None) -> Any:
        return None if values is None else tuple(values[i] for i in rows)

    return PatchSplit(
        name, pick(split.ids), pick(split.images), pick(split.masks), pick(split.patients), 0,
        pick(split.volumes), pick(split.slices), pick(split.volume_slices),
    )  # fmt: skip


def fit_segmentation(
    data: PatchData, settings: SegmentationSettings = SegmentationSettings(), seed: int = 0
) -> SegmentationFit:
    """Train the heads, choose the learning rate on validation, score test (module docstring)."""
    if data.pooling not in data.entry.shapes or len(data.entry.shapes[data.pooling]) != 3:
        raise ProbeInputError(
            f"the segmentation probe needs the patch-token grid (pooling {PATCH_POOLING!r}, "
            f"shape (h, w, D)); entry {data.entry.key.digest()[:12]} stores "
            f"{dict(data.entry.shapes)}. Extract with `embedkit extract --patch-tokens`"
        )
    notes: list[str] = []
    train, val = data.train, data.val
    rows = np.arange(len(train.ids))
    if not len(val.ids):
        from embedkit.probes.targets import holdout_split

        fit_rows, val_rows = holdout_split(len(rows), 0.1, seed, groups=np.asarray(train.patients))
        if len(fit_rows) and len(val_rows):
            val, rows = _subset(train, val_rows, "val"), fit_rows
            notes.append(f"no validation split: lr chosen on {len(val_rows)} held-out train images")
    heads = _train(data, train, rows, settings, seed)
    block = _rows_per_block(data, settings)
    val_dice: dict[float, float] = {}
    if len(val.ids) and len(settings.lrs) > 1:
        every = range(len(settings.lrs))
        from embedkit.eval.segmentation import macro_dice

        val_scores = _score_cases(data, val, heads, every, block, with_hd95=False)[0]
        for lr, scores in zip(settings.lrs, val_scores, strict=True):
            val_dice[lr] = macro_dice(scores)
        finite = {lr: v for lr, v in val_dice.items() if np.isfinite(v)}
        best = max(finite, key=lambda lr: finite[lr]) if finite else settings.lrs[0]
    else:
        best = settings.lrs[0]
    head = settings.lrs.index(best)
    (scores,), shown = _score_cases(data, data.test, heads, [head], block)
    overlays = _overlays(data, data.test, heads, head, scores, shown, block)
    return SegmentationFit(best, val_dice, scores, overlays, notes)


class SegmentationKind:
    """The ``segmentation`` probe kind (registered below)."""

    name = "segmentation"
    curve: str | None = None
    inputs = "patches"

    def __init__(self, settings: SegmentationSettings = SegmentationSettings()) -> None:
        self.settings = settings

    def default_pooling(self, stored: Collection[str]) -> str:
        return PATCH_POOLING

    def params(self, request: ProbeRequest) -> dict[str, Any]:
        values = asdict(self.settings)
        values["lrs"] = list(self.settings.lrs)  # block_bytes stays: it sets the visit order
        return {**values, "head": "linear", "loss": "cross-entropy + dice"}

    def fit_score(self, request: ProbeRequest, data: PatchData) -> KindResult:
        from embedkit.eval.segmentation import summarize_segmentation
        from embedkit.results.segmentation import dice_table

        fit = fit_segmentation(data, self.settings, request.seed)
        scores = fit.scores
        metrics, per_label = summarize_segmentation(
            scores, n_boot=request.n_boot, seed=request.seed
        )
        table = dice_table(scores)
        return KindResult(
            {"lr": fit.lr},
            {"val_dice_per_lr": {float(k): v for k, v in fit.val_dice.items()}},
            metrics=metrics,
            notes=fit.notes,
            per_label=per_label,
            table=table,
            task=SEGMENTATION_TASK,
            labels=tuple(data.classes[1:]),
            arrays={"overlays": fit.overlays},
        )


register(SegmentationKind())
