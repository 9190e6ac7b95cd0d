"""The command line as users call it: exit codes, messages, and the demo end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedkit.cli import app, main
from embedkit.errors import IntegrityError
from embedkit.store import CacheRoot, FeatureEntry
from embedkit.store.layout import COMPLETE_FILE

runner = CliRunner()


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run through `main` (which turns user errors into exit 2) and capture everything."""
    import sys

    old = sys.argv
    sys.argv = ["embedkit", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("extract", "models", "demo", "manifest", "cache"):
        assert command in result.output


def test_models_lists_the_registry() -> None:
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    assert '"dinov3/vit7b16"' in result.output and '"dinov3-7b"' in result.output


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-demo") / "demo"
    result = runner.invoke(
        app,
        ["demo", "--out", str(out), "--patients", "20", "--size", "96", "--workers", "0"],
        env={"XDG_CACHE_HOME": str(out.parent / "xdg"), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output and "224px" in result.output and "512px" in result.output
    return out


def test_demo_builds_checks_and_extracts_two_resolutions(demo_run: Path) -> None:
    entries = sorted(p.name for p in demo_run.glob("cache/demo/*/*.zarr"))
    # 224 and 512 px, and 224 px with patch tokens for the segmentation probe
    assert [e[:6] for e in entries] == ["224px-", "224px-", "512px-"]
    assert all((p / COMPLETE_FILE).is_file() for p in demo_run.glob("cache/demo/*/*.zarr"))


def test_cache_ls_info_verify_and_corruption(
    demo_run: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    manifest = str(demo_run / "manifest.yaml")
    code, output = _run(["cache", "ls", "--manifest", manifest], capsys)
    assert code == 0 and output.count("complete") == 3
    code, output = _run(["cache", "ls", "--json", "--manifest", manifest], capsys)
    rows = json.loads(output)
    assert code == 0 and sorted(r["resolution"] for r in rows) == [224, 224, 512]
    code, output = _run(["cache", "info", rows[0]["digest"][:8], "--manifest", manifest], capsys)
    assert code == 0 and "test/tiny-dinov3-vit" in output
    code, output = _run(["cache", "verify", "--manifest", manifest], capsys)
    assert code == 0 and "3 ok, 0 with problems" in output

    # Flip bytes of one stored chunk behind the store's back: verify must name the entry.
    chunk = next(p for p in (demo_run / "cache").rglob("cls/c.*") if p.is_file())
    good = chunk.read_bytes()

    def restore() -> None:  # the demo cache is shared by the module's tests
        chunk.write_bytes(good)

    request.addfinalizer(restore)
    data = bytearray(chunk.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    chunk.write_bytes(bytes(data))
    code, output = _run(["cache", "verify", "--manifest", manifest], capsys)
    assert code == 1 and "1 with problems" in output and "BAD" in output
    assert "cannot be decoded" in output or "checksum mismatch" in output
    # Readers never hand out a damaged chunk (here: truncated); they raise an IntegrityError
    # (every read is checked against the unit records, see tests/store/test_store_integrity.py).
    chunk.write_bytes(bytes(data[:-8]))
    entry = FeatureEntry.open(CacheRoot.from_uri(str(demo_run / "cache")), str(chunk.parents[1]))
    with pytest.raises(IntegrityError):
        entry.read("cls")


@pytest.fixture
def damaged_cache(demo_run: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A private copy of the demo's clean cache: (root, entry directories), to damage."""
    cache = tmp_path / "cache"
    shutil.copytree(demo_run / "cache", cache)
    entries = sorted(cache.glob("demo/*/*.zarr"))
    root = CacheRoot.from_uri(str(cache))
    assert all(not FeatureEntry.open(root, str(e)).verify() for e in entries)
    return cache, entries


def _first_chunk(entry: Path, array: str = "cls") -> Path:
    return next(
        p for p in sorted((entry / array).rglob("*")) if p.is_file() and p.name != "zarr.json"
    )


@pytest.mark.parametrize("damage", ["bad json", "bad array metadata", "missing array"])
def test_cache_verify_survives_anything_in_one_entry(
    damaged_cache: tuple[Path, list[Path]], damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, (bad, good, *_) = damaged_cache
    if damage == "bad json":
        (bad / "zarr.json").write_text("{")
    elif damage == "bad array metadata":
        (bad / "cls" / "zarr.json").write_text('{"zarr_format": 3, "shape": "x"}')
    else:
        shutil.rmtree(bad / "valid")
    code, output = _run(["cache", "verify", "--cache", str(cache)], capsys)
    assert code == 1 and "2 ok, 1 with problems" in output and "Traceback" not in output
    assert f"ok  {good.relative_to(cache).as_posix()}" in output
    assert "embedkit cache repair" in output
    digest = bad.name.rsplit("-", 1)[-1].removesuffix(".zarr")[:8]
    code, output = _run(["cache", "verify", digest, "--cache", str(cache)], capsys)
    assert code == 1 and "0 ok, 1 with problems" in output and "Traceback" not in output


def test_cache_repair_restores_a_flipped_chunk_from_the_cli(
    damaged_cache: tuple[Path, list[Path]],
    demo_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_run.parent / "xdg"))  # the demo's models
    cache, (entry, *_) = damaged_cache
    chunk = _first_chunk(entry)
    good = chunk.read_bytes()
    chunk.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    args = ["--cache", str(cache), "--manifest", str(demo_run / "manifest.yaml")]
    code, output = _run(["cache", "verify", *args], capsys)
    assert code == 1 and "checksum mismatch" in output
    code, output = _run(["cache", "repair", entry.relative_to(cache).as_posix(), *args], capsys)
    assert code == 0, output
    assert "repaired" in output and "Traceback" not in output
    assert chunk.read_bytes() == good
    code, output = _run(["cache", "verify", *args], capsys)
    assert code == 0 and "3 ok, 0 with problems" in output


def test_probe_on_a_damaged_entry_exits_non_zero_naming_the_repair(
    damaged_cache: tuple[Path, list[Path]],
    demo_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache, entries = damaged_cache
    # the 224 px entry a kNN probe reads: the one without patch tokens (the other is the
    # segmentation step's)
    entry = next(e for e in entries if e.name.startswith("224px-") and not (e / "patch").exists())
    _first_chunk(entry).unlink()  # a deleted chunk: never read as zeros
    model = json.loads((entry / "zarr.json").read_text())["attributes"]["key"]["model"]
    code, output = _run(
        [
            "probe",
            "--kind",
            "knn",
            "--model",
            model,
            "-d",
            "demo",
            "-r",
            "224",
            "--pooling",
            "cls",
            "--n-boot",
            "10",
            "--out",
            str(tmp_path / "results"),
            "--cache",
            str(cache),
            "--manifest",
            str(demo_run / "manifest.yaml"),
        ],
        capsys,
    )
    text = " ".join(output.split())
    assert code != 0 and "Traceback" not in output, output
    assert "is damaged" in text and "embedkit cache repair" in text and "missing" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "dinov3/vitb61", "--resolution", "224"], "did you mean 'dinov3/vitb16'"),
        (
            ["--model", "test/tiny-dinov2", "--resolution", "512", "--no-snap-resolution"],
            "nearest valid: 504 or 518",
        ),
        (
            ["--model", "test/tiny-dinov3-vit", "--resolution", "224", "-d", "nih"],
            "no dataset 'nih'",
        ),
    ],
)
def test_user_errors_exit_2_with_the_fix_and_no_traceback(
    demo_run: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    full = ["extract", "--manifest", str(demo_run / "manifest.yaml"), *args]
    if "-d" not in args:
        full += ["--dataset", "demo"]
    code, output = _run(full, capsys)
    assert code == 2
    assert message in " ".join(output.split())
    assert "Traceback" not in output


def test_extract_snaps_the_resolution_by_default_and_says_so(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--manifest", str(demo_run / "manifest.yaml"), "--cache", str(tmp_path / "cache")]
    args = ["extract", *cache, "-d", "demo", "--model", "test/tiny-dinov2", "-r", "64"]
    code, output = _run([*args, "--workers", "0", "--unit-rows", "32"], capsys)
    assert code == 0, output
    assert "resolution 64 is not a multiple of the model's patch size; used 70" in output
    code, output = _run(["cache", "ls", "--json", *cache], capsys)
    assert [r["resolution"] for r in json.loads(output)] == [70]  # nearest multiple of 14


def test_manifest_check_reports_and_fails_on_a_broken_manifest(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, output = _run(["manifest", "check", str(demo_run / "manifest.yaml")], capsys)
    assert code == 0 and "Cardiomegaly" in output
    broken = tmp_path / "broken.yaml"
    broken.write_text((demo_run / "manifest.yaml").read_text().replace("separator", "seperator"))
    code, output = _run(["manifest", "check", str(broken)], capsys)
    assert code == 2 and "did you mean 'separator'" in output and "Traceback" not in output


def test_probe_finds_the_entry_extract_snapped(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`probe -r 64` reads what `extract -r 64 --snap-resolution` stored at 70 (DINOv2, patch
    14), by the same snapping rule."""
    cache = ["--manifest", str(demo_run / "manifest.yaml"), "--cache", str(tmp_path / "cache")]
    model = ["-d", "demo", "--model", "test/tiny-dinov2", "-r", "64"]
    code, output = _run(["extract", *cache, *model, "--workers", "0", "--snap-resolution"], capsys)
    assert code == 0, output
    probe = ["probe", *cache, *model, "-k", "knn", "--n-boot", "20", "--ks", "1,3"]
    code, output = _run([*probe, "--results", str(tmp_path / "results")], capsys)
    assert code == 0, output
    assert "reading the entry extracted at 70" in " ".join(output.split())
    assert list((tmp_path / "results").rglob("*.json"))


def test_manifest_check_takes_m_like_every_other_command(
    demo_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = str(demo_run / "manifest.yaml")
    code, output = _run(["manifest", "check", "-m", manifest, "-d", "demo"], capsys)
    assert code == 0 and "Cardiomegaly" in output
    code, output = _run(["manifest", "check", "--manifest", manifest], capsys)
    assert code == 0 and "Cardiomegaly" in output


def test_epoch_lines_are_formatted() -> None:
    from embedkit.finetune.train import EpochLog
    from embedkit.study.display import epoch_line

    log = EpochLog(epoch=1, train_loss=0.9855625629425049, val_loss=0.5, lr=1e-5, seconds=3.21)
    line = epoch_line(log, 20)
    assert line == (
        "epoch 1/20: train loss 0.9856, val loss 0.5000, lr 1.00e-05 (3.2 s; checkpoint saved)"
    )
    assert "EpochLog" not in line


def test_push_of_an_entry_the_target_holds_complete_is_a_no_op(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = ["--manifest", str(demo_run / "manifest.yaml")]
    code, output = _run(["cache", "ls", "--json", *manifest], capsys)
    digest = json.loads(output)[0]["digest"][:12]
    target = str(tmp_path / "copy")
    code, output = _run(["cache", "push", digest, *manifest, "--to", target], capsys)
    assert code == 0, output
    assert "verified" in output
    code, output = _run(["cache", "push", digest, *manifest, "--to", target], capsys)
    assert code == 0, output
    assert "already there" in output and "nothing to copy" in " ".join(output.split())
