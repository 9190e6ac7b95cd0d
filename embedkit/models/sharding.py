"""Weight sharding of a frozen encoder across the ranks of a job (FSDP2) and ``--shard auto``.

- :func:`plan_memory` is the ``--shard auto`` planner, a pure function of the model's shape, the
  resolution, the batch size, the device memory and the number of ranks.
- :func:`load_sharded_encoder` builds the model on the meta device, wraps every block the family
  adapter names (:meth:`~embedkit.models.families.FamilyAdapter.blocks`: the transformer blocks
  of a ViT, the blocks of every ConvNeXt stage) and the root with
  ``torch.distributed.fsdp.fully_shard``, allocates only this rank's 1/N of every parameter and
  fills it from the safetensors files with ``safe_open(...).get_slice`` (a rank reads only its
  rows). No rank ever holds the full weights: loading a 7B checkpoint needs
  ~1/N of 13.4 GB (bf16) per rank, plus one layer at a time during the forward.

Every rank runs its own data share through the sharded model; each forward all-gathers one block
at a time, so all ranks must make the same number of forward calls (the engine pads with dummy
batches, see ``run_extraction(min_forwards=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from embedkit.errors import ModelLoadError, ShardingError
from embedkit.models.families import get_family
from embedkit.models.loading import EncoderIdentity, LoadedEncoder, parse_dtype
from embedkit.models.policies import ShardMode
from embedkit.models.shape import ModelShape

GB = 1e9
#: Live activations of one block at inference, in units of tokens x dim x bytes: residual stream,
#: qkv (3), attention output, MLP hidden (4, or ~5.3 for SwiGLU), plus allocator slack.
ACTIVATION_FACTOR = 16
#: CUDA context, allocator fragmentation, workspace.
FIXED_OVERHEAD_BYTES = 1.5 * GB
#: Fraction of device memory the plan may use.
USABLE_FRACTION = 0.9


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """The ``--shard auto`` decision and the numbers behind it (bytes per rank)."""

    mode: Literal["replicate", "fsdp"]
    weights_bytes: float  # full model
    per_rank_bytes: float  # what this plan needs on each device
    activation_bytes: float
    device_bytes: float
    world_size: int

    def describe(self) -> str:
        return (
            f"{self.mode}: {self.per_rank_bytes / GB:.1f} GB per rank of "
            f"{self.device_bytes / GB:.0f} GB (weights {self.weights_bytes / GB:.1f} GB, "
            f"activations {self.activation_bytes / GB:.1f} GB, {self.world_size} rank(s))"
        )


def activation_bytes(shape: ModelShape, side: int, batch_size: int, dtype_bytes: int) -> float:
    """Peak activation memory of one inference forward (one block live at a time, SDPA)."""
    if shape.kind == "convnet":  # the first stage: (side/4)^2 positions x first-stage dim
        positions = (side // shape.patch) ** 2
        return float(batch_size * positions * shape.embed_dim * dtype_bytes * ACTIVATION_FACTOR)
    per_image = shape.tokens(side) * shape.embed_dim * dtype_bytes * ACTIVATION_FACTOR
    return float(batch_size * per_image)


def plan_memory(
    shape: ModelShape,
    *,
    side: int,
    batch_size: int,
    device_bytes: float,
    world_size: int,
    dtype_bytes: int = 2,
) -> MemoryPlan:
    """Replicate when the whole model plus activations fits one device, else FSDP over the ranks.

    Needs per rank: replicate = weights + activations + overhead; FSDP = weights / N + two
    gathered blocks (the current one and the prefetched next) + activations + overhead. Raises
    :class:`ShardingError` (saying what would fit) when neither fits in 90% of ``device_bytes``.
    """
    if world_size < 1 or batch_size < 1 or device_bytes <= 0:
        raise ValueError(
            f"Expected world_size, batch_size >= 1 and device_bytes > 0, got {world_size}, "
            f"{batch_size}, {device_bytes} instead"
        )
    weights = float(shape.params * dtype_bytes)
    acts = activation_bytes(shape, side, batch_size, dtype_bytes)
    usable = USABLE_FRACTION * device_bytes
    replicate = weights + acts + FIXED_OVERHEAD_BYTES
    if replicate <= usable:
        return MemoryPlan("replicate", weights, replicate, acts, device_bytes, world_size)
    gathered = 2 * weights / shape.layers

    def fsdp_need(n: int) -> float:
        return weights / n + gathered + acts + FIXED_OVERHEAD_BYTES

    if world_size > 1 and fsdp_need(world_size) <= usable:
        return MemoryPlan("fsdp", weights, fsdp_need(world_size), acts, device_bytes, world_size)
    room = usable - gathered - acts - FIXED_OVERHEAD_BYTES
    advice = []
    if room > 0:
        need = math.ceil(weights / room)
        advice.append(f"run with at least {need} ranks and --shard fsdp (torchrun)")
    per_image = acts / batch_size
    fit_batch = int((usable - weights - FIXED_OVERHEAD_BYTES) // per_image)
    if fit_batch >= 1:
        advice.append(f"lower --batch-size to {fit_batch} or less")
    advice.append("use a device with more memory")
    raise ShardingError(
        f"The model ({shape.params / 1e9:.2f}B parameters, {weights / GB:.1f} GB of weights) at "
        f"{side} px and batch {batch_size} needs {replicate / GB:.1f} GB per device as a replica"
        + (
            f" and {fsdp_need(world_size) / GB:.1f} GB per rank with FSDP over {world_size}"
            if world_size > 1
            else ""
        )
        + f", but a {device_bytes / GB:.0f} GB device has {usable / GB:.1f} GB usable. "
        + _sentence("; or ".join(advice))
        + "."
    )


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def device_memory_bytes(device: torch.device, local_world_size: int = 1) -> float:
    """Memory of ``device``; for the CPU, the host RAM shared by this node's ranks."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(total) / max(1, local_world_size)


