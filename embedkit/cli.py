"""The `embedkit` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, overload

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.core import Command, Context
from typer.core import TyperArgument, TyperGroup, TyperOption

from embedkit.errors import EmbedkitError, did_you_mean
from embedkit.eval.bootstrap import Correction
from embedkit.extract.request import (
    BadImagePolicy,
    Compression,
    ComputeDtype,
    DeviceMap,
    ExtractionRequest,
    FingerprintMode,
    ResizePolicy,
    ShardPolicy,
    StorageDtype,
)
from embedkit.finetune.request import FinetuneRequest, FinetuneTask
from embedkit.probes.policies import ProbeBackend
from embedkit.probes.request import ProbeRequest, VolumePooling
from embedkit.study.display import epoch_line, step_bar, working
from embedkit.study.options import (
    field_defaults,
    finetune_methods,
    probe_kinds,
    request_from_options,
)

R = TypeVar("R")

#: Conventional metavars for the types typer would show as ``<int>``, ``<str>``, ...
_METAVARS = {
    "int": "INTEGER",
    "int range": "INTEGER",
    "str": "TEXT",
    "float": "FLOAT",
    "float range": "FLOAT",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIR",
}


class _Argument(TyperArgument):
    """A positional argument shown by its name alone (``PIPELINE``), without a ``<file>`` type."""

    def display_type_rich(self, ctx: Context) -> str | None:
        return None


def _conventional_metavars(command: Command, ctx: Context) -> None:
    """Flags show no metavar, values show TEXT/INTEGER/FLOAT/PATH (closed sets their choices),
    arguments their name in capitals."""
    for param in command.get_params(ctx):
        if type(param) is TyperArgument:
            param.__class__ = _Argument
            param.metavar = param.metavar or str(param.name).removesuffix("_arg").upper()
        if param.metavar is not None:
            continue
        if isinstance(param, TyperOption) and (param.is_flag or param.count):
            param.metavar = ""
            continue
        label = param.display_type(ctx) if hasattr(param, "display_type") else ""
        bare = label.strip("<>")
        if bare.startswith("list[") and bare.endswith("]"):
            bare = bare[5:-1]
        if bare in _METAVARS:
            param.metavar = _METAVARS[bare]
        elif bare == "bool":
            param.metavar = ""


class _Group(TyperGroup):
    """typer's group, with conventional metavars on every command's options."""

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _conventional_metavars(command, ctx)
        return command

    def format_help(self, ctx: Context, formatter: Any) -> None:
        _conventional_metavars(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    cls=_Group,
    name="embedkit",
    help=(
        "Frozen-feature embedding store and probing toolkit for vision foundation models in "
        "medical imaging. Extract features once into a shared Zarr cache, then probe from it."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
manifest_app = typer.Typer(cls=_Group, help="Validate data manifests.", no_args_is_help=True)
cache_app = typer.Typer(
    cls=_Group,
    help="List, inspect, verify, copy (push/pull) and clean up (gc) feature cache entries.",
    no_args_is_help=True,
)
app.add_typer(manifest_app, name="manifest")
app.add_typer(cache_app, name="cache")

# Wide tables when output goes to a file or CI log (rich would assume 80 columns).
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=200)

ManifestOpt = Annotated[
    Path | None,
    typer.Option(
        "--manifest",
        "-m",
        help="Data manifest (YAML). Default: ./data_manifest.yaml.",
        dir_okay=False,
    ),
]
CacheOpt = Annotated[
    str | None,
    typer.Option(
        "--cache",
        "-c",
        help="Cache root: a local or shared path, or an fsspec URL (s3://bucket/prefix). "
        "Default: the manifest's `cache`.",
    ),
]

LocalCacheOpt = Annotated[
    str | None,
    typer.Option(
        "--local-cache",
        envvar="EMBEDKIT_LOCAL_CACHE",
        help="Local directory that keeps verified copies of the entries read (a read-through "
        "cache for s3:// or shared roots): filled on first use, checked against the entry's "
        "checksums, reused while the entry is unchanged.",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"embedkit {version('embedkit')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    _version_: Annotated[
        bool,
        typer.Option(
            "--version",
            metavar="",
            callback=_version,
            is_eager=True,
            help="Print the embedkit version and exit.",
        ),
    ] = False,
) -> None:
    """Frozen-feature embedding store and probing toolkit for vision foundation models in
    medical imaging. Extract features once into a shared Zarr cache, then probe from it."""


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-M",
        help="Registry name (see `embedkit models`, e.g. dinov3/vitb16 or dinov3-7b), a "
        "Hugging Face hub id, or a local directory with config.json + model.safetensors.",
    ),
]
WorkersHelp = "Image-loading worker processes (0 = in the main process)."


def _choice(values: Iterable[str]) -> dict[str, Any]:
    """`typer.Option` arguments for a closed option set, from the names its layer declares."""
    choices = tuple(values)

    def parse(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(map(repr, choices))}"
                f"{did_you_mean(value, choices)}"
            )
        return value

    return {"parser": parse, "metavar": "[" + "|".join(choices) + "]"}


def _one_of(literal: Any) -> dict[str, Any]:
    return _choice(get_args(literal))


@overload
def _csv(values: None) -> None: ...
@overload
def _csv(values: tuple[object, ...]) -> str: ...
def _csv(values: tuple[object, ...] | None) -> str | None:
    """A sequence default as the command line writes it (``10,20,100,200``)."""
    return None if values is None else ",".join(map(str, values))


# Every request option's default comes from its request dataclass (the same defaults a pipeline
# step has); the commands only add flags and help.
EXTRACT = field_defaults(ExtractionRequest)
PROBE = field_defaults(ProbeRequest)
FINETUNE = field_defaults(FinetuneRequest)

#: Options that say where a command reads, writes or runs, not what it computes: they are not
#: part of its request. Every other option of `extract`, `probe` and `finetune` is a request
#: field of the same name.
RUN_CONTEXT = frozenset({"cache", "manifest", "local_cache", "results", "nproc"})


def _request(ctx: typer.Context, request_type: type[R]) -> R:
    """The command's request: its parsed options through the mapping pipeline steps use."""
    options = {k: v for k, v in ctx.params.items() if k not in RUN_CONTEXT}
    return request_from_options(request_type, options)


