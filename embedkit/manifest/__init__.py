"""The data manifest: typed dataset entries, their labels and splits, and the check report.

manifest = load_manifest("data_manifest.yaml")
table = manifest.dataset("nih-cxr14").load()
train_rows = table.indices("train")

Exports load lazily (:mod:`embedkit.lazy`): pandas loads with the table, not with the package.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedkit.manifest.check import (
        DatasetReport,
        LabelCount,
        SplitSize,
        check_dataset,
        render_report,
    )
    from embedkit.manifest.labels import Labels
    from embedkit.manifest.loader import DEFAULT_MANIFEST, Manifest, load_manifest, parse_manifest
    from embedkit.manifest.schema import (
        SPLIT_NAMES,
        ColumnsLabels,
        DatasetConfig,
        FilesSplits,
        Fractions,
        GivenSplits,
        PatientSplits,
        SeparatedLabels,
        SingleLabels,
    )
    from embedkit.manifest.splits import patient_split
    from embedkit.manifest.table import DatasetTable
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "check": ("DatasetReport", "LabelCount", "SplitSize", "check_dataset", "render_report"),
            "labels": ("Labels",),
            "loader": ("DEFAULT_MANIFEST", "Manifest", "load_manifest", "parse_manifest"),
            "schema": (
                "SPLIT_NAMES",
                "ColumnsLabels",
                "DatasetConfig",
                "FilesSplits",
                "Fractions",
                "GivenSplits",
                "PatientSplits",
                "SeparatedLabels",
                "SingleLabels",
            ),
            "splits": ("patient_split",),
            "table": ("DatasetTable",),
        },
    )

__all__ = [
    "DEFAULT_MANIFEST",
    "SPLIT_NAMES",
    "ColumnsLabels",
    "DatasetConfig",
    "DatasetReport",
    "DatasetTable",
    "FilesSplits",
    "Fractions",
    "GivenSplits",
    "LabelCount",
    "Labels",
    "Manifest",
    "PatientSplits",
    "SeparatedLabels",
    "SingleLabels",
    "SplitSize",
    "check_dataset",
    "load_manifest",
    "parse_manifest",
    "patient_split",
    "render_report",
]