def resolve_shard(
    mode: ShardMode,
    shape: ModelShape,
    *,
    side: int,
    batch_size: int,
    device: torch.device,
    world_size: int,
    local_world_size: int,
    dtype: str,
) -> Literal["replicate", "fsdp"]:
    """``none``: replicate; ``fsdp``: fsdp (needs >= 2 ranks); ``auto``: :func:`plan_memory`."""
    if mode == "none":
        return "replicate"
    if mode == "fsdp":
        if world_size < 2:
            raise ShardingError(
                "--shard fsdp splits the weights across ranks: launch at least 2 "
                "(torchrun --nproc_per_node=N, or embedkit extract --nproc N)"
            )
        return "fsdp"
    plan = plan_memory(
        shape,
        side=side,
        batch_size=batch_size,
        device_bytes=device_memory_bytes(device, local_world_size),
        world_size=world_size,
        dtype_bytes=parse_dtype(dtype).itemsize,
    )
    return plan.mode


# --- FSDP2 ---------------------------------------------------------------------------------------


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's local tensor of a (possibly FSDP-sharded) parameter and its first dim-0 row."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0
    local = param.to_local()
    placement = param.placements[0]
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ModelLoadError(f"unexpected FSDP placement {param.placements} (expected Shard(0))")
    mesh = param.device_mesh
    chunk = math.ceil(param.shape[0] / mesh.size())
    return local, chunk * mesh.get_local_rank()


def _weight_files(identity: EncoderIdentity) -> list[Path]:
    files = sorted(identity.directory.glob("*.safetensors"))
    if files or identity.hub_id is None:
        if not files:
            raise ModelLoadError(
                f"{identity.directory}: --shard fsdp loads weights from *.safetensors files, "
                "found none"
            )
        return files
    from huggingface_hub import snapshot_download

    commit = identity.directory.name
    folder = snapshot_download(identity.hub_id, revision=commit, allow_patterns="*.safetensors")
    return sorted(Path(folder).glob("*.safetensors"))


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(key, lazy slice) of every tensor in the safetensors files; nothing is read yet."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, handle.get_slice(key)