def _launch(nproc: int, model: str, revision: str | None) -> None:
    """Relaunch this command under torchrun with ``nproc`` ranks, after checking here that the
    model resolves (one clean error, not one per rank; an unreachable hub is found once and the
    ranks inherit offline mode)."""
    from embedkit.distributed import launch_torchrun
    from embedkit.models.loading import identify_encoder

    identify_encoder(model, revision=revision)
    raise typer.Exit(launch_torchrun(nproc, sys.argv[1:]))


def _snapped_resolution(model: str, resolution: int) -> int:
    """``resolution`` as extraction with --snap-resolution stores it for ``model`` (the same
    rule); unchanged when the model's patch size is not known without a download."""
    from embedkit.models import EncoderSpec, resolve, validate_resolution

    target = resolve(model)
    if not isinstance(target, EncoderSpec):
        return resolution
    return validate_resolution(target, resolution, snap=True)


def _cache_uri(cache: str | None, manifest: Path | None) -> str:
    if cache is not None:
        return cache
    from embedkit.manifest import load_manifest

    return load_manifest(manifest).cache


@manifest_app.command("check")
def manifest_check(
    manifest_arg: Annotated[
        Path | None,
        typer.Argument(
            metavar="[MANIFEST]",
            help="Manifest file, as -m/--manifest (either form; default ./data_manifest.yaml).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    manifest: ManifestOpt = None,
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", "-d", help="Only this dataset (repeatable).")
    ] = None,
    check_files: Annotated[
        bool, typer.Option("--check-files", help="Also check that every image file exists.")
    ] = False,
) -> None:
    """Load each dataset of a manifest and report images, labels, splits and patient leakage.

    Prints, per dataset: the image count, each label's positive / negative / ignored counts,
    split sizes by image and by patient, and whether any patient appears in two splits.
    Exits non-zero if a dataset fails to load or a split leaks patients.
    """
    from embedkit.manifest import check_dataset, load_manifest, render_report

    if manifest_arg is not None and manifest is not None and manifest_arg != manifest:
        raise typer.BadParameter(
            f"two manifests given ({manifest_arg} and -m {manifest}); pass one", param_hint="-m"
        )
    man = load_manifest(manifest or manifest_arg)
    names = dataset or list(man.datasets)
    failed = False
    for name in names:
        report = check_dataset(man.dataset(name), check_files=check_files)
        out.print(render_report(report))
        failed = failed or not report.ok
    if failed:
        raise typer.Exit(1)


@app.command("models")
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    include_test: Annotated[
        bool, typer.Option("--test/--no-test", help="Include the tiny random test models.")
    ] = True,
) -> None:
    """List the encoder registry: names, hub ids, sizes, patch sizes and whether gated.

    Any Hugging Face hub id (org/name) or a local directory in transformers format can be
    used as --model too.
    """
    from embedkit.models import list_specs, render_specs, spec_summary

    specs = [s for s in list_specs() if include_test or not s.name.startswith("test/")]
    if as_json:
        out.print_json(json.dumps([spec_summary(s) for s in specs]))
    else:
        out.print(render_specs(specs))


