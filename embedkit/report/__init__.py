"""Comparison reports built from result records alone: tables, paired tests, plots, HTML."""

from embedkit.report.build import ReportFiles, build_report
from embedkit.report.compare import (
    Comparison,
    PairChoice,
    RunPair,
    RunSelector,
    compare_records,
)
from embedkit.report.tables import SummaryRow, summary_rows

__all__ = [
    "Comparison",
    "PairChoice",
    "ReportFiles",
    "RunPair",
    "RunSelector",
    "SummaryRow",
    "build_report",
    "compare_records",
    "summary_rows",
]
