"""A CLI start stays cheap: importing the CLI and every ``--help`` load none of the heavy packages.

Each check runs in a fresh interpreter, since this test session has long imported them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

#: Packages that take seconds to import; a CLI start must not pay for them.
HEAVY = ("torch", "transformers", "scipy", "pandas", "sklearn", "peft")

# Walks the typer app's command tree, runs `<command> --help` for every command and group, then
# reports the exit codes and which heavy packages got imported on the way.
_EVERY_HELP = """
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from embedkit.cli import app

def walk(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
        yield from walk(sub, [*path, name])

runner = CliRunner()
codes = {}
for path in walk(get_command(app), []):
    result = runner.invoke(app, [*path, "--help"])
    codes[" ".join(path)] = [result.exit_code, result.output[:200] + repr(result.exception)]
heavy = sorted(m for m in %r if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_importing_the_cli_loads_no_heavy_package() -> None:
    proc = _python(
        "-c",
        f"import sys, embedkit.cli; print([m for m in {HEAVY!r} if m in sys.modules])",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"`import embedkit.cli` imported {proc.stdout.strip()}"


def test_python_m_embedkit_help_exits_0() -> None:
    proc = _python("-m", "embedkit", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("extract", "probe", "finetune", "models", "manifest", "cache", "demo"):
        assert command in proc.stdout


def test_every_command_help_works_without_heavy_packages() -> None:
    proc = _python("-c", _EVERY_HELP % (HEAVY,))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    codes = report["codes"]
    # the walk reached the nested groups, not just the top level
    assert {"", "extract", "probe", "finetune", "manifest check", "cache ls", "cache gc"} <= set(
        codes
    )
    failed = {path: detail for path, (code, detail) in codes.items() if code != 0}
    assert not failed, f"--help failed for: {failed}"
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


def test_the_registries_and_option_sets_load_without_heavy_packages() -> None:
    code = (
        "import sys\n"
        "from embedkit.data.policies import OnBadImage, ResizeMode\n"
        "from embedkit.models.policies import ComputeDtype, DeviceMap, ShardMode\n"
        "from embedkit.extract.request import ExtractionRequest\n"
        "from embedkit.finetune.methods import METHOD_NAMES\n"
        "from embedkit.probes.registry import registered_kinds\n"
        "from embedkit.models import get_spec\n"
        "print(','.join(METHOD_NAMES), ','.join(registered_kinds()),\n"
        "      get_spec('dinov2/base').name)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr
    names, heavy = proc.stdout.splitlines()
    assert names == "full,lora,bitfit,linear linear,knn,fewshot,sgd,segmentation dinov2/base"
    assert heavy == "[]"


def test_listing_the_models_loads_no_heavy_package() -> None:
    """`embedkit models` reads the registry: facts, no weights, no torch."""
    program = (
        "import sys\nfrom typer.testing import CliRunner\nfrom embedkit.cli import app\n"
        "result = CliRunner().invoke(app, ['models'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'dinov3/vit7b16' in result.output, result.output\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    proc = _python("-c", program)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("[]"), f"`embedkit models` imported {proc.stdout}"
