"""Turn a model name into a frozen encoder ready to embed images.

Three sources, one loading path:

- ``hub:``   a registered entry or an unregistered hub id, loaded with the family's
  ``from_pretrained(hub_id, revision=..., dtype=...)`` (Hugging Face cache, network if needed);
- ``local:`` a directory holding ``config.json`` + ``model.safetensors`` (family from model_type);
- ``tiny:``  a ``test/...`` entry: the real architecture at a tiny size, random-initialised with
  a fixed seed, saved once under ``<cache_dir>/tiny-models/<name>/<config digest>/`` and then loaded
  through the same local-directory path as a user's checkpoint.

Weights fingerprint (part of every feature-cache key):

- hub snapshot: ``commit:<40-hex commit>`` of the snapshot the weights came from;
- local or tiny directory: ``sha256:<hex>``, a SHA-256 over the names and SHA-256s of
  ``config.json`` and the weight files (``*.safetensors``; ``*.bin`` only when there is no
  safetensors file). Each file's hash is memoised in ``<cache_dir>/fingerprints.json`` keyed by
  (absolute path, size, mtime_ns), so a 27 GB checkpoint is hashed once.

Offline is a state of the process, not a failure per model: before the first hub request,
:func:`hub_reachable` opens one TCP connection to the hub endpoint (``HF_ENDPOINT``, or the proxy)
with a short timeout. When it fails, Hugging Face offline mode is switched on for the rest of the
process (and its children), so cached snapshots keep working and nothing else waits on retries.
Each hub model's config is looked up once per process (:func:`hub_config` remembers the answer,
including a failure), so a study with 100 steps of one model asks the hub once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from embedkit.atomic import atomic_write
from embedkit.errors import ModelLoadError
from embedkit.models.families import FamilyAdapter, family_for_model_type, get_family
from embedkit.models.pooling import check_poolings, pool
from embedkit.models.registry import (
    EncoderSpec,
    read_config_json,
    resolve,
    spec_from_config,
    validate_resolution,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    "DTYPES",
    "HUB_TIMEOUT_S",
    "EncoderIdentity",
    "LoadedEncoder",
    "default_cache_dir",
    "hub_reachable",
    "hub_spec",
    "identify_encoder",
    "load_encoder",
    "materialise_tiny",
    "parse_dtype",
    "validate_resolution",
    "weights_fingerprint",
]

#: Seed of every tiny test model: the same weights in every process.
TINY_SEED = 0
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_HALF = (torch.bfloat16, torch.float16)
_FINGERPRINT_MEMO = "fingerprints.json"
#: How long the one reachability check of the hub may wait (seconds).
HUB_TIMEOUT_S = 3.0


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"expected a dtype in {', '.join(DTYPES)}, got {dtype!r} instead")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/embedkit``, else ``~/.cache/embedkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "embedkit"


@dataclass
class LoadedEncoder:
    """A frozen encoder (``eval()``, no gradients) and where its weights came from."""

    spec: EncoderSpec
    model: torch.nn.Module
    source: str  # "hub:org/name@<commit>", "local:/abs/dir" or "tiny:test/..."
    weights_fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def adapter(self) -> FamilyAdapter:
        return get_family(self.spec.family)

    def encode(self, pixels: torch.Tensor, poolings: Iterable[str]) -> dict[str, torch.Tensor]:
        """One forward pass over normalised ``pixels`` (B, 3, H, W).

        Returns float32 tensors on ``self.device``, batch first: ``(B, D)``, ``(B, 2D)`` for
        ``cls+mean``, ``(B, h, w, D)`` for ``patch``.
        """
        names = check_poolings(self.spec, poolings)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
        height, width = int(pixels.shape[2]), int(pixels.shape[3])
        for side in (height, width):
            validate_resolution(self.spec, side)
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.device.type == "cuda" and self.dtype in _HALF:
            autocast = torch.autocast("cuda", dtype=self.dtype)
        with torch.inference_mode(), autocast:
            outputs = self.adapter.forward(
                self.model, pixels.to(self.device, self.dtype), self.spec
            )
            tokens = self.adapter.tokens(outputs, self.spec, (height, width))
            features = pool(tokens, names)
        return {name: value.float() for name, value in features.items()}


@dataclass(frozen=True)
class EncoderIdentity:
    """Which weights a name refers to, found without building the model.

    Enough to compute a feature-cache key, so a cache hit never loads a (7B) checkpoint.
    """

    spec: EncoderSpec
    source: str  # "hub:org/name@<commit>", "local:/abs/dir" or "tiny:test/..."
    weights_fingerprint: str
    directory: Path  # the checkpoint folder (hub: the snapshot folder)
    hub_id: str | None = None
    revision: str | None = None


def identify_encoder(
    name: str, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> EncoderIdentity:
    """Resolve ``name`` to its spec and weights fingerprint (hub: downloads config.json only)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = resolve(name)
    if isinstance(target, EncoderSpec) and target.tiny_config is not None:
        _no_revision(revision, name)
        directory = materialise_tiny(target, root)
        return EncoderIdentity(
            target, f"tiny:{target.name}", weights_fingerprint(directory, root), directory
        )
    if isinstance(target, EncoderSpec) and target.hub_id is None:  # a local directory
        _no_revision(revision, name)
        directory = Path(target.name)
        return EncoderIdentity(
            target, f"local:{directory}", weights_fingerprint(directory, root), directory
        )
    hub_id = target.hub_id
    if hub_id is None:  # unreachable: tiny and local specs are handled above
        raise ModelLoadError(f"{name}: the registry entry has neither hub_id nor tiny_config")
    try:
        config, snapshot = hub_config(hub_id, revision=revision)
    except ModelLoadError as exc:
        if isinstance(target, EncoderSpec) and target.gated and "gated" not in str(exc):
            raise ModelLoadError(
                f"{exc} {target.name} is gated: once online, accept its licence on "
                f"https://huggingface.co/{hub_id} and make a token available (set HF_TOKEN, or "
                "run `hf auth login`)."
            ) from exc
        raise
    adapter = family_for_model_type(config.model_type, where=hub_id)
    if isinstance(target, EncoderSpec):
        if adapter.name != target.family:
            raise ModelLoadError(
                f"{target.name}: {hub_id} is a {config.model_type!r} checkpoint, but the "
                f"registry entry expects family {target.family!r}"
            )
        spec = target
    else:
        spec = spec_from_config(config, name=hub_id, hub_id=hub_id, files=snapshot)
    commit = snapshot.name
    return EncoderIdentity(
        spec, f"hub:{hub_id}@{commit}", f"commit:{commit}", snapshot, hub_id, revision
    )


