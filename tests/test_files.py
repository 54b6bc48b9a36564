"""phitrain.files: the one atomic-write helper every writer uses (files and directories)."""

from __future__ import annotations

import numpy as np
import pytest

from phitrain.files import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_writes_replace_whole_files_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "stats.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "x.npy") as tmp, tmp.open("wb") as f:
        assert not (tmp_path / "x.npy").exists()                  # not visible under its name until complete
        assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("x*"))
        np.save(f, np.arange(3))
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "stats.json", "sub", "x.npy"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "exercises.jsonl"
    atomic_write_text(target, "complete\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["exercises.jsonl"]


def test_atomic_directory_replaces_or_keeps_the_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
        raise KeyboardInterrupt
    assert (target / "a").read_text() == "1"
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
