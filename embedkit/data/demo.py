"""The embedded demo dataset: synthetic, radiograph-like chest images made by code.

Every image is a frontal "chest film": a bright torso with two dark lung fields, ribs, a heart
shadow and noise, drawn from per-patient anatomy so that a patient's images look alike. Four
findings, each with its own visual scale, so that resolution matters the way it does on real
chest X-rays:

- ``Nodule``: one to three small bright round opacities (2-4 px across at 224 px, so only
  clearly visible at high resolution);
- ``Pneumothorax``: a thin pleural line with a dark, marking-free rim at one lung apex (a
  fine-detail finding);
- ``Cardiomegaly``: an enlarged heart shadow (large, visible at any resolution);
- ``Effusion``: a bright fluid layer with a meniscus at one lung base (large).

Every image also has a label map (8-bit PNG beside it, ``<image id>_mask.png``) for the
segmentation probe, drawn from the same shapes: :data:`MASK_CLASSES` background, lung, heart
(over the lungs where they overlap) and nodule (the small opacities: a few pixels at 224 px, so a
segmentation at low resolution misses most of them).

The output is an image folder plus ``index.csv`` with the columns the default
``data_manifest.yaml`` expects: ``image_id,path,patient_id,findings,view,mask``. A quarter of the
images are written as 16-bit PNG, the rest as 8-bit PNG, so both decoding paths are exercised.
Nothing here is a real patient and the labels mean nothing clinically: this is for running the
pipeline offline, checking plumbing, and seeing that small findings need more pixels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FINDINGS: tuple[str, ...] = ("Nodule", "Cardiomegaly", "Effusion", "Pneumothorax")
PREVALENCE: dict[str, float] = {
    "Nodule": 0.3,
    "Cardiomegaly": 0.3,
    "Effusion": 0.25,
    "Pneumothorax": 0.2,
}
INDEX_COLUMNS: tuple[str, ...] = ("image_id", "path", "patient_id", "findings", "view", "mask")
#: Label-map classes of the demo masks: value i is ``MASK_CLASSES[i]``.
MASK_CLASSES: tuple[str, ...] = ("background", "lung", "heart", "nodule")


@dataclass(frozen=True, slots=True)
class DemoSpec:
    """How much demo data to make. The defaults give 300 images of 1024 x 1024 px."""

    n_patients: int = 100
    images_per_patient: int = 3
    size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_patients < 1 or self.images_per_patient < 1:
            raise ValueError(
                f"Expected at least one patient and one image per patient, got "
                f"{self.n_patients} patients x {self.images_per_patient} images instead"
            )
        if not 64 <= self.size <= 4096:
            raise ValueError(f"Expected an image size in [64, 4096] px, got {self.size} instead")

    @property
    def n_images(self) -> int:
        return self.n_patients * self.images_per_patient


@dataclass(frozen=True, slots=True)
class _Anatomy:
    """Per-patient geometry in unit coordinates (0..1 across the image)."""

    lung_w: float
    lung_h: float
    lung_gap: float
    heart_w: float
    rib_phase: float
    brightness: float


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return coords[None, :], coords[:, None]


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, soft: float
) -> np.ndarray:
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / soft, 0.0, 1.0)


def _draw(
    anatomy: _Anatomy, findings: set[str], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image as float32 in [0, 1], and its label map (uint8, :data:`MASK_CLASSES`)."""
    x, y = _grid(size)
    jitter = rng.normal(0.0, 0.01, size=2)
    img = 0.08 + 0.55 * _ellipse(x, y, 0.5 + jitter[0], 0.55 + jitter[1], 0.46, 0.5, 0.08)
    lungs = np.zeros((size, size), dtype=np.float32)
    for side in (-1.0, 1.0):
        cx = 0.5 + side * (anatomy.lung_gap + anatomy.lung_w)
        lungs = np.maximum(lungs, _ellipse(x, y, cx, 0.48, anatomy.lung_w, anatomy.lung_h, 0.15))
    img = img - 0.35 * lungs
    ribs = 0.5 + 0.5 * np.sin(
        2 * np.pi * (y * 9.0 + 0.08 * np.abs(x - 0.5) * 9 + anatomy.rib_phase)
    )
    img = img + 0.06 * lungs * (ribs > 0.8)
    heart_w = anatomy.heart_w * (1.45 if "Cardiomegaly" in findings else 1.0)
    heart = _ellipse(x, y, 0.53, 0.62, heart_w, 0.13, 0.3)
    img = img + 0.3 * heart
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[lungs > 0.5] = 1
    labels[heart > 0.5] = 2
    if "Effusion" in findings:
        side = rng.choice([-1.0, 1.0])
        cx = 0.5 + side * (anatomy.lung_gap + anatomy.lung_w)
        level = 0.62 + rng.uniform(0.0, 0.06)
        meniscus = level - 0.06 * ((x - cx) / anatomy.lung_w) ** 2
        lung = _ellipse(x, y, cx, 0.48, anatomy.lung_w * 1.05, anatomy.lung_h * 1.05, 0.1)
        img = img + 0.4 * (y > meniscus) * lung
    if "Pneumothorax" in findings:
        side = rng.choice([-1.0, 1.0])
        cx = 0.5 + side * (anatomy.lung_gap + 1.6 * anatomy.lung_w)
        edge = _ellipse(x, y, cx, 0.3, anatomy.lung_w * 0.9, 0.14, 0.04)
        rim = (edge > 0.0) & (edge < 0.35)
        img = img - 0.12 * (edge >= 0.35) * lungs + 0.1 * rim * lungs
    if "Nodule" in findings:
        for _ in range(int(rng.integers(1, 4))):
            side = rng.choice([-1.0, 1.0])
            cx = 0.5 + side * (anatomy.lung_gap + anatomy.lung_w * rng.uniform(0.4, 1.6))
            cy = rng.uniform(0.32, 0.62)
            radius = rng.uniform(0.006, 0.011)
            nodule = _ellipse(x, y, cx, cy, radius, radius, 0.5)
            img = img + 0.35 * nodule
            labels[nodule > 0.5] = 3
    img = img * anatomy.brightness + rng.normal(0.0, 0.02, size=(size, size))
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    return _Anatomy(
        lung_w=float(rng.uniform(0.12, 0.15)),
        lung_h=float(rng.uniform(0.26, 0.32)),
        lung_gap=float(rng.uniform(0.03, 0.05)),
        heart_w=float(rng.uniform(0.1, 0.12)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        brightness=float(rng.uniform(0.85, 1.15)),
    )


def _save_png(path: Path, img: np.ndarray, sixteen_bit: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if sixteen_bit:
        Image.fromarray((img * 65535.0 + 0.5).astype(np.uint16)).save(tmp, format="PNG")
    else:
        Image.fromarray((img * 255.0 + 0.5).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_labels(path: Path, labels: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(labels, mode="L").save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_demo(
    out_dir: str | os.PathLike[str],
    spec: DemoSpec | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the demo dataset to ``out_dir`` (``images/`` and ``index.csv``); return the index path.

    Deterministic for a given spec. Resumable: images already on disk are kept (each is written
    atomically), and ``index.csv`` is written last, so a complete index means complete data.
    """
    spec = spec or DemoSpec()
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    done = 0
    for p in range(spec.n_patients):
        prng = np.random.default_rng([spec.seed, p])
        anatomy = _anatomy(prng)
        patient_id = f"P{p:05d}"
        for k in range(spec.images_per_patient):
            irng = np.random.default_rng([spec.seed, p, k])
            findings = {f for f in FINDINGS if irng.random() < PREVALENCE[f]}
            image_id = f"{patient_id}_{k:02d}"
            sixteen_bit = (p + k) % 4 == 0
            rel = f"{patient_id}/{image_id}.png"
            mask_rel = f"{patient_id}/{image_id}_mask.png"
            path, mask_path = images / rel, images / mask_rel
            if not (path.exists() and mask_path.exists()):
                path.parent.mkdir(parents=True, exist_ok=True)
                img, labels = _draw(anatomy, findings, spec.size, irng)
                if not path.exists():  # data from before the masks: images stay as they are
                    _save_png(path, img, sixteen_bit)
                _save_labels(mask_path, labels)
            ordered = [f for f in FINDINGS if f in findings]
            rows.append(
                {
                    "image_id": image_id,
                    "path": rel,
                    "patient_id": patient_id,
                    "findings": "|".join(ordered) if ordered else "No Finding",
                    "view": "PA" if k % 2 == 0 else "AP",
                    "mask": mask_rel,
                }
            )
            done += 1
            if progress is not None:
                progress(done, spec.n_images)
    index = out / "index.csv"
    tmp = index.with_name("index.csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(INDEX_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, index)
    return index
