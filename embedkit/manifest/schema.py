"""Typed models of ``data_manifest.yaml``.

Every model forbids unknown keys and is frozen. Relative paths resolve against the manifest's
folder, passed as ``context={"base_dir": folder}`` when validating; :mod:`.loader` reads the YAML
and turns pydantic's errors into ``ManifestError`` messages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from embedkit.data.policies import CT_WINDOWS, SliceAxis
from embedkit.errors import did_you_mean

if TYPE_CHECKING:
    from embedkit.manifest.table import DatasetTable

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _text(value: object) -> object:
    """YAML reads ``0`` as int and ``no`` as bool: accept ints as text, refuse bools and floats."""
    if isinstance(value, (bool, float)):
        raise ValueError(
            f"YAML read {value!r} as a {type(value).__name__}; quote it to mean the text "
            f"(e.g. '{str(value).lower()}')"
        )
    return str(value) if isinstance(value, int) else value


def _texts(value: object) -> object:
    """A list of texts; a single scalar stands for a one-item list."""
    items = value if isinstance(value, list | tuple) else [value]
    return tuple(_text(item) for item in items)


def _optional_texts(value: object) -> object:
    return None if value is None else _texts(value)


def _unique(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{what} lists {dupes} more than once; list each once")
    return values


def _local_path(value: object, info: ValidationInfo) -> Path:
    """Resolve a local path against ``context['base_dir']``; URLs are refused (cache only)."""
    if isinstance(value, str) and "://" in value:
        raise ValueError(
            f"{value!r} is a URL; images, index and split files must be local paths "
            "(only `cache` may be a URL)"
        )
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"expected a path, got {type(value).__name__} {value!r}")
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return Path(os.path.abspath(path)) if path.is_absolute() else path


# ---- labels ------------------------------------------------------------------------------------


class SeparatedLabels(_Strict):
    """All findings in one cell, split by ``separator`` (ChestX-ray14 ``Finding Labels``)."""

    format: Literal["separated"]
    column: str
    separator: str = Field(default="|", min_length=1)
    negative: str | None = None
    names: tuple[str, ...] | None = None
    ignore_unknown: bool = False

    _names = field_validator("names", mode="before")(_optional_texts)

    @model_validator(mode="after")
    def _check(self) -> SeparatedLabels:
        if self.names is None:
            return self
        if not self.names:
            raise ValueError("names is empty; list the labels, or leave names out to use all seen")
        _unique(self.names, "names")
        if self.negative is not None and self.negative in self.names:
            raise ValueError(
                f"the negative token {self.negative!r} is also in names; "
                "remove it from names (it means 'no positive label')"
            )
        with_sep = [n for n in self.names if self.separator in n]
        if with_sep:
            raise ValueError(f"names {with_sep} contain the separator {self.separator!r}")
        return self


class ColumnsLabels(_Strict):
    """One column per label holding 1 / 0 / -1 (uncertain) / blank (CheXpert, MIMIC-CXR)."""

    format: Literal["columns"]
    columns: tuple[str, ...] = Field(min_length=1)
    uncertain: Literal["negative", "positive", "ignore"] = "ignore"
    blank: Literal["negative", "ignore"] = "negative"

    _columns = field_validator("columns", mode="before")(_texts)

    @model_validator(mode="after")
    def _check(self) -> ColumnsLabels:
        _unique(self.columns, "columns")
        return self


class SingleLabels(_Strict):
    """One class per image (multiclass), e.g. RSNA pneumonia or a diagnosis column."""

    format: Literal["single"]
    column: str
    classes: tuple[str, ...] | None = None

    _classes = field_validator("classes", mode="before")(_optional_texts)

    @model_validator(mode="after")
    def _check(self) -> SingleLabels:
        if self.classes is not None:
            if len(self.classes) < 2:
                raise ValueError("classes needs at least two classes")
            _unique(self.classes, "classes")
        return self


LabelsConfig = Annotated[
    SeparatedLabels | ColumnsLabels | SingleLabels, Field(discriminator="format")
]


# ---- splits ------------------------------------------------------------------------------------


class Fractions(_Strict):
    """Share of images per split; non-negative and summing to 1."""

    train: float = Field(ge=0)
    val: float = Field(default=0.0, ge=0)
    test: float = Field(ge=0)

    @model_validator(mode="after")
    def _check(self) -> Fractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"fractions sum to {total:g} (train {self.train:g} + val {self.val:g} + "
                f"test {self.test:g}); they must sum to 1"
            )
        return self


class PatientSplits(_Strict):
    """Seeded patient-wise split (see :func:`embedkit.manifest.splits.patient_split`)."""

    method: Literal["patient"]
    fractions: Fractions
    seed: int = 0


class SplitValues(_Strict):
    """Which values of the split column mean train / val / test (one value or a list each)."""

    train: tuple[str, ...] = ("train",)
    val: tuple[str, ...] = ("val",)
    test: tuple[str, ...] = ("test",)

    _values = field_validator("train", "val", "test", mode="before")(_texts)

    @model_validator(mode="after")
    def _check(self) -> SplitValues:
        _unique(self.train + self.val + self.test, "values")
        return self

    def lookup(self) -> dict[str, str]:
        """Column value → split name."""
        return {v: split for split in SPLIT_NAMES for v in getattr(self, split)}


class GivenSplits(_Strict):
    """The index has a split column."""

    method: Literal["given"]
    column: str
    values: SplitValues = SplitValues()


class FilesSplits(_Strict):
    """One text file of image ids per split (one id a line), relative to the manifest."""

    method: Literal["files"]
    train: Path
    val: Path | None = None
    test: Path | None = None

    @field_validator("train", "val", "test", mode="before")
    @classmethod
    def _resolve(cls, value: object, info: ValidationInfo) -> Path | None:
        return None if value is None else _local_path(value, info)

    def files(self) -> dict[str, Path]:
        """Split name → id file, for the splits that have one."""
        named = {split: getattr(self, split) for split in SPLIT_NAMES}
        return {split: path for split, path in named.items() if path is not None}


SplitsConfig = Annotated[GivenSplits | PatientSplits | FilesSplits, Field(discriminator="method")]


# ---- volumes -----------------------------------------------------------------------------------


class WindowLevels(_Strict):
    """An explicit CT window in Hounsfield units."""

    level: float
    width: float = Field(gt=0)


class CTVolumes(_Strict):
    """CT volumes: Hounsfield units through a window, a preset name or ``{level, width}``."""

    modality: Literal["ct"]
    window: str | WindowLevels
    slice_axis: SliceAxis = "axial"

    @field_validator("window")
    @classmethod
    def _preset(cls, value: str | WindowLevels) -> str | WindowLevels:
        if isinstance(value, str) and value not in CT_WINDOWS:
            raise ValueError(
                f"unknown CT window {value!r}{did_you_mean(value, CT_WINDOWS) or '.'} "
                f"Presets: {', '.join(CT_WINDOWS)}; or give {{level: ..., width: ...}} in HU"
            )
        return value


class MRVolumes(_Strict):
    """MRI volumes: each volume's ``percentiles`` (low, high) are mapped to 0 and 1."""

    modality: Literal["mr"]
    percentiles: tuple[float, float] = (0.5, 99.5)
    slice_axis: SliceAxis = "axial"

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"expected percentiles 0 <= low < high <= 100, got {list(value)}")
        return value


