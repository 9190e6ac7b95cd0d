"""Finetuning baselines: full, LoRA, BitFit and linear (head-only) training of registry encoders.

``run_finetune(FinetuneRequest(...))`` trains, keeps the epoch with the lowest validation loss,
evaluates on the test split and writes a result record in the probes' format
(``kind = "finetune-<method>"``); see :mod:`embedkit.finetune.train`.
"""

from embedkit.finetune.checkpoint import CheckpointError
from embedkit.finetune.methods import (
    METHOD_NAMES,
    METHODS,
    LoraSettings,
    Method,
    count_parameters,
    get_method,
    register_method,
)
from embedkit.finetune.model import Classifier, default_pooling
from embedkit.finetune.train import (
    DEFAULT_RESULTS,
    EpochLog,
    FinetuneOutcome,
    FinetuneRequest,
    finetune_record_relpath,
    run_finetune,
)

__all__ = [
    "DEFAULT_RESULTS",
    "METHODS",
    "METHOD_NAMES",
    "CheckpointError",
    "Classifier",
    "EpochLog",
    "FinetuneOutcome",
    "FinetuneRequest",
    "LoraSettings",
    "Method",
    "count_parameters",
    "default_pooling",
    "finetune_record_relpath",
    "get_method",
    "register_method",
    "run_finetune",
]
