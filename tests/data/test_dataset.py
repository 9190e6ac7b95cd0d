"""ImageDataset, collate, make_loader and read_all over real PNG files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.data.dataset import Batch, ImageDataset, Sample, collate, make_loader, read_all
from embedkit.data.transforms import Preprocessing
from embedkit.errors import BadImagesError, ManifestError

WritePng = Callable[..., Path]
PRE = Preprocessing(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # identity normalisation


def _constant_pngs(write_png: WritePng, n: int) -> tuple[list[str], list[Path]]:
    """n 16x12 PNGs; image k is constant k * 20 (so it is recognisable after resizing)."""
    ids = [f"img{k:02d}" for k in range(n)]
    paths = [
        write_png(f"{i}.png", np.full((16, 12), k * 20, dtype=np.uint8)) for k, i in enumerate(ids)
    ]
    return ids, paths


def _corrupt(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:40])
    return path


def test_loader_with_workers_yields_ordered_batches(write_png: WritePng) -> None:
    ids, paths = _constant_pngs(write_png, 7)
    loader = make_loader(ImageDataset(ids, paths, PRE), batch_size=3, num_workers=2)
    batches = list(loader)
    assert [len(b.ids) for b in batches] == [3, 3, 1]
    assert [i for b in batches for i in b.ids] == ids
    indices = torch.cat([b.indices for b in batches])
    assert indices.dtype == torch.int64
    assert indices.tolist() == list(range(7))
    pixels = torch.cat([b.pixels for b in batches])
    assert pixels.shape == (7, 3, 8, 8)
    expected = torch.tensor([k * 20 / 255 for k in range(7)]).view(7, 1, 1, 1).expand(-1, 3, 8, 8)
    torch.testing.assert_close(pixels, expected)
    assert all(b.ok.all() for b in batches)


def test_loader_over_a_subset_keeps_the_given_order(write_png: WritePng) -> None:
    ids, paths = _constant_pngs(write_png, 6)
    loader = make_loader(
        ImageDataset(ids, paths, PRE), batch_size=2, num_workers=0, indices=[4, 1, 5]
    )
    batches = list(loader)
    assert torch.cat([b.indices for b in batches]).tolist() == [4, 1, 5]
    assert [i for b in batches for i in b.ids] == ["img04", "img01", "img05"]


def test_a_bad_image_fails_only_its_own_sample(write_png: WritePng, tmp_path: Path) -> None:
    ids, paths = _constant_pngs(write_png, 4)
    _corrupt(paths[2])
    batch = next(iter(make_loader(ImageDataset(ids, paths, PRE), batch_size=4, num_workers=0)))
    assert batch.ok.tolist() == [True, True, False, True]
    assert batch.errors[2].startswith(str(paths[2]))
    assert "img02.png" in batch.errors[2]
    assert [e for k, e in enumerate(batch.errors) if k != 2] == ["", "", ""]
    assert (batch.pixels[2] == 0).all()
    assert (batch.pixels[3] > 0).all()


def test_missing_file_is_a_failed_sample(tmp_path: Path) -> None:
    sample = ImageDataset(["a"], [tmp_path / "absent.png"], PRE)[0]
    assert not sample.ok
    assert "absent.png: no such file" in sample.error
    assert sample.pixels.shape == (3, 8, 8)


def test_collate_stacks_in_order() -> None:
    samples = [
        Sample(torch.full((3, 2, 2), float(k)), k + 10, f"s{k}", k != 1, "bad" if k == 1 else "")
        for k in range(3)
    ]
    batch = collate(samples)
    assert batch.pixels[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch.indices.tolist() == [10, 11, 12]
    assert batch.ok.dtype == torch.bool
    assert batch.ok.tolist() == [True, False, True]
    assert batch.errors == ["", "bad", ""]


def test_batch_pin_memory_pins_every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: list[int] = []

    def fake_pin(self: torch.Tensor) -> torch.Tensor:  # no accelerator on CI to really pin
        copy = self.clone()
        pinned.append(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = collate([Sample(torch.ones(3, 2, 2), 0, "a", True, "")])
    copy = batch.pin_memory()
    assert isinstance(copy, Batch)
    assert {id(copy.pixels), id(copy.indices), id(copy.ok)} == set(pinned)
    assert copy.ids == ["a"]
    torch.testing.assert_close(copy.pixels, batch.pixels)


def test_read_all_fail_lists_every_bad_image(write_png: WritePng, tmp_path: Path) -> None:
    ids, paths = _constant_pngs(write_png, 5)
    _corrupt(paths[1])
    paths[3] = tmp_path / "gone.png"
    with pytest.raises(BadImagesError) as info:
        read_all(ids, paths, PRE, on_bad_image="fail", batch_size=2)
    assert [image_id for image_id, _ in info.value.failures] == ["img01", "img03"]
    assert "2 of 5 images could not be read" in str(info.value)
    assert "img01.png" in str(info.value)
    assert "gone.png" in str(info.value)


def test_read_all_skip_returns_the_good_ones_and_the_reasons(
    write_png: WritePng, tmp_path: Path
) -> None:
    ids, paths = _constant_pngs(write_png, 5)
    _corrupt(paths[0])
    _corrupt(paths[4])
    pixels, skipped = read_all(ids, paths, PRE, on_bad_image="skip", batch_size=2)
    assert pixels.shape == (3, 3, 8, 8)
    assert pixels[:, 0, 0, 0].tolist() == pytest.approx([20 / 255, 40 / 255, 60 / 255])
    assert [image_id for image_id, _ in skipped] == ["img00", "img04"]
    assert "corrupt or truncated" in skipped[0][1]


def test_read_all_with_nothing_readable(tmp_path: Path) -> None:
    pixels, skipped = read_all(["x"], [tmp_path / "x.png"], PRE, on_bad_image="skip")
    assert pixels.shape == (0, 3, 8, 8)
    assert len(skipped) == 1


def test_read_all_refuses_an_unknown_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'fail' or 'skip', got 'ignore' instead"):
        read_all([], [], PRE, on_bad_image="ignore")  # type: ignore[arg-type]


def test_ids_and_paths_must_match(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="got 2 ids and 1 paths instead"):
        ImageDataset(["a", "b"], [tmp_path / "a.png"], PRE)