class _CheckpointKeys:
    """Checkpoint key -> model name, through transformers' own renaming of legacy keys.

    transformers 5 renamed the modules of several families (ViT, ViT-MAE: ``encoder.layer.0.
    attention.attention.query`` became ``layers.0.attention.q_proj``) and still *saves* the old
    names, renaming them back when it loads (``conversion_mapping``). Rows of a tensor can be
    read from its file only when the key is merely renamed; a family whose conversion merges or
    splits tensors (a ``WeightConverter``) cannot be sharded from its files, which is said once,
    clearly, instead of a list of missing tensors.
    """

    def __init__(self, model: torch.nn.Module, source: str) -> None:
        self._source = source
        self._renamings: list[Any] = []
        self._converters: list[Any] = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # an older transformers: keys are the module names
            return
        for transform in get_model_conversion_mapping(model):  # type: ignore[arg-type]
            if isinstance(transform, WeightRenaming):
                self._renamings.append(transform)
            elif isinstance(transform, WeightConverter):
                self._converters.append(transform)

    def model_key(self, key: str) -> str:
        if not self._renamings and not self._converters:
            return key
        from transformers.core_model_loading import rename_source_key

        renamed, converter = rename_source_key(key, self._renamings, self._converters)
        if converter is not None:
            raise ModelLoadError(
                f"{self._source}: checkpoint tensor {key!r} is converted (merged or split) "
                "by transformers when it loads, so --shard fsdp cannot read its rows from the "
                "file; use --shard none on a GPU with room for the whole model"
            )
        return renamed


def _match_key(key: str, names: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The model tensor a checkpoint key belongs to: equal, without the base-model prefix, or
    the one model name ending in ``.<key>`` (transformers may nest the backbone, e.g. ``model.``).
    """
    for candidate in (key, key.removeprefix(prefix)):
        if candidate in names:
            return candidate
    matches = [n for n in names if n.endswith(f".{key}")]
    return matches[0] if len(matches) == 1 else None


def load_sharded_encoder(
    identity: EncoderIdentity,
    mesh: Any,
    *,
    device: torch.device,
    dtype: str,
) -> LoadedEncoder:
    """The encoder of ``identity`` with FSDP2-sharded weights; each rank reads only its rows."""
    from torch.distributed.fsdp import fully_shard

    torch_dtype = parse_dtype(dtype)
    adapter = get_family(identity.spec.family)
    config = adapter.for_inference(adapter.config_class.from_pretrained(identity.directory))
    with torch.device("meta"):
        built: torch.nn.Module = adapter.model_class(config, **adapter.model_kwargs)
    model = built.to(torch_dtype)
    model.eval()
    model.requires_grad_(False)
    # before fully_shard: it swaps the class for a generated FSDP<Name> subclass, which
    # transformers takes for custom code and gives no key renamings
    keys = _CheckpointKeys(model, identity.source)
    # Reshard after every forward, the root too (its default keeps the root's parameters
    # gathered for a backward pass that inference never runs).
    for block in adapter.blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    # Non-persistent buffers (e.g. RoPE frequencies) are computed, not stored: let the model's
    # own initialiser recompute them on modules that hold buffers but no parameters.
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        has_buffers = any(True for _ in module.buffers(recurse=False))
        if has_buffers and not any(True for _ in module.parameters(recurse=False)):
            if init is None:
                raise ModelLoadError(f"{identity.source}: cannot initialise buffers for FSDP")
            init(module)
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    loaded: set[str] = set()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    with torch.no_grad():
        for key, lazy in _checkpoint_tensors(_weight_files(identity)):
            name = _match_key(keys.model_key(key), targets, prefix)
            if name is None:
                continue
            local, first = _local_rows(targets[name])
            if local.ndim == 0:
                local.copy_(lazy[()])
            elif local.shape[0] > 0:
                local.copy_(lazy[first : first + local.shape[0]].to(local.dtype))
            loaded.add(name)
    persistent = set(model.state_dict())
    missing = sorted(n for n in targets if n not in loaded and n in persistent)
    if missing:
        raise ModelLoadError(
            f"{identity.source}: the checkpoint lacks {len(missing)} tensors of "
            f"{adapter.model_class_name} (e.g. {missing[:5]}); embedkit refuses to run an "
            "encoder with uninitialised parts"
        )
    return LoadedEncoder(
        identity.spec, model, identity.source, identity.weights_fingerprint, device, torch_dtype
    )


def resident_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (the local shards of FSDP-sharded parameters)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