def load_encoder(
    name: str | EncoderIdentity,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    device_map: str | None = None,
) -> LoadedEncoder:
    """Load ``name`` (registered name, alias, local directory or hub id) as a frozen encoder.

    ``name`` may also be an :class:`EncoderIdentity` from :func:`identify_encoder`.
    ``device_map="auto"`` places the layers over every visible GPU (and the CPU when they are
    full) in one process with accelerate: for encoders no single GPU holds. It gives no
    speed-up over one GPU; ``device`` is then ignored and inputs go to the first layer's device.
    ``cache_dir`` is embedkit's cache root (tiny models, fingerprint memo); hub downloads stay in
    the Hugging Face cache. ``revision`` (branch, tag or commit) applies to hub models only.
    """
    torch_dtype = parse_dtype(dtype)
    target_device = torch.device(device)
    ident = (
        name
        if isinstance(name, EncoderIdentity)
        else identify_encoder(name, revision=revision, cache_dir=cache_dir)
    )
    adapter = get_family(ident.spec.family)
    if ident.hub_id is None:
        with _quiet_if(ident.spec.tiny_config is not None):
            model = _from_directory(ident.directory, adapter, torch_dtype, device_map)
    else:
        config = adapter.config_class.from_pretrained(ident.directory)
        model = _from_pretrained(
            adapter,
            ident.hub_id,
            torch_dtype,
            config=config,
            revision=ident.revision,
            device_map=device_map,
        )
    if ident.spec.tiny_config is not None or ident.hub_id is not None:
        _check_matches(model, ident.spec)
    model.eval()
    model.requires_grad_(False)
    module: torch.nn.Module = model
    if device_map is None:
        module.to(target_device)
    else:  # accelerate placed the layers; inputs go where the first parameters are
        target_device = next(module.parameters()).device
    return LoadedEncoder(
        ident.spec, model, ident.source, ident.weights_fingerprint, target_device, torch_dtype
    )


@contextlib.contextmanager
def _quiet_if(quiet: bool) -> Iterator[None]:
    """Hide transformers' progress bars (for tiny models, which load instantly)."""
    from transformers.utils import logging as hf_logging

    if not quiet or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _no_revision(revision: str | None, name: str) -> None:
    if revision is not None:
        raise ModelLoadError(
            f"--revision {revision!r} applies to Hugging Face hub models only, not to {name!r}"
        )