VolumesConfig = Annotated[CTVolumes | MRVolumes, Field(discriminator="modality")]


# ---- datasets ----------------------------------------------------------------------------------


class DatasetFields(_Strict):
    """The keys of one ``datasets.<name>`` entry."""

    images: Path
    index: Path
    id_column: str
    path_column: str | None = None
    patient_column: str | None = None
    filters: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # Image-level targets; a segmentation-only dataset (``classes``) may have none.
    labels: LabelsConfig | None = None
    splits: SplitsConfig
    # Each path is a volume (NIfTI, DICOM series folder, multi-frame DICOM): one row per slice.
    volumes: VolumesConfig | None = None
    # Segmentation: the label-map classes, id 0 first (the background); the index then needs a
    # `mask` column (MASK_COLUMN) with one label-map path per row, relative to `images`.
    classes: tuple[str, ...] | None = None

    _classes = field_validator("classes", mode="before")(_optional_texts)

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(value) < 2:
            raise ValueError("classes needs the background and at least one class")
        return None if value is None else _unique(value, "classes")

    @model_validator(mode="after")
    def _targets(self) -> DatasetFields:
        if self.labels is None and self.classes is None:
            raise ValueError(
                "a dataset needs `labels` (image-level targets), `classes` (label maps in the "
                "index's `mask` column, for segmentation), or both"
            )
        return self

    @field_validator("images", "index", mode="before")
    @classmethod
    def _resolve(cls, value: object, info: ValidationInfo) -> Path:
        return _local_path(value, info)

    @field_validator("filters", mode="before")
    @classmethod
    def _filter_values(cls, value: object) -> object:
        if isinstance(value, dict):
            return {str(k): _texts(v) for k, v in value.items()}
        return value

    @field_validator("index")
    @classmethod
    def _index_suffix(cls, value: Path) -> Path:
        if not value.name.lower().endswith(INDEX_SUFFIXES):
            raise ValueError(
                f"{value.name!r} is not a supported index file; use one of "
                + ", ".join(INDEX_SUFFIXES)
            )
        return value


#: The index column of label-map paths of a dataset with ``classes``.
MASK_COLUMN = "mask"
INDEX_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".pq")


class DatasetConfig(DatasetFields):
    """A validated dataset entry; ``name`` is its key under ``datasets``."""

    name: str

    @property
    def path_column_name(self) -> str:
        """The column of image paths (``path_column``, else ``id_column``)."""
        return self.path_column or self.id_column

    def load(self) -> DatasetTable:
        """Read the index, apply filters, build labels and splits (raises ``ManifestError``)."""
        from embedkit.manifest.table import load_table

        return load_table(self)


class ManifestFile(_Strict):
    """The whole YAML document."""

    cache: str = "./embedkit-cache"
    datasets: dict[str, DatasetFields]

    @field_validator("datasets")
    @classmethod
    def _names(cls, value: dict[str, DatasetFields]) -> dict[str, DatasetFields]:
        if not value:
            raise ValueError("no datasets; add at least one entry under `datasets`")
        bad = [name for name in value if not DATASET_NAME.match(name)]
        if bad:
            raise ValueError(
                f"dataset names {bad} are not valid; use letters, digits, '.', '_' and '-' "
                "(they name cache folders)"
            )
        return value