@app.command("extract")
def extract(
    ctx: typer.Context,
    model: ModelOpt,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset name in the manifest.")],
    resolution: Annotated[
        int,
        typer.Option(
            "--resolution", "-r", help="Square input size in pixels (e.g. 224, 512, 1024)."
        ),
    ],
    patch_tokens: Annotated[
        bool,
        typer.Option(
            "--patch-tokens/--no-patch-tokens",
            help="Also store the patch-token grid (float16; large). The standard poolings "
            "(cls and mean, or pooled and mean for ConvNeXt; cls+mean is derived) are always "
            "stored.",
        ),
    ] = EXTRACT["patch_tokens"],
    dtype: Annotated[
        str,
        typer.Option(
            **_one_of(ComputeDtype), help="Compute dtype; auto = bf16 on GPU, fp32 on CPU."
        ),
    ] = EXTRACT["dtype"],
    storage_dtype: Annotated[
        str, typer.Option(**_one_of(StorageDtype), help="dtype of the stored features.")
    ] = EXTRACT["storage_dtype"],
    compression: Annotated[
        str,
        typer.Option(
            **_one_of(Compression),
            help="Codec of a new entry's files: none (default; fastest reads, float16 features "
            "compress only ~8%) or zstd (level 1; ~8% smaller, 3-5x slower full reads). "
            "Not part of the cache key: both hold the same features.",
        ),
    ] = EXTRACT["compression"],
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images per forward pass.")
    ] = EXTRACT["batch_size"],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = EXTRACT["device"],
    num_workers: Annotated[
        int, typer.Option("--workers", "--num-workers", help=WorkersHelp)
    ] = EXTRACT["num_workers"],
    unit_rows: Annotated[
        int, typer.Option(help="Images per resumable work unit (one chunk per pooling).")
    ] = EXTRACT["unit_rows"],
    resize: Annotated[
        str,
        typer.Option(
            **_one_of(ResizePolicy),
            help="squash: resize to a square; pad: letterbox; crop: centre square.",
        ),
    ] = EXTRACT["resize"],
    snap_resolution: Annotated[
        bool,
        typer.Option(
            help="A resolution that is not a multiple of the model's patch size becomes the "
            "nearest one (DINOv2, patch 14: 512 -> 518); the size used is recorded in the "
            "cache key and printed. --no-snap-resolution stops with the valid sizes instead."
        ),
    ] = EXTRACT["snap_resolution"],
    on_bad_image: Annotated[
        str,
        typer.Option(
            **_one_of(BadImagePolicy),
            help="fail: stop after listing every unreadable image (finished work is kept); "
            "skip: leave them out and record their IDs in the entry.",
        ),
    ] = EXTRACT["on_bad_image"],
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag or commit).")
    ] = EXTRACT["revision"],
    overwrite: Annotated[
        bool, typer.Option(help="Delete an existing entry with the same key and recompute.")
    ] = EXTRACT["overwrite"],
    shard: Annotated[
        str,
        typer.Option(
            **_one_of(ShardPolicy),
            help="none: a full replica per rank; fsdp: split the weights over the ranks "
            "(FSDP2, needs >= 2 ranks); auto: replicas if the model fits the device, else fsdp.",
        ),
    ] = EXTRACT["shard"],
    device_map: Annotated[
        str | None,
        typer.Option(
            **_one_of(DeviceMap),
            help="One process, layers spread over all visible GPUs (accelerate): for a model "
            "no single GPU holds when torchrun + --shard fsdp is not an option. No speed-up.",
        ),
    ] = EXTRACT["device_map"],
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the encoder.")
    ] = EXTRACT["compile"],
    auto_batch: Annotated[
        bool,
        typer.Option(
            help="GPU: find the largest batch (up to 8x --batch-size) that fits, backing off "
            "on out-of-memory. Ignored on CPU."
        ),
    ] = EXTRACT["auto_batch"],
    lease_ttl_s: Annotated[
        float | None,
        typer.Option(
            "--lease-ttl",
            help="Seconds after which another job takes over a unit whose job stopped "
            "heartbeating (crashed). Default: $EMBEDKIT_LEASE_TTL, else 60. Jobs on one entry "
            "may extract at once on every backend; they split its units (docs/sharing.md).",
        ),
    ] = EXTRACT["lease_ttl_s"],
    fingerprint: Annotated[
        str,
        typer.Option(
            **_one_of(FingerprintMode),
            help="How an image file is recognised as unchanged, so that its row is copied from "
            "another entry of the same feature space: quick = size, mtime and the first and "
            "last 64 KiB; content = sha256 of every byte (reads every image once).",
        ),
    ] = EXTRACT["fingerprint"],
    reuse: Annotated[
        bool,
        typer.Option(
            help="Copy the rows that complete entries of the same feature space (same model, "
            "weights, resolution, preprocessing, dtypes, poolings) hold for the same images, "
            "and compute only the others. --no-reuse computes every image.",
        ),
    ] = EXTRACT["reuse"],
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Launch this many ranks on this node with torchrun (data parallel; one GPU "
            "each). For several nodes, run torchrun yourself (docs/scale-out.md).",
        ),
    ] = 1,
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
) -> None:
    """Run a frozen encoder over a dataset at one resolution into the feature cache.

    The entry is keyed by everything that determines its bytes (model and weights
    fingerprint, resolution, preprocessing, dtypes, image list). An existing complete entry
    is reused without computing anything; an interrupted one resumes where it stopped. Every
    standard pooling comes from the same forward pass, so asking later for another pooling
    never re-runs the encoder.
    """
    from embedkit.extract import extract as run
    from embedkit.progress import rich_progress

    request = _request(ctx, ExtractionRequest)
    if nproc > 1:
        _launch(nproc, request.model, request.revision)
    try:
        result = run(request, manifest=manifest, cache=cache, progress=rich_progress)
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/yellow]: every finished unit is saved; rerun the same command "
            "to resume from there."
        )
        raise typer.Exit(130) from None
    entry = result.entry
    if result.rank != 0:
        return  # rank 0 of a torchrun job reports for the whole job
    if entry.key.resolution != request.resolution:
        err.print(
            f"[yellow]note:[/yellow] resolution {request.resolution} is not a multiple of the "
            f"model's patch size; used {entry.key.resolution} (--no-snap-resolution to refuse)"
        )
    if result.reused:
        out.print(f"[green]found[/green] {entry.uri} (complete; nothing to compute)")
    else:
        out.print(
            f"[green]wrote[/green] {entry.uri}: {result.images_computed} images computed, "
            f"{result.images_copied} copied from {len(result.copied_from)} "
            f"{'entry' if len(result.copied_from) == 1 else 'entries'} of the same feature "
            f"space, in {result.elapsed_s:.1f} s"
            + (f" ({result.images_per_s:.1f} img/s)" if result.images_computed else "")
            + (f" on {result.world_size} ranks" if result.world_size > 1 else "")
        )
        if result.throughput is not None:
            out.print(f"throughput: {result.throughput.render()}")
        if result.world_size == 1:  # other jobs on the same entry may have written the rest
            shown = ",".join(map(str, sorted(result.units)))
            out.print(f"units computed here: {shown} ({len(result.units)} of {entry.n_units})")
    if result.skipped:
        err.print(
            f"[yellow]{len(result.skipped)} unreadable images skipped[/yellow] "
            "(recorded in the entry)"
        )
    out.print(f"key {entry.key.digest()}")