def _check_matches(model: torch.nn.Module, spec: EncoderSpec) -> None:
    """The loaded checkpoint must have the architecture facts its registry entry claims."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]
    facts = get_family(spec.family).facts(config)
    expected = (spec.embed_dim, spec.patch_size, spec.num_register_tokens)
    got = (facts.embed_dim, facts.patch_size, facts.num_register_tokens)
    if got != expected:
        raise ModelLoadError(
            f"{spec.name}: the checkpoint has (embed_dim, patch_size, registers) = {got}, but the "
            f"registry entry says {expected}; pass the checkpoint as a local directory instead"
        )


def _from_pretrained(
    adapter: FamilyAdapter,
    source: str | Path,
    dtype: torch.dtype,
    *,
    config: PretrainedConfig | None = None,
    revision: str | None = None,
    device_map: str | None = None,
) -> PreTrainedModel:
    """``from_pretrained`` that refuses checkpoints with missing or mismatched weights; the
    model is built from the checkpoint's config with the family's ``config_overrides``."""
    kwargs: dict[str, Any] = dict(adapter.model_kwargs)
    if config is None:
        with _hub_errors(str(source), revision):
            config = adapter.config_class.from_pretrained(source, revision=revision or "main")
    kwargs["config"] = adapter.for_inference(config)
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    with _hub_errors(str(source), revision):
        loaded: Any = adapter.model_class.from_pretrained(
            source, dtype=dtype, output_loading_info=True, **kwargs
        )
    model, info = cast("tuple[PreTrainedModel, dict[str, Any]]", loaded)
    problems = {k: list(info[k]) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in problems.items())
        raise ModelLoadError(
            f"{source}: the weights do not fit {adapter.model_class_name} ({detail}); "
            "embedkit refuses to run an encoder with randomly initialised parts"
        )
    return model


def _from_directory(
    directory: Path, adapter: FamilyAdapter, dtype: torch.dtype, device_map: str | None = None
) -> PreTrainedModel:
    read_config_json(directory)  # a clear error when config.json is missing
    try:
        return _from_pretrained(adapter, directory, dtype, device_map=device_map)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{directory}: could not load the checkpoint ({exc}); the directory must hold "
            "config.json and model.safetensors"
        ) from exc


# --- Hugging Face hub ---------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


@contextlib.contextmanager
def _hub_errors(hub_id: str, revision: str | None) -> Iterator[None]:
    """Translate hub and transformers download failures into :class:`ModelLoadError`."""
    from huggingface_hub import errors as hub

    try:
        yield
    except OSError as exc:
        if Path(hub_id).is_dir():
            raise
        chain = list(_chain(exc))
        local = (
            f"Alternatively, pass a local copy: --model /path/to/dir holding config.json and "
            f"model.safetensors, made with `hf download {hub_id} --local-dir DIR`."
        )
        at = f" at revision {revision!r}" if revision else ""
        if any(isinstance(e, hub.GatedRepoError) for e in chain) or "gated repo" in str(exc):
            message = (
                f"{hub_id} is a gated repository: accept its licence on "
                f"https://huggingface.co/{hub_id} and make a token available (set HF_TOKEN, or "
                f"run `hf auth login`). {local}"
            )
        elif any(isinstance(e, hub.RevisionNotFoundError) for e in chain):
            message = f"{hub_id} has no revision {revision!r}. {local}"
        elif any(isinstance(e, hub.RepositoryNotFoundError) for e in chain):
            message = (
                f"{hub_id} was not found on the Hugging Face hub (or it is private and no token "
                f"is set). {local}"
            )
        else:
            if _is_connection_error(chain) and not _offline_why():
                _go_offline(f"{type(chain[-1]).__name__}: {chain[-1]}")
            why = _offline_why()
            why = (
                f"it is not in the local Hugging Face cache and {why}"
                if why
                else f"{type(chain[-1]).__name__}: {chain[-1]}"
            )
            message = f"could not download {hub_id}{at}: {why}. {local}"
        raise ModelLoadError(message) from exc


#: Why the hub cannot be reached in this process ("" until a check failed); see hub_reachable.
_HUB_DOWN: dict[str, str] = {}
#: hub_config's answers in this process, by (hub_id, revision, hub cache, endpoint):
#: a config or the error it raised.
_HUB_CONFIGS: dict[tuple[object, ...], tuple[Any, Path] | ModelLoadError] = {}


def _hub_address() -> tuple[str, int]:
    """The host and port a hub request connects to first: the HTTPS proxy if set, else
    the endpoint (``HF_ENDPOINT``)."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if endpoint.scheme == "http":
        proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    target = urllib.parse.urlsplit(proxy) if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    return target.hostname or "huggingface.co", port


def _go_offline(why: str) -> None:
    """Switch Hugging Face offline mode on for this process and the processes it starts."""
    from huggingface_hub import constants

    host, port = _hub_address()
    _HUB_DOWN.setdefault(
        "why", f"the Hugging Face hub ({host}:{port}) cannot be reached ({why}); the rest of "
        "this run stays offline (locally cached models only, no retries)"
    )  # fmt: skip
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def _offline_why() -> str:
    """Why hub requests are not made in this process ("" when they are)."""
    from huggingface_hub import constants

    if "why" in _HUB_DOWN:
        return _HUB_DOWN["why"]
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    return ""


