"""The probe-kind registry: one small protocol, one entry per kind, looked up by name.

A probe kind says everything :func:`embedkit.probes.run.run_probe` needs to know about it:

- ``name``: what ``--kind`` / a pipeline step's ``kind:`` says;
- ``curve``: what its records declare to the report: None when the metrics are points on the test
  split (with saved per-image scores), otherwise the axis of the curve its metrics form, keyed
  ``"<x>-<unit>"`` (few-shot: ``"shots"``, keys ``"1-shot"``, ``"2-shot"``, ...);
- :meth:`ProbeKind.default_pooling`: the pooling used when the request names none, given the
  poolings the entry stores;
- :meth:`ProbeKind.params`: the hyper-parameters that enter the record identity;
- :meth:`ProbeKind.fit_score`: fit on train (choosing hyper-parameters on validation) and score
  the test split, returning a :class:`KindResult`;
- ``inputs`` (optional, default ``"features"``): what the runner loads for it
  (:data:`ProbeInputs`): ``"features"``, one pooled vector per image joined with the image
  labels (:class:`ProbeData`); ``"patches"``, the stored patch-token grid joined with the
  dataset's label maps (:class:`PatchData`, read blockwise by the kind itself).

A kind that computes its own metrics (a curve, or per-class segmentation scores) returns them
in :attr:`KindResult.metrics` (and :attr:`KindResult.per_label`, :attr:`KindResult.table`,
:attr:`KindResult.task` / :attr:`KindResult.labels` when its record describes other targets
than the image labels, and :attr:`KindResult.arrays` for files written beside the record).

Adding a kind: write its module (estimator + a class with the members above) and register it
once (:func:`register`, called at the bottom of :mod:`embedkit.probes.kinds`). Nothing else
branches on kind names: the runner, the CLI and pipeline choices
(:data:`embedkit.probes.PROBE_KINDS`) and the report all read this registry or what a record
declares.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args, runtime_checkable

import numpy as np

from embedkit.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from embedkit.data.volumes import VolumeSlice
    from embedkit.probes.features import SplitFeatures
    from embedkit.probes.request import ProbeRequest
    from embedkit.results import ScoreTable
    from embedkit.store import FeatureEntry
    from embedkit.store.readcache import ProgressFactory

__all__ = [
    "KindResult",
    "PatchData",
    "PatchSplit",
    "ProbeData",
    "ProbeInputs",
    "ProbeKind",
    "get_kind",
    "kind_inputs",
    "register",
    "registered_kinds",
]

#: What a kind reads (its optional ``inputs`` attribute; see the module docstring).
ProbeInputs = Literal["features", "patches"]


@dataclass(frozen=True, eq=False)
class ProbeData:
    """The three splits of one dataset on one entry and pooling, and what their targets mean."""

    train: SplitFeatures
    val: SplitFeatures
    test: SplitFeatures
    labels: tuple[str, ...]  # label (multi-label) or class (multi-class) names, in column order
    task: Literal["multilabel", "multiclass"]
    dataset: str


@dataclass(frozen=True, eq=False)
class PatchSplit:
    """One split of a dataset with label maps, row i for image ``ids[i]`` (images skipped as
    unreadable at extraction are left out). For volumes, ``volumes[i]`` / ``slices[i]`` say
    which volume and slice row i is, so slice predictions stack back into volumes, and
    ``volume_slices[i]`` how the slice is read (its volume file and slice axis)."""

    split: str
    ids: tuple[str, ...]
    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    patients: tuple[str, ...]
    n_skipped: int
    volumes: tuple[str, ...] | None = None
    slices: tuple[int, ...] | None = None
    volume_slices: tuple[VolumeSlice, ...] | None = None


@dataclass(frozen=True, eq=False)
class PatchData:
    """The three splits of a dataset with label maps on one entry's patch-token ``pooling``
    (``(N, h, w, D)`` rows read by id, blockwise, from ``entry``)."""

    train: PatchSplit
    val: PatchSplit
    test: PatchSplit
    classes: tuple[str, ...]  # label-map ids 0.. (0 = background)
    entry: FeatureEntry
    pooling: str
    resize: str  # the entry's preprocessing resize mode (squash, pad, crop)
    dataset: str
    progress: ProgressFactory | None = None


@dataclass
class KindResult:
    """What one kind's fit-and-score returns.

    Either ``scores`` (test scores ``(N, L)``, row i for ``data.test.ids[i]``), which the runner
    evaluates (per-label AUROC / AP with bootstrap CIs) and saves beside the record, or
    ``metrics`` already computed by the kind (a curve: ``{"<x>-<unit>": {metric: summary}}``).
    With ``scores``, ``val_scores`` (the same model's scores of ``data.val``, row i for
    ``data.val.ids[i]``) let the runner choose the operating points (Youden threshold) on
    validation and apply them on test; without them the record has no sensitivity /
    specificity.
    """

    selected: dict[str, Any]  # chosen on validation (C, k, lr, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None
    metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    val_scores: np.ndarray | None = None
    #: Per-label rows computed by the kind (with ``metrics``), else the runner's or none.
    per_label: list[dict[str, Any]] | None = None
    #: Per-case test scores saved beside the record (with ``metrics``), for paired comparisons.
    table: ScoreTable | None = None
    #: The record's task and labels when they are not the dataset's image labels.
    task: str | None = None
    labels: tuple[str, ...] | None = None
    #: Arrays saved beside the record as ``<record stem>.<name>.npz`` (named in its ``extra``).
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


DataT_contra = TypeVar("DataT_contra", contravariant=True)


@runtime_checkable
class ProbeKind(Protocol[DataT_contra]):
    """One probe kind; see the module docstring. ``DataT_contra`` is what its
    :meth:`fit_score` takes: :class:`ProbeData` (``inputs = "features"``, the default) or
    :class:`PatchData` (``inputs = "patches"``)."""

    @property
    def name(self) -> str: ...

    @property
    def curve(self) -> str | None: ...

    def default_pooling(self, stored: Collection[str]) -> str: ...

    def params(self, request: ProbeRequest) -> dict[str, Any]: ...

    def fit_score(self, request: ProbeRequest, data: DataT_contra) -> KindResult: ...


_KINDS: dict[str, ProbeKind[Any]] = {}


def kind_inputs(kind: ProbeKind[Any]) -> ProbeInputs:
    """What the runner loads for ``kind``: its ``inputs``, ``"features"`` when it declares none."""
    value = getattr(kind, "inputs", "features")
    for choice in get_args(ProbeInputs):
        if value == choice:
            inputs: ProbeInputs = choice
            return inputs
    raise ConfigError(
        f"probe kind {kind.name!r} declares inputs {value!r}; "
        f"expected one of {list(get_args(ProbeInputs))}"
    )


def register(kind: ProbeKind[Any]) -> ProbeKind[Any]:
    """Add ``kind`` to the registry (a second kind of the same name is an error)."""
    if not isinstance(kind, ProbeKind):
        raise TypeError(f"Expected a ProbeKind, got {type(kind).__name__} instead")
    if kind.name in _KINDS:
        raise ConfigError(f"probe kind {kind.name!r} is already registered")
    kind_inputs(kind)
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> tuple[str, ...]:
    """The names of every registered probe kind, in registration order."""
    return tuple(_KINDS)


def get_kind(name: str) -> ProbeKind[Any]:
    """The registered kind ``name``; an unknown name is a :class:`ConfigError` listing them."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown probe kind {name!r}{did_you_mean(name, _KINDS)}; choose one of {list(_KINDS)}"
        ) from None
