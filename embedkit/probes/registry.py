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
  the test split, returning a :class:`KindResult`.

Adding a kind: write its module (estimator + a class with the members above) and register it
once (:func:`register`, called at the bottom of :mod:`embedkit.probes.kinds`). Nothing else
branches on kind names: the runner, the CLI and pipeline choices
(:data:`embedkit.probes.PROBE_KINDS`) and the report all read this registry or what a record
declares.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from embedkit.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from embedkit.probes.features import SplitFeatures
    from embedkit.probes.request import ProbeRequest

__all__ = [
    "KindResult",
    "ProbeData",
    "ProbeKind",
    "get_kind",
    "register",
    "registered_kinds",
]


@dataclass(frozen=True, eq=False)
class ProbeData:
    """The three splits of one dataset on one entry and pooling, and what their targets mean."""

    train: SplitFeatures
    val: SplitFeatures
    test: SplitFeatures
    labels: tuple[str, ...]  # label (multi-label) or class (multi-class) names, in column order
    task: Literal["multilabel", "multiclass"]
    dataset: str


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


@runtime_checkable
class ProbeKind(Protocol):
    """One probe kind; see the module docstring."""

    @property
    def name(self) -> str: ...

    @property
    def curve(self) -> str | None: ...

    def default_pooling(self, stored: Collection[str]) -> str: ...

    def params(self, request: ProbeRequest) -> dict[str, Any]: ...

    def fit_score(self, request: ProbeRequest, data: ProbeData) -> KindResult: ...


_KINDS: dict[str, ProbeKind] = {}


def register(kind: ProbeKind) -> ProbeKind:
    """Add ``kind`` to the registry (a second kind of the same name is an error)."""
    if not isinstance(kind, ProbeKind):
        raise TypeError(f"Expected a ProbeKind, got {type(kind).__name__} instead")
    if kind.name in _KINDS:
        raise ConfigError(f"probe kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> tuple[str, ...]:
    """The names of every registered probe kind, in registration order."""
    return tuple(_KINDS)


def get_kind(name: str) -> ProbeKind:
    """The registered kind ``name``; an unknown name is a :class:`ConfigError` listing them."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown probe kind {name!r}{did_you_mean(name, _KINDS)}; choose one of {list(_KINDS)}"
        ) from None
