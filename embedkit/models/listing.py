"""`embedkit models`: the registry as a table or as JSON-able rows."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from embedkit.models.pooling import available_poolings
from embedkit.models.registry import EncoderSpec


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def spec_summary(spec: EncoderSpec) -> dict[str, object]:
    """The facts of one entry as plain JSON types."""
    return {
        "name": spec.name,
        "aliases": list(spec.aliases),
        "family": spec.family,
        "hub_id": spec.hub_id,
        "params": spec.params,
        "embed_dim": spec.embed_dim,
        "patch_size": spec.patch_size,
        "input_multiple": spec.input_multiple,
        "register_tokens": spec.num_register_tokens,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "gated": spec.gated,
        "license": spec.license,
        "poolings": list(available_poolings(spec)),
        "gflops_224": spec.gflops_224,
        "test_model": spec.tiny_config is not None,
    }


def render_specs(specs: Sequence[EncoderSpec]) -> Table:
    """A table of registry entries for the terminal."""
    table = Table(title="embedkit encoders", title_justify="left")
    table.add_column("name", no_wrap=True)
    for column in ("family", "params", "dim", "patch"):
        table.add_column(column, no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("access", no_wrap=True)
    for spec in specs:
        name = spec.name + (f" ({', '.join(spec.aliases)})" if spec.aliases else "")
        if spec.tiny_config is not None:
            source, access = "random tiny (tests/demo)", "offline"
        else:
            source, access = spec.hub_id or "", "gated" if spec.gated else "open"
        table.add_row(
            name,
            spec.family,
            _params(spec.params),
            str(spec.embed_dim),
            str(spec.patch_size or "-"),
            source,
            access,
        )
    table.caption = (
        "Also accepted: any Hugging Face hub id (org/name) or a local checkpoint folder."
    )
    return table
