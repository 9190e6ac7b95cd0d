"""What to extract: the request value and the closed option sets it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embedkit.errors import EmbedkitError
from embedkit.models.device import ComputeDtype

StorageDtype = Literal["float16", "float32"]
#: Storage codec of a new entry (see embedkit.store.entry.COMPRESSIONS): not part of the cache
#: key, since it changes the files but not the stored values (checksums cover decoded bytes).
Compression = Literal["none", "zstd"]
BadImagePolicy = Literal["fail", "skip"]
ResizePolicy = Literal["squash", "pad", "crop"]
ShardPolicy = Literal["none", "fsdp", "auto"]

#: Images per work unit: one Zarr chunk per pooling, one completion record.
DEFAULT_UNIT_ROWS = 1024


@dataclass(frozen=True, slots=True)
class ExtractionRequest:
    """What to extract. Everything that changes the stored bytes ends up in the cache key."""

    model: str
    dataset: str
    resolution: int
    patch_tokens: bool = False
    dtype: ComputeDtype = "auto"
    storage_dtype: StorageDtype = "float16"
    compression: Compression = "none"
    batch_size: int = 32
    device: str = "auto"
    num_workers: int = 2
    unit_rows: int = DEFAULT_UNIT_ROWS
    resize: ResizePolicy = "squash"
    snap_resolution: bool = False
    on_bad_image: BadImagePolicy = "fail"
    revision: str | None = None
    overwrite: bool = False
    shard: ShardPolicy = "none"
    device_map: str | None = None  # "auto": one process, layers over all GPUs (accelerate)
    compile: bool = False
    auto_batch: bool = False
    lease_ttl_s: float | None = None  # None: $EMBEDKIT_LEASE_TTL, else 60 s

    def __post_init__(self) -> None:
        if self.device_map is not None and self.shard != "none":
            raise EmbedkitError(
                "--device-map and --shard are two ways to split a model: use --shard fsdp "
                "under torchrun (data parallel, faster) or --device-map auto in one process"
            )
        for name in ("resolution", "batch_size", "unit_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected a positive integer for {name}, got {value!r} instead")
        if self.num_workers < 0:
            raise ValueError(f"Expected num_workers >= 0, got {self.num_workers} instead")
