"""Every command's `--help`: help text on every option, one name per thing across commands,
conventional metavars, and `embedkit --version`."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

import pytest
import typer
from typer._click.core import Command, Context, Parameter
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from embedkit.cli import app

runner = CliRunner()


def _commands() -> Iterator[tuple[str, Command]]:
    root = typer.main.get_command(app)
    stack: list[tuple[str, Command]] = [("", root)]
    while stack:
        path, command = stack.pop()
        yield path, command
        if isinstance(command, TyperGroup):
            ctx = Context(command)
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                stack.append((f"{path} {name}".strip(), sub))


COMMANDS = sorted(_commands(), key=lambda item: item[0])


def _params(command: Command) -> list[Parameter]:
    return [p for p in command.get_params(Context(command)) if p.name != "help"]


def test_the_walk_finds_every_command() -> None:
    names = {path for path, _ in COMMANDS}
    assert {"extract", "probe", "finetune", "run", "report", "demo", "models"} <= names
    assert {"manifest check", "cache ls", "cache push", "cache pull"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[p or "embedkit" for p, _ in COMMANDS])
def test_every_option_has_help_text(path: str, command: Command) -> None:
    missing = [
        "/".join(p.opts) for p in _params(command) if not (getattr(p, "help", None) or "").strip()
    ]
    assert not missing, f"embedkit {path}: options without help text: {missing}"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[p or "embedkit" for p, _ in COMMANDS])
def test_help_shows_conventional_metavars(path: str, command: Command) -> None:
    result = runner.invoke(app, [*path.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    typer_types = r"<(?:bool|str|int|float|file|path|directory|(?:int|float) range|list\[.*?\])>"
    odd = sorted(set(re.findall(typer_types, result.output)))
    assert not odd, f"embedkit {path} --help shows {odd}; use TEXT, INTEGER, PATH, ..."


def _long(param: Parameter) -> set[str]:
    return {o for o in [*param.opts, *getattr(param, "secondary_opts", [])] if o.startswith("--")}


def test_one_name_per_thing_across_commands() -> None:
    """An option of the same name is spelled the same everywhere (they share a long flag), and a
    short flag always stands for the same long flag."""
    by_name: dict[str, list[tuple[str, set[str]]]] = defaultdict(list)
    by_short: dict[str, list[tuple[str, set[str]]]] = defaultdict(list)
    for path, command in COMMANDS:
        for param in _params(command):
            if not isinstance(param, TyperOption):
                continue
            flags = _long(param)
            by_name[str(param.name)].append((path, flags))
            for short in (o for o in param.opts if not o.startswith("--")):
                by_short[short].append((path, flags))
    problems = []
    for table, what in ((by_name, "option"), (by_short, "short flag")):
        for key, uses in table.items():
            if not set.intersection(*(flags for _, flags in uses)):
                problems.append(f"{what} {key}: {uses}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        ("manifest", {"--manifest", "-m"}),
        ("cache", {"--cache", "-c"}),
        ("num_workers", {"--workers", "--num-workers"}),
        ("workers", {"--workers", "--num-workers"}),
        ("model", {"--model"}),
        ("results", {"--results"}),
    ],
)
def test_the_same_things_have_the_same_names(name: str, flags: set[str]) -> None:
    uses = [
        (path, set(p.opts) | set(getattr(p, "secondary_opts", [])))
        for path, command in COMMANDS
        for p in _params(command)
        if p.name == name and isinstance(p, TyperOption)
    ]
    assert uses
    for path, opts in uses:
        assert flags <= opts, f"embedkit {path}: {name} is {sorted(opts)}, expected {sorted(flags)}"


def test_every_command_that_reads_a_manifest_takes_m() -> None:
    for path, command in COMMANDS:
        params = _params(command)
        if any(isinstance(p, TyperArgument) and p.name == "manifest_arg" for p in params):
            assert any(p.name == "manifest" and "-m" in p.opts for p in params), path


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"embedkit {version('embedkit')}"


def test_model_has_a_short_flag_where_it_names_the_encoder() -> None:
    for path in ("extract", "probe", "finetune", "demo"):
        command = dict(COMMANDS)[path]
        (model,) = [p for p in _params(command) if p.name == "model"]
        assert "-M" in model.opts, path
