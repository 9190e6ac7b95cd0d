"""What to extract: the request value and the closed option sets it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from embedkit.data.policies import OnBadImage, ResizeMode
from embedkit.errors import EmbedkitError
from embedkit.extract.fingerprint import FingerprintMode
from embedkit.models.policies import ComputeDtype, DeviceMap, ShardMode

__all__ = [
    "DEFAULT_UNIT_ROWS",
    "BadImagePolicy",
    "Compression",
    "ComputeDtype",
    "DeviceMap",
    "ExtractionRequest",
    "FingerprintMode",
    "ResizePolicy",
    "ShardPolicy",
    "StorageDtype",
]

# The closed option sets of an extraction. Each is declared once, by the layer that interprets
# it, in a torch-free module (resize, bad images: data.policies; sharding, compute dtype, device
# map: models.policies); the names below are what `embedkit extract` and a pipeline's
# `extract:` offer (both build this request through embedkit.study.options).
StorageDtype = Literal["float16", "float32"]
#: Storage codec of a new entry (the store checks it against embedkit.store.entry.COMPRESSIONS):
#: not part of the cache key, since it changes the files but not the stored values (checksums
#: cover decoded bytes).
Compression = Literal["none", "zstd"]
BadImagePolicy = OnBadImage
ResizePolicy = ResizeMode
ShardPolicy = ShardMode

#: Images per work unit: one Zarr chunk per pooling, one completion record.
DEFAULT_UNIT_ROWS = 1024


@dataclass(frozen=True, slots=True)
class ExtractionRequest:
    """What to extract. Everything that changes the stored bytes ends up in the cache key.

    The field defaults are the only defaults: `embedkit extract` and a pipeline's ``extract:``
    read them from here. ``snap_resolution`` is on: a resolution that is not a multiple of the
    model's patch size becomes the nearest one (DINOv2 at 512 px runs at 518; the size used is
    recorded in the cache key); turn it off to be refused instead.
    """

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
    snap_resolution: bool = True
    on_bad_image: BadImagePolicy = "fail"
    revision: str | None = None
    overwrite: bool = False
    shard: ShardPolicy = "none"
    device_map: DeviceMap | None = None
    compile: bool = False
    auto_batch: bool = False
    lease_ttl_s: float | None = None  # None: $EMBEDKIT_LEASE_TTL, else 60 s
    #: How an image file is fingerprinted (embedkit.extract.fingerprint): what decides that a
    #: row of another entry may be copied for it.
    fingerprint: FingerprintMode = "quick"
    #: Copy the rows other complete entries of the same feature space hold for the same image
    #: bytes instead of computing them.
    reuse: bool = True

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
        if self.lease_ttl_s is not None and not self.lease_ttl_s > 0:
            raise ValueError(f"Expected lease_ttl_s > 0 seconds, got {self.lease_ttl_s} instead")