@cache_app.command("ls")
def cache_ls(
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="Only this dataset.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the entries of a cache root: dataset, model, resolution, poolings, size, state.

    An entry's state is complete, partial, or superseded (a later complete entry of the same
    dataset and feature space holds another image list: an older snapshot of the dataset).
    """
    from embedkit.store import CacheRoot, list_entries, render_entries

    root = CacheRoot.from_uri(_cache_uri(cache, manifest))
    rows = list_entries(root, dataset=dataset, model=model)
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(s) for s in rows]))
    elif not rows:
        err.print(f"no entries in {root.uri}")
    else:
        out.print(render_entries(rows))


@cache_app.command("info")
def cache_info(
    query: Annotated[str, typer.Argument(help="Entry digest (or a unique prefix of it) or path.")],
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    local_cache: LocalCacheOpt = None,
) -> None:
    """Show one entry's key, provenance, completion and size (and its local copy's state)."""
    from embedkit.store import CacheRoot, find_entry, local_copy_status, render_info

    root = CacheRoot.from_uri(_cache_uri(cache, manifest))
    entry = find_entry(root, query)
    info = entry.info()
    if local_cache is not None:
        info["local_copy"] = local_copy_status(entry, local_cache)
    if as_json:
        out.print_json(json.dumps(info, default=str))
    else:
        out.print(render_info(info))


@cache_app.command("verify")
def cache_verify(
    query: Annotated[
        str | None, typer.Argument(help="One entry (digest prefix or path); default: all.")
    ] = None,
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    local_cache: LocalCacheOpt = None,
) -> None:
    """Re-check entries: completion, shapes, IDs, per-unit checksums, no NaN/Inf.

    With --local-cache, complete entries are checked through their local copies: every unit
    of the copy is re-checked against the cache's unit records and fetched again if damaged,
    then the copy is verified. Exits non-zero if any entry has a problem.
    """
    from embedkit.errors import CacheNotFoundError
    from embedkit.store import CacheRoot, find_entry, verify_local_copies, verify_root
    from embedkit.store.layout import resolve_entry

    root = CacheRoot.from_uri(_cache_uri(cache, manifest))
    if local_cache is not None:
        problems = verify_local_copies(root, local_cache, query)
    elif query is not None:
        try:
            relpath = find_entry(root, query).relpath
        except CacheNotFoundError:  # a damaged entry may not open: find it by its name
            relpath = resolve_entry(root, query)
            if not root.exists(f"{relpath}/zarr.json"):
                raise
        problems = verify_root(root, relpath)
    else:
        problems = verify_root(root)
    bad = 0
    for relpath, issues in problems.items():
        if issues:
            bad += 1
            err.print(f"[red]BAD[/red] {relpath}", highlight=False)
            for issue in issues:
                err.print(f"    {escape(issue)}", highlight=False, soft_wrap=True)
            err.print(
                f"    repair: embedkit cache repair {relpath} --cache {root.url()}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            out.print(f"[green]ok[/green]  {relpath}")
    out.print(f"{len(problems) - bad} ok, {bad} with problems")
    if bad:
        raise typer.Exit(1)


@cache_app.command("repair")
def cache_repair(
    query: Annotated[str, typer.Argument(help="Entry digest (or a unique prefix of it) or path.")],
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    device: Annotated[
        str, typer.Option(help="Device to recompute on (the original run's kind of device).")
    ] = "auto",
    workers: Annotated[int, typer.Option("--workers", "--num-workers", help=WorkersHelp)] = 0,
) -> None:
    """Recompute the damaged or missing units of a complete entry from its images.

    The units that `cache verify` reports (checksum mismatch, missing or truncated chunk,
    NaN/Inf, bad unit record) are recomputed with the entry's recorded request (model,
    revision, resolution, preprocessing, dtypes, batch size), so the entry becomes
    bit-identical to an undamaged one; then the entry is verified. Exits non-zero if it
    cannot be repaired (the images or the model changed: re-extract with --overwrite).
    """
    from embedkit.extract.repair import repair_entry
    from embedkit.progress import rich_progress

    result = repair_entry(
        query,
        manifest=manifest,
        cache=cache,
        device=device,
        num_workers=workers,
        progress=rich_progress,
    )
    entry = result.entry
    if not result.units:
        out.print(f"[green]ok[/green]  {entry.relpath}: nothing damaged, nothing to repair")
        return
    for u in result.units:
        err.print(f"    unit {u}: " + escape("; ".join(result.problems[u])), highlight=False)
    out.print(
        f"[green]repaired[/green] {entry.relpath}: recomputed units "
        f"{', '.join(map(str, result.units))} of {entry.n_units}, verified "
        f"({result.elapsed_s:.1f} s)"
    )


def _copy_entry_cli(
    src_uri: str, dst_uri: str, query: str, *, overwrite: bool, verify: bool
) -> None:
    from embedkit.errors import EntryExistsError
    from embedkit.store import CacheRoot, CopiedObject, copy_entry, find_entry

    copied = [0, 0]  # bytes copied, bytes already there
    src, dst = CacheRoot.from_uri(src_uri), CacheRoot.from_uri(dst_uri)
    relpath = find_entry(src, query, allow_partial=False).relpath
    total = sum(st.size for st in src.entry_files(relpath).values())
    try:
        with step_bar(err, f"copy {relpath}", unit="bytes") as update:

            def count(obj: CopiedObject) -> None:
                copied[1 if obj.skipped else 0] += obj.size
                update(copied[0] + copied[1], total)

            entry = copy_entry(src, dst, query, verify=verify, overwrite=overwrite, on_object=count)
    except EntryExistsError:  # the destination already holds it, complete: nothing to do
        out.print(
            f"[green]already there[/green] {query}: {dst.uri} holds the complete entry; nothing "
            "to copy (--overwrite to replace it)"
        )
        return
    out.print(
        f"[green]copied[/green] {entry.relpath} to {entry.root.uri}: {copied[0] / 1e6:.1f} MB "
        f"copied, {copied[1] / 1e6:.1f} MB already there"
        + (", verified" if verify else ", NOT verified")
    )


@cache_app.command("push")
def cache_push(
    query: Annotated[str, typer.Argument(help="Entry digest (or a unique prefix) or path.")],
    to: Annotated[str, typer.Option("--to", help="Destination root (path or s3://...).")],
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination entry.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Check the copy against the checksums before completing it.")
    ] = True,
) -> None:
    """Copy a complete entry from the cache root to another root, verified; resumable."""
    _copy_entry_cli(_cache_uri(cache, manifest), to, query, overwrite=overwrite, verify=verify)


@cache_app.command("pull")
def cache_pull(
    query: Annotated[str, typer.Argument(help="Entry digest (or a unique prefix) or path.")],
    from_: Annotated[str, typer.Option("--from", help="Source root (path or s3://...).")],
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing local entry.")] = False,
    verify: Annotated[
        bool, typer.Option(help="Check the copy against the checksums before completing it.")
    ] = True,
) -> None:
    """Copy a complete entry from another root into the cache root, verified; resumable."""
    _copy_entry_cli(from_, _cache_uri(cache, manifest), query, overwrite=overwrite, verify=verify)


@cache_app.command("gc")
def cache_gc(
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only list what would be removed.")
    ] = False,
    partial_older_than: Annotated[
        str,
        typer.Option(help="Remove partial entries idle for longer than this (7d, 12h, 2w)."),
    ] = "7d",
    unused_since: Annotated[
        str | None,
        typer.Option(help="Also remove complete entries not read since this date (YYYY-MM-DD)."),
    ] = None,
    superseded: Annotated[
        bool,
        typer.Option(
            "--superseded",
            help="Also remove superseded entries: complete entries of a dataset and feature "
            "space for which a later complete entry with another image list exists (marked in "
            "`embedkit cache ls`). Run with --dry-run first.",
        ),
    ] = False,
) -> None:
    """Remove abandoned partial entries and, on request, complete entries unused since a date
    or superseded by a later snapshot of their dataset.

    Entries with a live lease (a job is extracting into them) are never removed, nor entries a
    partial entry is copying rows from.
    """
    import datetime as dt

    from embedkit.store import CacheRoot, collect_garbage, parse_age

    try:
        age = parse_age(partial_older_than)
        since = None if unused_since is None else dt.datetime.fromisoformat(unused_since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    root = CacheRoot.from_uri(_cache_uri(cache, manifest))
    found = collect_garbage(
        root, partial_older_than=age, unused_since=since, superseded=superseded, dry_run=dry_run
    )
    verb = "would remove" if dry_run else "removed"
    for cand in found:
        out.print(f"{verb} {cand.relpath}  ({cand.reason}, {cand.size_bytes / 1e6:.1f} MB)")
    freed = sum(c.size_bytes for c in found)
    out.print(
        f"{verb} {len(found)} entries, {freed / 1e6:.1f} MB" + (" freed" if not dry_run else "")
    )


@app.command("probe")
def probe(
    ctx: typer.Context,
    kind: Annotated[
        str,
        typer.Option(
            "--kind",
            "-k",
            **_choice(probe_kinds()),
            help="linear: logistic regression, C chosen on val (DINOv2 grid); knn: cosine kNN, "
            "k chosen on val; fewshot: 1-16 examples per class/label, 5 draws; sgd: the "
            "DINOv2/DINOv3 linear-eval SGD heads, lr chosen on val; segmentation: a linear head "
            "on the patch tokens (extract --patch-tokens) against the label maps of the "
            "manifest's `mask` column, lr chosen on val, Dice/IoU (HD95 for volumes).",
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-M", help="Model of the cached features (as extracted).")
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset in the manifest.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Resolution in px.")],
    pooling: Annotated[
        str | None,
        typer.Option(
            help="cls, mean, cls+mean (pooled, pooled+mean for ConvNeXt), patch (the token "
            "grid). Default: cls+mean for linear and few-shot, cls for kNN, patch for "
            "segmentation."
        ),
    ] = PROBE["pooling"],
    entry: Annotated[
        str | None, typer.Option(help="Cache entry digest (prefix) when several entries match.")
    ] = PROBE["entry"],
    seed: Annotated[int, typer.Option(help="Seed for bootstrap and few-shot draws.")] = PROBE[
        "seed"
    ],
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = PROBE["n_boot"],
    ks: Annotated[
        str,
        typer.Option(help="kNN: the k to choose from on val, comma-separated (DINOv2 protocol)."),
    ] = _csv(PROBE["ks"]),
    shots: Annotated[
        str, typer.Option(help="Few-shot: examples per class/label, comma-separated.")
    ] = _csv(PROBE["shots"]),
    draws: Annotated[int, typer.Option(help="Few-shot: random draws per shot count.")] = PROBE[
        "draws"
    ],
    max_iter: Annotated[
        int, typer.Option(help="Linear: solver iterations per C (DINOv2 protocol: 1000).")
    ] = PROBE["max_iter"],
    tol: Annotated[
        float,
        typer.Option(
            help="Linear: stopping tolerance. The default gives the same chosen C and test AUROC "
            "as 1e-12 (measured, benchmarks/RESULTS.md); 1e-12 is DINOv2's strict protocol."
        ),
    ] = PROBE["tol"],
    backend: Annotated[
        str,
        typer.Option(
            **_one_of(ProbeBackend),
            help="Linear and kNN: torch (embedkit's solvers, CPU or GPU), sklearn (the CPU "
            "reference) or cuml (GPU, needs the `gpu` extra).",
        ),
    ] = PROBE["backend"],
    volume_pooling: Annotated[
        str,
        typer.Option(
            **_one_of(VolumePooling),
            help="Volume datasets (CT, MRI): pool each volume's slice features by mean or max "
            "and probe the volume-level labels (recorded in the probe's identity).",
        ),
    ] = PROBE["volume_pooling"],
    results: Annotated[
        Path,
        typer.Option(
            "--results", "--out", "-o", help="Results directory (JSON + Parquet records)."
        ),
    ] = Path("embedkit-results"),
    overwrite: Annotated[
        bool, typer.Option(help="Recompute even if an identical record exists.")
    ] = PROBE["overwrite"],
    cache: CacheOpt = None,
    manifest: ManifestOpt = None,
    local_cache: LocalCacheOpt = None,
) -> None:
    """Fit a probe on cached features and report test metrics with 95% bootstrap CIs.

    Reads a complete cache entry (never re-extracts), joins labels and splits from the manifest
    by image id, and writes a self-describing record (cache key, hyper-parameters, chosen C/k,
    metrics, per-label table, test scores for paired tests) to --out. An identical earlier run
    is reused unless --overwrite.
    """
    from embedkit.probes.run import render_record, run_probe
    from embedkit.progress import rich_progress

    request = _request(ctx, ProbeRequest)
    snapped = _snapped_resolution(request.model, request.resolution)
    if snapped != request.resolution:
        err.print(
            f"[yellow]note:[/yellow] resolution {request.resolution} is not a multiple of the "
            f"model's patch size; reading the entry extracted at {snapped} (as "
            "`extract --snap-resolution` stores it)"
        )
        request = dataclasses.replace(request, resolution=snapped)
    # The local-copy fetch shows its own bar (one live display at a time).
    live = nullcontext() if local_cache else working(err, f"probe {request.kind}")
    with live:
        outcome = run_probe(
            request,
            manifest=manifest,
            cache=cache,
            results=results,
            local_cache=local_cache,
            progress=lambda total, desc: rich_progress(total, desc, console=err, unit="unit"),
        )
    out.print(render_record(outcome.record))
    for note in outcome.record.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    state = "found (identical run)" if outcome.reused else "wrote"
    out.print(f"{state} {outcome.path}")


@app.command("run")
def run_pipeline_cmd(
    pipeline: Annotated[
        Path, typer.Argument(help="Pipeline file, e.g. pipelines/demo.yaml.", dir_okay=False)
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (cached vs to run, compute) only.")
    ] = False,
    manifest: ManifestOpt = None,
    cache: CacheOpt = None,
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Results directory (default: the pipeline's)."),
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report", help="Report directory (default: the pipeline's).")
    ] = None,
    local_cache: LocalCacheOpt = None,
) -> None:
    """Run a whole study: datasets x models x resolutions x {extract, probes, finetune}, then
    the report.

    Prints the plan first: every step, what is cached or done, each extraction's forward
    FLOPs and each finetuning's (epochs x images x 3 x forward), and the totals per block and
    for the study in GPU-hours on a named GPU at a stated MFU. A dry run plans a study before
    its data is there (datasets missing from the manifest are marked, with how to add them, and
    sized from the pipeline's `expected:`); running it needs them. Finished steps are skipped,
    so rerunning after a kill continues; a failing step is reported and the others still run
    (exit status 1 at the end, with the failed steps listed).
    """
    from embedkit.study.pipeline import run_pipeline

    summary = run_pipeline(
        pipeline,
        manifest=manifest,
        cache=cache,
        results=results,
        report=report_dir,
        dry_run=dry_run,
        console=out,
        local_cache=local_cache,
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command("report")
def report(
    results: Annotated[
        Path, typer.Option("--results", help="Results directory written by `embedkit probe`.")
    ] = Path("embedkit-results"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the report files go.")] = Path(
        "embedkit-report"
    ),
    correction: Annotated[
        str,
        typer.Option(**_one_of(Correction), help="Multiple-comparison correction of the p-values."),
    ] = "holm",
) -> None:
    """Build a comparison report from result records alone (no features, no models).

    Writes summary.md/.csv (macro AUROC with 95% CI per dataset x model x resolution x method),
    per_label.md/.csv, comparisons.md/.csv (paired permutation tests between runs on the same test
    images: resolutions, models and methods, with the chosen correction), PNG plots (AUROC vs
    resolution with CI bands, per-label deltas, few-shot curves) and report.html, one
    self-contained page that opens offline.
    """
    from embedkit.report import build_report

    built = build_report(results, out_dir, correction=correction)  # type: ignore[arg-type]
    out.print(
        f"{len(built.summary)} runs, {len(built.comparisons)} paired comparisons -> "
        f"{built.html} (+ {len(built.files) - 1} files in {out_dir})"
    )


@app.command("finetune")
def finetune(
    ctx: typer.Context,
    model: ModelOpt,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset in the manifest.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Resolution in px.")],
    method: Annotated[
        str,
        typer.Option(
            **_choice(finetune_methods()),
            help="full: every parameter; lora: LoRA adapters (peft) + head; bitfit: encoder "
            "biases + head; linear: head only.",
        ),
    ],
    task: Annotated[
        str,
        typer.Option(
            **_one_of(FinetuneTask),
            help="classification: the manifest's labels from a pooled feature; segmentation: "
            "a label map per image (the index's mask column) from the patch tokens.",
        ),
    ] = FINETUNE["task"],
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = FINETUNE[
        "epochs"
    ],
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate. Default: full 1e-5, lora 1e-4, bitfit/linear 1e-3."),
    ] = FINETUNE["lr"],
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images per optimiser step (per rank).")
    ] = FINETUNE["batch_size"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = FINETUNE[
        "weight_decay"
    ],
    warmup: Annotated[float, typer.Option(help="Fraction of steps in linear warm-up.")] = FINETUNE[
        "warmup"
    ],
    layer_decay: Annotated[
        float, typer.Option(help="Layer-wise lr decay for ViT families (1.0 = off).")
    ] = FINETUNE["layer_decay"],
    pooling: Annotated[
        str | None,
        typer.Option(help="Head input: mean (ViT default), cls, cls+mean; pooled (ConvNeXt)."),
    ] = FINETUNE["pooling"],
    augment: Annotated[bool, typer.Option(help="Flip + small rotation on train.")] = FINETUNE[
        "augment"
    ],
    lora_r: Annotated[int, typer.Option(help="LoRA: rank of the adapter matrices.")] = FINETUNE[
        "lora_r"
    ],
    lora_alpha: Annotated[
        int, typer.Option(help="LoRA: scaling numerator (the update is scaled by alpha / r).")
    ] = FINETUNE["lora_alpha"],
    lora_dropout: Annotated[
        float, typer.Option(help="LoRA: dropout on the adapter input.")
    ] = FINETUNE["lora_dropout"],
    lora_targets: Annotated[
        str | None,
        typer.Option(help="Comma-separated module names (default per family: q_proj,v_proj)."),
    ] = _csv(FINETUNE["lora_targets"]),
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(help="Recompute activations in the backward pass to save memory (GPU only)."),
    ] = FINETUNE["gradient_checkpointing"],
    seed: Annotated[
        int, typer.Option(help="Seed for initialisation, data order and bootstrap.")
    ] = FINETUNE["seed"],
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = FINETUNE[
        "n_boot"
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = FINETUNE["device"],
    num_workers: Annotated[
        int, typer.Option("--workers", "--num-workers", help=WorkersHelp)
    ] = FINETUNE["num_workers"],
    results: Annotated[
        Path,
        typer.Option(
            "--results", "--out", "-o", help="Results directory (records + run checkpoints)."
        ),
    ] = Path("embedkit-results"),
    overwrite: Annotated[
        bool, typer.Option(help="Retrain even if an identical record exists.")
    ] = FINETUNE["overwrite"],
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Launch this many data-parallel ranks on this node with torchrun (one GPU "
            "each; gloo on CPU). --batch-size is per rank: the global batch is "
            "batch-size x ranks. For several nodes, run torchrun yourself.",
        ),
    ] = 1,
    manifest: ManifestOpt = None,
) -> None:
    """Finetune an encoder + linear head and write a probe-style result record.

    Same encoder and preprocessing as extraction; AdamW with warm-up + cosine; BCE with
    pos_weight (multi-label) or cross-entropy; best epoch by validation loss; test metrics with
    95% bootstrap CIs. Checkpoints go to --out/runs/<run id>/ after every epoch: rerunning the
    same command after a kill resumes from the last finished epoch. Under torchrun (or with
    --nproc N) the ranks train data-parallel (DDP); rank 0 writes checkpoints and the record.
    """
    from embedkit.finetune import run_finetune
    from embedkit.probes.run import render_record

    request = _request(ctx, FinetuneRequest)
    if nproc > 1:
        _launch(nproc, request.model, None)

    def progress(log: Any) -> None:
        err.print(escape(epoch_line(log, request.epochs)), highlight=False)

    with step_bar(err, f"finetune {request.method}", unit="batches") as on_batch:
        outcome = run_finetune(
            request, manifest=manifest, results=results, on_epoch=progress, on_batch=on_batch
        )
    if outcome.rank != 0:
        return  # rank 0 of a torchrun job reports for the whole job
    if outcome.record.task == "segmentation":
        from embedkit.report.segmentation import render_segmentation as render_record
    out.print(render_record(outcome.record))
    for note in outcome.record.notes:
        err.print(f"[yellow]note:[/yellow] {escape(note)}")
    if outcome.resumed_from:
        err.print(f"resumed after epoch {outcome.resumed_from} from {outcome.run_dir}")
    state = "found (identical run)" if outcome.reused else "wrote"
    out.print(f"{state} {outcome.path}")


@app.command("demo")
def demo(
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Where the demo data, results and report go (cache: per manifest)."
        ),
    ] = Path("embedkit-demo"),
    patients: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Synthetic patients (default: the pipeline's, 100). On existing demo data "
            "another number adds (or leaves out) patients; the images on disk are kept and the "
            "next extraction computes only the new ones.",
        ),
    ] = None,
    images_per_patient: Annotated[
        int | None, typer.Option(min=1, help="Images per patient (default 3).")
    ] = None,
    size: Annotated[
        int | None, typer.Option(min=64, help="Image size in pixels (default 1024).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-M",
            help="Encoder for every step (default: the tiny random test/tiny-dinov3-vit).",
        ),
    ] = None,
    resolution: Annotated[
        list[int] | None,
        typer.Option(
            "--resolution",
            "-r",
            help="Repeatable. Default 224 and 512; finetuning runs at the smallest.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", "--num-workers", min=0, help="Image-loading worker processes (default 2)."
        ),
    ] = None,
    pipeline: Annotated[
        Path | None,
        typer.Option(help="Pipeline file to run (default: pipelines/demo.yaml).", dir_okay=False),
    ] = None,
) -> None:
    """Run pipelines/demo.yaml end to end, offline: generate the synthetic demo images, check
    them, extract at 224 and 512 px, probe (linear, kNN, few-shot), finetune (LoRA), report.

    The same runner as `embedkit run pipelines/demo.yaml`; ends with the path of the HTML
    report. The default model is a tiny DINOv3 ViT with RANDOM weights, so the features exercise
    the pipeline but mean nothing; pass e.g. --model dinov3/vitb16 (or a local checkpoint
    directory) to run the same with real weights.
    """
    from embedkit.study.demo import DEMO_PIPELINE, run_demo

    summary = run_demo(
        out_dir,
        patients=patients,
        images_per_patient=images_per_patient,
        size=size,
        model=model,
        resolutions=tuple(resolution) if resolution else None,
        workers=workers,
        pipeline=pipeline or DEMO_PIPELINE,
        console=out,
    )
    if summary.failed:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: user errors print one clear message (no traceback) and exit 2."""
    try:
        app()
    except EmbedkitError as exc:
        err.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
