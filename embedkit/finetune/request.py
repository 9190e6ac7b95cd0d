"""What to finetune: the request value and the settings it validates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from embedkit.errors import ConfigError
from embedkit.finetune.methods import LoraSettings, get_method

#: What the head predicts: the manifest's labels from a pooled feature (classification), or a
#: label map per image from the patch tokens (segmentation; masks from the index's mask column).
FinetuneTask = Literal["classification", "segmentation"]
FINETUNE_TASKS: tuple[str, ...] = get_args(FinetuneTask)


@dataclass(frozen=True, slots=True)
class FinetuneRequest:
    """One finetuning run. Every field except ``device``, ``num_workers`` and ``overwrite``
    is part of the run id (a changed hyper-parameter is a new run, never a resume).

    The field defaults are the only defaults: `embedkit finetune` and a pipeline's finetune
    steps read them from here (through embedkit.study.options)."""

    model: str
    dataset: str
    resolution: int
    method: str  # a registered finetuning method: embedkit.finetune.METHOD_NAMES
    task: FinetuneTask = "classification"
    epochs: int = 10
    lr: float | None = None  # default: the method's (full 1e-5, lora 1e-4, bitfit/linear 1e-3)
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of all steps spent in linear warm-up
    layer_decay: float = 1.0  # layer-wise lr decay (ViT families); 1.0 = off
    pooling: str | None = None  # default: mean of patch tokens (ViT), pooled (ConvNeXt)
    augment: bool = True
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool = False  # GPU only
    seed: int = 0
    n_boot: int = 1000
    device: str = "auto"
    num_workers: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        get_method(self.method)  # unknown method -> ConfigError listing the methods
        if self.task not in FINETUNE_TASKS:
            raise ConfigError(
                f"Expected task {' or '.join(FINETUNE_TASKS)}, got {self.task!r} instead"
            )
        if self.task == "segmentation" and self.pooling not in (None, "patch"):
            raise ConfigError(
                f"a segmentation head sits on the patch tokens; got pooling {self.pooling!r} "
                "(leave --pooling out)"
            )
        problems = [
            f"{name}={value}"
            for name, value, ok in (
                ("epochs", self.epochs, self.epochs >= 1),
                ("batch_size", self.batch_size, self.batch_size >= 1),
                ("lr", self.lr, self.lr is None or self.lr > 0),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                ("warmup", self.warmup, 0 <= self.warmup < 1),
                ("layer_decay", self.layer_decay, 0 < self.layer_decay <= 1),
                ("n_boot", self.n_boot, self.n_boot >= 1),
                ("num_workers", self.num_workers, self.num_workers >= 0),
            )
            if not ok
        ]
        if problems:
            raise ConfigError(
                "Expected epochs >= 1, batch_size >= 1, lr > 0, weight_decay >= 0, "
                "0 <= warmup < 1, 0 < layer_decay <= 1, n_boot >= 1 and num_workers >= 0, got "
                f"{', '.join(problems)} instead"
            )
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.lora_settings()  # validates r, alpha, dropout, targets

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else get_method(self.method).default_lr