def _is_connection_error(chain: list[BaseException]) -> bool:
    """A failure to reach the server (whichever HTTP client the hub library uses)."""
    return any(
        isinstance(e, ConnectionError | TimeoutError)
        or any(n in type(e).__name__ for n in ("Connect", "Timeout"))
        for e in chain
    )


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether this process may ask the Hugging Face hub (checked once, with ``timeout``).

    False when offline mode is on (``HF_HUB_OFFLINE``, or set by an earlier failed check). The
    first failed check switches offline mode on, so later lookups use the local cache at once.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if "checked" in _HUB_DOWN:
        return True
    host, port = _hub_address()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        _go_offline(f"{type(exc).__name__}: {exc}")
        return False
    _HUB_DOWN["checked"] = "yes"
    return True


def hub_config(hub_id: str, *, revision: str | None = None) -> tuple[PretrainedConfig, Path]:
    """The config of a hub model and the snapshot folder of its cached ``config.json``.

    Asked once per process (the answer, or the error, is remembered); when the hub cannot be
    reached the Hugging Face cache answers (see :func:`hub_reachable`).
    """
    from huggingface_hub import constants

    key = (hub_id, revision, constants.HF_HUB_CACHE, constants.ENDPOINT)
    known = _HUB_CONFIGS.get(key)
    if isinstance(known, ModelLoadError):
        raise known
    if known is not None:
        return cast("tuple[PretrainedConfig, Path]", known)
    try:
        found = _hub_config(hub_id, revision)
    except ModelLoadError as exc:
        _HUB_CONFIGS[key] = exc
        raise
    _HUB_CONFIGS[key] = found
    return found


def _hub_config(hub_id: str, revision: str | None) -> tuple[PretrainedConfig, Path]:
    from huggingface_hub import hf_hub_download

    hub_reachable()
    with _hub_errors(hub_id, revision):
        config_file = Path(hf_hub_download(hub_id, "config.json", revision=revision))
    snapshot = config_file.parent  # <hub cache>/models--org--name/snapshots/<commit>/
    raw = read_config_json(snapshot)
    adapter = family_for_model_type(raw.get("model_type"), where=f"{hub_id}/config.json")
    return adapter.config_class.from_pretrained(snapshot), snapshot


def hub_spec(hub_id: str, *, revision: str | None = None) -> EncoderSpec:
    """The spec of an unregistered hub model, built from its config (no weights downloaded)."""
    config, snapshot = hub_config(hub_id, revision=revision)
    return spec_from_config(config, name=hub_id, hub_id=hub_id, files=snapshot)


# --- tiny test models -------------------------------------------------------------------------


def _tiny_key(spec: EncoderSpec) -> str:
    import transformers

    payload = {
        "family": spec.family,
        "config": dict(spec.tiny_config or {}),
        "seed": TINY_SEED,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def materialise_tiny(spec: EncoderSpec, cache_dir: Path) -> Path:
    """Build the tiny model of ``spec`` once (fixed seed) and return its directory.

    The model is written to a temporary sibling directory and renamed into place, so concurrent
    processes never see a half-written checkpoint; a process that loses the race drops its copy.
    """
    if spec.tiny_config is None:
        raise ValueError(f"{spec.name} is not a tiny test entry")
    final = cache_dir / "tiny-models" / spec.name / _tiny_key(spec)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    adapter = get_family(spec.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = adapter.model_class(adapter.build_config(spec.tiny_config), **adapter.model_kwargs)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        with _quiet_if(True):
            model.save_pretrained(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- fingerprints -------------------------------------------------------------------------------


def _weight_files(directory: Path) -> list[Path]:
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not weights:
        raise ModelLoadError(
            f"{directory}: no *.safetensors (or *.bin) weight files; expected a transformers "
            "checkpoint folder (config.json + model.safetensors), as written by save_pretrained "
            "or `hf download REPO --local-dir DIR`"
        )
    return [directory / "config.json", *weights]


def _file_sha256(path: Path, memo: dict[str, Any]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    entry = memo.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def weights_fingerprint(directory: str | Path, cache_dir: str | Path | None = None) -> str:
    """``sha256:<hex>`` over config.json and the weight files of ``directory`` (memoised)."""
    directory = Path(directory).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo_path = root / _FINGERPRINT_MEMO
    try:
        memo: dict[str, Any] = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    before = json.dumps(memo, sort_keys=True)
    combined = hashlib.sha256()
    for path in _weight_files(directory):
        combined.update(f"{path.name}\0{_file_sha256(path, memo)}\n".encode())
    if json.dumps(memo, sort_keys=True) != before:
        _write_json_atomic(memo_path, memo)
    return f"sha256:{combined.hexdigest()}"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Best effort: the memo is only a cache, so an unwritable cache dir is not an error."""
    text = json.dumps(data, indent=1, sort_keys=True)
    with contextlib.suppress(OSError):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".json")
