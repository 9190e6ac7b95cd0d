"""Metrics, bootstrap confidence intervals and tests for probe results (CXR study protocol).

Exports load lazily (:mod:`embedkit.lazy`): the metrics need numpy only, DeLong needs scipy.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedkit.eval.bootstrap import (
        BootstrapCI,
        BootstrapError,
        PairedTest,
        adjust_pvalues,
        bootstrap_ci,
        bootstrap_indices,
        paired_bootstrap_test,
    )
    from embedkit.eval.delong import (
        DeLongResult,
        delong_ci,
        delong_covariance,
        delong_test,
        delong_test_per_label,
    )
    from embedkit.eval.metrics import (
        MetricInputError,
        accuracy,
        auroc,
        auroc_columns,
        average_precision,
        balanced_accuracy,
        evaluate_multiclass,
        evaluate_multilabel,
        labels_without_both_classes,
        macro_ap,
        macro_auroc,
        ovr_macro_auroc,
        per_label_ap,
        per_label_auroc,
        youden,
    )
    from embedkit.eval.permutation import PermutationTest, paired_permutation_test
    from embedkit.eval.summary import OPERATING_POINT, RARE_LABEL_MIN, Evaluation, evaluate_scores
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "bootstrap": (
                "BootstrapCI",
                "BootstrapError",
                "PairedTest",
                "adjust_pvalues",
                "bootstrap_ci",
                "bootstrap_indices",
                "paired_bootstrap_test",
            ),
            "delong": (
                "DeLongResult",
                "delong_ci",
                "delong_covariance",
                "delong_test",
                "delong_test_per_label",
            ),
            "metrics": (
                "MetricInputError",
                "accuracy",
                "auroc",
                "auroc_columns",
                "average_precision",
                "balanced_accuracy",
                "evaluate_multiclass",
                "evaluate_multilabel",
                "labels_without_both_classes",
                "macro_ap",
                "macro_auroc",
                "ovr_macro_auroc",
                "per_label_ap",
                "per_label_auroc",
                "youden",
            ),
            "permutation": ("PermutationTest", "paired_permutation_test"),
            "summary": ("OPERATING_POINT", "RARE_LABEL_MIN", "Evaluation", "evaluate_scores"),
        },
    )

__all__ = [
    "OPERATING_POINT",
    "RARE_LABEL_MIN",
    "BootstrapCI",
    "BootstrapError",
    "DeLongResult",
    "Evaluation",
    "MetricInputError",
    "PairedTest",
    "PermutationTest",
    "accuracy",
    "adjust_pvalues",
    "auroc",
    "auroc_columns",
    "average_precision",
    "balanced_accuracy",
    "bootstrap_ci",
    "bootstrap_indices",
    "delong_ci",
    "delong_covariance",
    "delong_test",
    "delong_test_per_label",
    "evaluate_multiclass",
    "evaluate_multilabel",
    "evaluate_scores",
    "labels_without_both_classes",
    "macro_ap",
    "macro_auroc",
    "ovr_macro_auroc",
    "paired_bootstrap_test",
    "paired_permutation_test",
    "per_label_ap",
    "per_label_auroc",
    "youden",
]
