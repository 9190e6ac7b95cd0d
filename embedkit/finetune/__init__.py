"""Finetuning baselines: full, LoRA, BitFit and linear (head-only) training of registry encoders,
for classification (a head on a pooled feature) and segmentation (a head on the patch tokens,
:mod:`embedkit.finetune.segmentation`).

``run_finetune(FinetuneRequest(...))`` trains, keeps the epoch with the lowest validation loss,
evaluates on the test split and writes a result record in the probes' format
(``kind = "finetune-<method>"``); see :mod:`embedkit.finetune.train`.

Exports load lazily (:mod:`embedkit.lazy`): the request and :data:`METHOD_NAMES` come without
torch or peft.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    from embedkit.finetune.model import Classifier, EncoderHead, default_pooling
    from embedkit.finetune.request import FINETUNE_TASKS, FinetuneRequest
    from embedkit.finetune.segmentation import Segmenter
    from embedkit.finetune.train import (
        DEFAULT_RESULTS,
        EpochLog,
        FinetuneOutcome,
        finetune_record_relpath,
        run_finetune,
    )
else:
    from embedkit.lazy import lazy_exports

    __getattr__, __dir__ = lazy_exports(
        __name__,
        {
            "checkpoint": ("CheckpointError",),
            "methods": (
                "METHOD_NAMES",
                "METHODS",
                "LoraSettings",
                "Method",
                "count_parameters",
                "get_method",
                "register_method",
            ),
            "model": ("Classifier", "EncoderHead", "default_pooling"),
            "request": ("FINETUNE_TASKS", "FinetuneRequest"),
            "segmentation": ("Segmenter",),
            "train": (
                "DEFAULT_RESULTS",
                "EpochLog",
                "FinetuneOutcome",
                "finetune_record_relpath",
                "run_finetune",
            ),
        },
    )

__all__ = [
    "DEFAULT_RESULTS",
    "FINETUNE_TASKS",
    "METHODS",
    "METHOD_NAMES",
    "CheckpointError",
    "Classifier",
    "EncoderHead",
    "EpochLog",
    "FinetuneOutcome",
    "FinetuneRequest",
    "LoraSettings",
    "Method",
    "Segmenter",
    "count_parameters",
    "default_pooling",
    "finetune_record_relpath",
    "get_method",
    "register_method",
    "run_finetune",
]
