"""Result records (JSON + Parquet scores) and the guard that keeps a results folder consistent."""

from embedkit.results.records import (
    RECORD_FORMAT_VERSION,
    ResultRecord,
    ResultsDir,
    ScoreTable,
    load_record,
    load_scores,
    record_id,
)

__all__ = [
    "RECORD_FORMAT_VERSION",
    "ResultRecord",
    "ResultsDir",
    "ScoreTable",
    "load_record",
    "load_scores",
    "record_id",
]
