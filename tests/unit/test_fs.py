"""distrib.fs: what a crash in the middle of a write leaves behind."""

from pathlib import Path

import pytest

from distrib import fs


def test_publishing_a_directory_replaces_the_old_one_whole(tmp_path: Path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with fs.publishing(final) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").read_text() == "old"  # readers still see the old version
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_failed_publish_removes_its_temporary_and_keeps_the_old_version(tmp_path: Path):
    final = tmp_path / "hf"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with fs.publishing(final) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (final / "old.txt").read_text() == "old"


def test_atomic_write_text_leaves_the_whole_old_text_or_the_whole_new_one(tmp_path: Path, monkeypatch):
    path = tmp_path / "latest"
    fs.atomic_write_text(path, "step_1")
    real_replace = fs.os.replace

    def crash(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fs.os, "replace", crash)
    with pytest.raises(OSError):
        fs.atomic_write_text(path, "step_2")
    monkeypatch.setattr(fs.os, "replace", real_replace)
    assert path.read_text() == "step_1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    fs.atomic_write_text(path, "step_2")
    assert path.read_text() == "step_2"
