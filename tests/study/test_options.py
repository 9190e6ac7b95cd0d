"""One schema per request: the CLI commands and the pipeline steps offer the same options, with
the same defaults, and build the same request objects through one mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args

import pytest
import typer
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic_core import PydanticUndefined

from embedkit.cli import RUN_CONTEXT, app
from embedkit.errors import ConfigError
from embedkit.extract.request import ExtractionRequest
from embedkit.finetune.request import FinetuneRequest
from embedkit.probes.request import ProbeRequest
from embedkit.study.options import (
    IDENTITY,
    PIPELINE_ALIASES,
    REQUEST_TYPES,
    parse_option,
    request_from_options,
    step_schema,
)
from embedkit.study.pipeline import Block, expand, load_pipeline

REQUIRED = object()  # stands for "no default" on either side

#: The step schema each command's options must match, as a pipeline block holds it.
BLOCK_STEPS: dict[str, Any] = {
    "extract": Block.model_fields["extract"].annotation,
    "probe": get_args(Block.model_fields["probes"].annotation)[0],
    "finetune": get_args(Block.model_fields["finetune"].annotation)[0],
}


def _cli_options(command: str) -> dict[str, object]:
    """Request options of a CLI command: name -> default, parsed as the request takes it."""
    group = typer.main.get_group(app)
    request_type = REQUEST_TYPES[command]
    schema = step_schema(request_type, identity=True)
    out: dict[str, object] = {}
    for p in group.commands[command].params:
        if p.name is None or p.name in RUN_CONTEXT:
            continue
        if p.required or p.name not in schema.model_fields:
            out[p.name] = REQUIRED  # an option the request lacks fails the comparison
            continue
        value = parse_option(request_type, p.name, p.default)
        annotation: Any = schema.model_fields[p.name].annotation
        out[p.name] = TypeAdapter(annotation).validate_python(value)
    return out


def _step_options(request_type: type[Any], step: type[BaseModel]) -> dict[str, object]:
    """Options of a pipeline step (request field name -> default), the block's axes included
    as required."""
    aliases = PIPELINE_ALIASES.get(request_type, {})
    out: dict[str, object] = dict.fromkeys(IDENTITY, REQUIRED)
    for key, info in step.model_fields.items():
        if key == "options":  # a finetune step's nested mapping of the same fields
            continue
        name = aliases.get(key, key)
        out[name] = REQUIRED if info.default is PydanticUndefined else info.default
    return out


@pytest.mark.parametrize("command", ["extract", "probe", "finetune"])
def test_every_cli_option_is_a_pipeline_step_option_with_the_same_default(command: str) -> None:
    request_type = REQUEST_TYPES[command]
    step = BLOCK_STEPS[command]
    assert step is step_schema(request_type)
    cli = _cli_options(command)
    pipeline = _step_options(request_type, step)
    assert set(cli) == set(pipeline), (
        f"only on the command line: {sorted(set(cli) - set(pipeline))}; "
        f"only in a pipeline step: {sorted(set(pipeline) - set(cli))}"
    )
    differ = {n: (cli[n], pipeline[n]) for n in cli if cli[n] != pipeline[n]}
    assert not differ, f"defaults differ (cli, pipeline): {differ}"
    # ... and both are the request's own fields and defaults.
    fields = {f.name: f for f in dataclasses.fields(request_type)}
    assert set(fields) == set(pipeline)
    for name, f in fields.items():
        default = REQUIRED if f.default is dataclasses.MISSING else f.default
        assert pipeline[name] == default, name


def test_the_cli_and_a_pipeline_step_build_the_same_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsed CLI options and a pipeline step go through one mapping to equal requests."""
    from typer.testing import CliRunner

    seen: dict[str, object] = {}

    def capture(request: ProbeRequest, **_: object) -> object:
        seen["request"] = request
        raise typer.Exit(0)

    monkeypatch.setattr("embedkit.probes.run.run_probe", capture)
    result = CliRunner().invoke(
        app,
        ["probe", "--kind", "knn", "--model", "test/tiny-dinov3-vit", "-d", "demo",
         "-r", "224", "--ks", "5,7", "--seed", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = {
        "name": "x",
        "datasets": ["demo"],
        "blocks": [
            {
                "name": "b",
                "models": ["test/tiny-dinov3-vit"],
                "resolutions": [224],
                "probes": [{"kind": "knn", "ks": [5, 7], "seed": 3}],
            }
        ],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    (step,) = [s for s in expand(load_pipeline(tmp_path / "p.yaml")) if s.action == "probe"]
    assert step.request() == seen["request"]
    assert step.request().ks == (5, 7)


def test_snap_resolution_has_one_default_everywhere() -> None:
    assert ExtractionRequest("m", "d", 512).snap_resolution is True
    assert _cli_options("extract")["snap_resolution"] is True
    assert BLOCK_STEPS["extract"]().snap_resolution is True


def test_request_from_options_checks_types_choices_and_values() -> None:
    base = {"model": "m", "dataset": "d", "resolution": 224}
    request = request_from_options(ExtractionRequest, {**base, "workers": 0, "dtype": "bf16"})
    assert (request.num_workers, request.dtype) == (0, "bf16")  # the pipeline alias works
    with pytest.raises(ConfigError, match=r"dtype: 'bf61' is not a valid choice; did you mean"):
        request_from_options(ExtractionRequest, {**base, "dtype": "bf61"})
    with pytest.raises(ConfigError, match=r"unknown field; did you mean 'batch_size'"):
        request_from_options(ExtractionRequest, {**base, "batchsize": 8})
    with pytest.raises(ConfigError, match=r"blocks\[0\]: Expected a positive integer for batch_"):
        request_from_options(ExtractionRequest, {**base, "batch_size": 0}, where="blocks[0]")
    with pytest.raises(ConfigError, match="lease_ttl_s > 0"):
        request_from_options(ExtractionRequest, {**base, "lease_ttl_s": 0})
    probe = request_from_options(ProbeRequest, {**base, "kind": "fewshot", "shots": "1, 2,4"})
    assert probe.shots == (1, 2, 4)
    tuned = request_from_options(FinetuneRequest, {**base, "method": "lora", "lora_targets": "a,b"})
    assert tuned.lora_targets == ("a", "b")
    with pytest.raises(ConfigError, match="unknown finetuning method 'lroa'; did you mean 'lora'"):
        request_from_options(FinetuneRequest, {**base, "method": "lroa"})


def _pipeline(tmp_path: Path, **block: object) -> Path:
    doc = {
        "name": "x",
        "datasets": ["demo"],
        "blocks": [
            {"name": "b", "models": ["test/tiny-dinov3-vit"], "resolutions": [224], **block}
        ],
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_pipeline_takes_every_request_option(tmp_path: Path) -> None:
    path = _pipeline(
        tmp_path,
        extract={"workers": 0, "compile": True, "lease_ttl_s": 5.0, "shard": "auto"},
        probes=[{"kind": "knn", "ks": [10, 20]}, {"kind": "linear", "max_iter": 50}],
        finetune=[
            {"method": "lora", "lora_r": 8, "num_workers": 0},
            {"method": "bitfit", "options": {"warmup": 0.2}},  # the older nested form
        ],
    )
    steps = expand(load_pipeline(path))
    extract, knn, linear, lora, bitfit = (s.request() for s in steps)
    assert (extract.num_workers, extract.compile, extract.lease_ttl_s) == (0, True, 5.0)
    assert extract.shard == "auto" and extract.snap_resolution is True
    assert knn.ks == (10, 20) and linear.max_iter == 50
    assert (lora.lora_r, lora.num_workers, lora.method) == (8, 0, "lora")
    assert bitfit.warmup == 0.2


def test_a_pipeline_reports_bad_option_values_with_their_keys(tmp_path: Path) -> None:
    path = _pipeline(
        tmp_path,
        extract={"batch_size": 0},
        probes=[{"kind": "knn", "ks": []}],
        finetune=[{"method": "lora", "lora_r": 8, "options": {"lora_r": 4}}],
    )
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    for part in (
        "blocks[0].extract: Expected a positive integer for batch_size",
        "blocks[0].probes[0]: Expected n_boot >= 1, draws >= 1 and non-empty ks",
        "blocks[0].finetune[0].options.lora_r: also set at the step's top level",
    ):
        assert part in message, (part, message)


def test_a_convnext_pipeline_may_probe_pooled_plus_mean(tmp_path: Path) -> None:
    """`embedkit probe` accepts pooled+mean on a ConvNeXt (its default there); so does a
    pipeline."""
    path = _pipeline(
        tmp_path,
        models=["dinov3/convnext-base"],
        probes=[{"kind": "linear", "pooling": "pooled+mean"}],
    )
    steps = expand(load_pipeline(path))
    assert [s.request().pooling for s in steps if s.action == "probe"] == ["pooled+mean"]
