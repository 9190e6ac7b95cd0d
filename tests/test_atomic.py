"""Atomic replacement of records, checkpoints and memos: whole files, readable by the team."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedkit.atomic import atomic_write, shared_mode


def test_new_file_gets_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    target = tmp_path / "sub" / "record.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert target.read_text() == "{}"
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == shared_mode()


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("old"))

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["record.json"]
