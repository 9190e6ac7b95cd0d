"""The closed option sets of the models layer, without torch: the CLI and requests read them here.

:mod:`embedkit.models.device` and :mod:`embedkit.models.sharding` interpret them (and re-export
them under these names); ``DeviceMap`` goes to transformers/accelerate as ``device_map``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ComputeDtype", "DeviceMap", "ShardMode"]

#: The dtype an encoder runs in; ``auto`` is bf16 on GPU, fp32 on CPU.
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
#: Weight sharding across the ranks of a job: none, FSDP2, or planned from memory (``auto``).
ShardMode = Literal["none", "fsdp", "auto"]
#: ``device_map`` of transformers/accelerate: one process, layers over all visible GPUs.
DeviceMap = Literal["auto", "balanced", "sequential"]
