"""docs/extending.md stays true: each section's Python blocks run, in order, in a fresh process,
followed by a check that uses what they registered the way a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _sections() -> dict[str, str]:
    """Section title -> its Python code blocks, joined."""
    code: dict[str, str] = {}
    title = ""
    in_block = False
    lines: list[str] = []
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.strip() == "```python":
            in_block, lines = True, []
        elif line.strip() == "```" and in_block:
            in_block = False
            code[title] = code.get(title, "") + "\n".join(lines) + "\n\n"
        elif in_block:
            lines.append(line)
    return code


SECTIONS = _sections()

CHECKS = {
    "An encoder family": """
        from embedkit.extract import ExtractionRequest, extract
        from embedkit.models import get_family, get_spec
        from embedkit.models.throughput import flops_per_image, shape_from_spec

        request = ExtractionRequest(
            model="test/tiny-deit", dataset="demo", resolution=64, num_workers=0, unit_rows=8,
            patch_tokens=True,
        )
        entry = extract(request, manifest=MANIFEST, model_cache_dir=MODEL_CACHE).entry
        assert entry.read("cls").shape == (24, 32), entry.read("cls").shape
        # 64 px / patch 16: a 4 x 4 grid, the distillation token left out
        assert entry.read("patch").shape == (24, 4, 4, 32), entry.read("patch").shape
        assert flops_per_image(shape_from_spec(get_spec("test/tiny-deit")), 64) > 0
        assert get_family("deit").lora_targets == ("q_proj", "v_proj")
        print("OK")
    """,
    "A probe kind": """
        from embedkit.extract import ExtractionRequest, extract
        from embedkit.probes.run import run_probe

        request = ExtractionRequest(
            model="test/tiny-vit", dataset="demo", resolution=64, num_workers=0, unit_rows=8
        )
        extract(request, manifest=MANIFEST, model_cache_dir=MODEL_CACHE)
        outcome = run_probe(
            ProbeRequest(kind="centroid", model="test/tiny-vit", dataset="demo", resolution=64,
                         n_boot=50),
            manifest=MANIFEST, results=RESULTS,
        )
        assert outcome.record.kind == "centroid", outcome.record.kind
        assert 0.0 <= outcome.record.metrics["macro_auroc"]["point"] <= 1.0
        print("OK")
    """,
    "A storage backend": """
        from embedkit.extract import ExtractionRequest, extract
        from embedkit.store import CacheRoot, list_entries

        request = ExtractionRequest(
            model="test/tiny-vit", dataset="demo", resolution=64, num_workers=0, unit_rows=8
        )
        result = extract(request, manifest=MANIFEST, cache="scratch://team/cache",
                         model_cache_dir=MODEL_CACHE)
        assert (Path(os.environ["SCRATCH"]) / "team" / "cache" / result.entry.relpath).is_dir()
        (summary,) = list_entries(CacheRoot.from_uri("scratch://team/cache"))
        assert summary.complete and summary.model == "test/tiny-vit"
        print("OK")
    """,
    "A report plot": """
        from embedkit.extract import ExtractionRequest, extract
        from embedkit.probes.request import ProbeRequest
        from embedkit.probes.run import run_probe
        from embedkit.report import build_report

        request = ExtractionRequest(
            model="test/tiny-vit", dataset="demo", resolution=64, num_workers=0, unit_rows=8
        )
        extract(request, manifest=MANIFEST, model_cache_dir=MODEL_CACHE)
        run_probe(
            ProbeRequest(kind="knn", model="test/tiny-vit", dataset="demo", resolution=64,
                         n_boot=50),
            manifest=MANIFEST, results=RESULTS,
        )
        files = build_report(RESULTS, Path(RESULTS).parent / "report", n_boot=50)
        names = [Path(f).name for f in files.files]
        assert "test_positives_demo.png" in names, names
        print("OK")
    """,
}


def test_every_python_section_has_a_check() -> None:
    assert set(SECTIONS) == set(CHECKS), set(SECTIONS) ^ set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(CHECKS))
def test_worked_example_runs(
    section: str, demo_manifest: Path, model_cache: Path, tmp_path: Path
) -> None:
    preamble = (
        "import os\nfrom pathlib import Path\n"
        f"MANIFEST = {str(demo_manifest)!r}\nMODEL_CACHE = {str(model_cache)!r}\n"
        f"RESULTS = {str(tmp_path / 'results')!r}\n"
    )
    program = preamble + SECTIONS[section] + textwrap.dedent(CHECKS[section])
    env = {**os.environ, "SCRATCH": str(tmp_path / "scratch"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"{section}:\n{proc.stdout}\n{proc.stderr}"
    )


def test_sections_name_only_modules_that_exist() -> None:
    for module in set(re.findall(r"`(embedkit/[\w/]+\.py)`", DOC.read_text())):
        assert (DOC.parents[1] / module).is_file(), module
