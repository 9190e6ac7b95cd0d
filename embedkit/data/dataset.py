"""A map-style dataset of image files, an ordered loader, and a read-everything helper.

A bad image never stops a dataset: :meth:`ImageDataset.__getitem__` returns a :class:`Sample`
with ``ok=False``, the error message (which names the file) and a zero tensor, and the caller
decides the policy (fail on any, or skip and record). Loaders never shuffle: batch ``k`` holds
the ``k``-th run of indices, so rows can be written to the store in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from embedkit.data.policies import OnBadImage
from embedkit.data.readers import PixelSource, read_image
from embedkit.data.transforms import Preprocessing
from embedkit.errors import BadImagesError, ImageReadError, ManifestError

__all__ = ["Batch", "ImageDataset", "Sample", "collate", "make_loader", "read_all"]


@dataclass
class Sample:
    """One dataset item; ``pixels`` is all zeros when ``ok`` is False."""

    pixels: torch.Tensor
    index: int
    id: str
    ok: bool
    error: str


@dataclass
class Batch:
    """Collated samples: ``pixels`` (B, 3, S, S), ``indices`` int64, ``ok`` bool."""

    pixels: torch.Tensor
    indices: torch.Tensor
    ids: list[str]
    ok: torch.Tensor
    errors: list[str]

    def pin_memory(self) -> Batch:
        """Return a copy with its tensors in pinned memory (called by the DataLoader)."""
        return Batch(
            pixels=self.pixels.pin_memory(),
            indices=self.indices.pin_memory(),
            ids=self.ids,
            ok=self.ok.pin_memory(),
            errors=self.errors,
        )


class ImageDataset(Dataset[Sample]):
    """Images read with :func:`read_image` and transformed by a :class:`Preprocessing`."""

    def __init__(
        self,
        ids: Sequence[str],
        paths: Sequence[str | os.PathLike[str]],
        preprocessing: Preprocessing,
    ) -> None:
        if len(ids) != len(paths):
            raise ManifestError(
                f"Expected one path per image id, got {len(ids)} ids and {len(paths)} paths instead"
            )
        self.ids = list(ids)
        # Plain paths become strings; a PixelSource (a volume slice) stays itself: it reads itself.
        self.paths: list[str | os.PathLike[str]] = [
            p if isinstance(p, PixelSource) else os.fspath(p) for p in paths
        ]
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        try:
            pixels = self.preprocessing(read_image(self.paths[index]))
        except ImageReadError as exc:
            size = self.preprocessing.size
            return Sample(torch.zeros(3, size, size), index, self.ids[index], False, str(exc))
        return Sample(pixels, index, self.ids[index], True, "")


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`, keeping their order."""
    return Batch(
        pixels=torch.stack([s.pixels for s in samples]),
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
        ids=[s.id for s in samples],
        ok=torch.tensor([s.ok for s in samples], dtype=torch.bool),
        errors=[s.error for s in samples],
    )


def make_loader(
    dataset: ImageDataset,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
    prefetch_factor: int = 2,
) -> DataLoader[Sample]:
    """An ordered (never shuffled) loader of :class:`Batch` es over ``dataset``.

    ``indices`` restricts it to those dataset indices, in the given order (``Batch.indices``
    still holds dataset indices). Workers are persistent when ``num_workers > 0``.
    """
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1, got {batch_size} instead")
    if num_workers < 0:
        raise ValueError(f"Expected num_workers >= 0, got {num_workers} instead")
    source: Dataset[Sample] = dataset if indices is None else Subset(dataset, list(indices))
    workers = num_workers > 0
    return DataLoader(
        source,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers,
        prefetch_factor=prefetch_factor if workers else None,
    )


def read_all(
    ids: Sequence[str],
    paths: Sequence[str | os.PathLike[str]],
    preprocessing: Preprocessing,
    *,
    on_bad_image: OnBadImage,
    batch_size: int = 16,
    num_workers: int = 0,
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Read and transform every image; for tests, probes and other small sets.

    Returns the (N_ok, 3, S, S) tensor of the readable images in input order and the
    ``(id, reason)`` pairs of those skipped. With ``on_bad_image="fail"``, any failure raises
    :class:`~embedkit.errors.BadImagesError` listing every bad image, not only the first.
    """
    if on_bad_image not in get_args(OnBadImage):
        choices = " or ".join(repr(c) for c in get_args(OnBadImage))
        raise ValueError(f"Expected on_bad_image {choices}, got {on_bad_image!r} instead")
    dataset = ImageDataset(ids, paths, preprocessing)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    kept: list[torch.Tensor] = []
    skipped: list[tuple[str, str]] = []
    for batch in loader:
        kept.append(batch.pixels[batch.ok])
        skipped.extend(
            (i, e)
            for i, e, ok in zip(batch.ids, batch.errors, batch.ok.tolist(), strict=True)
            if not ok
        )
    if skipped and on_bad_image == "fail":
        raise BadImagesError(skipped, total=len(dataset))
    size = preprocessing.size
    pixels = torch.cat(kept) if kept else torch.empty(0, 3, size, size)
    return pixels, skipped
